"""Remote delivery against real peers on loopback: a DNS server (dnslib) and SMTP
servers (aiosmtpd), plus peers that drop the connection or hang."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SAME_USER, Instance, Processes, free_port, wait_for
from tests.integration.dnsserver import dns_server
from tests.integration.test_chain import delivered

PEERS = Path(__file__).resolve().parent.parent / "peers"
PY = "/usr/bin/python3"


class Peer:
    def __init__(self, port: int, outdir: Path) -> None:
        self.port = port
        self.outdir = outdir

    def messages(self) -> list[tuple[dict[str, Any], bytes]]:
        out = []
        for meta in sorted(self.outdir.glob("*.json"), key=lambda p: int(p.stem)):
            out.append((json.loads(meta.read_text()), meta.with_suffix(".eml").read_bytes()))
        return out

    def raw_messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.outdir.glob("*-*.eml"))]

    def events(self, kind: str) -> list[dict[str, Any]]:
        path = self.outdir / "events.jsonl"
        if not path.exists():
            return []
        return [e for e in map(json.loads, path.read_text().splitlines()) if e["kind"] == kind]


def start_peer(processes: Processes, tmp_path: Path, *args: str) -> Peer:
    port = free_port()
    outdir = tmp_path / f"peer-{port}"
    processes.start(
        [PY, str(PEERS / "smtp_peer.py"), "--port", str(port), "--outdir", str(outdir), *args]
    )
    wait_for(lambda: (outdir / "ready").exists())
    return Peer(port, outdir)


@pytest.fixture
def dns() -> Iterator[Callable[..., int]]:
    """Start real DNS servers (tests/integration/dnsserver.py) for a test; stopped after it."""
    with ExitStack() as stack:

        def start(zone: dict[str, Any], servfail: Iterable[str] = ()) -> int:
            port, _resolver = stack.enter_context(dns_server(zone, servfail))
            return int(port)

        yield start


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA and a certificate for mx.example.net signed by it (openssl at test time)."""
    d = tmp_path_factory.mktemp("certs")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=MailGrave Test CA",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "mx.key",
        "-out",
        "mx.csr",
        "-subj",
        "/CN=mx.example.net",
    )
    (d / "ext.cnf").write_text("subjectAltName=DNS:mx.example.net\n")
    run(
        "x509",
        "-req",
        "-in",
        "mx.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "mx.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    return {"ca": d / "ca.pem", "cert": d / "mx.pem", "key": d / "mx.key"}


ZONE = {
    "example.net": [["MX", 10, "mx.example.net."]],
    "mx.example.net": [["A", "127.0.0.1"]],
    "nomx.example.net": [["A", "127.0.0.1"]],
    "nullmx.example.net": [["MX", 0, "."]],
}


def remote_instance(tmp_path: Path, dns_port: int, smtp_port: int, **extra: Any) -> Instance:
    remote = {
        "dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": "3s"},
        "port": smtp_port,
        "timeout": "3s",
        "connect_timeout": "2s",
    }
    remote.update(extra.pop("remote", {}))
    return Instance(tmp_path, remote=remote, **extra)


def remote_by_hand(
    inst: Instance,
    *rcpts: str,
    sender: str = "alice@example.org",
    data: bytes = b"Subject: t\n\nbody\n",
) -> tuple[int, list[str]]:
    res = inst.run("mailgrave-remote", *SAME_USER, "--sender", sender, *rcpts, input=data)
    lines = [line for line in res.stdout.decode().splitlines() if not line.startswith("|")]
    return res.returncode, lines


def test_mx_lookup_one_transaction_and_per_recipient_results(
    tmp_path: Path, processes: Processes, dns: Callable[..., int]
) -> None:
    peer = start_peer(processes, tmp_path)
    inst = remote_instance(tmp_path, dns(ZONE), peer.port)
    rc, lines = remote_by_hand(
        inst,
        "a@example.net",
        "reject-b@example.net",
        "c@example.net",
        data=b"Subject: t\n\n.dot\nbody\n",
    )
    assert rc == 111 or rc == 100 or rc == 0
    assert lines[0].startswith("K") and "mx.example.net[127.0.0.1]" in lines[0]
    assert lines[1].startswith("D") and "550 5.1.1" in lines[1] and "RCPT TO" in lines[1]
    assert lines[2].startswith("K")
    [(meta, body)] = peer.messages()  # one transaction for both accepted recipients
    assert meta["rcpt_tos"] == ["a@example.net", "c@example.net"]
    assert body.endswith(b"\r\n.dot\r\nbody\r\n")  # dot-stuffing undone by the peer
    assert rc == 100


