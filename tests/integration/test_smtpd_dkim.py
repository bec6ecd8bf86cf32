"""DKIM verification (RFC 6376) and DMARC (RFC 7489) on receipt: a real DNS
server on loopback publishing DKIM keys, SPF and DMARC records; messages signed
by dkimpy (an independent signer); the one Authentication-Results: header read
back with python3-authres; enforce; a big message in bounded memory."""

from __future__ import annotations

import base64
import os
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import authres  # type: ignore[import-untyped]
import authres.dmarc  # type: ignore[import-untyped]
import dkim  # type: ignore[import-untyped]
import pytest

from tests.conftest import Instance, Processes, free_port, program, wait_for
from tests.integration.dnsserver import dns_server

AUTHRES = authres.FeatureContext(authres.dmarc)  # the dmarc method's header.from


def auth_results(raw: bytes) -> list[Any]:
    """Every Authentication-Results: field of ``raw``, parsed by python3-authres."""
    head = raw.partition(b"\n\n")[0].decode().replace("\n\t", " ").split("\n")
    return [AUTHRES.parse(f) for f in head if f.lower().startswith("authentication-results:")]


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    """(a private key PEM, its DKIM key record), made by openssl."""
    d = tmp_path_factory.mktemp("dkim-key")
    subprocess.run(
        ["openssl", "genrsa", "-out", str(d / "k.pem"), "2048"], check=True, capture_output=True
    )
    der = subprocess.run(
        ["openssl", "rsa", "-in", str(d / "k.pem"), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    return (d / "k.pem").read_bytes(), "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def dns_port(key: tuple[bytes, str]) -> Iterator[int]:
    zone: dict[str, list[tuple[Any, ...]]] = {
        "sel._domainkey.signed.test": [("TXT", key[1])],
        "_dmarc.signed.test": [("TXT", "v=DMARC1; p=reject")],
        "pass.test": [("TXT", "v=spf1 ip4:127.0.0.1 -all")],
        "_dmarc.pass.test": [("TXT", "v=DMARC1; p=reject; adkim=s")],
        "fail.test": [("TXT", "v=spf1 -all")],
        "_dmarc.quarantine.test": [("TXT", "v=DMARC1; p=quarantine")],
        "sel._domainkey.quarantine.test": [("TXT", key[1])],
        # pct= (RFC 7489 §6.6.4): the share of failures the policy applies to
        "_dmarc.pct0.test": [("TXT", "v=DMARC1; p=reject; pct=0")],
        "_dmarc.pct50.test": [("TXT", "v=DMARC1; p=reject; pct=50")],
        "_dmarc.pct100.test": [("TXT", "v=DMARC1; p=reject; pct=100")],
        "_dmarc.qpct0.test": [("TXT", "v=DMARC1; p=quarantine; pct=0")],
    }
    servfail = ["_dmarc.broken.test", "sel._domainkey.broken.test"]
    with dns_server(zone, servfail) as (port, _resolver):
        yield port


def start(procs: Processes, base: Path, port: int, mode: str) -> tuple[Instance, int]:
    inst = Instance(
        base,
        relay_networks=["192.0.2.0/24"],  # 127.0.0.1 is an outside client here
        checks={"spf": "record", "dkim": mode, "dmarc": mode},
        queue={"idle_exit": "10m"},
        smtpd={"max_message_size": "64M"},
        remote={"dns": {"nameservers": ["127.0.0.1"], "port": port, "timeout": "2s"}},
    )
    smtp_port = free_port()
    inst.start(procs, listen=f"127.0.0.1:{smtp_port}")
    return inst, smtp_port


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory, dns_port: int) -> Iterator[Any]:
    procs = Processes()
    try:
        yield start(procs, tmp_path_factory.mktemp("dkim-record"), dns_port, "record")
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def enforcing(tmp_path_factory: pytest.TempPathFactory, dns_port: int) -> Iterator[Any]:
    procs = Processes()
    try:
        yield start(procs, tmp_path_factory.mktemp("dkim-enforce"), dns_port, "enforce")
    finally:
        procs.stop_all()


def message(from_: str, subject: str, body: bytes = b"Hello,\r\n\r\nthere.  \r\n\r\n\r\n") -> bytes:
    return (
        f"From: Someone <{from_}>\r\nTo: alice@example.org\r\nSubject: {subject}\r\n\r\n".encode()
        + body
    )


def sign(
    msg: bytes,
    key: bytes,
    domain: str = "signed.test",
    canon: tuple[bytes, bytes] = (b"relaxed", b"simple"),
    **kw: Any,
) -> bytes:
    sig = dkim.sign(
        msg,
        b"sel",
        domain.encode(),
        key,
        canonicalize=canon,
        include_headers=[b"from", b"to", b"subject"],
        **kw,
    )
    return bytes(sig) + msg


def send(port: int, sender: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
        smtp.ehlo("client.test")
        smtp.sendmail(sender, ["alice@example.org"], data)


def received(inst: Instance, subject: str) -> Any:
    """The one Authentication-Results: header of the delivered message, parsed."""
    mark = f"Subject: {subject}\n".encode()
    wait_for(lambda: any(mark in m for m in inst.messages("alice")), timeout=60)
    raw = next(m for m in inst.messages("alice") if mark in m)
    [header] = auth_results(raw)
    assert header.authserv_id == "mx.example.org"
    return header


def raw_field(inst: Instance, subject: str) -> str:
    """The Authentication-Results: field of the delivered message, unfolded."""
    received(inst, subject)
    mark = f"Subject: {subject}\n".encode()
    raw = next(m for m in inst.messages("alice") if mark in m)
    head = raw.partition(b"\n\n")[0].decode().replace("\n\t", " ").replace("\n ", " ")
    [field] = [f for f in head.split("\n") if f.lower().startswith("authentication-results:")]
    return field


def clauses(header: Any, method: str) -> list[Any]:
    return [c for c in header.results if c.method == method]


@pytest.mark.parametrize(
    ("canon", "length"),
    [
        ((b"relaxed", b"simple"), False),
        ((b"simple", b"simple"), False),
        ((b"relaxed", b"relaxed"), True),
        ((b"simple", b"relaxed"), True),
    ],
)
def test_signed_by_dkimpy_passes(
    recording: tuple[Instance, int],
    key: tuple[bytes, str],
    canon: tuple[bytes, bytes],
    length: bool,
) -> None:
    inst, port = recording
    subject = f"signed {canon} {length}"
    send(
        port,
        "a@fail.test",
        sign(message("a@signed.test", subject), key[0], canon=canon, length=length),
    )
    header = received(inst, subject)
    [d] = clauses(header, "dkim")
    assert (d.result, d.header_d, d.header_s, d.header_i) == (
        "pass",
        "signed.test",
        "sel",
        "@signed.test",
    )
    [spf] = clauses(header, "spf")
    assert spf.result == "fail"  # not aligned anyway: DMARC passes by DKIM
    [dm] = clauses(header, "dmarc")
    assert (dm.result, dm.header_from) == ("pass", "signed.test")


def test_signed_by_a_second_mailgrave_passes(
    recording: tuple[Instance, int],
    key: tuple[bytes, str],
    tmp_path: Path,
    processes: Processes,
) -> None:
    # A second MailGrave signs (dkim.sign, the module's key as signed.test's
    # "sel") what is injected on it and relays it to the recording one, which
    # finds dkim=pass and DMARC passing by that signature's alignment.
    inst, port = recording
    pem = tmp_path / "k.pem"
    pem.write_bytes(key[0])
    traditional = tmp_path / "signed.test.sel.key"  # PKCS#1, as dkim.sign wants it
    subprocess.run(
        ["openssl", "rsa", "-in", str(pem), "-traditional", "-out", str(traditional)],
        check=True,
        capture_output=True,
    )
    traditional.chmod(0o600)
    (tmp_path / "signer").mkdir()
    signer = Instance(
        tmp_path / "signer",
        hostname="signer.example.net",
        local_domains=["signer.example.net"],
        dkim={"sign": {"signed.test": {"selector": "sel", "key": str(traditional)}}},
        remote={"routes": {"example.org": f"[127.0.0.1]:{port}"}, "tls": "none"},
    )
    signer.settings["local"]["virtual"] = {}  # alice@example.org is the other one's
    signer.write_config()
    signer.start(processes)
    text = message("a@signed.test", "signed by a second mailgrave", b"Hello,  \r\n\r\n\r\n")
    res = signer.sendmail("-f", "a@signed.test", "alice@example.org", data=text)
    assert res.returncode == 0, res.stderr
    try:
        header = received(inst, "signed by a second mailgrave")
    except AssertionError:
        raise AssertionError(signer.log.read_text()[-3000:]) from None
    [d] = clauses(header, "dkim")
    assert (d.result, d.header_d, d.header_s) == ("pass", "signed.test", "sel")
    [dm] = clauses(header, "dmarc")
    assert (dm.result, dm.header_from) == ("pass", "signed.test")
    raw = next(m for m in inst.messages("alice") if b"signed by a second mailgrave" in m)
    assert raw.lower().count(b"\ndkim-signature:") == 1


def test_modified_message_fails_dkim_and_dmarc(
    recording: tuple[Instance, int], key: tuple[bytes, str]
) -> None:
    inst, port = recording
    signed = sign(message("a@signed.test", "modified body"), key[0])
    send(port, "a@fail.test", signed.replace(b"there.", b"THERE!"))
    signed = sign(message("a@signed.test", "modified subject"), key[0])
    send(
        port,
        "a@fail.test",
        signed.replace(b"From: Someone", b"From: Somebody"),  # a signed field
    )
    for subject in ("modified body", "modified subject"):
        header = received(inst, subject)
        assert [c.result for c in clauses(header, "dkim")] == ["fail"]
        [dm] = clauses(header, "dmarc")
        assert (dm.result, dm.header_from) == ("fail", "signed.test")  # recorded, not refused


def test_every_signature_and_length_respected(
    recording: tuple[Instance, int], key: tuple[bytes, str]
) -> None:
    """Two signatures, one of them with l=: appended text leaves the l= one valid."""
    inst, port = recording
    msg = message("a@quarantine.test", "two signatures")
    with_l = sign(msg, key[0], domain="quarantine.test", length=True)
    both = sign(with_l, key[0], domain="signed.test")  # over the whole body
    send(port, "a@fail.test", both + b"appended by a list\r\n")
    header = received(inst, "two signatures")
    got = sorted((c.header_d, c.result) for c in clauses(header, "dkim"))
    assert got == [("quarantine.test", "pass"), ("signed.test", "fail")]
    [dm] = clauses(header, "dmarc")
    assert (dm.result, dm.header_from) == ("pass", "quarantine.test")


def test_dmarc_by_aligned_spf_none_and_temperror(
    recording: tuple[Instance, int], key: tuple[bytes, str]
) -> None:
    inst, port = recording
    # relaxed SPF alignment: news.pass.test's organizational domain is pass.test,
    # whose policy applies (found at the organizational domain)
    send(port, "a@pass.test", message("b@news.pass.test", "aligned spf"))
    send(port, "a@pass.test", message("b@none.test", "no policy"))
    send(
        port,
        "a@pass.test",
        sign(message("b@broken.test", "dns trouble"), key[0], domain="broken.test"),
    )
    assert [(c.result, c.header_from) for c in clauses(received(inst, "aligned spf"), "dmarc")] == [
        ("pass", "news.pass.test")
    ]
    header = received(inst, "no policy")
    assert [c.result for c in clauses(header, "dmarc")] == ["none"]
    assert [c.result for c in clauses(header, "dkim")] == ["none"]
    header = received(inst, "dns trouble")
    assert [c.result for c in clauses(header, "dkim")] == ["temperror"]
    assert [c.result for c in clauses(header, "dmarc")] == ["temperror"]


def test_enforce_rejects_dmarc_failure_of_p_reject(
    enforcing: tuple[Instance, int], key: tuple[bytes, str]
) -> None:
    inst, port = enforcing
    forged = sign(message("a@signed.test", "forged"), key[0]).replace(b"there.", b"THERE!")
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(port, "a@fail.test", forged)
    assert info.value.smtp_code == 550 and info.value.smtp_error.startswith(b"5.7.1")
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(port, "a@fail.test", message("a@broken.test", "deferred"))
    assert info.value.smtp_code == 451 and info.value.smtp_error.startswith(b"4.7.5")
    # p=quarantine is recorded, not refused; a pass is delivered
    send(port, "a@fail.test", message("a@quarantine.test", "quarantined"))
    send(port, "a@fail.test", sign(message("a@signed.test", "enforced pass"), key[0]))
    [dm] = clauses(received(inst, "quarantined"), "dmarc")
    assert dm.result == "fail"
    [dm] = clauses(received(inst, "enforced pass"), "dmarc")
    assert dm.result == "pass"
    assert not any(b"Subject: forged" in m for m in inst.messages("alice"))
    assert inst.spool_entries() == []


def test_enforce_applies_p_reject_only_to_the_pct_sample(
    enforcing: tuple[Instance, int],
) -> None:
    # pct=0: never refused; the failure and what the policy came to (the next
    # lower one, quarantine: MailGrave has none, so delivered) in the header.
    inst, port = enforcing
    send(port, "a@fail.test", message("a@pct0.test", "pct zero"))
    [dm] = clauses(received(inst, "pct zero"), "dmarc")
    assert (dm.result, dm.header_from) == ("fail", "pct0.test")
    # (python3-authres drops comments: read the field itself)
    assert "dmarc=fail (p=reject pct=0 dis=quarantine) header.from=pct0.test" in raw_field(
        inst, "pct zero"
    )
    send(port, "a@fail.test", message("a@qpct0.test", "quarantine pct zero"))
    assert "dmarc=fail (p=quarantine pct=0 dis=none)" in raw_field(inst, "quarantine pct zero")
    # pct=100: every failure is refused, as without pct=
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(port, "a@fail.test", message("a@pct100.test", "pct hundred"))
    assert info.value.smtp_code == 550 and info.value.smtp_error.startswith(b"5.7.1")
    assert not any(b"Subject: pct hundred" in m for m in inst.messages("alice"))


def test_pct_sampling_with_an_injected_roll(dns_port: int) -> None:
    """Checker.dmarc against the DNS server, the pct= sample fixed: pct=50
    refuses a roll of 0-49 and gives quarantine for 50-99."""
    from mailgrave import config
    from mailgrave.queue.authcheck import Checker

    conf = config.parse_text(
        "checks: {dmarc: enforce}\n"
        f"remote: {{dns: {{nameservers: [127.0.0.1], port: {dns_port}, timeout: 2s}}}}\n"
    )
    header = b"From: a@pct50.test\r\nSubject: x\r\n"
    for roll, refused, comment in (
        (0, True, "p=reject pct=50 dis=reject"),
        (49, True, "p=reject pct=50 dis=reject"),
        (50, False, "p=reject pct=50 dis=quarantine"),
        (99, False, "p=reject pct=50 dis=quarantine"),
    ):
        checker = Checker(conf, roll=lambda roll=roll: roll)  # type: ignore[misc]
        clause, refuse = checker.dmarc(header, "fail", "fail.test", [])
        assert (clause.result, refuse, clause.result_comment) == ("fail", refused, comment)
    # a pass is never sampled
    rolls: list[int] = []
    checker = Checker(conf, roll=lambda: rolls.append(0) or 0)  # type: ignore[func-returns-value]
    clause, refuse = checker.dmarc(b"From: a@pass.test\r\n", "pass", "pass.test", [])
    assert (clause.result, refuse, rolls) == ("pass", False, [])


def test_relay_networks_clients_are_not_checked(
    tmp_path: Path, processes: Processes, dns_port: int, key: tuple[bytes, str]
) -> None:
    # "port 25 only; not for authenticated or relay_networks clients": the same
    # forged message (SPF -all, a broken signature, From: a p=reject domain)
    # under enforce is taken from 127.0.0.1 (relay_networks) without any
    # Authentication-Results: of ours, and refused from 127.0.0.2 (outside).
    inst = Instance(
        tmp_path,
        relay_networks=["127.0.0.1/32"],
        checks={"spf": "enforce", "dkim": "enforce", "dmarc": "enforce"},
        remote={"dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": "2s"}},
    )
    port = free_port()
    inst.start(processes, listen=f"127.0.0.1:{port}")
    forged = sign(message("a@signed.test", "from a relay client"), key[0])
    forged = forged.replace(b"there.", b"THERE!")
    send(port, "a@fail.test", forged)
    mark = b"Subject: from a relay client\n"
    wait_for(lambda: any(mark in m for m in inst.messages("alice")), timeout=60)
    raw = next(m for m in inst.messages("alice") if mark in m)
    assert auth_results(raw) == []
    outside = forged.replace(b"from a relay client", b"from outside")
    with smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=("127.0.0.2", 0)) as smtp:
        smtp.ehlo("client.test")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail("a@fail.test", ["alice@example.org"], outside)
        assert refused.value.smtp_code == 550  # SPF fail, at MAIL FROM
        with pytest.raises(smtplib.SMTPDataError) as info:
            smtp.sendmail("a@signed.test", ["alice@example.org"], outside)  # no SPF record
        assert info.value.smtp_code == 550 and info.value.smtp_error.startswith(b"5.7.1")
    assert not any(b"Subject: from outside" in m for m in inst.messages("alice"))


