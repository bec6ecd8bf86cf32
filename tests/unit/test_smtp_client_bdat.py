"""mailgrave-remote's client with CHUNKING (RFC 3030): BDAT when offered, DATA otherwise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from mailgrave.remote.client import BDAT_CHUNK, SMTPError, wire_format
from tests.unit.test_smtp_client import EHLO_ALL, Peer, message, pairs


def read_chunk(p: Peer) -> tuple[bytes, bytes]:
    """(the BDAT command line, the chunk's octets)."""
    head = p.read()
    assert head.startswith(b"BDAT "), head
    size = int(head.split()[1])
    return head, p.file.read(size)


def test_bdat_used_when_offered_pipelined_in_chunks() -> None:
    got: dict[str, Any] = {}
    text = b"Subject: big\n\n" + b".dotted line stays as it is\n" * (BDAT_CHUNK // 20)

    def script(p: Peer) -> None:
        p.greet("250-mx.test", "250-PIPELINING", "250-CHUNKING", "250 8BITMIME")
        envelope = [p.read(), p.read()]
        assert envelope[0].startswith(b"MAIL FROM:") and envelope[1].startswith(b"RCPT TO:")
        p.say("250 2.1.0 ok", "250 2.1.5 ok")
        chunks = []
        while True:
            head, octets = read_chunk(p)
            chunks.append((head, octets))
            if head.endswith(b" LAST\r\n"):
                break
        got["chunks"] = chunks
        p.say(*(f"250 2.0.0 {len(o)} octets" for _, o in chunks[:-1]))
        p.say("250 2.0.0 queued as B1")
        assert p.read() == b"QUIT\r\n"
        p.say("221 bye")

    peer = Peer(script)
    client = peer.connect()
    client.greet("me.test")
    results = client.deliver(
        "s@a.test",
        ["a@b.test"],
        message(text),
        len(text),
        False,
        chunks=wire_format(iter([text]), dot_stuff=False),
    )
    client.quit()
    peer.finish()
    assert pairs(results)[0][1].endswith("said: 250 2.0.0 queued as B1")
    chunks = got["chunks"]
    assert len(chunks) >= 2 and all(len(o) >= BDAT_CHUNK for _, o in chunks[:-1])
    assert b"".join(o for _, o in chunks) == text.replace(b"\n", b"\r\n")  # no dot-stuffing
    assert ">>> BDAT" in "\n".join(client.transcript)


def test_refused_chunk_fails_the_transaction() -> None:
    def script(p: Peer) -> None:
        p.greet("250-mx.test", "250 CHUNKING")  # no PIPELINING: one command at a time
        p.read()
        p.say("250 ok")
        p.read()
        p.say("250 ok")
        assert read_chunk(p) == (b"BDAT 3 LAST\r\n", b"x\r\n")
        p.say("552 5.3.4 too big")

    [(code, text)] = pairs([failure_of(script).result()])
    assert code == "D" and text.endswith("said: 552 5.3.4 too big (in reply to BDAT)")


def test_data_without_chunking() -> None:
    def script(p: Peer) -> None:
        p.greet(*EHLO_ALL)
        [p.read() for _ in range(2)]
        p.say("250 ok", "250 ok")
        assert p.read() == b"DATA\r\n"
        p.say("354 go")
        assert p.data() == b"..x\r\n"
        p.say("250 2.0.0 done")

    peer = Peer(script)
    client = peer.connect()
    client.greet("me.test")
    results = client.deliver(
        "s@a.test", ["a@b.test"], message(b".x\n"), 3, False, chunks=iter([b".x\r\n"])
    )
    peer.finish()
    assert results[0].code == "K"


@pytest.mark.parametrize("chunking", [True, False])
def test_an_answer_lost_after_the_whole_message_is_not_a_stale_session(chunking: bool) -> None:
    # The connection drops after BDAT ... LAST (or DATA's dot): the peer may have
    # the message, so mailgrave-remote must not send it again at once elsewhere.
    def script(p: Peer) -> None:
        p.greet("250-mx.test", "250-PIPELINING", *(["250-CHUNKING"] if chunking else []), "250 OK")
        p.read(), p.read()
        p.say("250 ok", "250 ok")
        if chunking:
            assert read_chunk(p) == (b"BDAT 3 LAST\r\n", b"x\r\n")
        else:
            assert p.read() == b"DATA\r\n"
            p.say("354 go on")
            while p.read() != b".\r\n":
                pass

    failure = failure_of(script)
    assert failure.answer_lost and not failure.before_the_message
    assert failure.result().code == "Z"


def test_a_drop_at_mail_is_before_the_message() -> None:
    def script(p: Peer) -> None:
        p.greet("250-mx.test", "250-PIPELINING", "250 CHUNKING")
        p.read()

    failure = failure_of(script)
    assert failure.before_the_message and not failure.answer_lost


def failure_of(script: Callable[[Peer], None]) -> SMTPError:
    """How a one-line message's transaction with ``script`` failed."""
    peer = Peer(script)
    client = peer.connect()
    client.greet("me.test")
    with pytest.raises(SMTPError) as info:
        client.deliver("s@a.test", ["a@b.test"], message(b"x\n"), 2, False, chunks=iter([b"x\r\n"]))
    peer.finish()
    return info.value
