"""The hostile corpus (issue 13), in the protocol core: each case what an attacker
sends and the reply it must get. Cases already in test_smtp_server.py (the
bare-LF smuggling variants, long lines, HTTP, over-size, STARTTLS pipelining)
are not repeated; this file adds the rest of the corpus.

Bare LF in DATA is refused today and may become normalized (smtpd.bare_lf,
issue 12): the smuggling cases here assert only what must hold under both, that
no bare-LF, bare-CR or NUL variant ends DATA or starts a second transaction.
"""

from __future__ import annotations

import pytest

from mailgrave.smtp import server as S
from tests.unit.test_smtp_server import Dialog

TRAILER = b"MAIL FROM:<evil@b.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nsmuggled\r\n"


def _outputs(events: list[S.Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, S.Output))


@pytest.mark.parametrize(
    "terminator",
    [
        b"\r\n.\x00\r\n",
        b"\r\n\x00.\r\n",
        b"\r\n.\r\x00\n",
        b"\r\n.\x00\n",
        b"\r\n.\r\r\n",
        b"\r\n .\r\n",
        b"\r\n..\r\n",
    ],
    ids=repr,
)
def test_smuggled_terminator_starts_no_second_transaction(terminator: bytes) -> None:
    """Whatever follows the fake end is message text; only one reply after the real dot."""
    d = Dialog().ready()
    d.transaction("alice@example.org")
    assert d.code("DATA") == "354 End"
    events = d.send(b"Subject: x\r\n\r\nhello" + terminator + TRAILER)
    starts = [e for e in d.events if isinstance(e, S.MessageStart)]
    assert len(starts) == 1
    assert _outputs(events) == b""  # nothing answered: still in DATA
    events = d.send(b"\r\n.\r\n")
    out = _outputs(events)
    completes = [e for e in events if isinstance(e, S.MessageComplete)]
    if completes:  # accepted as one message (the smuggled text is its body)
        out += _outputs(d.server.message_queued("Q1"))
    assert out.count(b"\r\n") == 1, out
    assert out[:3] in (b"250", b"554", b"500"), out
    assert len([e for e in d.events if isinstance(e, S.MessageStart)]) == 1
    assert d.server.state == S.State.READY


# --- command lines

# (id, what the client sends after EHLO, the reply codes it gets, in order)
COMMAND_CASES = [
    ("1000-octet line", b"NOOP " + b"x" * 995 + b"\r\n", ["500 5.5.2"]),
    ("999-octet line", b"NOOP " + b"x" * 992 + b"\r\n", ["250 2.0.0"]),
    ("1 MB line", b"NOOP " + b"x" * 1_000_000 + b"\r\nNOOP\r\n", ["500 5.5.2", "250 2.0.0"]),
    ("NUL in verb", b"NO\x00OP\r\n", ["500 5.5.1"]),
    ("NUL in MAIL", b"MAIL FROM:<a\x00@b.test>\r\n", ["501 5.1.3"]),
    ("NUL after MAIL", b"MAIL FROM:<a@b.test>\x00\r\n", ["501 5.5.4"]),
    ("8-bit Latin-1 in verb", b"N\xd6OP\r\n", ["500 5.5.2"]),
    ("8-bit in MAIL", b"MAIL FROM:<\xe9t\xe9@b.test>\r\n", ["500 5.5.2"]),
    ("UTF-8 MAIL without SMTPUTF8", "MAIL FROM:<été@b.test>\r\n".encode(), ["553 5.6.7"]),
    ("CR inside MAIL", b"MAIL FROM:<a@b.test>\rRCPT TO:<bob@example.org>\r\n", ["500 5.5.2"]),
    (
        "LF inside MAIL",
        b"MAIL FROM:<a@b.test>\nRCPT TO:<bob@example.org>\r\n",
        ["500 5.5.2", "503 5.5.1"],
    ),
    (
        "CR inside RCPT",
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\rRCPT TO:<x@far.test>\r\n",
        ["250 2.0.0", "500 5.5.2"],
    ),
    (
        "LF inside RCPT",
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org\n>\r\n",
        ["250 2.0.0", "500 5.5.2", "500 5.5.1"],
    ),
    ("DATA before MAIL", b"DATA\r\n", ["503 5.5.1"]),
    ("DATA before RCPT", b"MAIL FROM:<a@b.test>\r\nDATA\r\n", ["250 2.0.0", "503 5.5.1"]),
    (
        "DATA after refused RCPT",
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\n",
        ["250 2.0.0", "554 5.7.1", "503 5.5.1"],
    ),
    # CHUNKING is offered: BDAT outside a transaction is refused and its 5 octets
    # are read and thrown away, never taken as a command ("hello").
    ("BDAT before MAIL", b"BDAT 5 LAST\r\nhello\r\n", ["503 5.5.1", "500 5.5.2"]),
    ("AUTH not offered", b"AUTH PLAIN AGFAAGI=\r\n", ["502 5.5.1"]),  # no users file, no TLS
    ("empty line", b"\r\n", ["500 5.5.2"]),
    ("only spaces", b"   \r\n", ["500 5.5.2"]),
    ("MAIL with no colon", b"MAIL <a@b.test>\r\n", ["501 5.5.4"]),
    ("MAIL unknown parameter", b"MAIL FROM:<a@b.test> XFORWARD=1\r\n", ["555 5.5.4"]),
    ("MAIL SIZE not a number", b"MAIL FROM:<a@b.test> SIZE=1e9\r\n", ["501 5.5.4"]),
    ("MAIL unbalanced bracket", b"MAIL FROM:<a@b.test\r\n", ["501 5.5.4"]),
    ("EHLO with two words", b"EHLO a b\r\n", ["501 5.5.4"]),
    ("VRFY", b"VRFY alice\r\n", ["252 2.5.0"]),
    ("EXPN", b"EXPN staff\r\n", ["500 5.5.1"]),
    ("TURN", b"TURN\r\n", ["500 5.5.1"]),
]


