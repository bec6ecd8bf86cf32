"""DKIM signing (RFC 6376, RFC 8463) by mailgrave-queue, verified by dkimpy against a
real DNS server on loopback, and by OpenDKIM (opendkim-testmsg, a second implementation):
inject, authenticated submission, relay_networks; rsa-sha256 and ed25519-sha256;
untrusted clients unsigned; a missing key; a 50 MB message."""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest
from dkim.util import parse_tag_value

from tests.conftest import (
    ROOT,
    SAME_USER,
    Instance,
    Processes,
    free_port,
    program,
    read_spool_file,
    wait_for,
)
from tests.integration.dnsserver import dns_server
from tests.integration.test_submission import (
    PASSWORD,
    PEERS,
    _connectable,
    add_user,
    insecure,
    make_cert,
)


def keygen(inst: Instance, domain: str, selector: str, algorithm: str, keys: Path) -> str:
    """`mailgrave dkim keygen`: the TXT record's text (its strings joined)."""
    res = inst.run(
        "mailgrave", "dkim", "keygen", domain, "--selector", selector,
        "--algorithm", algorithm, "--dir", str(keys),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    line = res.stdout.decode().splitlines()[0]
    assert line.startswith(f"{selector}._domainkey.{domain}. IN TXT ")
    return "".join(re.findall(r'"([^"]*)"', line))


class Dkim:
    def __init__(
        self, inst: Instance, ports: dict[str, int], sink: Path, dns_port: int, zone_file: Path
    ) -> None:
        self.inst, self.ports, self.sink, self.dns_port = inst, ports, sink, dns_port
        self.zone_file = zone_file

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        """dkimpy's TXT lookup, asked of the loopback DNS server."""
        query = dns.message.make_query(name.decode(), dns.rdatatype.TXT)
        answer = dns.query.udp(query, "127.0.0.1", timeout=timeout, port=self.dns_port)
        for rrset in answer.answer:
            for rd in rrset:
                return b"".join(rd.strings)
        return None

    def verify(self, message: bytes) -> bool:
        return bool(dkim.verify(message, dnsfunc=self.dnsfunc))

    def opendkim(self, message: bytes) -> subprocess.CompletedProcess[bytes]:
        """opendkim-testmsg's verdict (tests/peers/opendkim_verify.py: the same zone,
        served on port 53 of a loopback in a network namespace of its own)."""
        return subprocess.run(
            [sys.executable, "-m", "tests.peers.opendkim_verify", str(self.zone_file)],
            input=message, capture_output=True, cwd=ROOT, timeout=120,
        )  # fmt: skip

    def sunk(self, subject: str) -> bytes:
        def find() -> bytes | None:
            for p in self.sink.glob("*.eml"):
                data = p.read_bytes()
                if f"Subject: {subject}\r\n".encode() in data:
                    return data
            return None

        return bytes(wait_for(find, timeout=30))


@pytest.fixture(scope="module")
def dk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dkim]:
    base = tmp_path_factory.mktemp("dkim")
    procs = Processes()
    sink_port = free_port()
    sink = base / "sink"
    procs.start(
        ["/usr/bin/python3", str(PEERS / "smtp_peer.py"), "--port", str(sink_port),
         "--outdir", str(sink)]
    )  # fmt: skip
    wait_for(lambda: (sink / "ready").exists())
    cert, key = make_cert(base)
    (base / "rate").mkdir()
    inst = Instance(
        base,
        relay_networks=["127.0.0.2/32"],  # 127.0.0.1 is an outside client here
        smtpd={"tls": {"certificate": str(cert), "key": str(key)}, "timeout": "10s"},
        auth={
            "users_file": str(base / "users"),
            "senders": {"alice": ["alice@example.org", "@ed.test"]},
            "rate_limit": {"directory": str(base / "rate")},
        },
        remote={
            "routes": {"elsewhere.test": f"[127.0.0.1]:{sink_port}"},
            "tls": "none",
        },
    )
    keys = base / "keys"
    rsa_txt = keygen(inst, "example.org", "s1", "rsa-sha256", keys)
    ed_txt = keygen(inst, "ed.test", "e1", "ed25519-sha256", keys)
    inst.settings["dkim"] = {
        "sign": {
            "example.org": {"selector": "s1", "key": str(keys / "example.org.s1.key")},
            "ed.test": {
                "selector": "e1",
                "key": str(keys / "ed.test.e1.key"),
                "algorithm": "ed25519-sha256",
            },
        }
    }
    inst.write_config()
    add_user(inst, "alice", PASSWORD)
    zone = {
        "s1._domainkey.example.org": [("TXT", rsa_txt)],
        "e1._domainkey.ed.test": [("TXT", ed_txt)],
    }
    zone_file = base / "zone.json"
    zone_file.write_text(json.dumps(zone))
    ports = {"smtp": free_port(), "submission": free_port()}
    args = [program("mailgrave"), "--config", str(inst.config_path), "run"]
    args += ["--retry-interval", "1", "--listen", f"127.0.0.1:{ports['smtp']}"]
    args += ["--listen", f"127.0.0.2:{ports['smtp']}"]
    args += ["--submission", f"127.0.0.1:{ports['submission']}"]
    inst.log = base / "run.log"
    try:
        with dns_server(zone) as (dns_port, _resolver):
            with inst.log.open("wb") as log:
                proc = procs.start(args, stdout=subprocess.DEVNULL, stderr=log)
            for port in ports.values():
                wait_for(lambda port=port: _connectable(port) or proc.poll() is not None)
            assert proc.poll() is None, inst.log.read_text()
            yield Dkim(inst, ports, sink, dns_port, zone_file)
    finally:
        procs.stop_all()


