"""qmail-queue's text0 envelope: ``F`` sender NUL, ``T`` recipient NUL ..., NUL.

MailGrave's extension for delivery status notifications (RFC 3461): after
the ``F`` field, ``R`` RET NUL and ``E`` ENVID NUL; after a ``T`` field, ``N``
NOTIFY NUL and ``O`` ORCPT NUL for that recipient. Each is written only when
it is set, so an envelope without DSN parameters is exactly qmail's, and a
reader that knows only ``F`` and ``T`` refuses one with them (it does not
start with ``T``) instead of dropping them silently. Values are stored
xtext-decoded and hold no control characters.

And for SMTPUTF8 (RFC 6531): after the ``F`` field, ``U`` alone (an empty
value) when the client declared SMTPUTF8 on MAIL FROM, so that the next hop
is asked for it when the message needs it (see mailgrave.remote).
"""

from __future__ import annotations

from mailgrave.address import AddressError, parse
from mailgrave.record import Record, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO

MAX_ENVELOPE = 1024 * 1024


class EnvelopeError(ValueError):
    """A malformed envelope; permanent."""


DSN_RET = ("FULL", "HDRS")
DSN_NOTIFY = ("SUCCESS", "FAILURE", "DELAY")
MAX_ENVID = 100  # RFC 3461 §4.4
MAX_ORCPT = 500  # RFC 3461 §4.2


def valid_notify(value: str) -> bool:
    """``NEVER`` alone, or a list of SUCCESS, FAILURE, DELAY, each at most once."""
    if value == "NEVER":
        return True
    words = value.split(",")
    return bool(value) and len(set(words)) == len(words) and all(w in DSN_NOTIFY for w in words)


def dsn_text_ok(value: str, limit: int) -> bool:
    """An ENVID or ORCPT value as stored: printable ASCII, at most ``limit`` long."""
    return 0 < len(value) <= limit and all(" " <= c <= "~" for c in value)


@record
class Envelope(Record):
    """Sender (``""`` for the null sender), at least one recipient, and the DSN
    parameters (RFC 3461): ``ret`` and ``envid`` of the message, ``notify`` and
    ``orcpt`` of each recipient (empty tuples, or one entry per recipient,
    ``""`` where it is not set)."""

    sender: str
    recipients: tuple[str, ...]
    ret: str = ""  # "", FULL or HDRS
    envid: str = ""
    notify: tuple[str, ...] = ()  # "", NEVER or e.g. "SUCCESS,FAILURE"
    orcpt: tuple[str, ...] = ()  # "" or "rfc822;user@example.org"
    utf8: bool = False  # SMTPUTF8 was declared on MAIL FROM (RFC 6531)

    def notify_of(self, i: int) -> str:
        return self.notify[i] if i < len(self.notify) else ""

    def orcpt_of(self, i: int) -> str:
        return self.orcpt[i] if i < len(self.orcpt) else ""

    def encode(self) -> bytes:
        def field(tag: str, value: str) -> bytes:
            return (tag + value).encode("utf-8", "surrogateescape") + b"\0"

        parts = [field("F", self.sender)]
        if self.ret:
            parts.append(field("R", self.ret))
        if self.envid:
            parts.append(field("E", self.envid))
        if self.utf8:
            parts.append(field("U", ""))
        for i, r in enumerate(self.recipients):
            parts.append(field("T", r))
            if self.notify_of(i):
                parts.append(field("N", self.notify_of(i)))
            if self.orcpt_of(i):
                parts.append(field("O", self.orcpt_of(i)))
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
    recipients: list[str] = []
    notify: list[str] = []
    orcpt: list[str] = []
    ret = envid = ""
    utf8 = False
    for field in texts[1:]:
        tag, value = field[:1], field[1:]
        if tag == "T":
            recipients.append(value)
            notify.append("")
            orcpt.append("")
        elif tag == "R" and not recipients and not ret and value in DSN_RET:
            ret = value
        elif tag == "E" and not recipients and not envid and dsn_text_ok(value, MAX_ENVID):
            envid = value
        elif tag == "U" and not recipients and not utf8 and not value:
            utf8 = True
        elif tag == "N" and recipients and not notify[-1] and valid_notify(value):
            notify[-1] = value
        elif tag == "O" and recipients and not orcpt[-1] and dsn_text_ok(value, MAX_ORCPT):
            orcpt[-1] = value
        else:
            raise EnvelopeError("envelope field does not start with T (or a bad DSN or U field)")
    if not recipients:
        raise EnvelopeError("envelope has no recipients")
    if validate:
        try:
            if sender:
                sender = str(parse(sender))
            recipients = [str(parse(r)) for r in recipients]
        except AddressError as exc:
            raise EnvelopeError(f"bad address in envelope: {exc}") from exc
    return Envelope(
        sender,
        tuple(recipients),
        ret,
        envid,
        tuple(notify) if any(notify) else (),
        tuple(orcpt) if any(orcpt) else (),
        utf8,
    )


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