def test_no_mx_falls_back_to_a_null_mx_and_nxdomain_are_permanent(
    tmp_path: Path, processes: Processes, dns: Callable[..., int]
) -> None:
    peer = start_peer(processes, tmp_path)
    inst = remote_instance(tmp_path, dns(ZONE, servfail=["broken.example.net"]), peer.port)
    assert remote_by_hand(inst, "x@nomx.example.net")[0] == 0
    rc, lines = remote_by_hand(inst, "x@nullmx.example.net")
    assert rc == 100 and "null MX" in lines[0]
    rc, lines = remote_by_hand(inst, "x@nowhere.example.net")
    assert rc == 100 and lines[0].startswith("D5.1.2")
    rc, lines = remote_by_hand(inst, "x@broken.example.net")
    assert rc == 111 and lines[0].startswith("Z4.4.3")


def test_route_bypasses_mx_and_smtputf8_refused(tmp_path: Path, processes: Processes) -> None:
    peer = start_peer(processes, tmp_path)
    inst = remote_instance(
        tmp_path, free_port(), 9, remote={"routes": {"routed.test": f"[127.0.0.1]:{peer.port}"}}
    )
    assert remote_by_hand(inst, "x@routed.test")[0] == 0
    rc, lines = remote_by_hand(inst, "jürgen@routed.test")
    assert rc == 100 and "SMTPUTF8" in lines[0]
    assert len(peer.messages()) == 1


def test_starttls_verified_with_test_ca_and_wrong_name_refused(
    tmp_path: Path, processes: Processes, dns: Callable[..., int], certs: dict[str, Path]
) -> None:
    peer = start_peer(processes, tmp_path, "--cert", str(certs["cert"]), "--key", str(certs["key"]))
    dns = dns(
        {
            **ZONE,
            "other.test": [["MX", 5, "wrongname.test."]],
            "wrongname.test": [["A", "127.0.0.1"]],
        },
    )
    inst = remote_instance(
        tmp_path, dns, peer.port, remote={"tls": "verify", "ca_file": str(certs["ca"])}
    )
    rc, lines = remote_by_hand(inst, "x@example.net")
    assert rc == 0, lines
    assert peer.messages()[0][0]["tls"] is True
    rc, lines = remote_by_hand(inst, "x@other.test")
    assert rc == 111 and "TLS" in lines[0]
    assert len(peer.messages()) == 1
    # opportunistic: TLS used, the name not checked
    inst2 = (
        remote_instance(tmp_path / "o", dns, peer.port)
        if (tmp_path / "o").mkdir() is None
        else None
    )
    assert inst2 is not None
    assert remote_by_hand(inst2, "x@other.test")[0] == 0


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_smarthost_auth_checked_by_the_peer(
    tmp_path: Path, processes: Processes, dns: Callable[..., int], certs: dict[str, Path], mech: str
) -> None:
    peer = start_peer(
        processes,
        tmp_path,
        "--cert",
        str(certs["cert"]),
        "--key",
        str(certs["key"]),
        "--auth",
        "relayuser:s3cret",
        "--auth-mechs",
        mech,
    )
    dns = dns(ZONE)
    pwfile = tmp_path / "pw"
    pwfile.write_text("s3cret\n")
    inst = remote_instance(
        tmp_path,
        dns,
        9,
        remote={
            "ca_file": str(certs["ca"]),
            "smarthost": {
                "host": "mx.example.net",
                "port": peer.port,
                "login": "relayuser",
                "password_file": str(pwfile),
            },
        },
    )
    rc, lines = remote_by_hand(inst, "anyone@anywhere.test")
    assert rc == 0, lines
    [auth] = peer.events("auth")
    assert auth == {"kind": "auth", "mechanism": mech, "ok": True, "tls": True}
    assert peer.messages()[0][0]["auth"] is True
    res = inst.run(
        "mailgrave-remote", *SAME_USER, "--sender", "a@example.org", "x@anywhere.test", input=b"x\n"
    )
    assert b"s3cret" not in res.stdout + res.stderr  # never in a transcript or log