def message(sender: str, to: str, subject: str, body: str = "hello  \r\n\r\n") -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        f"Message-ID: <{time.time_ns()}@client.test>\r\n\r\n{body}"
    ).encode()


def signatures(msg: bytes) -> list[bytes]:
    return re.findall(rb"^DKIM-Signature:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*", msg, re.M | re.I)


def test_injected_mail_is_signed_rsa_and_verifies(dk: Dkim) -> None:
    res = dk.inst.sendmail(
        "-f", "alice@example.org", "x@elsewhere.test",
        data=message("alice@example.org", "x@elsewhere.test", "inject rsa").replace(b"\r\n", b"\n"),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    msg = dk.sunk("inject rsa")
    (sig,) = signatures(msg)
    tags = parse_tag_value(re.sub(rb"\s+", b"", sig.split(b":", 1)[1]))
    assert tags[b"a"] == b"rsa-sha256" and tags[b"c"] == b"relaxed/relaxed"
    assert tags[b"d"] == b"example.org" and tags[b"s"] == b"s1"
    signed = tags[b"h"].split(b":")
    assert signed.count(b"from") == 2  # over-signed: one more than present
    assert {b"to", b"subject", b"date", b"message-id"} <= set(signed)
    assert msg.index(b"DKIM-Signature:") < msg.index(b"Received:")
    assert dk.verify(msg)
    assert not dk.verify(msg.replace(b"hello", b"hellO"))  # the body, altered
    assert not dk.verify(msg.replace(b"Subject: inject rsa", b"Subject: inject RSA"))


def test_authenticated_submission_is_signed_ed25519(dk: Dkim) -> None:
    with smtplib.SMTP("127.0.0.1", dk.ports["submission"], timeout=30) as c:
        c.starttls(context=insecure())
        c.login("alice", PASSWORD)
        c.sendmail(
            "alice@ed.test",
            ["x@elsewhere.test"],
            message("alice@ed.test", "x@elsewhere.test", "submission ed25519"),
        )
    msg = dk.sunk("submission ed25519")
    (sig,) = signatures(msg)
    assert b"a=ed25519-sha256" in sig and b"d=ed.test" in sig
    assert b"with ESMTPSA" in msg
    assert dk.verify(msg)
    assert not dk.verify(msg.replace(b"hello", b"jello"))


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --net --mount needs root")
@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_opendkim_verifies_what_dkimpy_verifies(dk: Dkim, algorithm: str) -> None:
    """A second, independent implementation (libopendkim, with the C library's resolver)
    agrees: the delivered message verifies; altered after signing, it does not."""
    subject = f"opendkim {algorithm}"
    if algorithm == "rsa-sha256":
        sender = "alice@example.org"
        data = message(sender, "x@elsewhere.test", subject).replace(b"\r\n", b"\n")
        assert dk.inst.sendmail("-f", sender, "x@elsewhere.test", data=data).returncode == 0
    else:
        sender = "alice@ed.test"
        with smtplib.SMTP("127.0.0.1", dk.ports["submission"], timeout=30) as c:
            c.starttls(context=insecure())
            c.login("alice", PASSWORD)
            c.sendmail(sender, ["x@elsewhere.test"], message(sender, "x@elsewhere.test", subject))
    msg = dk.sunk(subject)
    (sig,) = signatures(msg)
    assert f"a={algorithm}".encode() in sig
    assert dk.verify(msg)
    res = dk.opendkim(msg)
    assert res.returncode == 0, res.stderr
    body = dk.opendkim(msg.replace(b"hello", b"hellO"))
    assert body.returncode != 0 and b"Bad signature" in body.stderr, body.stderr
    header = dk.opendkim(msg.replace(f"Subject: {subject}".encode(), b"Subject: altered"))
    assert header.returncode != 0 and b"Bad signature" in header.stderr, header.stderr
    unsigned = dk.opendkim(msg.replace(sig + b"\r\n", b""))
    assert unsigned.returncode != 0 and b"No signature" in unsigned.stderr, unsigned.stderr


def test_relay_networks_client_is_signed(dk: Dkim) -> None:
    with smtplib.SMTP(
        "127.0.0.2", dk.ports["smtp"], timeout=30, source_address=("127.0.0.2", 0)
    ) as c:
        c.sendmail(
            "alice@example.org",
            ["x@elsewhere.test"],
            message("alice@example.org", "x@elsewhere.test", "relay net"),
        )
    msg = dk.sunk("relay net")
    assert len(signatures(msg)) == 1
    assert dk.verify(msg)


def test_outside_client_with_our_from_is_not_signed(dk: Dkim) -> None:
    with smtplib.SMTP("127.0.0.1", dk.ports["smtp"], timeout=30) as c:
        c.sendmail(
            "spoof@example.net",
            ["bob@example.org"],
            message("alice@example.org", "bob@example.org", "outside"),
        )

    def arrived() -> bytes | None:
        return next((m for m in dk.inst.messages("bob") if b"Subject: outside" in m), None)

    msg = wait_for(arrived, timeout=30)
    assert signatures(msg) == []
    assert not dk.verify(msg)


def test_missing_key_is_a_temporary_failure_and_a_check_error(
    tmp_path: Path, processes: Processes
) -> None:
    missing = tmp_path / "gone.key"
    inst = Instance(
        tmp_path, dkim={"sign": {"example.org": {"selector": "s1", "key": str(missing)}}}
    )
    res = inst.run("mailgrave", "check")
    assert res.returncode == 1
    assert f"dkim.sign.example.org.key: cannot read {missing}".encode() in res.stderr
    inst.start(processes)
    data = message("alice@example.org", "x@elsewhere.test", "no key").replace(b"\r\n", b"\n")
    res = inst.sendmail("-f", "alice@example.org", "x@elsewhere.test", data=data)
    assert res.returncode == 75 or res.returncode == 111, (res.returncode, res.stderr)
    assert b"DKIM" in res.stderr
    assert inst.spool_entries() == []  # never queued unsigned
    # Mail that is not ours to sign still flows.
    other = message("someone@example.com", "bob@example.org", "not ours").replace(b"\r\n", b"\n")
    assert inst.sendmail("bob@example.org", data=other).returncode == 0


def _vmhwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_50mb_message_signed_in_bounded_memory(
    dk: Dkim, tmp_path: Path, processes: Processes
) -> None:
    """mailgrave-queue's peak RSS grows by less than 10 MB for a 50 MB signed message."""
    inst = Instance(tmp_path, dkim=dk.inst.settings["dkim"], queue={"max_message_size": "60M"})
    inst.spool.mkdir()
    inst.run_dir.mkdir()
    sock = inst.run_dir / "queue.ctrl"
    queue = processes.start(
        [
            program("mailgrave-queue"),
            "--config",
            str(inst.config_path),
            *SAME_USER,
            "--in",
            str(sock),
        ]
    )
    wait_for(lambda: sock.exists() or queue.poll() is not None)
    small = message("alice@example.org", "x@elsewhere.test", "warm-up").replace(b"\r\n", b"\n")
    assert inst.sendmail("x@elsewhere.test", data=small).returncode == 0
    before = _vmhwm(queue.pid)
    line = b"0123456789 abcdefghij\tABCDEFGHIJ  0123456789 abcdefghij ABCDEFGHIJ 0123456  \n"
    body = line * (50 * 1024 * 1024 // len(line))
    big = message("alice@example.org", "x@elsewhere.test", "fifty").replace(b"\r\n", b"\n")
    big = big[: -len(b"hello  \n\n")] + body
    feeder = subprocess.Popen(
        [program("mailgrave-inject"), "--config", str(inst.config_path), "x@elsewhere.test"],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = feeder.communicate(big, timeout=300)
    assert feeder.returncode == 0, err
    growth = _vmhwm(queue.pid) - before
    print(f"mailgrave-queue VmHWM growth for a {len(big)} byte signed message: {growth} bytes")
    assert growth < 10 * 1024 * 1024, growth
    (entry,) = [p for p in (inst.spool / "todo").iterdir() if p.stat().st_size > len(body)]
    _, stored = read_spool_file(entry)
    del body, big
    assert dk.verify(stored.replace(b"\n", b"\r\n"))
