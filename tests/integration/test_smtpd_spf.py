"""SPF (RFC 7208) on receipt: a real DNS server on loopback publishing SPF records,
mailgrave-smtpd checking MAIL FROM through remote.dns, the result in one
Authentication-Results: header (read back with python3-authres), and enforce."""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Iterator
from typing import Any

import authres  # type: ignore[import-untyped]
import pytest

from tests.conftest import Instance, Processes, free_port, wait_for
from tests.integration.dnsserver import dns_server

ZONE: dict[str, list[tuple[Any, ...]]] = {
    "pass.test": [("TXT", "v=spf1 ip4:127.0.0.1 -all")],
    "fail.test": [("TXT", "v=spf1 ip4:192.0.2.1 -all")],
    "soft.test": [("TXT", "v=spf1 ip4:192.0.2.1 ~all")],
    "include.test": [("TXT", "v=spf1 include:pass.test -all")],
    "none.test": [("A", "192.0.2.7")],
    "client.test": [("TXT", "v=spf1 ip4:127.0.0.1 -all")],  # the HELO name, for <>
}
SERVFAIL = ["broken.test"]


def start(procs: Processes, base: Any, port: int, mode: str) -> tuple[Instance, int]:
    inst = Instance(
        base,
        relay_networks=["192.0.2.0/24"],  # 127.0.0.1 is an outside client here
        checks={"spf": mode},
        remote={"dns": {"nameservers": ["127.0.0.1"], "port": port, "timeout": "2s"}},
    )
    smtp_port = free_port()
    inst.start(procs, listen=f"127.0.0.1:{smtp_port}")
    return inst, smtp_port


@pytest.fixture(scope="module")
def dns_port() -> Iterator[int]:
    with dns_server(ZONE, SERVFAIL) as (port, _resolver):
        yield port


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory, dns_port: int) -> Iterator[Any]:
    procs = Processes()
    try:
        yield start(procs, tmp_path_factory.mktemp("spf-record"), dns_port, "record")
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def enforcing(tmp_path_factory: pytest.TempPathFactory, dns_port: int) -> Iterator[Any]:
    procs = Processes()
    try:
        yield start(procs, tmp_path_factory.mktemp("spf-enforce"), dns_port, "enforce")
    finally:
        procs.stop_all()


def send(port: int, sender: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        body = f"From: <{sender or 'x@client.test'}>\r\nSubject: {subject}\r\n\r\nhello\r\n"
        smtp.sendmail(sender, ["alice@example.org"], body.encode())


def auth_results(raw: bytes) -> list[Any]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [
        authres.AuthenticationResultsHeader.parse("Authentication-Results: " + v.replace("\n", ""))
        for v in msg.get_all("Authentication-Results", [])
    ]


@pytest.mark.parametrize(
    ("sender", "result"),
    [
        ("a@pass.test", "pass"),
        ("a@include.test", "pass"),
        ("a@fail.test", "fail"),
        ("a@soft.test", "softfail"),
        ("a@none.test", "none"),
        ("a@broken.test", "temperror"),
        ("", "pass"),  # the null sender: the HELO identity
    ],
)
def test_record_adds_one_header_and_rejects_nothing(
    recording: tuple[Instance, int], sender: str, result: str
) -> None:
    inst, port = recording
    subject = f"spf {sender or 'null'}"
    send(port, sender, subject)
    wait_for(lambda: any(subject.encode() in m for m in inst.messages("alice")), timeout=30)
    raw = next(m for m in inst.messages("alice") if subject.encode() in m)
    [header] = auth_results(raw)
    assert header.authserv_id == "mx.example.org"
    [clause] = [c for c in header.results if c.method == "spf"]  # with dkim=, dmarc=
    assert clause.result == result
    assert clause.smtp_mailfrom == (sender or "postmaster@client.test")
    # below this host's Received: line, above the message's own fields
    assert raw.index(b"Received:") < raw.index(b"Authentication-Results:") < raw.index(b"From:")


def test_enforce_refuses_fail_at_mail_and_defers_dns_trouble(
    enforcing: tuple[Instance, int],
) -> None:
    inst, port = enforcing
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        code, text = smtp.mail("a@fail.test")
        assert (code, text[:6]) == (550, b"5.7.23")
        code, text = smtp.mail("a@broken.test")
        assert (code, text[:5]) == (451, b"4.7.2")
        smtp.rset()
        assert smtp.mail("a@soft.test")[0] == 250  # softfail is recorded, not refused
        smtp.rset()
    send(port, "a@pass.test", "enforced pass")
    wait_for(lambda: any(b"enforced pass" in m for m in inst.messages("alice")), timeout=30)


def test_relay_networks_clients_are_not_checked(tmp_path: Any, processes: Processes) -> None:
    inst = Instance(tmp_path, checks={"spf": "enforce"})  # 127.0.0.1 relays by default
    port = free_port()
    inst.start(processes, listen=f"127.0.0.1:{port}")
    send(port, "a@fail.test", "trusted client")  # the DNS server of remote.dns is port 9
    wait_for(lambda: inst.messages("alice"), timeout=30)
    assert b"Authentication-Results:" not in inst.messages("alice")[0]


FORGED = (
    b"From: <a@pass.test>\r\n"
    b"Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=a@pass.test\r\n"
    b"Authentication-Results: other.example; spf=fail smtp.mailfrom=a@pass.test\r\n"
    b"Subject: forged\r\n\r\nhello\r\n"
)


def test_forged_authentication_results_removed(recording: tuple[Instance, int]) -> None:
    """RFC 8601 §5: a field claiming this host's authserv-id goes; another host's stays."""
    inst, port = recording
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        smtp.sendmail("a@fail.test", ["alice@example.org"], FORGED)
    wait_for(lambda: any(b"Subject: forged" in m for m in inst.messages("alice")), timeout=30)
    raw = next(m for m in inst.messages("alice") if b"Subject: forged" in m)
    ours, other = auth_results(raw)
    assert ours.authserv_id == "mx.example.org"
    assert [c.result for c in ours.results if c.method == "spf"] == ["fail"]
    assert other.authserv_id == "other.example"
    assert raw.count(b"mx.example.org; spf=pass") == 0


def test_forged_authentication_results_removed_for_trusted_clients(
    recording: tuple[Instance, int],
) -> None:
    """A local injection (trusted, unchecked) loses the forged field too."""
    inst, _port = recording
    data = FORGED.replace(b"Subject: forged", b"Subject: forged locally")
    inst.sendmail("-f", "a@pass.test", "alice@example.org", data=data)
    wait_for(lambda: any(b"forged locally" in m for m in inst.messages("alice")), timeout=30)
    raw = next(m for m in inst.messages("alice") if b"forged locally" in m)
    [other] = auth_results(raw)
    assert other.authserv_id == "other.example"