def test_no_auth_over_plaintext(tmp_path: Path, processes: Processes) -> None:
    peer = start_peer(processes, tmp_path)  # no STARTTLS offered
    pwfile = tmp_path / "pw"
    pwfile.write_text("s3cret\n")
    inst = remote_instance(
        tmp_path,
        free_port(),
        9,
        remote={
            "smarthost": {
                "host": "127.0.0.1",
                "port": peer.port,
                "login": "relayuser",
                "password_file": str(pwfile),
            }
        },
    )
    rc, lines = remote_by_hand(inst, "x@anywhere.test")
    assert rc == 111 and "STARTTLS" in lines[0]
    assert peer.events("auth") == [] and peer.messages() == []


def test_connection_reuse_for_messages_due_together(tmp_path: Path, processes: Processes) -> None:
    peer = start_peer(processes, tmp_path)
    inst = remote_instance(
        tmp_path,
        free_port(),
        9,
        remote={
            "routes": {"example.net": f"[127.0.0.1]:{peer.port}"},
            "destination_concurrency": 1,
        },
    )
    queue = start_chain(inst, processes)
    for i in range(3):
        assert (
            inst.sendmail(f"user{i}@example.net", data=f"Subject: {i}\n\nx\n".encode()).returncode
            == 0
        )
    wait_for(lambda: len(peer.messages()) == 3)
    assert len(peer.events("ehlo")) == 1, peer.events("ehlo")
    del queue


def start_chain(inst: Instance, processes: Processes) -> Any:
    return inst.start(processes)


def test_one_of_three_refused_gives_one_bounce_naming_it(
    tmp_path: Path, processes: Processes
) -> None:
    peer = start_peer(processes, tmp_path)
    inst = remote_instance(
        tmp_path, free_port(), 9, remote={"routes": {"example.net": f"[127.0.0.1]:{peer.port}"}}
    )
    inst.start(processes)
    res = inst.sendmail(
        "-f",
        "alice@example.org",
        "a@example.net",
        "reject-me@example.net",
        "c@example.net",
        data=b"Subject: three\n\nx\n",
    )
    assert res.returncode == 0
    wait_for(lambda: inst.messages("alice"), timeout=20)
    [bounce] = delivered(inst, "alice")
    assert bounce.get_content_type() == "multipart/report"
    report = list(bounce.iter_parts())[1].get_payload()
    assert [r["Final-Recipient"] for r in report[1:]] == ["rfc822; reject-me@example.net"]
    assert "550 5.1.1" in report[1]["Diagnostic-Code"]
    [(meta, body)] = peer.messages()
    assert meta["rcpt_tos"] == ["a@example.net", "c@example.net"]
    # What leaves is the message from its Received: line on, not the spool header.
    assert body.startswith(b"Received: by ") and b"\0" not in body
    returned = list(bounce.iter_parts())[2].as_bytes()
    assert b"Subject: three" in returned and b"MGQ1" not in returned and b"\0" not in returned
    wait_for(lambda: inst.spool_entries() == [])


def test_tempfail_then_accept_is_delivered_once(tmp_path: Path, processes: Processes) -> None:
    peer = start_peer(processes, tmp_path, "--tempfail-first", "1")
    inst = remote_instance(
        tmp_path,
        free_port(),
        9,
        remote={"routes": {"example.net": f"[127.0.0.1]:{peer.port}"}},
        queue={"retry": ["1s"]},
    )
    inst.start(processes, retry_interval=0.5)
    assert inst.sendmail("a@example.net", data=b"Subject: again\n\nx\n").returncode == 0
    wait_for(lambda: peer.messages(), timeout=20)
    wait_for(lambda: inst.spool_entries() == [], timeout=20)
    assert len(peer.messages()) == 1


def test_drop_mid_data_is_retried_not_lost(tmp_path: Path, processes: Processes) -> None:
    raw = start_peer(processes, tmp_path, "--mode", "drop-data-first")
    port, outdir = raw.port, raw.outdir
    inst = remote_instance(
        tmp_path,
        free_port(),
        9,
        remote={"routes": {"example.net": f"[127.0.0.1]:{port}"}},
        queue={"retry": ["1s"]},
    )
    inst.start(processes, retry_interval=0.5)
    assert (
        inst.sendmail("a@example.net", data=b"Subject: dropped\n\nline1\nline2\n").returncode == 0
    )
    wait_for(lambda: list(outdir.glob("*-*.eml")), timeout=20)
    [body] = [p.read_bytes() for p in outdir.glob("*-*.eml")]
    assert body.endswith(b"line1\r\nline2\r\n")
    wait_for(lambda: inst.spool_entries() == [], timeout=20)