@pytest.mark.parametrize(
    "sent,expected", [c[1:] for c in COMMAND_CASES], ids=[c[0] for c in COMMAND_CASES]
)
def test_hostile_command(sent: bytes, expected: list[str]) -> None:
    d = Dialog(max_errors=0).ready()
    assert d.codes(sent) == expected
    assert d.code("NOOP") == "250 2.0.0"  # the session is still usable


def test_thousand_pipelined_rcpts() -> None:
    """Beyond max_recipients: 452 for each one over, in order; DATA still works."""
    d = Dialog(max_recipients=100, max_errors=0).ready()
    d.code("MAIL FROM:<a@b.test>")
    burst = b"".join(b"RCPT TO:<alice@example.org>\r\n" for _ in range(1000)) + b"DATA\r\n"
    codes = d.codes(burst)
    assert len(codes) == 1001
    # Duplicates are kept once, so the cap is never reached by one address.
    assert codes[:1000] == ["250 2.0.0"] * 1000
    assert codes[-1] == "354 End"
    d2 = Dialog(max_recipients=100, max_errors=0).ready()
    d2.code("MAIL FROM:<a@b.test>")
    burst = b"".join(b"RCPT TO:<postmaster>\r\nRCPT TO:<x%d@far.test>\r\n" % i for i in range(500))
    codes = d2.codes(burst)
    assert len(codes) == 1000
    assert codes[0] == "250 2.0.0" and set(codes[1::2]) == {"554 5.7.1"}


def test_thousand_pipelined_rcpts_close_after_max_errors() -> None:
    """With the default error limit a flood of refused RCPTs ends the session."""
    d = Dialog(max_errors=10).ready()
    d.code("MAIL FROM:<a@b.test>")
    events = d.send(b"".join(b"RCPT TO:<x%d@far.test>\r\n" % i for i in range(1000)))
    out = _outputs(events)
    assert out.count(b"554 5.7.1") == 10
    assert out.endswith(b"421 4.7.0 Too many errors, closing connection\r\n")
    assert isinstance(events[-1], S.Close)


def test_starttls_injection_cve_2011_0411() -> None:
    """Plaintext pipelined after STARTTLS must never be read as if it came inside TLS."""
    d = Dialog(tls_available=True).ready()
    events = d.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@b.test>\r\n")
    assert _outputs(events) == b"220 2.0.0 Ready to start TLS\r\n"
    assert events[-1] == S.StartTLS()
    d.server.tls_started()
    # Inside TLS: the injected MAIL is gone, the session needs EHLO again.
    assert d.code("MAIL FROM:<a@b.test>") == "503 5.5.1"
    assert d.server.sender is None


@pytest.mark.parametrize(
    "line", [b"OPTIONS * HTTP/1.1\r\n", b"PUT /x HTTP/1.1\r\n", b"get / http/1.0\r\n"], ids=repr
)
def test_more_http_requests_close_without_reply(line: bytes) -> None:
    d = Dialog()
    events = d.send(line)
    assert _outputs(events) == b""
    assert isinstance(events[-1], S.Close)


def test_oversize_message_552_after_the_dot_then_usable() -> None:
    """SIZE not declared: read to the real end, 552 there, no commit, nothing past the limit."""
    d = Dialog(max_message_size=50_000).ready()
    d.transaction("alice@example.org")
    assert d.code("DATA") == "354 End"
    events = d.send((b"y" * 998 + b"\r\n") * 200)
    assert _outputs(events) == b""
    events = d.send(b".\r\n")
    assert _outputs(events) == b"552 5.3.4 Message size exceeds fixed limit\r\n"
    assert not [e for e in d.events if isinstance(e, S.MessageComplete)]
    forwarded = sum(len(e.data) for e in d.events if isinstance(e, S.MessageData))
    assert forwarded <= 50_000
    d.transaction("bob@example.org")
