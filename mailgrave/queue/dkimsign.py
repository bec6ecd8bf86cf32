"""DKIM signing (RFC 6376, RFC 8463) as a message streams into the spool.

mailgrave-queue signs because it alone knows where a message came from (it
believes queue.ctrl attributes only from ``queue.trusted_users``) and it has
no network.  The body hash (relaxed, RFC 6376 §3.4.4) is computed while the
message is written; only the header section (at most ``MAX_HEADER`` bytes)
is kept in memory; dkimpy signs the header section with that body hash
(``DomainSigner.gen_header``), and the queue inserts the field into the spool
file in place (:meth:`mailgrave.spool.Submission.insert`).

What is hashed is what mailgrave-remote will send: the spool's LF form with
one CR before each LF dropped and a missing final line end added
(``remote.client.wire_format``).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Mapping
from email.utils import getaddresses

from mailgrave import config as configmod
from mailgrave import log as logmod
from mailgrave.address import AddressError, to_ascii_domain
from mailgrave.dkimkey import DkimKeyError, read_key
from mailgrave.errors import PermFail, TempFail

log = logmod.getLogger(__name__)

MAX_HEADER = 1 << 20  # a header section this long from a trusted origin is refused
_PARTIAL = 1 << 16  # a partial line longer than this is hashed as it comes
_WSP_EOL = re.compile(rb"[\t ]+\n")
_WSP = re.compile(rb"[\t ]+")
_TRAILING_CRLF = re.compile(rb"(?:\r\n)+\Z")


def trusted_origin(config: configmod.Config, attrs: dict[str, str] | None, believed: bool) -> bool:
    """May mail from this submission be signed?

    ``attrs`` are the queue.ctrl attributes as the peer sent them (None by
    hand), ``believed`` whether the peer is one of ``queue.trusted_users``.
    No client address: a local injection (trusted).  A client address from
    a peer the queue does not believe: not trusted (nobody vouches for it).
    Otherwise authenticated submission (``proto`` ends in ``A``: ESMTPA,
    ESMTPSA, UTF8SMTPSA) or a client in ``relay_networks``.
    """
    if not attrs or not attrs.get("addr"):
        return True
    if not believed:
        return False
    return attrs.get("proto", "").endswith("A") or config.may_relay(attrs["addr"])


class RelaxedBody:
    """The relaxed body canonicalization (RFC 6376 §3.4.4), streamed into SHA-256.

    Fed the spool form (LF line ends); memory stays bounded: empty lines are
    counted, not kept, and a long line is hashed as it arrives.
    """

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.carry = b""  # the current line's unhashed part
        self.blanks = 0  # empty lines not yet hashed (dropped if they end the body)
        self.midline = False  # part of the current line is already hashed

    def feed(self, data: bytes) -> None:
        buf = self.carry + data
        end = buf.rfind(b"\n")
        if end >= 0:
            self._lines(buf[: end + 1])
            buf = buf[end + 1 :]
        if len(buf) > _PARTIAL:
            cr = b"\r" if buf.endswith(b"\r") else b""  # may be the CR of a line end
            body = buf[: len(buf) - len(cr)]
            keep = len(body.rstrip(b" \t"))
            if keep:
                self._emit(_WSP.sub(b" ", body[:keep]))
                self.midline = True
            buf = (b" " if keep < len(body) else b"") + cr
        self.carry = buf

    def _emit(self, data: bytes) -> None:
        if self.blanks and not self.midline:
            self.hash.update(b"\r\n" * self.blanks)
            self.blanks = 0
        self.hash.update(data)

    def _lines(self, block: bytes) -> None:
        """Complete lines (``block`` ends with LF)."""
        text = block.replace(b"\r\n", b"\n")  # remote drops one CR before each LF
        text = _WSP.sub(b" ", _WSP_EOL.sub(b"\n", text)).replace(b"\n", b"\r\n")
        if self.midline:
            first = text.index(b"\r\n") + 2
            self.hash.update(text[:first])  # the end of a line begun earlier
            self.midline = False
            text = text[first:]
        m = _TRAILING_CRLF.search(text)
        trailing = (m.end() - m.start()) // 2 if m else 0
        content = text[: m.start()] if m else text
        if content:
            self._emit(content + b"\r\n")
            self.blanks = trailing - 1
        else:
            self.blanks += trailing

    def digest(self) -> bytes:
        """The body hash (base64): a last line without its LF is ended, as remote sends it."""
        if self.carry or self.midline:
            self.feed(b"\n")
        return base64.b64encode(self.hash.digest())


class Signer:
    """One submission's signature: fed the message as it arrives, :meth:`field` at the end."""

    def __init__(self, keys: Mapping[str, tuple[str, str, str]]) -> None:
        self.keys = keys
        self._cr = False  # a CR at the end of a chunk (as spool.Submission keeps it)
        self.head = bytearray()
        self.header: bytes | None = None  # the header section, once complete
        self.domain: str | None = None
        self.body: RelaxedBody | None = None

    def feed(self, chunk: bytes) -> None:
        """The message's bytes as the queue receives them (CRLF or LF)."""
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            chunk, self._cr = chunk[:-1], True
        self._data(chunk.replace(b"\r\n", b"\n"))

    def _data(self, data: bytes) -> None:
        """The spool form (LF line ends) of the next bytes."""
        if self.header is None:
            data = self._head(data)
        if self.body is not None and data:
            self.body.feed(data)

    def _head(self, data: bytes) -> bytes:
        """Collect the header section; return what of ``data`` is body."""
        start = max(0, len(self.head) - 1)
        self.head += data
        if self.head.startswith(b"\n"):
            end = 0  # no header fields at all
        else:
            end = self.head.find(b"\n\n", start)
            if end < 0:
                if len(self.head) > MAX_HEADER:
                    raise PermFail("5.3.4 header section too long")
                return b""
            end += 1
        body = bytes(self.head[end + 1 :])  # after the empty line
        self._header_done(bytes(self.head[:end]))
        return body

    def _header_done(self, header: bytes) -> None:
        self.header = header
        self.head = bytearray()
        self.domain = _signing_domain(header, self.keys)
        if self.domain is not None:
            self.body = RelaxedBody()

    def field(self) -> bytes | None:
        """The DKIM-Signature field (LF line ends), or None when this message is not ours to sign.

        A key that cannot be read or used is a TempFail: never unsigned mail.
        """
        if self._cr:
            self._cr = False
            self._data(b"\r")  # kept by the spool; remote drops it
        if self.header is None:
            self._header_done(bytes(self.head))  # a message that is all header
        if self.domain is None:
            return None
        assert self.body is not None
        selector, path, algorithm = self.keys[self.domain]
        try:
            privkey = read_key(path, algorithm)
            return _sign(
                self.header or b"", self.body.digest(), self.domain, selector, privkey, algorithm
            )
        except DkimKeyError as exc:
            log.error("DKIM key for %s unusable: %s", self.domain, exc)
        except Exception as exc:  # dkimpy's DKIMException, nacl's errors: a broken key
            log.error("DKIM signing for %s failed: %s", self.domain, type(exc).__name__)
        raise TempFail("4.3.0 cannot DKIM-sign this message now")


