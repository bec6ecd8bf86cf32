"""MTA-STS when sending (RFC 8461), against real peers on loopback: a DNS
server (dnslib) publishing ``_mta-sts`` TXT and MX records, an HTTPS server
(http.server + ssl, certificates from a test CA made with openssl) serving
the policy on a free port (remote.mta_sts_port, for tests), and aiosmtpd as
the MX, with and without STARTTLS."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SAME_USER, Instance, Processes, free_port, wait_for
from tests.integration.dnsserver import dns_server
from tests.integration.test_remote_delivery import PY, Peer, start_peer

PEERS = Path(__file__).resolve().parent.parent / "peers"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA; certificates from it for mta-sts.example.net and mx.example.net;
    the same two from a CA nobody trusts."""
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    for name in ("ca", "rogue"):
        run(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=MailGrave {name} CA",
        )  # fmt: skip
    for host, signer in (
        ("mta-sts.example.net", "ca"),
        ("mx.example.net", "ca"),
        ("mta-sts.example.net", "rogue"),
        ("mx.example.net", "rogue"),
    ):
        stem = f"{host}-{signer}"
        run(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{stem}.key",
            "-out", f"{stem}.csr", "-subj", f"/CN={host}",
        )  # fmt: skip
        (d / f"{stem}.cnf").write_text(f"subjectAltName=DNS:{host}\n")
        run(
            "x509", "-req", "-in", f"{stem}.csr", "-CA", f"{signer}.pem", "-CAkey",
            f"{signer}.key", "-CAcreateserial", "-out", f"{stem}.pem", "-days", "2",
            "-extfile", f"{stem}.cnf",
        )  # fmt: skip
    return {p.name: p for p in d.iterdir()}


def start_policy_server(
    processes: Processes, tmp_path: Path, pki: dict[str, Path], policy: str, signer: str = "ca"
) -> tuple[int, Path]:
    port = free_port()
    outdir = tmp_path / f"https-{port}"
    policy_file = tmp_path / f"policy-{port}.txt"
    policy_file.write_text(policy)
    stem = f"mta-sts.example.net-{signer}"
    processes.start(
        [
            PY,
            str(PEERS / "https_policy.py"),
            "--port",
            str(port),
            "--outdir",
            str(outdir),
            "--cert",
            str(pki[f"{stem}.pem"]),
            "--key",
            str(pki[f"{stem}.key"]),
            "--policy",
            str(policy_file),
        ]
    )
    wait_for(lambda: (outdir / "ready").exists())
    return port, outdir


@pytest.fixture
def dns() -> Iterator[Callable[..., int]]:
    """Start real DNS servers (tests/integration/dnsserver.py) for a test."""
    with ExitStack() as stack:

        def start(zone: dict[str, Any]) -> int:
            port, _resolver = stack.enter_context(dns_server(zone))
            return int(port)

        yield start


ZONE = {
    "example.net": [["MX", 10, "mx.example.net."]],
    "mx.example.net": [["A", "127.0.0.1"]],
    "_mta-sts.example.net": [["TXT", "v=STSv1; id=20260101T000000;"]],
    "mta-sts.example.net": [["A", "127.0.0.1"]],
}


def policy(mode: str, *mx: str) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), "max_age: 86400"]
    return "\r\n".join(lines) + "\r\n"


def sts_instance(
    tmp_path: Path, pki: dict[str, Path], dns_port: int, smtp_port: int, https_port: int
) -> Instance:
    return Instance(
        tmp_path,
        remote={
            "dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": "3s"},
            "port": smtp_port,
            "timeout": "3s",
            "connect_timeout": "2s",
            "ca_file": str(pki["ca.pem"]),
            "mta_sts_port": https_port,
            "mta_sts_timeout": "5s",
            "mta_sts_cache": str(tmp_path / "mta-sts"),
        },
    )


def _by_hand(inst: Instance) -> tuple[int, str, str]:
    res = inst.run(
        "mailgrave-remote", *SAME_USER, "--sender", "alice@example.org", "x@example.net",
        input=b"Subject: sts\n\nbody\n",
    )  # fmt: skip
    return res.returncode, res.stdout.decode(), res.stderr.decode()


def test_enforce_refuses_an_mx_not_in_the_policy_and_keeps_the_mail_queued(
    tmp_path: Path, processes: Processes, pki: dict[str, Path], dns: Callable[..., int]
) -> None:
    peer = start_peer(processes, tmp_path)
    https, requests = start_policy_server(
        processes, tmp_path, pki, policy("enforce", "mx1.example.com", "*.other.example.net")
    )
    inst = sts_instance(tmp_path, pki, dns(ZONE), peer.port, https)
    inst.start(processes)
    res = inst.sendmail("-f", "alice@example.org", "x@example.net", data=b"Subject: sts\n\nx\n")
    assert res.returncode == 0
    wait_for(lambda: any(e.startswith("info/") for e in inst.spool_entries()), timeout=20)
    [qid] = [e.split("/")[1] for e in inst.spool_entries() if e.startswith("info/")]
    shown = inst.run("mailgrave", "queue", "show", qid).stdout.decode()
    assert "<x@example.net> pending" in shown
    assert "MTA-STS policy of example.net (enforce) allows none of its MX hosts" in shown
    assert peer.messages() == [] and peer.events("ehlo") == []
    # The policy was fetched over HTTPS by name, and cached with its id.
    [req] = [json.loads(line) for line in (requests / "requests.jsonl").read_text().splitlines()]
    assert req == {"path": "/.well-known/mta-sts.txt", "host": "mta-sts.example.net"}
    cached = json.loads((tmp_path / "mta-sts" / "example.net").read_text())
    assert (cached["id"], cached["mode"], cached["max_age"]) == (
        "20260101T000000",
        "enforce",
        86400,
    )