def test_authenticated_submission_is_not_checked(
    tmp_path: Path, processes: Processes, dns_port: int, key: tuple[bytes, str]
) -> None:
    # The other half of "not for authenticated or relay_networks clients": the
    # forged message of the test above, under enforce, from 127.0.0.1 outside
    # relay_networks, is taken on the smtps port after AUTH (no
    # Authentication-Results: of ours) and refused on port 25 without it.
    import ssl
    import subprocess as sp

    from tests.integration.test_submission import (
        PASSWORD,
        _connectable,
        add_user,
        insecure,
        make_cert,
    )

    cert, tls_key = make_cert(tmp_path)
    inst = Instance(
        tmp_path,
        relay_networks=["192.0.2.0/24"],
        checks={"spf": "enforce", "dkim": "enforce", "dmarc": "enforce"},
        smtpd={"tls": {"certificate": str(cert), "key": str(tls_key)}},
        auth={
            "users_file": str(tmp_path / "users"),
            "senders": {"carol": ["@fail.test", "@signed.test"]},
        },
        remote={"dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": "2s"}},
    )
    add_user(inst, "carol", PASSWORD)
    port, smtps = free_port(), free_port()
    args = [program("mailgrave"), "--config", str(inst.config_path), "run"]
    args += ["--listen", f"127.0.0.1:{port}", "--smtps", f"127.0.0.1:{smtps}"]
    with (tmp_path / "run.log").open("wb") as log:
        proc = processes.start(args, stdout=sp.DEVNULL, stderr=log)
    wait_for(lambda: _connectable(smtps) or proc.poll() is not None)
    assert proc.poll() is None, (tmp_path / "run.log").read_text()
    forged = sign(message("a@signed.test", "from carol"), key[0]).replace(b"there.", b"THERE!")
    ctx: ssl.SSLContext = insecure()
    with smtplib.SMTP_SSL("127.0.0.1", smtps, timeout=60, context=ctx) as smtp:
        smtp.login("carol", PASSWORD)
        smtp.sendmail("a@fail.test", ["alice@example.org"], forged)
    mark = b"Subject: from carol\n"
    wait_for(lambda: any(mark in m for m in inst.messages("alice")), timeout=60)
    raw = next(m for m in inst.messages("alice") if mark in m)
    assert auth_results(raw) == []
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail("a@fail.test", ["alice@example.org"], forged)
        assert refused.value.smtp_code == 550  # SPF fail, at MAIL FROM


