"""Client side of queue.ctrl: submit one message to mailgrave-queue (docs/flow.md)."""

from __future__ import annotations

# _socket: socket.py would import enum and selectors in every mailgrave-smtpd
# started per connection (Accept=yes); a stream socket needs none of it.
import _socket as socket
import struct
import time

from mailgrave.envelope import Envelope
from mailgrave.errors import PermFail, TempFail

CHUNK = 64 * 1024
REPLY_TIMEOUT = 120.0
CONNECT_PATIENCE = 10.0


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


class QueueClient:
    """One submission over queue.ctrl: attrs and envelope at once, then the
    message streamed with :meth:`write`, then :meth:`commit` or :meth:`abort`."""

    def __init__(self, path: str, attrs: dict[str, str], envelope: Envelope) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
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