def test_enforce_delivers_to_a_listed_mx_only_over_verified_tls(
    tmp_path: Path, processes: Processes, pki: dict[str, Path], dns: Callable[..., int]
) -> None:
    https, _ = start_policy_server(processes, tmp_path, pki, policy("enforce", "*.example.net"))
    plain = start_peer(processes, tmp_path)  # no STARTTLS
    inst = sts_instance(tmp_path, pki, dns(ZONE), plain.port, https)
    code, out, _ = _by_hand(inst)
    assert code == 111 and "does not offer STARTTLS (MTA-STS policy in enforce mode)" in out
    assert plain.messages() == []
    cert, key = pki["mx.example.net-ca.pem"], pki["mx.example.net-ca.key"]
    tls = start_peer(processes, tmp_path, "--cert", str(cert), "--key", str(key))
    inst = sts_instance(tmp_path, pki, dns(ZONE), tls.port, https)
    code, out, _ = _by_hand(inst)
    assert code == 0, out
    [(meta, _body)] = tls.messages()
    assert meta["tls"] is True


def test_testing_mode_only_logs(
    tmp_path: Path, processes: Processes, pki: dict[str, Path], dns: Callable[..., int]
) -> None:
    peer = start_peer(processes, tmp_path)
    https, _ = start_policy_server(processes, tmp_path, pki, policy("testing", "mx9.example.com"))
    inst = sts_instance(tmp_path, pki, dns(ZONE), peer.port, https)
    code, out, err = _by_hand(inst)
    assert code == 0, out
    assert len(peer.messages()) == 1
    assert (
        "MTA-STS policy of example.net, mode testing: MX mx.example.net: not in the policy; "
        "delivering anyway" in err
    )


@pytest.mark.parametrize("mode", ["enforce", "testing"])
def test_policy_host_with_an_untrusted_certificate_means_no_policy(
    tmp_path: Path, processes: Processes, pki: dict[str, Path], dns: Callable[..., int], mode: str
) -> None:
    # A policy that does not name the MX, served with a certificate from a CA
    # we do not trust: it is not used at all (RFC 8461 §3.3), in either mode:
    # the mail goes out, in plain text, and nothing is said about the MX.
    peer = start_peer(processes, tmp_path)
    https, requests = start_policy_server(
        processes, tmp_path, pki, policy(mode, "mx1.example.com"), signer="rogue"
    )
    inst = sts_instance(tmp_path, pki, dns(ZONE), peer.port, https)
    code, out, err = _by_hand(inst)
    assert code == 0, out
    assert len(peer.messages()) == 1
    assert (
        "MTA-STS policy of example.net not used: TLS with mta-sts.example.net failed: "
        "unable to get local issuer certificate" in err
    )
    assert "mode " not in err  # no policy was applied to the MX
    assert not (tmp_path / "mta-sts" / "example.net").exists()
    assert not (requests / "requests.jsonl").exists()  # no request went over that TLS


def _mx(processes: Processes, tmp_path: Path, pki: dict[str, Path], signer: str | None) -> Peer:
    """The MX: aiosmtpd with STARTTLS and a certificate for mx.example.net from
    ``signer`` (``ca``: trusted, ``rogue``: not), or without STARTTLS (None)."""
    if signer is None:
        return start_peer(processes, tmp_path)
    cert, key = pki[f"mx.example.net-{signer}.pem"], pki[f"mx.example.net-{signer}.key"]
    return start_peer(processes, tmp_path, "--cert", str(cert), "--key", str(key))


