"""Both ends of MailGrave's control sockets (docs/flow.md).

* queue.ctrl: :class:`QueueClient` submits one message to mailgrave-queue
  (smtpd, inject, local's forwards, send's bounces); :func:`read_attrs` and
  :func:`read_chunks` are the queue's side; :func:`queue_answer` its reply.
* local.ctrl and remote.ctrl: :func:`request` (with :class:`Agents`, the
  connections mailgrave-send keeps) asks an agent to deliver one message to
  some recipients; :func:`recv_request` and :func:`send_results` are the
  agent's side. Results travel as :meth:`mailgrave.errors.Result.line`.

``_socket`` and no :mod:`socket`: mailgrave-smtpd imports this module on
every connection (mailgrave.smtpd.IMPORT_BUDGET).
"""

from __future__ import annotations

import _socket
import _thread
import os
import select
import struct
import sys
import time

from mailgrave.envelope import Envelope, EnvelopeError, decode, read_fields
from mailgrave.errors import PermFail, Result, TempFail
from mailgrave.record import Record, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from typing import BinaryIO

CHUNK = 64 * 1024
MAX_CHUNK = 16 * 1024 * 1024
MAX_ATTRS = 16 * 1024
MAX_REQUEST = 1 << 20
REPLY_TIMEOUT = 120.0
CONNECT_PATIENCE = 10.0
DELIVERY_TIMEOUT = 3600.0
MAX_TRANSCRIPT = 200

# --- queue.ctrl -----------------------------------------------------------------------


def encode_attrs(attrs: dict[str, str]) -> bytes:
    out = bytearray()
    for key, value in attrs.items():
        item = f"{key}={value}".encode("utf-8", "surrogateescape")
        if b"\0" in item or b"\n" in item:
            raise ValueError("attribute contains NUL or newline")
        out += item + b"\0"
    return bytes(out) + b"\0"


def parse_reply(line: bytes) -> str:
    """Turn the queue's one-line answer into a queue id or raise Temp/PermFail."""
    text = line.decode("utf-8", "replace").rstrip("\n")
    if text.startswith("K"):
        return text[1:].split(" ", 1)[0]
    if text.startswith("D"):
        raise PermFail(text[1:] or "message refused by the queue")
    if text.startswith("Z"):
        raise TempFail(text[1:] or "queue failure")
    raise TempFail("no answer from the queue")


def queue_answer(code: str, text: str) -> bytes:
    """The queue's one-line answer: ``K<qid> queued``, ``Z<text>`` or ``D<text>``."""
    return f"{code}{' '.join(text.split())}\n".encode("utf-8", "replace")


class QueueClient:
    """One submission over queue.ctrl: attrs and envelope at once, then the
    message streamed with :meth:`write`, then :meth:`commit` or :meth:`abort`."""

    def __init__(self, path: str, attrs: dict[str, str], envelope: Envelope) -> None:
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.settimeout(REPLY_TIMEOUT)
        self._early: bytes | None = None
        deadline = time.monotonic() + CONNECT_PATIENCE
        while True:
            try:
                self.sock.connect(path)
                break
            except BlockingIOError:
                # The queue's backlog is full for an instant (a burst): wait a little.
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                self.sock.close()
                raise TempFail("the queue is overloaded") from None
            except OSError as exc:
                self.sock.close()
                raise TempFail("cannot reach the queue (mailgrave-queue not running?)") from exc
        self._send(encode_attrs(attrs) + envelope.encode())

    def _send(self, data: bytes) -> None:
        if self._early is not None:
            return
        try:
            self.sock.sendall(data)
        except OSError:
            # The queue may have refused early (D/Z line) and closed.
            self._early = self._read_reply()

    def write(self, data: bytes) -> None:
        """Send message bytes; any length (split into chunks)."""
        view = memoryview(data)
        while view and self._early is None:
            piece = view[: CHUNK * 4]
            view = view[len(piece) :]
            self._send(struct.pack(">I", len(piece)) + bytes(piece))

    def commit(self) -> str:
        """End the message and wait until the queue has it on disk; return the queue id."""
        try:
            self._send(struct.pack(">I", 0))
            reply = self._early if self._early is not None else self._read_reply()
        finally:
            self.sock.close()
        return parse_reply(reply)

    def abort(self) -> None:
        """Drop the submission: the queue keeps nothing."""
        self.sock.close()

    def _read_reply(self) -> bytes:
        buf = bytearray()
        try:
            while not buf.endswith(b"\n") and len(buf) < 4096:
                data = self.sock.recv(4096)
                if not data:
                    break
                buf += data
        except OSError:
            pass
        return bytes(buf)


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise ConnectionError("submission truncated")
    return data


