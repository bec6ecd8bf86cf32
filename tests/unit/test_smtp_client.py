"""The SMTP client against scripted peers on loopback: EHLO/HELO, pipelining, SIZE/8BITMIME,
SMTPUTF8, per-recipient results, DATA streaming, timeouts, AUTH, and the transcript."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgrave.errors import Result
from mailgrave.remote.client import Client, SMTPError, Timeouts, header_is_ascii, wire_format

FAST = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=2, data_end=2)


class Peer:
    """One scripted SMTP server connection; ``script(peer)`` runs in a thread."""

    def __init__(self, script: Callable[[Peer], None]) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.lines: list[bytes] = []
        self.error: BaseException | None = None
        self.conn: socket.socket | None = None
        self.file: Any = None
        self.clients: list[Client] = []
        self.thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self.thread.start()

    def _run(self, script: Callable[[Peer], None]) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        self.conn = conn
        self.file = conn.makefile("rwb")
        try:
            script(self)
        except BaseException as exc:  # reported by finish()
            self.error = exc
        finally:
            self.file.close()
            conn.close()

    def greet(self, *ehlo_reply: str) -> None:
        """The opening every script shares: 220, read the EHLO, answer it with ``ehlo_reply``."""
        self.say("220 mx.test")
        self.read()
        self.say(*ehlo_reply)

    def say(self, *lines: str) -> None:
        self.file.write(b"".join(line.encode() + b"\r\n" for line in lines))
        self.file.flush()

    def read(self) -> bytes:
        line: bytes = self.file.readline()
        self.lines.append(line)
        return line

    def pending(self, wait: float = 0.3) -> bool:
        """Whether the client sent more without waiting for a reply."""
        assert self.conn is not None
        time.sleep(wait)
        return _readable(self.conn)

    def data(self) -> bytes:
        body = b""
        while (line := self.file.readline()) not in (b".\r\n", b""):
            body += line
        return body

    def connect(self, timeouts: Timeouts = FAST) -> Client:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        client = Client(sock, f"mx.test[127.0.0.1]:{self.port}", timeouts)
        self.clients.append(client)
        return client

    def finish(self) -> None:
        self.thread.join(10)
        for client in self.clients:
            client.sock.close()
        self.listener.close()
        if self.error is not None:
            raise self.error


def pairs(results: list[Result]) -> list[tuple[str, str]]:
    """(code, what it says) of each result, as the K/Z/D lines show them."""
    return [(r.code, r.reply_text()) for r in results]


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


EHLO_ALL = ["250-mx.test", "250-PIPELINING", "250-SIZE 1000000", "250 8BITMIME"]


def message(text: bytes) -> Iterator[bytes]:
    return wire_format(iter([text]))


def test_pipelined_envelope_and_per_recipient_results() -> None:
    got: dict[str, Any] = {}

    def script(p: Peer) -> None:
        p.say("220 mx.test ESMTP")
        p.read()
        p.say(*EHLO_ALL)
        envelope = [p.read() for _ in range(4)]  # all before any reply: pipelining
        got["envelope"] = envelope
        p.say("250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 no such user", "451 4.2.0 later")
        assert p.read() == b"DATA\r\n"
        p.say("354 go")
        got["body"] = p.data()
        p.say("250 2.0.0 queued as X1")
        assert p.read() == b"QUIT\r\n"
        p.say("221 bye")

    peer = Peer(script)
    client = peer.connect()
    client.greet("me.test")
    results = client.deliver(
        "s@a.test",
        ["a@b.test", "bad@b.test", "later@b.test"],
        message(b"Subject: x\n\n.dot\nend"),
        42,
        False,
    )
    client.quit()
    peer.finish()
    assert got["envelope"] == [
        b"MAIL FROM:<s@a.test> SIZE=42 BODY=8BITMIME\r\n",
        b"RCPT TO:<a@b.test>\r\n",
        b"RCPT TO:<bad@b.test>\r\n",
        b"RCPT TO:<later@b.test>\r\n",
    ]
    assert got["body"] == b"Subject: x\r\n\r\n..dot\r\nend\r\n"
    name = f"mx.test[127.0.0.1]:{peer.port}"
    assert pairs(results) == [
        ("K", f"{name} said: 250 2.0.0 queued as X1"),
        ("D", f"{name} said: 550 5.1.1 no such user (in reply to RCPT TO)"),
        ("Z", f"{name} said: 451 4.2.0 later (in reply to RCPT TO)"),
    ]
    assert "<<< 250 2.0.0 queued as X1" in client.transcript
    assert not any("dot" in line for line in client.transcript)  # never the body


def test_helo_fallback_and_no_pipelining_waits_for_each_reply() -> None:
    def script(p: Peer) -> None:
        p.say("220 old.test SMTP")
        assert p.read().startswith(b"EHLO ")
        p.say("502 5.5.2 what?")
        assert p.read() == b"HELO me.test\r\n"
        p.say("250 old.test")
        assert p.read() == b"MAIL FROM:<>\r\n"  # no SIZE, no BODY: nothing was offered
        assert not p.pending()
        p.say("250 ok")
        assert p.read() == b"RCPT TO:<a@b.test>\r\n"
        assert not p.pending()
        p.say("250 ok")
        assert p.read() == b"DATA\r\n"
        p.say("354 go")
        assert p.data() == b"x\r\n"
        p.say("250 done")

    peer = Peer(script)
    client = peer.connect()
    client.greet("me.test")
    assert client.deliver("", ["a@b.test"], message(b"x\n"), 2, False)[0].code == "K"
    peer.finish()


def test_every_recipient_refused_resets_and_sends_no_data() -> None:
    def script(p: Peer) -> None:
        p.greet(*EHLO_ALL)
        for _ in range(3):
            p.read()
        p.say("250 ok", "550 no", "553 no")
        assert p.read() == b"RSET\r\n"
        p.say("250 reset")
        # the connection is still good for the next message
        assert p.read().startswith(b"MAIL FROM:<t@a.test>")
        p.read()
        p.say("250 ok", "250 ok")
        assert p.read() == b"DATA\r\n"
        p.say("354 go")
        p.data()
        p.say("250 second")

    peer = Peer(script)
    client = peer.connect()
    client.greet("me.test")
    first = client.deliver("s@a.test", ["x@b.test", "y@b.test"], message(b"x\n"), 2, False)
    assert [code for code, _ in pairs(first)] == ["D", "D"]
    second = client.deliver("t@a.test", ["z@b.test"], message(b"y\n"), 2, False)
    assert pairs(second)[0][0] == "K" and "250 second" in pairs(second)[0][1]
    peer.finish()


def test_smtputf8_needed_but_not_offered_is_permanent_and_sends_nothing() -> None:
    def script(p: Peer) -> None:
        p.greet(*EHLO_ALL)
        assert p.read() == b""  # the client closes without a MAIL FROM

    peer = Peer(script)
    client = peer.connect()
    client.greet("me.test")
    with pytest.raises(SMTPError) as err:
        client.deliver("s@a.test", ["jürgen@b.test"], message(b"x\n"), 2, True)
    assert err.value.permanent and "SMTPUTF8" in err.value.text
    client.sock.close()
    peer.finish()


def test_smtputf8_declared_when_offered_and_needed() -> None:
    def script(p: Peer) -> None:
        p.greet("250-mx.test", "250 SMTPUTF8")
        assert p.read() == b"MAIL FROM:<s@a.test> SMTPUTF8\r\n"
        p.say("250 ok")
        assert p.read() == "RCPT TO:<jürgen@b.test>\r\n".encode()
        p.say("250 ok")
        p.read()
        p.say("354 go")
        p.data()
        p.say("250 ok")

    peer = Peer(script)
    client = peer.connect()
    client.greet("me.test")
    assert client.deliver("s@a.test", ["jürgen@b.test"], message(b"x\n"), 2, True)[0].code == "K"
    peer.finish()


@pytest.mark.parametrize("stage", ["greeting", "MAIL", "end of data"])
def test_a_hanging_peer_times_out_with_the_stage_named(stage: str) -> None:
    release = threading.Event()

    def script(p: Peer) -> None:
        if stage != "greeting":
            p.greet(*EHLO_ALL)
            for _ in range(2):
                p.read()
            if stage == "end of data":
                p.say("250 ok", "250 ok")
                p.read()
                p.say("354 go")
                p.data()
        release.wait(10)  # then say nothing

    def session(client: Client) -> None:
        client.greet("me.test")
        client.deliver("s@a.test", ["a@b.test"], message(b"x\n"), 2, False)

    err, took = timed_failure(script, 0.5, session, release)
    assert took < 3
    assert not err.permanent and "timeout" in err.text
    assert stage.split()[0] in err.text


def timed_failure(
    script: Callable[[Peer], None],
    timeout: float,
    session: Callable[[Client], None],
    release: threading.Event,
) -> tuple[SMTPError, float]:
    """How ``session`` against ``script`` failed with every reply timeout set to
    ``timeout``, and how long it took; ``release`` then lets the script end."""
    peer = Peer(script)
    limits = dict(greeting=timeout, command=timeout, data_init=timeout, data_end=timeout)
    client = peer.connect(Timeouts(connect=2, **limits))
    start = time.monotonic()
    with pytest.raises(SMTPError) as err:
        session(client)
    took = time.monotonic() - start
    release.set()
    client.sock.close()
    peer.finish()
    return err.value, took


def test_a_reply_trickled_a_byte_at_a_time_is_bounded_by_the_timeout() -> None:
    # Each byte comes well inside the timeout, the whole reply never does: the
    # timeout is for the reply (RFC 5321 4.5.3.2), not for each read.
    stop = threading.Event()

    def script(p: Peer) -> None:
        p.say("220-mx.test")
        for _ in range(200):
            if stop.wait(0.1):
                return
            p.file.write(b"2")
            p.file.flush()

    err, took = timed_failure(script, 0.8, lambda client: client.greet("me.test"), stop)
    assert 0.7 < took < 2.5, took
    assert "timeout waiting for the reply to greeting" in err.text


def test_connection_dropped_mid_data_is_a_temporary_failure() -> None:
    def script(p: Peer) -> None:
        p.greet(*EHLO_ALL)
        p.read()
        p.read()
        p.say("250 ok", "250 ok")
        p.read()
        p.say("354 go")
        p.read()  # one line, then gone

    peer = Peer(script)
    client = peer.connect()
    client.greet("me.test")
    with pytest.raises(SMTPError) as err:
        client.deliver("s@a.test", ["a@b.test"], message(b"line\n" * 100000), 600000, False)
    assert not err.value.permanent and err.value.reply is None
    client.sock.close()
    peer.finish()


def test_auth_is_never_sent_without_tls() -> None:
    def script(p: Peer) -> None:
        p.greet("250-mx.test", "250 AUTH PLAIN LOGIN")
        assert p.read() == b""  # nothing: the client gives up without sending credentials

    peer = Peer(script)
    client = peer.connect()
    client.greet("me.test")
    with pytest.raises(SMTPError, match="without TLS"):
        client.auth("user", "s3cret")
    client.sock.close()
    peer.finish()


@pytest.mark.parametrize("offered", ["PLAIN LOGIN", "LOGIN", "CRAM-MD5"])
def test_auth_uses_an_offered_mechanism_and_keeps_the_secret_out_of_the_transcript(
    offered: str,
) -> None:
    seen: list[bytes] = []

    def script(p: Peer) -> None:
        p.greet("250-mx.test", f"250 AUTH {offered}")
        if offered == "CRAM-MD5":
            assert p.read() == b""
            return
        line = p.read()
        seen.append(line)
        if line.startswith(b"AUTH PLAIN "):
            p.say("235 ok")
            return
        p.say("334 VXNlcm5hbWU6")
        seen.append(p.read())
        p.say("334 UGFzc3dvcmQ6")
        seen.append(p.read())
        p.say("235 ok")

    peer = Peer(script)
    client = peer.connect()
    client.greet("me.test")
    client.tls = True  # as after STARTTLS (TLS itself is tested in tests/integration)
    if offered == "CRAM-MD5":
        with pytest.raises(SMTPError, match="no AUTH PLAIN or LOGIN"):
            client.auth("user", "s3cret")
    else:
        client.auth("user", "s3cret")
        assert client.authenticated
    client.sock.close()
    peer.finish()
    if offered == "PLAIN LOGIN":
        assert seen == [b"AUTH PLAIN " + base64.b64encode(b"\0user\0s3cret") + b"\r\n"]
    elif offered == "LOGIN":
        assert seen == [b"AUTH LOGIN\r\n", b"dXNlcg==\r\n", b"czNjcmV0\r\n"]
    text = "\n".join(client.transcript)
    assert "s3cret" not in text and "czNjcmV0" not in text and "AHVzZXIAczNjcmV0" not in text


# --- wire_format ---------------------------------------------------------------------


def unstuff(wire: bytes) -> bytes:
    assert wire == b"" or wire.endswith(b"\r\n")
    lines = wire.split(b"\r\n")[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\n" for line in lines)


@given(
    st.lists(st.sampled_from([b"a", b".", b"\n", b"..", b"x.y", b"\r\n", b" "]), max_size=60),
    st.integers(min_value=1, max_value=7),
)
def test_wire_format_is_crlf_dot_stuffed_whatever_the_block_boundaries(
    parts: list[bytes], size: int
) -> None:
    spool = b"".join(parts).replace(b"\r\n", b"\n")
    blocks = [spool[i : i + size] for i in range(0, len(spool), size)]
    wire = b"".join(wire_format(iter(blocks)))
    assert b"\n" not in wire.replace(b"\r\n", b"")  # no bare LF on the wire
    assert b"\r\n.\r\n" not in b"\r\n" + wire  # the body never ends the DATA early
    expected = spool if spool.endswith(b"\n") or not spool else spool + b"\n"
    assert unstuff(wire) == expected


@given(st.integers(min_value=1, max_value=9))
def test_header_is_ascii_looks_at_the_header_only_whatever_the_block_boundaries(
    size: int,
) -> None:
    def split(data: bytes) -> list[bytes]:
        return [data[i : i + size] for i in range(0, len(data), size)]

    ascii_head = b"From: a@b.c\nSubject: x\n\nGr\xc3\xbc\xc3\x9fe\n"
    assert header_is_ascii(iter(split(ascii_head)))
    assert header_is_ascii(iter(split(ascii_head.replace(b"\n", b"\r\n"))))
    assert header_is_ascii(iter(split(b"\nno header: \xc3\xbc\n")))
    assert not header_is_ascii(iter(split(b"From: J\xc3\xb6rg <a@b.c>\n\nbody\n")))
    assert not header_is_ascii(iter(split(b"Subject: x\nTo: \xc3\xbc@b.c")))  # no body
    # a header line folded over a block boundary, UTF-8 at its end
    assert not header_is_ascii(iter(split(b"Subject: x\n \xc3\xbc\n\nb\n")))


def test_header_is_ascii_reads_no_further_than_the_header() -> None:
    def blocks() -> Iterator[bytes]:
        yield b"Subject: x\n"
        yield b"\nbody\n"
        raise AssertionError("read past the header")

    assert header_is_ascii(blocks())


def test_wire_format_streams_a_huge_line_in_bounded_pieces() -> None:
    block = b"x" * 65536
    pieces = wire_format(block for _ in range(200))  # 13 MB without a line end
    sizes = [len(p) for p in pieces]
    assert max(sizes) <= 65536 + 3 and sum(sizes) == 200 * 65536 + 2


@pytest.mark.parametrize("final", ["554 5.6.0 content refused", "drop"])
def test_a_failed_data_phase_leaves_refused_recipients_their_own_answer(final: str) -> None:
    def script(p: Peer) -> None:
        p.greet(*EHLO_ALL)
        for _ in range(3):
            p.read()
        p.say("250 ok", "550 5.1.1 no such user", "250 ok")
        p.read()
        p.say("354 go")
        p.data()
        if final != "drop":
            p.say(final)

    peer = Peer(script)
    client = peer.connect()
    client.greet("me.test")
    results = pairs(
        client.deliver("s@a.test", ["bad@b.test", "ok@b.test"], message(b"x\n"), 2, False)
    )
    peer.finish()
    assert results[0][0] == "D" and "550 5.1.1" in results[0][1]
    if final == "drop":
        assert results[1][0] == "Z" and client.broken  # not to be reused
    else:
        assert results[1] == (
            "D",
            f"{client.name} said: 554 5.6.0 content refused (in reply to end of DATA)",
        )
        assert not client.broken


def test_control_characters_in_replies_never_reach_results_or_transcript() -> None:
    def script(p: Peer) -> None:
        p.greet(*EHLO_ALL)
        p.read()
        p.read()
        p.say("250 ok", "550 5.1.1 \x1b[31mred\x00\rno\tuser")

    peer = Peer(script)
    client = peer.connect()
    client.greet("me.test")
    [(code, text)] = pairs(client.deliver("s@a.test", ["x@b.test"], message(b"x\n"), 2, False))
    peer.finish()
    assert code == "D" and "550 5.1.1 ?[31mred??no user" in text
    assert all(c.isprintable() for line in client.transcript for c in line)


def test_a_message_over_the_advertised_size_is_refused_before_mail_from() -> None:
    def script(p: Peer) -> None:
        p.greet("250-mx.test", "250 SIZE 1000")
        assert p.read() == b""  # nothing sent

    peer = Peer(script)
    client = peer.connect()
    client.greet("me.test")
    with pytest.raises(SMTPError) as err:
        client.deliver("s@a.test", ["x@b.test"], message(b"x\n"), 1001, False)
    assert err.value.permanent and "at most 1000 bytes" in err.value.text
    assert err.value.status == "5.3.4"  # RFC 3463: message too big for system
    client.sock.close()
    peer.finish()


def test_a_refused_login_is_temporary_not_a_bounce() -> None:
    def script(p: Peer) -> None:
        p.greet("250-mx.test", "250 AUTH PLAIN")
        p.read()
        p.say("535 5.7.8 authentication failed")

    peer = Peer(script)
    client = peer.connect()
    client.greet("me.test")
    client.tls = True
    with pytest.raises(SMTPError) as err:
        client.auth("user", "wrong")
    peer.finish()
    assert not err.value.permanent and "535 5.7.8" in err.value.text
    assert not client.authenticated