def test_testing_mode_tests_the_mx_tls_and_only_logs_what_fails(
    tmp_path: Path, processes: Processes, pki: dict[str, Path], dns: Callable[..., int]
) -> None:
    # RFC 8461 §5: in testing mode the MX is checked as enforce would check it;
    # a failure is logged (mode, MX, reason) and the mail is delivered anyway.
    https, _ = start_policy_server(processes, tmp_path, pki, policy("testing", "mx.example.net"))
    zone = dns(ZONE)
    prefix = "MTA-STS policy of example.net, mode testing: MX mx.example.net: "

    untrusted = _mx(processes, tmp_path, pki, "rogue")
    code, out, err = _by_hand(sts_instance(tmp_path, pki, zone, untrusted.port, https))
    assert code == 0, out
    [(meta, _)] = untrusted.messages()
    assert meta["tls"] is True  # opportunistic TLS, as without a policy
    [line] = [x for x in err.splitlines() if prefix in x]
    assert line.endswith(
        f"{prefix}TLS with mx.example.net[127.0.0.1]:{untrusted.port} failed: "
        "unable to get local issuer certificate; delivering anyway"
    ), line

    plain = _mx(processes, tmp_path, pki, None)
    code, out, err = _by_hand(sts_instance(tmp_path, pki, zone, plain.port, https))
    assert code == 0, out
    [(meta, _)] = plain.messages()
    assert meta["tls"] is False
    assert (
        f"{prefix}mx.example.net[127.0.0.1]:{plain.port} does not offer STARTTLS; "
        "delivering anyway" in err
    )

    trusted = _mx(processes, tmp_path, pki, "ca")
    code, out, err = _by_hand(sts_instance(tmp_path, pki, zone, trusted.port, https))
    assert code == 0, out
    [(meta, _)] = trusted.messages()
    assert meta["tls"] is True
    assert prefix not in err


@pytest.mark.parametrize("signer", ["rogue", None])
def test_enforce_keeps_the_mail_queued_when_the_mx_tls_does_not_verify(
    tmp_path: Path,
    processes: Processes,
    pki: dict[str, Path],
    dns: Callable[..., int],
    signer: str | None,
) -> None:
    # An MX the policy names, but with a certificate from an untrusted CA, or no
    # STARTTLS at all: not used; the mail stays queued, the reason shown.
    https, _ = start_policy_server(processes, tmp_path, pki, policy("enforce", "mx.example.net"))
    peer = _mx(processes, tmp_path, pki, signer)
    inst = sts_instance(tmp_path, pki, dns(ZONE), peer.port, https)
    inst.start(processes)
    res = inst.sendmail("-f", "alice@example.org", "x@example.net", data=b"Subject: sts\n\nx\n")
    assert res.returncode == 0
    name = f"mx.example.net[127.0.0.1]:{peer.port}"
    reason = (
        f"TLS with {name} failed: unable to get local issuer certificate"
        if signer
        else f"{name} does not offer STARTTLS"
    )

    def shown() -> str:
        qids = [e.split("/")[1] for e in inst.spool_entries() if e.startswith("info/")]
        if not qids:
            return ""
        return inst.run("mailgrave", "queue", "show", *qids).stdout.decode()

    wait_for(lambda: reason in shown(), timeout=20)
    text = shown()
    assert "<x@example.net> pending" in text
    assert f"4.7.5 {reason} (MTA-STS policy in enforce mode)" in text, text
    assert peer.messages() == []


def test_cached_policy_is_used_when_the_fetch_fails(
    tmp_path: Path, processes: Processes, pki: dict[str, Path], dns: Callable[..., int]
) -> None:
    peer = start_peer(processes, tmp_path)
    inst = sts_instance(tmp_path, pki, dns(ZONE), peer.port, free_port())  # nothing listens
    code, _out, _err = _by_hand(inst)
    assert code == 0 and len(peer.messages()) == 1  # no policy, no cache: delivered
    import time

    (tmp_path / "mta-sts").mkdir()
    (tmp_path / "mta-sts" / "example.net").write_text(
        json.dumps(
            {
                "domain": "example.net",
                "id": "older",
                "mode": "enforce",
                "mx": ["mx1.example.com"],
                "max_age": 86400,
                "fetched": time.time(),
            }
        )
    )
    code, out, _err = _by_hand(inst)
    assert code == 111 and "allows none of its MX hosts" in out
    assert len(peer.messages()) == 1


def test_mta_sts_off_looks_nothing_up(
    tmp_path: Path, processes: Processes, pki: dict[str, Path], dns: Callable[..., int]
) -> None:
    peer = start_peer(processes, tmp_path)
    https, requests = start_policy_server(processes, tmp_path, pki, policy("enforce", "x.test"))
    inst = sts_instance(tmp_path, pki, dns(ZONE), peer.port, https)
    inst.settings["remote"]["mta_sts"] = "off"
    inst.write_config()
    code, out, _ = _by_hand(inst)
    assert code == 0, out
    assert not (requests / "requests.jsonl").exists()


def test_mailgrave_check_reports_the_mta_sts_settings(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    inst = Instance(
        tmp_path,
        remote={"ca_file": str(tmp_path / "missing.pem"), "mta_sts_cache": str(not_a_dir)},
    )
    res = inst.run("mailgrave", "check")
    assert res.returncode == 1
    err = res.stderr.decode()
    assert f"remote.ca_file: cannot read {tmp_path / 'missing.pem'}" in err
    assert f"remote.mta_sts_cache: {not_a_dir} is not a directory" in err
    inst.settings["remote"] = {"mta_sts": "sometimes"}
    inst.write_config()
    res = inst.run("mailgrave", "check")
    assert res.returncode == 1 and b"remote.mta_sts: expected one of off, on" in res.stderr
