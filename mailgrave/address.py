"""Mail addresses: RFC 5321 limits, normalisation of domains to A-labels."""

from __future__ import annotations

from mailgrave.record import Record, record

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class AddressError(ValueError):
    """An address that RFC 5321 (or MailGrave) does not accept; the text is safe to show."""


@record
class Address(Record):
    """A validated ``local@domain`` mailbox; ``domain`` is lower-case A-labels."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def needs_smtputf8(self) -> bool:
        return not self.local.isascii()


def _check_chars(text: str, what: str) -> None:
    for ch in text:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise AddressError(f"control character in {what}")


def to_ascii_domain(domain: str) -> str:
    """Return ``domain`` lower-cased and converted to A-labels (IDNA)."""
    domain = domain.rstrip(".") if domain.endswith(".") and len(domain) > 1 else domain
    if not domain:
        raise AddressError("empty domain")
    _check_chars(domain, "domain")
    if domain.startswith("[") and domain.endswith("]"):
        return _address_literal(domain)
    if domain.isascii():
        ascii_domain = domain.lower()
    else:
        try:
            import idna

            ascii_domain = idna.encode(domain, uts46=True).decode("ascii")
        except ImportError:  # pragma: no cover - python3-idna is a dnspython dependency
            try:
                ascii_domain = domain.encode("idna").decode("ascii").lower()
            except UnicodeError as exc:
                raise AddressError("invalid international domain name") from exc
        except Exception as exc:  # idna.IDNAError and friends
            raise AddressError("invalid international domain name") from exc
    if len(ascii_domain) > MAX_DOMAIN:
        raise AddressError("domain longer than 255 octets")
    for label in ascii_domain.split("."):
        if not label or len(label) > 63:
            raise AddressError("bad domain label")
        if label.startswith("-") or label.endswith("-"):
            raise AddressError("bad domain label")
        if not all(c.isalnum() or c in "-_" for c in label):
            raise AddressError("bad character in domain")
    return ascii_domain


def _address_literal(domain: str) -> str:
    import ipaddress

    inner = domain[1:-1]
    try:
        if inner.lower().startswith("ipv6:"):
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError as exc:
        raise AddressError("bad address literal") from exc


def check_local(local: str) -> str:
    """Validate a local part (already unquoted) and return it."""
    if not local:
        raise AddressError("empty local part")
    _check_chars(local, "local part")
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL:
        raise AddressError("local part longer than 64 octets")
    return local


def parse(text: str) -> Address:
    """Parse a bare ``local@domain`` (no angle brackets) as found in an envelope.

    The local part is split at the last ``@`` so that an ``@`` in a quoted local
    part survives; the domain is converted to A-labels.
    """
    if len(text.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise AddressError("address longer than 256 octets")
    _check_chars(text, "address")
    local, sep, domain = text.rpartition("@")
    if not sep:
        raise AddressError("address has no domain")
    return Address(check_local(local), to_ascii_domain(domain))


def parse_or_local(text: str, default_domain: str) -> Address:
    """Like :func:`parse`, but a bare name gets ``default_domain``."""
    if "@" not in text:
        text = f"{text}@{default_domain}"
    return parse(text)


_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)


def _is_dot_atom(text: str) -> bool:
    """RFC 5322 dot-atom (UTF-8 allowed, RFC 6532): atext runs joined by single dots."""
    return all(
        part and all(ch in _ATEXT or not ch.isascii() for ch in part) for part in text.split(".")
    )


def _is_quoted_string(text: str) -> bool:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return False
    inner, i = text[1:-1], 0
    while i < len(inner):
        if inner[i] == "\\":
            i += 1
            if i == len(inner):
                return False
        elif inner[i] == '"':
            return False
        i += 1
    return True


def parse_mailbox(text: str, default_domain: str) -> Address:
    """A mailbox a user typed (sendmail's arguments, a To: header): like
    :func:`parse_or_local`, and the local part must be a dot-atom or a quoted
    string (``alice@@example.org``, ``a..b@x`` are refused)."""
    addr = parse_or_local(text, default_domain)
    if not (_is_dot_atom(addr.local) or _is_quoted_string(addr.local)):
        raise AddressError("bad local part")
    return addr