def queue_pid(run_pid: int) -> int:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == run_pid and b"mailgrave.queue" in cmdline:
            return int(entry)
    raise AssertionError("no mailgrave-queue")


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_big_message_verified_in_bounded_memory(
    tmp_path: Path, processes: Processes, dns_port: int, key: tuple[bytes, str]
) -> None:
    inst, port = start(processes, tmp_path, dns_port, "record")
    run_pid = processes.procs[-1].pid  # mailgrave run, the queue's parent
    send(port, "a@fail.test", sign(message("a@signed.test", "small"), key[0]))
    received(inst, "small")
    pid = queue_pid(run_pid)
    before = peak_rss_kib(pid)
    line = b"0123456789 abcdefghijklmnopqrstuvwxyz  ABCDEFGHIJKLMNOPQRSTUVWXYZ\t.\r\n"
    body = line * (20 * 1024 * 1024 // len(line))
    big = sign(message("a@signed.test", "big", body), key[0])
    started = time.monotonic()
    send(port, "a@fail.test", big)
    took = time.monotonic() - started
    assert queue_pid(run_pid) == pid  # the same process verified it
    growth = peak_rss_kib(pid) - before
    print(f"20 MB message: queue peak RSS {before} KiB -> +{growth} KiB, DATA to 250 {took:.2f} s")
    [d] = clauses(received(inst, "big"), "dkim")
    assert d.result == "pass"
    assert growth < 8 * 1024, growth