def read_attrs(stream: BinaryIO) -> dict[str, str]:
    """The attributes that begin a submission (``key=value`` NUL ..., NUL)."""
    try:
        block = read_fields(stream, MAX_ATTRS)
    except EOFError:
        raise ConnectionError("submission truncated") from None
    except OverflowError:
        raise PermFail("5.5.4 attributes too long") from None
    attrs: dict[str, str] = {}
    for item in block.split(b"\0")[:-2]:
        key, _, value = item.decode("utf-8", "replace").partition("=")
        attrs[key] = value
    return attrs


def read_chunks(stream: BinaryIO) -> Iterator[bytes]:
    """The message's chunks (4-byte length, then the bytes) up to the empty one;
    ConnectionError when the client went away before it (an abort)."""
    while True:
        (n,) = struct.unpack(">I", _read_exact(stream, 4))
        if n == 0:
            return
        if n > MAX_CHUNK:
            raise PermFail("5.5.4 chunk too large")
        yield _read_exact(stream, n)


# --- local.ctrl and remote.ctrl ---------------------------------------------------------


@record
class Request(Record):
    """One delivery request: a message (its open spool file) for some recipients."""

    qid: str
    sender: str
    recipients: tuple[str, ...]
    fd: int  # the spool file, read-only; -1 when the request carried none
    envelope: Envelope | None = None  # with the DSN parameters, when it decodes


def encode_request(
    qid: str, sender: str, recipients: list[str], envelope: Envelope | None = None
) -> bytes:
    """``Q<qid>`` NUL, then the envelope (text0, DSN fields included when
    ``envelope`` is given: it then names the same sender and recipients)."""
    if envelope is not None:
        return f"Q{qid}".encode() + b"\0" + envelope.encode()
    fields = [f"Q{qid}", f"F{sender}", *(f"T{r}" for r in recipients)]
    return b"".join(f.encode("utf-8", "surrogateescape") + b"\0" for f in fields) + b"\0"


# SCM_RIGHTS carries C ints; by hand rather than with array, whose import
# brings collections.abc into every smtpd connection.
_INT = 4


def send_fds(sock: _socket.socket, data: bytes, fds: list[int]) -> None:
    """One ``sendmsg`` with ``fds`` passed along (SCM_RIGHTS)."""
    payload = b"".join(fd.to_bytes(_INT, sys.byteorder) for fd in fds)
    sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, payload)] if fds else [])


def recv_fds(sock: _socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int]]:
    """One ``recvmsg``: the data and the descriptors that came with it."""
    msg, anc, _flags, _addr = sock.recvmsg(size, _socket.CMSG_SPACE(max_fds * _INT))
    fds = []
    for level, kind, payload in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            whole = len(payload) - len(payload) % _INT
            fds += [
                int.from_bytes(payload[i : i + _INT], sys.byteorder) for i in range(0, whole, _INT)
            ]
    return msg, fds


def recv_request(sock: _socket.socket) -> Request | None:
    """The agent's side: the next request; None at the end of the connection."""
    data = bytearray()
    fd = -1
    while not data.endswith(b"\0\0") or len(data) < 2:
        msg, fds = recv_fds(sock, 65536, 1)
        for extra in fds[1:] if fd < 0 else fds:
            os.close(extra)
        if fd < 0 and fds:
            fd = fds[0]
        if not msg:
            if fd >= 0:
                os.close(fd)
            return None
        data += msg
        if len(data) > MAX_REQUEST:
            if fd >= 0:
                os.close(fd)
            raise ValueError("request too large")
    texts = [f.decode("utf-8", "surrogateescape") for f in data[:-1].split(b"\0")[:-1]]
    qid = next((t[1:] for t in texts if t.startswith("Q")), "-")
    sender = next((t[1:] for t in texts if t.startswith("F")), "")
    rcpts = tuple(t[1:] for t in texts if t.startswith("T"))
    envelope = None
    start = data.find(b"\0F") + 1
    if start > 0:
        try:
            envelope = decode(bytes(data[start:]), validate=False)
        except EnvelopeError:
            envelope = None
    return Request(qid, sender, rcpts, fd, envelope)


