"""The message as it streams into the spool: forged Authentication-Results:
fields removed (RFC 8601 §5), and, for a message mailgrave-smtpd asks to be
checked, its header section kept and its body hashed for DKIM (RFC 6376
§3.4, §3.7) in bounded memory.

Used by mailgrave-queue on every submission; the queue is where this host's
own Authentication-Results: field is written, so it is where a field claiming
this host's authserv-id is known to be forged, whoever the client is.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable

MAX_FIELD = 64 * 1024  # a header field is held this long, then decided on what was seen
MAX_HEADER = 1024 * 1024  # the header section kept for DKIM; beyond it nothing is verified
MAX_BODY_LINE = 1024 * 1024  # a body line held for hashing; beyond it nothing is verified

_AR_NAME = b"authentication-results"
# authserv-id after any leading comments (RFC 8601 §2.2): a token or a quoted string
_AUTHSERV_ID = re.compile(rb'\s*(?:\([^)]*\)\s*)*(?:"([^"]*)"|([^\s;()"]+))')
_WS_EOL = re.compile(rb"[ \t]+\n")
_WS = re.compile(rb"[ \t]+")


def claims(field: bytes, authserv_id: str) -> bool:
    """Whether ``field`` (one header field, name and value) is an
    Authentication-Results: field that names ``authserv_id``."""
    name, colon, value = field.partition(b":")
    if not colon or name.strip().lower() != _AR_NAME:
        return False
    match = _AUTHSERV_ID.match(value.replace(b"\r", b"").replace(b"\n", b""))
    if match is None:
        return False
    found = match.group(1) if match.group(1) is not None else match.group(2)
    return found.decode("ascii", "replace").lower().rstrip(".") == authserv_id.lower().rstrip(".")


class BodyHash:
    """One DKIM body hash (RFC 6376 §3.4.3/§3.4.4, §3.7), fed LF-terminated lines
    without CR; ``limit`` is the signature's ``l=``."""

    def __init__(self, relaxed: bool, algorithm: str, limit: int | None) -> None:
        self.relaxed = relaxed
        self.hash = hashlib.new(algorithm)
        self.limit = limit
        self.count = 0  # octets hashed
        self.empty = 0  # empty lines seen and not yet hashed (dropped at the end)
        self.fed = False

    def update(self, block: bytes) -> None:
        if self.relaxed:
            block = _WS.sub(b" ", _WS_EOL.sub(b"\n", block))
        text = block.rstrip(b"\n")
        trailing = len(block) - len(text)
        if not text:
            self.empty += trailing
            return
        while self.empty:
            n = min(self.empty, 4096)
            self._feed(b"\r\n" * n)
            self.empty -= n
        self._feed(text.replace(b"\n", b"\r\n") + b"\r\n")
        self.empty = trailing - 1

    def digest(self, tail: bytes) -> bytes:
        """The hash, given the last line if it has no line end."""
        if tail:
            self.update(tail + b"\n")
        if not self.fed and not self.relaxed:
            self._feed(b"\r\n")  # simple: an empty body is one CRLF
        return self.hash.digest()

    def _feed(self, data: bytes) -> None:
        self.fed = True
        if self.limit is not None:
            data = data[: max(0, self.limit - self.count)]
        self.count += len(data)
        self.hash.update(data)


BodyKey = tuple[bool, str, int | None]  # (relaxed, hash algorithm, l=)


