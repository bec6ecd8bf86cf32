"""Hypothesis fuzzing of the SMTP core: nothing escapes, every reply is well formed."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mailgrave.smtp import server as S
from tests.unit.test_smtp_server import FakePolicy

REPLY_LINE = re.compile(rb"\A[2-5]\d\d[ -][^\r\n]*\Z")

COMMANDS = [
    b"EHLO client.test\r\n",
    b"HELO x\r\n",
    b"MAIL FROM:<a@b.test>\r\n",
    b"MAIL FROM:<> SIZE=10\r\n",
    b"RCPT TO:<alice@example.org>\r\n",
    b"RCPT TO:<x@far.test>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"DATA\r\n",
    b".\r\n",
    b"..\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"STARTTLS\r\n",
    b"QUIT\r\n",
    b"\xff\xfe\r\n",
    b'MAIL FROM:<"q\\"@"@b.test>\r\n',
    b"x" * 1100,
]

chunks = st.lists(st.one_of(st.sampled_from(COMMANDS), st.binary(max_size=200)), max_size=40)


def check_output(data: bytes) -> None:
    assert data.endswith(b"\r\n"), data
    lines = data[:-2].split(b"\r\n")
    for line in lines:
        assert REPLY_LINE.match(line) or line.startswith(b"354 "), line
    # a multi-line reply keeps its code and ends with a space line
    assert lines[-1][3:4] == b" "


@settings(max_examples=300, deadline=None)
@given(chunks, st.booleans(), st.booleans())
def test_core_never_raises_and_replies_are_well_formed(
    parts: list[bytes], tls: bool, relay: bool
) -> None:
    server = S.Server(FakePolicy(tls_available=tls, relay=relay, max_message_size=3000))
    closed = False
    for part in [*parts, b""]:
        events = server.receive_data(part)
        while events:
            ev = events.pop(0)
            assert not closed, "event after Close"
            if isinstance(ev, S.Output):
                check_output(ev.data)
            elif isinstance(ev, S.MessageComplete):
                events += server.message_queued("Q1")
            elif isinstance(ev, S.StartTLS):
                events += server.tls_started()
            elif isinstance(ev, S.Close):
                closed = True
    assert server.receive_data(b"NOOP\r\n") == []


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=50))
def test_data_chunking_does_not_change_the_result(body: bytes, step: int) -> None:
    """The same bytes split differently give the same message and replies."""

    def run(pieces: list[bytes]) -> tuple[bytes, bytes]:
        server = S.Server(FakePolicy(max_message_size=100_000))
        prefix = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        out, msg = bytearray(), bytearray()
        for piece in [prefix, *(p for p in pieces if p), b"\r\n.\r\n"]:
            events = server.receive_data(piece)
            while events:
                ev = events.pop(0)
                if isinstance(ev, S.Output):
                    out += ev.data
                elif isinstance(ev, S.MessageData):
                    msg += ev.data
                elif isinstance(ev, S.MessageComplete):
                    events += server.message_queued("Q")
        return bytes(out), bytes(msg)

    whole = run([body])
    split = run([body[i : i + step] for i in range(0, len(body), step)])
    assert whole == split


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b"\n.", b".\r"]), max_size=60),
    st.sampled_from(["normalize", "reject"]),
)
def test_only_crlf_dot_crlf_ends_data(pieces: list[bytes], bare_lf: str) -> None:
    """Whatever mix of bare LF, bare CR and dots: DATA ends (or a second
    transaction starts) only where CRLF "." CRLF really is."""
    body = b"".join(pieces)
    server = S.Server(FakePolicy(bare_lf=bare_lf, max_message_size=100_000))
    server.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\n")
    server.receive_data(b"DATA\r\n")
    events = server.receive_data(body + b"MAIL FROM:<evil@b.test>\r\n")
    ended = any(isinstance(e, (S.MessageComplete, S.MessageAborted)) for e in events)
    assert ended == (b"\r\n.\r\n" in b"\r\n" + body)