def results_text(results: list[Result], transcript: Sequence[str] = ()) -> bytes:
    """The agent's answer: transcript lines (``|``), then one line per recipient."""
    lines = [f"|{t}" for t in transcript[-50:]] + [r.line() for r in results]
    return "".join(line + "\n" for line in lines).encode("utf-8", "replace")


class Agents:
    """Connections to local.ctrl and remote.ctrl, kept open between requests.

    An agent answers any number of requests on one connection, one after
    another (docs/flow.md), so a send run reuses its connections instead of
    connecting (and having mailgrave-local fork a worker) per message.
    """

    def __init__(self) -> None:
        self._idle: dict[str, list[_socket.socket]] = {}
        self._lock = _thread.allocate_lock()  # _thread: no threading import for smtpd

    def get(self, path: str) -> _socket.socket | None:
        """An idle connection to ``path`` still open at the other end, or None."""
        while True:
            with self._lock:
                idle = self._idle.get(path)
                if not idle:
                    return None
                sock = idle.pop()
            # Between requests an agent sends nothing: readable means it has
            # closed the connection (it was restarted, or it exited).
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return sock
            sock.close()

    def put(self, path: str, sock: _socket.socket) -> None:
        with self._lock:
            self._idle.setdefault(path, []).append(sock)

    def close(self) -> None:
        with self._lock:
            for socks in self._idle.values():
                for sock in socks:
                    sock.close()
            self._idle.clear()


def request(
    socket_path: str,
    qid: str,
    sender: str,
    rcpts: list[str],
    message_path: str,
    agents: Agents,
    envelope: Envelope | None = None,
    on_results: Callable[[int, list[Result], list[str]], None] | None = None,
) -> tuple[list[Result], list[str]]:
    """mailgrave-send's side: one request over local.ctrl / remote.ctrl; the result
    for each recipient, in order, and the agent's transcript of the attempt
    (``envelope``: the same sender and recipients with their DSN parameters).

    ``on_results(first, results, transcript)`` is called as results arrive, with
    the index of the first of them and the transcript so far, before the next
    read from the agent (and once more for the recipients the agent left
    unanswered), so that the caller can record each one while the others are
    still being delivered."""
    transcript: list[str] = []
    results: list[Result] = []
    reported = 0

    def report() -> None:
        nonlocal reported
        first, reported = reported, len(results)
        if on_results is not None and reported > first:
            on_results(first, results[first:], transcript)

    buf = bytearray()
    fd = os.open(message_path, os.O_RDONLY | os.O_CLOEXEC)
    sock = agents.get(socket_path)
    try:
        if sock is None:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            sock.settimeout(DELIVERY_TIMEOUT)
            try:
                sock.connect(socket_path)
            except OSError:
                sock.close()
                sock = None
                name = os.path.basename(socket_path)
                unreachable = Result("Z", "4.3.0", f"delivery agent unreachable ({name})")
                results = [unreachable] * len(rcpts)
                report()
                return results, transcript
        send_fds(sock, encode_request(qid, sender, rcpts, envelope), [fd])
        while len(results) < len(rcpts):
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > 65536:
                    break
                report()
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
                continue
            line, buf = bytes(buf[:end]), buf[end + 1 :]
            text = line.decode("utf-8", "replace").rstrip("\r")
            if text.startswith("|"):
                if len(transcript) < MAX_TRANSCRIPT:
                    transcript.append(text[1:])
            elif text[:1] in ("K", "Z", "D"):
                results.append(Result.from_line(text))
    except OSError:  # TimeoutError included
        pass
    finally:
        os.close(fd)
        if sock is not None:
            if len(results) == len(rcpts) and not buf:
                agents.put(socket_path, sock)
            else:
                sock.close()
    missing = len(rcpts) - len(results)
    if missing:
        results += [Result("Z", "4.3.0", "delivery agent ended without an answer")] * missing
    report()
    return results, transcript
