"""The sans-I/O SMTP server core, dialog by dialog: bytes in, replies and events out."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from mailgrave.smtp import server as S
from mailgrave.smtp.replies import Reply


@dataclass
class FakePolicy:
    hostname: str = "mx.example.org"
    max_message_size: int = 10_000
    max_recipients: int = 3
    max_errors: int = 20
    tls_available: bool = False
    bare_lf: str = "normalize"
    relay: bool = False
    users: set[str] = field(default_factory=lambda: {"alice@example.org", "bob@example.org"})
    submission: bool = False
    auth_available: bool = False
    max_auth_failures: int = 3
    senders: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rate_left: int = 1000

    def sender_allowed(self, login: str, sender: str) -> bool:
        return sender in self.senders.get(login, (f"{login}@example.org",))

    def within_rate(self, login: str, recipients: int) -> bool:
        return recipients <= self.rate_left

    def is_local_domain(self, domain: str) -> bool:
        return domain in ("example.org", self.hostname)

    def recipient_exists(self, local: str, domain: str) -> bool:
        return f"{local}@{domain}".lower() in self.users

    def may_relay(self) -> bool:
        return self.relay


class Dialog:
    """A server plus helpers that return the reply codes for what is sent."""

    def __init__(self, **policy: object) -> None:
        self.server = S.Server(FakePolicy(**policy))  # type: ignore[arg-type]
        self.events: list[S.Event] = []

    def send(self, data: bytes) -> list[S.Event]:
        events = self.server.receive_data(data)
        self.events += events
        return events

    def replies(self, data: bytes) -> list[str]:
        """Every reply line sent back for ``data``."""
        out = b"".join(e.data for e in self.send(data) if isinstance(e, S.Output))
        return out.decode().split("\r\n")[:-1]

    def codes(self, data: bytes) -> list[str]:
        """``"250 2.0.0"``-style code pairs of the final line of every reply."""
        return [
            " ".join(line.split(" ")[:2])
            for line in self.replies(data)
            if re.match(r"\d{3} ", line)
        ]

    def code(self, line: str) -> str:
        codes = self.codes(line.encode() + b"\r\n")
        assert len(codes) == 1, codes
        return codes[0]

    def ready(self, relay: bool = False) -> Dialog:
        assert self.code("EHLO client.test").startswith("250")
        return self

    def transaction(self, *rcpts: str, sender: str = "s@client.test") -> None:
        assert self.code(f"MAIL FROM:<{sender}>") == "250 2.0.0"
        for rcpt in rcpts:
            assert self.code(f"RCPT TO:<{rcpt}>") == "250 2.0.0"

    def data(self, body: bytes) -> tuple[list[str], list[S.Event]]:
        assert self.code("DATA") == "354 End"
        events = self.send(body)
        out = b"".join(e.data for e in events if isinstance(e, S.Output))
        return out.decode().split("\r\n")[:-1], events


def message_bytes(events: list[S.Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, S.MessageData))


# --- greeting, EHLO, basic commands


def test_greeting_names_the_host() -> None:
    d = Dialog()
    assert d.server.greeting() == b"220 mx.example.org ESMTP MailGrave\r\n"


def test_ehlo_multiline_format_rfc5321() -> None:
    d = Dialog(tls_available=True)
    lines = d.replies(b"EHLO client.test\r\n")
    assert lines[0] == "250-mx.example.org Hello"
    assert all(line.startswith("250-") for line in lines[:-1])
    assert lines[-1].startswith("250 ") and not lines[-1].startswith("250-")
    keywords = {line[4:] for line in lines[1:]}
    assert {"PIPELINING", "SIZE 10000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"} <= keywords
    assert "STARTTLS" in keywords


def test_no_starttls_advertised_without_certificate() -> None:
    d = Dialog()
    assert "250-STARTTLS" not in d.replies(b"EHLO c\r\n")
    assert d.code("STARTTLS") == "502 5.5.1"


def test_commands_are_case_insensitive() -> None:
    d = Dialog()
    assert d.code("ehlo client.test").startswith("250")
    assert d.code("mail from:<s@client.test>") == "250 2.0.0"
    assert d.code("rCpT To:<alice@example.org>") == "250 2.0.0"
    assert d.code("NoOp") == "250 2.0.0"


def test_helo_gives_plain_smtp() -> None:
    d = Dialog()
    assert d.code("HELO client.test") == "250 mx.example.org"
    d.transaction("alice@example.org")
    d.code("DATA")
    start = [e for e in d.events if isinstance(e, S.MessageStart)]
    assert start[0].proto == "SMTP" and start[0].helo == "client.test"


@pytest.mark.parametrize("cmd", ["EHLO", "HELO", "EHLO two words"])
def test_hello_needs_one_argument(cmd: str) -> None:
    assert Dialog().code(cmd) == "501 5.5.4"


def test_vrfy_help_noop_rset_quit() -> None:
    d = Dialog().ready()
    assert d.code("VRFY alice") == "252 2.5.0"
    assert d.code("HELP").startswith("214 2.0.0")
    assert d.code("NOOP") == "250 2.0.0"
    d.transaction("alice@example.org")
    assert d.code("RSET") == "250 2.0.0"
    assert d.code("DATA") == "503 5.5.1"  # the transaction is gone
    events = d.send(b"QUIT\r\n")
    assert events[0] == S.Output(b"221 2.0.0 Bye\r\n")
    assert isinstance(events[-1], S.Close)
    assert d.send(b"NOOP\r\n") == []


def test_unknown_command() -> None:
    assert Dialog().code("EXPN staff") == "500 5.5.1"


def test_every_reply_after_ehlo_has_an_enhanced_code() -> None:
    d = Dialog().ready()
    lines = d.replies(
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<nobody@example.org>\r\nRCPT TO:<x@far.test>\r\n"
        b"RCPT TO:<alice@example.org>\r\nNOOP\r\nBOGUS\r\nVRFY x\r\nRSET\r\nQUIT\r\n"
    )
    assert len(lines) == 9
    for line in lines:
        assert re.match(r"^[245]\d\d [245]\.\d{1,3}\.\d{1,3} ", line), line


# --- sequence


def test_mail_before_helo_refused() -> None:
    assert Dialog().code("MAIL FROM:<a@b.test>") == "503 5.5.1"


def test_rcpt_before_mail_and_nested_mail() -> None:
    d = Dialog().ready()
    assert d.code("RCPT TO:<alice@example.org>") == "503 5.5.1"
    assert d.code("MAIL FROM:<a@b.test>") == "250 2.0.0"
    assert d.code("MAIL FROM:<a@b.test>") == "503 5.5.1"
    assert d.code("DATA") == "503 5.5.1"


def test_ehlo_resets_the_transaction() -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org")
    assert d.code("EHLO again.test").startswith("250")
    assert d.code("DATA") == "503 5.5.1"


# --- addresses


def test_null_sender() -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org", sender="")
    d.code("DATA")
    start = next(e for e in d.events if isinstance(e, S.MessageStart))
    assert start.sender == ""


def test_source_route_is_dropped() -> None:
    d = Dialog().ready()
    assert d.code("MAIL FROM:<@relay1.test,@relay2.test:joe@client.test>") == "250 2.0.0"
    assert d.code("RCPT TO:<@mx.example.org:alice@example.org>") == "250 2.0.0"
    assert d.server.sender == "joe@client.test"
    assert d.server.recipients == ["alice@example.org"]


def test_quoted_local_part() -> None:
    d = Dialog(users={"john smith@example.org"})
    d.ready()
    assert d.code('MAIL FROM:<"a>b"@client.test>') == "250 2.0.0"
    assert d.server.sender == "a>b@client.test"
    assert d.code('RCPT TO:<"john smith"@example.org>') == "250 2.0.0"


def test_postmaster_without_domain() -> None:
    d = Dialog().ready()
    assert d.code("MAIL FROM:<a@b.test>") == "250 2.0.0"
    assert d.code("RCPT TO:<PostMaster>") == "250 2.0.0"
    assert d.server.recipients == ["postmaster@mx.example.org"]
    assert d.code("RCPT TO:<alice>") == "501 5.1.3"


def test_domains_become_lowercase_a_labels() -> None:
    d = Dialog(relay=True).ready()
    assert d.code("MAIL FROM:<a@B.Test> SMTPUTF8") == "250 2.0.0"
    assert d.code("RCPT TO:<x@bücher.test>") == "250 2.0.0"
    assert d.server.sender == "a@b.test"
    assert d.server.recipients == ["x@xn--bcher-kva.test"]


def test_utf8_address_needs_smtputf8() -> None:
    d = Dialog().ready()
    assert d.code("MAIL FROM:<jürgen@client.test>") == "553 5.6.7"
    assert d.code("MAIL FROM:<jürgen@client.test> SMTPUTF8") == "250 2.0.0"


@pytest.mark.parametrize(
    "arg",
    [
        "FROM:a@b.test",
        "FROM:<a@b.test",
        "FROM:<a..b@b.test>",
        "FROM:<.a@b.test>",
        "FROM:<a@>",
        "FROM:<a@-bad.test>",
        "FROM:<a b@c.test>",
        "TO:<a@b.test>",
    ],
)
def test_bad_mail_syntax(arg: str) -> None:
    d = Dialog().ready()
    assert d.code(f"MAIL {arg}").startswith("501 5.")


def test_address_limits() -> None:
    d = Dialog(relay=True).ready()
    assert d.code("MAIL FROM:<" + "a" * 65 + "@b.test>") == "501 5.1.3"
    assert d.code("MAIL FROM:<" + "a" * 64 + "@b.test>") == "250 2.0.0"
    long_domain = ".".join(["d" * 60] * 5) + ".test"
    assert d.code(f"RCPT TO:<a@{long_domain}>") == "501 5.1.3"


def test_mail_parameters() -> None:
    d = Dialog().ready()
    assert d.code("MAIL FROM:<a@b.test> BODY=8BITMIME SIZE=100") == "250 2.0.0"
    d.code("RSET")
    assert d.code("MAIL FROM:<a@b.test> FOO=BAR") == "555 5.5.4"
    assert d.code("MAIL FROM:<a@b.test> BODY=BINARYMIME") == "501 5.5.4"
    assert d.code("MAIL FROM:<a@b.test>") == "250 2.0.0"
    assert d.code("RCPT TO:<alice@example.org> NOTIFY=NEVER") == "250 2.0.0"  # DSN
    assert d.code("RCPT TO:<bob@example.org> FOO=BAR") == "555 5.5.4"


def test_duplicate_recipients_are_kept_once() -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org", "alice@EXAMPLE.org")
    assert d.server.recipients == ["alice@example.org"]


# --- policy


def test_unknown_local_recipient_550() -> None:
    d = Dialog().ready()
    assert d.code("MAIL FROM:<a@b.test>") == "250 2.0.0"
    assert d.code("RCPT TO:<carol@example.org>") == "550 5.1.1"
    assert d.code("RCPT TO:<alice@example.org>") == "250 2.0.0"


def test_relay_refused_from_outside() -> None:
    d = Dialog(relay=False).ready()
    d.code("MAIL FROM:<a@b.test>")
    assert d.code("RCPT TO:<someone@elsewhere.test>") == "554 5.7.1"
    assert d.code("RCPT TO:<someone@[192.0.2.1]>") == "554 5.7.1"


def test_relay_allowed_from_relay_networks() -> None:
    d = Dialog(relay=True).ready()
    d.code("MAIL FROM:<a@b.test>")
    assert d.code("RCPT TO:<someone@elsewhere.test>") == "250 2.0.0"


@pytest.mark.parametrize(
    "rcpt",
    [
        "someone%elsewhere.test@far.test",
        "elsewhere.test!someone@far.test",
        '"someone@elsewhere.test"@far.test',
    ],
)
def test_tricks_never_relay_even_from_relay_networks(rcpt: str) -> None:
    d = Dialog(relay=True).ready()
    d.code("MAIL FROM:<a@b.test>")
    assert d.code(f"RCPT TO:<{rcpt}>") == "554 5.7.1"


@pytest.mark.parametrize(
    "rcpt", ["alice%elsewhere.test@example.org", '"alice@elsewhere.test"@example.org']
)
def test_tricks_to_local_domain_are_unknown_users(rcpt: str) -> None:
    d = Dialog(relay=True).ready()
    d.code("MAIL FROM:<a@b.test>")
    assert d.code(f"RCPT TO:<{rcpt}>") == "550 5.1.1"


def test_too_many_recipients() -> None:
    d = Dialog(max_recipients=2).ready()
    d.transaction("alice@example.org", "bob@example.org")
    assert d.code("RCPT TO:<alice@example.org>") == "452 4.5.3"
    assert d.code("RCPT TO:<postmaster>") == "452 4.5.3"


def test_declared_size_too_big() -> None:
    d = Dialog(max_message_size=1000).ready()
    assert d.code("MAIL FROM:<a@b.test> SIZE=1001") == "552 5.3.4"
    assert d.code("MAIL FROM:<a@b.test> SIZE=1000") == "250 2.0.0"


def test_message_too_big_after_the_dot() -> None:
    d = Dialog(max_message_size=1000).ready()
    d.transaction("alice@example.org")
    body = b"x" * 70 + b"\r\n"
    lines, events = d.data(body * 20)
    assert lines == []  # keeps reading
    events = d.send(b".\r\n")
    assert any(isinstance(e, S.MessageAborted) for e in events)
    assert S.Output(b"552 5.3.4 Message size exceeds fixed limit\r\n") in events
    assert not any(isinstance(e, S.MessageComplete) for e in events)
    # forwarded bytes stop at the limit
    assert len(message_bytes(d.events)) <= 1000
    assert d.code("NOOP") == "250 2.0.0"


def test_command_line_too_long() -> None:
    d = Dialog().ready()
    assert d.codes(b"NOOP " + b"x" * 1200 + b"\r\n") == ["500 5.5.2"]
    assert d.codes(b"NOOP " + b"x" * 600) == []
    assert d.codes(b"x" * 600 + b"\r\n") == ["500 5.5.2"]
    assert d.code("NOOP " + "x" * 990) == "250 2.0.0"  # 1000 octets with CRLF


def test_data_line_too_long() -> None:
    d = Dialog(max_message_size=100_000).ready()
    d.transaction("alice@example.org")
    lines, _ = d.data(b"ok\r\n" + b"y" * 1001 + b"\r\n.\r\n")
    assert lines == ["500 5.5.2 Message refused: line longer than 1000 octets"]


def test_max_errors_closes() -> None:
    d = Dialog(max_errors=3)
    events = d.send(b"BAD1\r\nBAD2\r\nBAD3\r\nNOOP\r\n")
    out = b"".join(e.data for e in events if isinstance(e, S.Output))
    assert out.endswith(b"421 4.7.0 Too many errors, closing connection\r\n")
    assert out.count(b"500 5.5.1") == 3
    assert isinstance(events[-1], S.Close)
    assert d.send(b"NOOP\r\n") == []


@pytest.mark.parametrize(
    "line",
    [b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.0\r\n", b"CONNECT mx:25 HTTP/1.1\r\n"],
)
def test_http_closes_at_once(line: bytes) -> None:
    d = Dialog()
    events = d.send(line + b"Host: x\r\n\r\n")
    assert not [e for e in events if isinstance(e, S.Output)]
    assert isinstance(events[-1], S.Close)


def test_timeout() -> None:
    d = Dialog().ready()
    events = d.server.timeout()
    assert events[0] == S.Output(b"421 4.4.2 Timeout, closing connection\r\n")
    assert isinstance(events[-1], S.Close)


def test_bare_lf_in_command_refused() -> None:
    d = Dialog()
    assert d.codes(b"EHLO x\n") == ["500 5.5.2"]
    assert d.server.state == S.State.CONNECTED


# --- DATA


def test_data_is_streamed_and_dot_unstuffed() -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org", "bob@example.org")
    lines, events = d.data(b"Subject: hi\r\n\r\n..leading dot\r\n")
    assert lines == []
    events += d.send(b"body\r\n.")
    events += d.send(b"\r\n")
    assert message_bytes(events) == b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n"
    complete = [e for e in events if isinstance(e, S.MessageComplete)]
    assert len(complete) == 1
    start = next(e for e in d.events if isinstance(e, S.MessageStart))
    assert start.recipients == ("alice@example.org", "bob@example.org")
    assert start.proto == "ESMTP"
    after = d.server.message_queued("QID123")
    assert after == [S.Output(b"250 2.0.0 Ok: queued as QID123\r\n")]
    assert d.server.messages == 1


def test_commands_pipelined_after_the_dot_wait_for_the_queue() -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org")
    d.code("DATA")
    events = d.send(b"hi\r\n.\r\nNOOP\r\nQUIT\r\n")
    assert not [e for e in events if isinstance(e, S.Output)]
    after = d.server.message_failed()
    out = b"".join(e.data for e in after if isinstance(e, S.Output))
    assert (
        out == b"451 4.3.0 Temporary failure, try again later\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"
    )


def test_pipelined_full_transaction() -> None:
    d = Dialog().ready()
    events = d.send(
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<nobody@example.org>\r\n"
        b"DATA\r\n"
    )
    out = b"".join(e.data for e in events if isinstance(e, S.Output))
    assert out == (
        b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n550 5.1.1 No such user here\r\n"
        b"354 End data with <CR><LF>.<CR><LF>\r\n"
    )


SMUGGLE_LF_ONLY = [b"\n.\n", b"\r\n.\n", b"\n.\r\n"]
SMUGGLE_CR = [b"\r.\r", b"\r\n.\r", b"\n.\r"]


@pytest.mark.parametrize("bare_lf", ["normalize", "reject"])
@pytest.mark.parametrize("smuggle", SMUGGLE_LF_ONLY + SMUGGLE_CR)
def test_smuggling_variants_do_not_end_data(smuggle: bytes, bare_lf: str) -> None:
    d = Dialog(bare_lf=bare_lf).ready()
    d.transaction("alice@example.org")
    body = (
        b"Subject: x\r\n\r\nhello"
        + smuggle
        + b"MAIL FROM:<evil@b.test>\r\nRCPT TO:<bob@example.org>\r\n"
    )
    lines, events = d.data(body)
    assert lines == []  # nothing answered: still in DATA, the "commands" are message text
    assert not any(isinstance(e, (S.MessageComplete, S.MessageAborted)) for e in events)
    events = d.send(b"DATA\r\nmore\r\n.\r\n")
    out = b"".join(e.data for e in events if isinstance(e, S.Output))
    assert len([e for e in d.events if isinstance(e, S.MessageStart)]) == 1
    if bare_lf == "normalize" and smuggle in SMUGGLE_LF_ONLY:
        # One message, ended by the real CRLF "." CRLF; the "commands" are its text.
        assert out == b""  # waiting for the queue
        assert [e for e in events if isinstance(e, S.MessageComplete)]
        msg = message_bytes(d.events)
        assert b"\r\nMAIL FROM:<evil@b.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n" in msg
        assert b"\n" not in msg.replace(b"\r\n", b"")  # every line end is CRLF
        assert msg.endswith(b"more\r\n")
        assert d.server.sender == "s@client.test"  # the one transaction, not evil's
        assert d.server.message_queued("Q1") == [S.Output(b"250 2.0.0 Ok: queued as Q1\r\n")]
        assert d.server.sender is None
        return
    assert out == b"554 5.6.0 Message refused: bare LF or CR (only CRLF line ends)\r\n"
    assert any(isinstance(e, S.MessageAborted) for e in events)
    assert d.server.state == S.State.READY
    assert d.server.sender is None


def test_bare_lf_lines_are_normalized() -> None:
    """smtplib and many scripts send LF line ends: they are line ends, stored as CRLF,
    dot-unstuffed like any line; only CRLF "." CRLF ends the data."""
    d = Dialog().ready()
    d.transaction("alice@example.org")
    lines, events = d.data(b"Subject: lf\n\n..dot\nbody\n.\nstill body\r\n.\r\n")
    assert lines == []
    assert any(isinstance(e, S.MessageComplete) for e in events)
    assert message_bytes(events) == b"Subject: lf\r\n\r\n.dot\r\nbody\r\n\r\nstill body\r\n"


def test_bare_lf_rejected_when_configured() -> None:
    d = Dialog(bare_lf="reject").ready()
    d.transaction("alice@example.org")
    lines, _events = d.data(b"Subject: lf\n\nbody\r\n.\r\n")
    assert lines == ["554 5.6.0 Message refused: bare LF or CR (only CRLF line ends)"]


def test_bare_cr_refused_even_when_normalizing() -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org")
    lines, _events = d.data(b"Subject: cr\r\n\r\na\rb\r\n.\r\n")
    assert lines == ["554 5.6.0 Message refused: bare LF or CR (only CRLF line ends)"]


def test_nul_in_data_refused() -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org")
    lines, _events = d.data(b"a\x00b\r\n.\r\n")
    assert lines == ["554 5.6.0 Message refused: NUL character"]


def test_data_split_at_every_byte() -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org")
    d.code("DATA")
    events: list[S.Event] = []
    for b in b"line one\r\n..two\r\n.\r\n":
        events += d.send(bytes([b]))
    assert message_bytes(events) == b"line one\r\n.two\r\n"
    assert any(isinstance(e, S.MessageComplete) for e in events)


def test_client_closes_during_data() -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org")
    d.data(b"partial\r\n")
    events = d.send(b"")
    assert any(isinstance(e, S.MessageAborted) for e in events)
    assert isinstance(events[-1], S.Close)


# --- STARTTLS


def test_starttls_discards_pipelined_and_requires_ehlo() -> None:
    d = Dialog(tls_available=True).ready()
    events = d.send(b"STARTTLS\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\n")
    assert events[0] == S.Output(b"220 2.0.0 Ready to start TLS\r\n")
    assert events[1] == S.StartTLS()
    assert len(events) == 2
    assert d.send(b"MAIL FROM:<a@b.test>\r\n") == []  # handshake not done: ignored
    assert d.server.tls_started() == []
    assert d.code("MAIL FROM:<a@b.test>") == "503 5.5.1"
    lines = d.replies(b"EHLO client.test\r\n")
    assert "250-STARTTLS" not in lines
    assert d.code("STARTTLS") == "503 5.5.1"
    d.transaction("alice@example.org")
    d.code("DATA")
    start = [e for e in d.events if isinstance(e, S.MessageStart)][-1]
    assert start.proto == "ESMTPS"


@pytest.mark.parametrize(
    ("tls", "utf8", "proto"),
    [
        (False, False, "ESMTP"),
        (True, False, "ESMTPS"),
        (False, True, "UTF8SMTP"),
        (True, True, "UTF8SMTPS"),
    ],
)
def test_proto_for_received_rfc3848_rfc6531(tls: bool, utf8: bool, proto: str) -> None:
    d = Dialog(tls_available=True).ready()
    if tls:
        d.code("STARTTLS")
        d.server.tls_started()
        d.ready()
    param = " SMTPUTF8" if utf8 else ""
    assert d.code(f"MAIL FROM:<a@b.test>{param}") == "250 2.0.0"
    assert d.code("RCPT TO:<alice@example.org>") == "250 2.0.0"
    d.code("DATA")
    start = [e for e in d.events if isinstance(e, S.MessageStart)][-1]
    assert start.proto == proto


def test_starttls_not_in_transaction() -> None:
    d = Dialog(tls_available=True).ready()
    d.code("MAIL FROM:<a@b.test>")
    assert d.code("STARTTLS") == "503 5.5.1"


def test_reply_encoding_multiline() -> None:
    r = Reply(250, "2.0.0", "first", ("second", "last"))
    assert r.encode() == b"250-2.0.0 first\r\n250-2.0.0 second\r\n250 2.0.0 last\r\n"