class Inbound:
    """Filters one message (CRLF or LF line ends) on its way to the spool.

    :meth:`feed` returns what to write; :meth:`end` the rest. With ``keep``,
    :attr:`header` is the header section as it arrived (CRLF line ends, forged
    fields included: they are what a signer signed) and :meth:`body_hashes`
    gives the hashes asked for by :meth:`want` (called at the end of the
    header section: ``on_header`` is called with the header section then)."""

    def __init__(
        self,
        authserv_id: str,
        keep: bool = False,
        on_header: Callable[[bytes], Iterable[BodyKey]] | None = None,
    ) -> None:
        self.authserv_id = authserv_id
        self.keep = keep
        self.on_header = on_header
        self.in_body = False
        self.buf = bytearray()  # header section: the incomplete line
        self.field = bytearray()  # header section: the field being read
        self.decided: bool | None = None  # a long field: keep (True) or drop (False)
        self.continuing = False  # the last header piece did not end its line
        self.header = bytearray()
        self.header_too_big = False
        self.removed = 0  # forged fields removed
        self.hashes: dict[BodyKey, BodyHash] = {}
        self.tail = b""  # body: the incomplete line
        self.body_too_long_line = False

    # --- the header section

    def feed(self, data: bytes) -> bytes:
        if self.in_body:
            self._body(data)
            return data
        out = bytearray()
        self.buf += data
        start = 0
        while not self.in_body:
            nl = self.buf.find(b"\n", start)
            if nl < 0:
                if len(self.buf) - start > MAX_FIELD:  # an endless line: decide on it now
                    self._line(bytes(self.buf[start:]), out, complete=False)
                    start = len(self.buf)
                break
            self._line(bytes(self.buf[start : nl + 1]), out, complete=True)
            start = nl + 1
        rest = bytes(self.buf[start:])
        self.buf.clear()
        if self.in_body:
            self._header_done()
            self._body(rest)
            out += rest
        else:
            self.buf += rest
        return bytes(out)

    def end(self) -> bytes:
        """The end of the message: what is still held back."""
        out = bytearray()
        if not self.in_body:
            if self.buf:
                self._line(bytes(self.buf), out, complete=False)
                self.buf.clear()
            self._end_field(out)
            self._header_done()
        return bytes(out)

    def _header_done(self) -> None:
        if self.keep and self.on_header is not None:
            self.want(self.on_header(bytes(self.header)))

    def _line(self, line: bytes, out: bytearray, complete: bool) -> None:
        if not self.continuing and line[:1] not in (b" ", b"\t"):
            self._end_field(out)
            if line in (b"\n", b"\r\n"):  # the end of the header section
                out += line
                self.in_body = True
                return
        self.continuing = not complete
        if self.keep and not self.header_too_big:
            self.header += line[:-1].rstrip(b"\r") + b"\r\n" if complete else line
            self.header_too_big = len(self.header) > MAX_HEADER
        if self.decided is None:
            self.field += line
            if len(self.field) > MAX_FIELD:
                self.decided = not claims(bytes(self.field), self.authserv_id)
                self._emit_field(out)
        elif self.decided:
            out += line

    def _end_field(self, out: bytearray) -> None:
        if self.field:
            self.decided = not claims(bytes(self.field), self.authserv_id)
            self._emit_field(out)
        self.decided = None

    def _emit_field(self, out: bytearray) -> None:
        if self.decided:
            out += self.field
        else:
            self.removed += 1
        self.field.clear()

    # --- the body

    def want(self, keys: Iterable[BodyKey]) -> None:
        """Hash the body for these (relaxed, algorithm, l=) keys."""
        for key in keys:
            if key not in self.hashes:
                self.hashes[key] = BodyHash(*key)

    def _body(self, data: bytes) -> None:
        if not self.hashes or self.body_too_long_line:
            return
        data = self.tail + data
        cut = data.rfind(b"\n") + 1
        self.tail = data[cut:]
        if len(self.tail) > MAX_BODY_LINE:
            self.body_too_long_line = True
            return
        if cut:
            block = data[:cut].replace(b"\r\n", b"\n")
            for h in self.hashes.values():
                h.update(block)

    def body_hashes(self) -> dict[BodyKey, bytes] | None:
        """The body hashes, or None when the body could not be hashed (a line too long)."""
        if self.body_too_long_line:
            return None
        tail = self.tail[:-1] if self.tail.endswith(b"\r") else self.tail
        return {key: h.digest(tail) for key, h in self.hashes.items()}