def _fields(header: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each field."""
    out: list[tuple[str, str]] = []
    for line in header.split(b"\n"):
        if line[:1] in (b" ", b"\t") and out:
            name, value = out[-1]
            out[-1] = (name, value + line.decode("utf-8", "replace"))
        elif b":" in line:
            name_b, _, value_b = line.partition(b":")
            out.append(
                (
                    name_b.strip().lower().decode("ascii", "replace"),
                    value_b.decode("utf-8", "replace"),
                )
            )
    return out


_TAG = re.compile(r"(?:^|;)\s*([a-z]+)\s*=\s*([^;]*)")


def _signing_domain(header: bytes, keys: Mapping[str, tuple[str, str, str]]) -> str | None:
    """The From: domain when it has a key and this message is not already signed with it."""
    fields = _fields(header)
    froms = [v for n, v in fields if n == "from"]
    if len(froms) != 1:
        return None
    domains = set()
    for _, addr in getaddresses(froms):
        local, at, domain = addr.rpartition("@")
        if not at or not local:
            return None
        try:
            domains.add(to_ascii_domain(domain.strip()))
        except AddressError:
            return None
    if len(domains) != 1:
        return None
    domain = domains.pop()
    if domain not in keys:
        return None
    selector = keys[domain][0]
    for name, value in fields:
        if name == "dkim-signature":
            tags = {k: re.sub(r"\s+", "", v).lower() for k, v in _TAG.findall(value)}
            if tags.get("d") == domain and tags.get("s") == selector:
                return None  # signed once already (mail that came back through the queue)
    return domain


def _sign(
    header: bytes, bodyhash: bytes, domain: str, selector: str, privkey: bytes, algorithm: str
) -> bytes:
    """dkimpy's DKIM.sign() with the body hash given: the header section and an empty body."""
    # dkimpy (91 ms to import, with dnspython) only where a message is signed:
    # most installations have no dkim.sign and never pay for it.
    import dkim
    from dkim.canonicalization import CanonicalizationPolicy

    alg = algorithm.encode()
    wire = header.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"
    signer = dkim.DKIM(wire, signature_algorithm=alg, linesep=b"\n")
    if algorithm == "ed25519-sha256":
        import nacl.encoding
        import nacl.signing

        pk = nacl.signing.SigningKey(privkey, encoder=nacl.encoding.Base64Encoder)
    else:
        from dkim.crypto import parse_pem_private_key

        pk = parse_pem_private_key(privkey)
    include = tuple(h.lower() for h in signer.default_sign_headers())  # From over-signed
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    signer.hasher = dkim.HASH_ALGORITHMS[alg]
    d = domain.encode()
    fields = [
        (b"v", b"1"),
        (b"a", alg),
        (b"c", policy.to_c_value()),
        (b"d", d),
        (b"i", b"@" + d),
        (b"q", b"dns/txt"),
        (b"s", selector.encode()),
        (b"t", str(int(time.time())).encode()),
        (b"h", b" : ".join(include)),
        (b"bh", bodyhash),
        (b"b", b"0" * 60),  # as dkimpy: b= folds onto its own line
    ]
    value = signer.gen_header(fields, include, policy, b"DKIM-Signature", pk)
    return b"DKIM-Signature: " + bytes(value)
