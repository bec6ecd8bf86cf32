"""CHUNKING/BDAT (RFC 3030) in the sans-I/O server core: chunks, limits, and the
hostile cases (size lies, BDAT mixed with DATA, BDAT outside a transaction)."""

from __future__ import annotations

import pytest

from mailgrave.smtp import server as S
from tests.unit.test_smtp_server import Dialog, message_bytes


def out(events: list[S.Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, S.Output))


def kinds(events: list[S.Event], kind: type) -> list[S.Event]:
    return [e for e in events if isinstance(e, kind)]


def test_chunking_is_advertised() -> None:
    assert "250-CHUNKING" in Dialog().replies(b"EHLO client.test\r\n")


def test_two_chunks_make_one_message_taken_as_is() -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org")
    first = b"Subject: hi\r\n\r\n.no dot-stuffing\r\n"
    events = d.send(b"BDAT %d\r\n" % len(first) + first)
    assert out(events) == b"250 2.0.0 %d octets received\r\n" % len(first)
    assert len(kinds(events, S.MessageStart)) == 1
    events += d.send(b"BDAT 6 LAST\r\nbody\r\n")
    assert message_bytes(events) == first + b"body\r\n"
    assert kinds(events, S.MessageComplete) == [S.MessageComplete(len(first) + 6)]
    assert d.server.message_queued("Q1") == [S.Output(b"250 2.0.0 Ok: queued as Q1\r\n")]
    assert d.code("NOOP") == "250 2.0.0"


def test_chunk_split_at_every_byte_and_crlf_across_chunks() -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org")
    events: list[S.Event] = []
    for b in b"BDAT 5\r\nab\r\ncBDAT 3 LAST\r\nd\r\n":
        events += d.send(bytes([b]))
    events += d.send(b"")  # nothing is left over to be taken for a command
    assert message_bytes(events) == b"ab\r\ncd\r\n"
    assert len(kinds(events, S.MessageComplete)) == 1
    # a CRLF split between two chunks is a CRLF, not a bare CR
    d = Dialog().ready()
    d.transaction("alice@example.org")
    events = d.send(b"BDAT 2\r\na\rBDAT 2 LAST\r\n\nb")
    assert message_bytes(events) == b"a\r\nb\r\n"  # and the missing final line end is added
    assert len(kinds(events, S.MessageComplete)) == 1


def test_bdat_0_last_ends_the_message() -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org")
    events = d.send(b"BDAT 4\r\nhi\r\nBDAT 0 LAST\r\n")
    assert message_bytes(events) == b"hi\r\n"
    assert kinds(events, S.MessageComplete) == [S.MessageComplete(4)]


def test_pipelined_bdat_transaction_waits_for_the_queue() -> None:
    d = Dialog().ready()
    events = d.send(
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\n"
        b"BDAT 4\r\nab\r\nBDAT 4 LAST\r\ncd\r\nNOOP\r\nQUIT\r\n"
    )
    assert out(events) == b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n250 2.0.0 4 octets received\r\n"
    assert message_bytes(events) == b"ab\r\ncd\r\n"
    assert len(kinds(events, S.MessageComplete)) == 1
    after = d.server.message_queued("Q2")
    assert out(after) == b"250 2.0.0 Ok: queued as Q2\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"


@pytest.mark.parametrize("bare_lf", ["reject", "normalize"])
def test_bare_lf_cr_and_nul_refuse_the_message_like_data(bare_lf: str) -> None:
    for body, reply in [
        *(
            [
                (b"a\nb\r\n", b"554 5.6.0 Message refused: bare LF or CR"),
                (b"a\r\n.\n", b"554 5.6.0 Message refused: bare LF or CR"),
            ]
            if bare_lf == "reject"
            else []
        ),
        (b"a\rb\r\n", b"554 5.6.0 Message refused: bare LF or CR"),
        (b"a\r", b"554 5.6.0 Message refused: bare LF or CR"),
        (b"a\r\r\n", b"554 5.6.0 Message refused: bare LF or CR"),
        (b"a\x00\r\n", b"554 5.6.0 Message refused: NUL"),
        (b"x" * 999 + b"\r\n", b"500 5.5.2 Message refused: line longer"),
    ]:
        d = Dialog(bare_lf=bare_lf).ready()
        d.transaction("alice@example.org")
        events = d.send(b"BDAT %d LAST\r\n" % len(body) + body + b"NOOP\r\n")
        assert out(events).startswith(reply + b""), body
        assert out(events).endswith(b"\r\n250 2.0.0 Ok\r\n")
        assert kinds(events, S.MessageAborted) and not kinds(events, S.MessageComplete)
        assert d.server.sender is None
    d = Dialog().ready()
    d.transaction("alice@example.org")
    body = b"x" * 998 + b"\r\n"  # the longest line allowed
    events = d.send(b"BDAT %d LAST\r\n" % len(body) + body)
    assert len(kinds(events, S.MessageComplete)) == 1


def test_size_lie_is_read_and_discarded_then_552() -> None:
    """A chunk over the limit: its octets are read (never taken for commands), 552,
    and the transaction is over, so a later chunk cannot start a truncated message."""
    d = Dialog(max_message_size=1000).ready()
    d.transaction("alice@example.org")
    events = d.send(b"BDAT 600\r\n" + b"x" * 598 + b"\r\n")
    assert out(events) == b"250 2.0.0 600 octets received\r\n"
    smuggled = b"MAIL FROM:<evil@b.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
    lie = smuggled + b"y" * (500 - len(smuggled))
    events = d.send(b"BDAT 500\r\n" + lie[:100])
    assert out(events) == b""  # still reading the chunk
    events = d.send(lie[100:] + b"BDAT 10 LAST\r\n0123456789" + b"NOOP\r\n")
    assert out(events) == (
        b"552 5.3.4 Message size exceeds fixed limit\r\n"
        b"503 5.5.1 Need MAIL before RCPT\r\n"
        b"250 2.0.0 Ok\r\n"
    )
    assert len(kinds(d.events, S.MessageAborted)) == 1
    assert not kinds(d.events, S.MessageComplete)
    assert b"evil" not in message_bytes(d.events)
    assert d.server.sender is None