def test_hanging_peer_times_out_and_others_still_delivered(
    tmp_path: Path, processes: Processes
) -> None:
    good = start_peer(processes, tmp_path)
    port = start_peer(processes, tmp_path, "--mode", "hang").port
    inst = remote_instance(
        tmp_path,
        free_port(),
        9,
        remote={
            "routes": {
                "hang.test": f"[127.0.0.1]:{port}",
                "example.net": f"[127.0.0.1]:{good.port}",
            },
            "timeout": "3s",
        },
    )
    inst.start(processes)
    assert inst.sendmail("x@hang.test", data=b"Subject: hang\n\nx\n").returncode == 0
    assert inst.sendmail("y@example.net", data=b"Subject: fine\n\nx\n").returncode == 0
    wait_for(lambda: good.messages(), timeout=10)  # not held up by the hanging one
    listing = wait_for(
        lambda: (o := inst.run("mailgrave", "queue").stdout.decode()) and "timeout" in o and o,
        timeout=20,
    )
    assert "<x@hang.test> pending" in listing


def test_lifetime_expiry_bounces_with_the_last_reply(tmp_path: Path, processes: Processes) -> None:
    peer = start_peer(processes, tmp_path, "--always-tempfail")
    inst = remote_instance(
        tmp_path,
        free_port(),
        9,
        remote={"routes": {"example.net": f"[127.0.0.1]:{peer.port}"}},
        queue={"retry": ["1s"], "lifetime": "3s"},
    )
    inst.start(processes, retry_interval=0.5)
    assert (
        inst.sendmail(
            "-f", "alice@example.org", "a@example.net", data=b"Subject: expire\n\nx\n"
        ).returncode
        == 0
    )
    wait_for(lambda: inst.messages("alice"), timeout=30)
    [bounce] = delivered(inst, "alice")
    report = list(bounce.iter_parts())[1].get_payload()
    assert report[1]["Action"] == "failed"
    assert "451 4.3.0 please try again later" in report[1]["Diagnostic-Code"]
    wait_for(lambda: inst.spool_entries() == [], timeout=10)


def test_undeliverable_bounce_goes_to_postmaster(tmp_path: Path, processes: Processes) -> None:
    peer = start_peer(processes, tmp_path)
    inst = remote_instance(
        tmp_path, free_port(), 9, remote={"routes": {"example.net": f"[127.0.0.1]:{peer.port}"}}
    )
    (inst.base / "aliases").write_text("postmaster: postmaster@example.org\n")
    inst.start(processes)
    # The sender is refused by its own server, so the bounce cannot be delivered either.
    res = inst.sendmail(
        "-f", "reject-sender@example.net", "reject-rcpt@example.net", data=b"Subject: doomed\n\nx\n"
    )
    assert res.returncode == 0
    wait_for(lambda: inst.messages("postmaster"), timeout=30)
    [double] = delivered(inst, "postmaster")
    assert double.get_content_type() == "multipart/report"
    assert "reject-sender@example.net" in double.as_string()
    wait_for(lambda: inst.spool_entries() == [], timeout=10)
    assert len(inst.messages("postmaster")) == 1  # never a bounce of the double bounce


def test_delay_warning_sent_once(tmp_path: Path, processes: Processes) -> None:
    peer = start_peer(processes, tmp_path, "--always-tempfail")
    inst = remote_instance(
        tmp_path,
        free_port(),
        9,
        remote={"routes": {"example.net": f"[127.0.0.1]:{peer.port}"}},
        queue={"retry": ["1s"], "warn_after": "2s"},
    )
    inst.start(processes, retry_interval=0.5)
    res = inst.sendmail("-f", "alice@example.org", "a@example.net", data=b"Subject: slow\n\nx\n")
    assert res.returncode == 0
    wait_for(lambda: inst.messages("alice"), timeout=30)
    [warning] = delivered(inst, "alice")
    assert warning["Subject"].startswith("Delayed Mail")
    report = list(warning.iter_parts())[1].get_payload()
    assert report[1]["Action"] == "delayed"
    # Still queued and retried, but no second warning.
    first_attempts = inst.run("mailgrave", "queue").stdout.decode()
    assert "<a@example.net> pending" in first_attempts
    # The transcript of the failed attempts is kept with the queue entry.
    qid = first_attempts.splitlines()[1].split()[0]
    shown = inst.run("mailgrave", "queue", "show", qid).stdout.decode()
    assert ">>> MAIL FROM:<alice@example.org>" in shown
    assert "<<< 451 4.3.0 please try again later" in shown
    wait_for(lambda: len(peer.events("ehlo")) >= 5, timeout=30)
    assert len(inst.messages("alice")) == 1
