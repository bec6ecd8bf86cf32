"""qmail-queue's text0 envelope: ``F`` sender NUL, ``T`` recipient NUL ..., NUL."""

from __future__ import annotations

from mailgrave.address import AddressError, parse
from mailgrave.record import Record, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO

MAX_ENVELOPE = 1024 * 1024


class EnvelopeError(ValueError):
    """A malformed envelope; permanent."""


@record
class Envelope(Record):
    """Sender (``""`` for the null sender) and at least one recipient."""

    sender: str
    recipients: tuple[str, ...]

    def encode(self) -> bytes:
        parts = [b"F" + self.sender.encode("utf-8", "surrogateescape") + b"\0"]
        parts += [b"T" + r.encode("utf-8", "surrogateescape") + b"\0" for r in self.recipients]
        parts.append(b"\0")
        return b"".join(parts)


def decode(data: bytes, *, validate: bool = True) -> Envelope:
    """Decode a complete text0 envelope; with ``validate`` every address is checked."""
    if len(data) > MAX_ENVELOPE:
        raise EnvelopeError("envelope too large")
    if not data.startswith(b"F") or not data.endswith(b"\0\0"):
        raise EnvelopeError("envelope does not start with F or is not terminated")
    fields = data[:-1].split(b"\0")[:-1]
    try:
        texts = [f.decode("utf-8") for f in fields]
    except UnicodeDecodeError as exc:
        raise EnvelopeError("envelope is not UTF-8") from exc
    sender = texts[0][1:]
    recipients = []
    for field in texts[1:]:
        if not field.startswith("T"):
            raise EnvelopeError("envelope field does not start with T")
        recipients.append(field[1:])
    if not recipients:
        raise EnvelopeError("envelope has no recipients")
    if validate:
        try:
            if sender:
                sender = str(parse(sender))
            recipients = [str(parse(r)) for r in recipients]
        except AddressError as exc:
            raise EnvelopeError(f"bad address in envelope: {exc}") from exc
    return Envelope(sender, tuple(recipients))


def read_fields(stream: BinaryIO, limit: int, first: bytes | None = None) -> bytes:
    """NUL-terminated fields from ``stream`` up to and including the empty field
    that ends them (``a\\0b\\0\\0``, or ``\\0`` alone when there are none),
    consuming nothing after it.

    A buffered stream is searched a buffer at a time (``peek``): a submission's
    attributes and envelope arrive in one piece, and reading them a byte at a
    time cost the queue 0.1 ms per message. Raises EOFError when the stream ends
    first, OverflowError past ``limit`` bytes, and ValueError at once when the
    first byte is not ``first``.
    """
    peek = getattr(stream, "peek", None)
    buf = bytearray()
    while True:
        chunk = peek() if peek is not None else stream.read(1)
        if not chunk:
            raise EOFError
        start = len(buf)
        buf += chunk
        if first is not None and buf[:1] != first:
            raise ValueError
        if buf[:1] == b"\0":
            end = 1
        else:
            end = buf.find(b"\0\0", max(0, start - 1))
            end = end + 2 if end >= 0 else -1
        if end < 0:
            if peek is not None:
                stream.read(len(chunk))
            if len(buf) > limit:
                raise OverflowError
            continue
        if peek is not None:
            stream.read(end - start)
        if end > limit:
            raise OverflowError
        return bytes(buf[:end])


def read_envelope(stream: BinaryIO, limit: int = MAX_ENVELOPE) -> bytes:
    """Read one text0 envelope from a buffered ``stream``, up to its final empty field."""
    try:
        return read_fields(stream, limit, first=b"F")
    except EOFError:
        raise EnvelopeError("envelope truncated") from None
    except OverflowError:
        raise EnvelopeError("envelope too large") from None
    except ValueError:
        raise EnvelopeError("envelope does not start with F") from None