def test_first_chunk_over_the_limit_starts_no_message() -> None:
    d = Dialog(max_message_size=100).ready()
    d.transaction("alice@example.org")
    events = d.send(b"BDAT 101 LAST\r\n" + b"z" * 101 + b"NOOP\r\n")
    assert out(events) == b"552 5.3.4 Message size exceeds fixed limit\r\n250 2.0.0 Ok\r\n"
    assert not kinds(events, S.MessageStart)
    assert d.server.sender is None


@pytest.mark.parametrize(
    ("setup", "reply"),
    [
        (b"", b"503 5.5.1 Need MAIL before RCPT"),
        (b"MAIL FROM:<a@b.test>\r\n", b"503 5.5.1 Need RCPT before DATA"),
    ],
)
def test_bdat_without_a_transaction_is_refused_and_its_chunk_discarded(
    setup: bytes, reply: bytes
) -> None:
    d = Dialog().ready()
    if setup:
        d.send(setup)
    chunk = b"RCPT TO:<alice@example.org>\r\n"
    events = d.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert out(events) == reply + b"\r\n250 2.0.0 Ok\r\n"
    assert not kinds(events, S.MessageStart)
    assert d.server.recipients == []


def test_bdat_before_ehlo_is_refused_and_its_chunk_discarded() -> None:
    d = Dialog()
    events = d.send(b"BDAT 6\r\nQUIT\r\nNOOP\r\n")
    assert out(events).startswith(b"503 5.5.1 Send EHLO or HELO first\r\n250 ")


def test_data_after_bdat_is_refused_and_bdat_continues() -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org")
    d.send(b"BDAT 4\r\nhi\r\n")
    for line in (b"DATA", b"MAIL FROM:<x@b.test>", b"RCPT TO:<bob@example.org>", b"EHLO x"):
        assert out(d.send(line + b"\r\n")).startswith(b"503 5.5.1 Only BDAT, RSET, NOOP or QUIT")
    events = d.send(b"BDAT 0 LAST\r\n")
    assert message_bytes(d.events) == b"hi\r\n"
    assert kinds(events, S.MessageComplete) == [S.MessageComplete(4)]
    start = kinds(d.events, S.MessageStart)
    assert len(start) == 1 and start[0].recipients == ("alice@example.org",)  # type: ignore[attr-defined]


def test_bdat_after_data_is_message_text() -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org")
    _lines, events = d.data(b"BDAT 3 LAST\r\nabc\r\n.\r\n")
    assert message_bytes(events) == b"BDAT 3 LAST\r\nabc\r\n"


def test_rset_and_quit_during_bdat_abort_the_message() -> None:
    for verb, reply in ((b"RSET", b"250 2.0.0 Ok"), (b"QUIT", b"221 2.0.0 Bye")):
        d = Dialog().ready()
        d.transaction("alice@example.org")
        d.send(b"BDAT 4\r\nhi\r\n")
        events = d.send(verb + b"\r\n")
        assert out(events) == reply + b"\r\n"
        assert len(kinds(events, S.MessageAborted)) == 1
    d = Dialog().ready()
    d.transaction("alice@example.org")
    d.send(b"BDAT 4\r\nhi")
    events = d.send(b"")
    assert kinds(events, S.MessageAborted) and isinstance(events[-1], S.Close)


@pytest.mark.parametrize(
    "line", [b"BDAT", b"BDAT x", b"BDAT -1", b"BDAT 10 LAS", b"BDAT 1 LAST more", b"BDAT 1e3"]
)
def test_bad_bdat_arguments_close_the_connection(line: bytes) -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org")
    d.send(b"BDAT 4\r\nhi\r\n")
    events = d.send(line + b"\r\nMAIL FROM:<evil@b.test>\r\n")
    assert out(events) == b"501 5.5.4 Syntax: BDAT size [LAST]; closing connection\r\n"
    assert kinds(events, S.MessageAborted) and isinstance(events[-1], S.Close)


def test_timeout_during_a_chunk_aborts() -> None:
    d = Dialog().ready()
    d.transaction("alice@example.org")
    d.send(b"BDAT 100\r\nabc")
    events = d.server.timeout()
    assert kinds(events, S.MessageAborted) and isinstance(events[-1], S.Close)


def test_bare_lf_in_a_chunk_is_a_line_end_when_normalizing() -> None:
    """smtpd.bare_lf: normalize applies to BDAT as to DATA: stored as CRLF, and no
    bare-LF variant starts a second transaction (BDAT has no terminator at all)."""
    d = Dialog(bare_lf="normalize").ready()
    d.transaction("alice@example.org")
    first = b"Subject: lf\n\nline one\n"
    events = d.send(b"BDAT %d\r\n" % len(first) + first)
    events += d.send(b"BDAT 17 LAST\r\n.\nMAIL FROM:<x@y>\n")
    assert message_bytes(events) == (b"Subject: lf\r\n\r\nline one\r\n.\r\nMAIL FROM:<x@y>\r\n")
    assert len(kinds(events, S.MessageComplete)) == 1 and not kinds(events, S.MessageAborted)
