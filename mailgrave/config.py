"""mailgrave.yaml: loaded with ``yaml.safe_load`` into frozen, validated objects.

Every section is a frozen record (:mod:`mailgrave.record`) whose fields carry
a converter; :func:`load` walks the YAML mapping, converts each value, and
collects every problem as ``FILE: key.path: message`` so that
``mailgrave check`` can report them all at once.

The compiled cache: parsing YAML (and importing it) costs more than the rest
of a ``mailgrave-smtpd`` start in ``Accept=yes`` mode, so a successful parse
stores the converted settings (plain types, :mod:`marshal`) in
``/var/cache/mailgrave/USER/config``, keyed by the file's path, device,
inode, size, mtime and ctime. The next start of any program as that user
uses it when the key still matches, the file is owned by that user or root
and nobody else may write it; anything else (stale, missing, foreign,
unreadable, corrupt) means the YAML is parsed again. See mailgrave.yaml(5).
"""

from __future__ import annotations

import _socket
import marshal
import os
import pwd
import stat
import sys
import zlib

from mailgrave import __version__
from mailgrave.address import AddressError, to_ascii_domain
from mailgrave.fileio import replace_file
from mailgrave.record import Record, field, record, section, specs

# re, ipaddress, socket and yaml are imported only where the YAML is parsed:
# with the compiled cache, a mailgrave-smtpd started per connection needs
# none of them (mailgrave.smtpd.IMPORT_BUDGET).

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

DEFAULT_PATH = "/etc/mailgrave/mailgrave.yaml"


class ConfigError(Exception):
    """One or more problems in a configuration file, each a one-line message."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Bad(ValueError):
    problems: list[str]  # when one value has several (a mapping's bad entries)


def _quote(value: object) -> str:
    if isinstance(value, str):
        return '"' + value[:60].encode("unicode_escape").decode("ascii") + '"'
    return repr(value)[:60]


# --- converters: each takes the YAML value and returns the typed value or raises _Bad


def _str(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Bad(f"expected a string, got {_quote(value)}")
    return str(value)


def _nonempty_str(value: object) -> str:
    text = _str(value)
    if not text:
        raise _Bad("must not be empty")
    return text


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"expected an integer, got {_quote(value)}")
    if value < 0:
        raise _Bad(f"expected a non-negative integer, got {value}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {_quote(value)}")
    return value


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(value: object) -> int:
    """``10M`` → bytes; plain integers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    import re

    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", str(value), re.IGNORECASE)
    if isinstance(value, bool) or not m:
        raise _Bad(f"expected a size such as 10M, got {_quote(value)}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def parse_duration(value: object) -> float:
    """``90s``, ``5m``, ``4h``, ``5d`` → seconds; plain numbers are seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(value))
    if isinstance(value, bool) or not m:
        raise _Bad(f"expected a duration such as 90s, 5m, 4h or 5d, got {_quote(value)}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _choice(*choices: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
        if text not in choices:
            raise _Bad(f"expected one of {', '.join(choices)}, got {_quote(value)}")
        return text

    return convert


def _on_off(value: object) -> str:
    """``on`` or ``off`` (YAML reads a bare on/off as true/false: both are accepted)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return _choice("off", "on")(value)


def _list(item: Callable[[object], Any]) -> Callable[[object], tuple[Any, ...]]:
    def convert(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _Bad(f"expected a list, got {_quote(value)}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except _Bad as exc:
                raise _Bad(f"item {i}: {exc}") from None
        return tuple(out)

    return convert


def _mapping(
    item: Callable[[object], Any], key: Callable[[object], str] | None = None
) -> Callable[[object], Mapping[str, Any]]:
    def convert(value: object) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise _Bad(f"expected a mapping, got {_quote(value)}")
        out = {}
        bad = []
        for k, v in value.items():
            try:
                out[key(k) if key else _str(k).lower()] = item(v)
            except _Bad as exc:
                bad.append(f"{k}: {exc}")
        if bad:  # every bad entry, not only the first
            error = _Bad(bad[0])
            error.problems = bad
            raise error
        return _FrozenDict(out)

    return convert


def _network(value: object) -> str:
    """A network in its normal form (host bits cleared): ``10.1.2.3/8`` → ``10.0.0.0/8``."""
    import ipaddress

    try:
        return str(ipaddress.ip_network(_str(value), strict=False))
    except ValueError:
        raise _Bad(f"expected a network such as 192.0.2.0/24, got {_quote(value)}") from None


def _domain(value: object) -> str:
    try:
        return to_ascii_domain(_nonempty_str(value))
    except AddressError as exc:
        raise _Bad(f"{exc}: {_quote(value)}") from None


def _mailbox(value: object) -> str:
    """An address as the envelope carries it: the local part lower-cased (it may be
    UTF-8, RFC 6531), the domain in lower-case A-labels (``bücher.example`` →
    ``xn--bcher-kva.example``)."""
    from mailgrave.address import AddressError, to_ascii_domain

    local, at, domain = _nonempty_str(value).rpartition("@")
    if not at or not local:
        raise _Bad(f"expected local@domain, got {_quote(value)}")
    try:
        return f"{local.lower()}@{to_ascii_domain(domain)}"
    except AddressError as exc:
        raise _Bad(f"{exc}: {_quote(value)}") from None


def _hostport(value: object) -> str:
    import re

    text = _nonempty_str(value)
    m = re.fullmatch(r"(\[([^\]]+)\]|[^\s:\[\]]+)(?::(\d{1,5}))?", text)
    if not m:
        raise _Bad(f"expected host, [host], host:port or [host]:port, got {_quote(value)}")
    if m.group(3) is not None and not 0 < int(m.group(3)) <= 65535:
        raise _Bad(f"port {m.group(3)} is not 1-65535: {_quote(value)}")
    inside = m.group(2)
    if inside is not None and not (_is_ip(inside) or _is_host_name(inside)):
        raise _Bad(f"[{inside}] is neither an IP address nor a host name: {_quote(value)}")
    return text


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_host_name(text: str) -> bool:
    """Letters, digits and hyphens in dot-separated labels (RFC 1123), or an IDN."""
    import re

    try:
        ascii_name = text.rstrip(".").encode("idna").decode("ascii")
    except UnicodeError:
        return False
    label = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    return (
        len(ascii_name) <= 253 and re.fullmatch(rf"{label}(?:\.{label})*", ascii_name) is not None
    )


def _ip(value: object) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(_str(value)))
    except ValueError:
        raise _Bad(f"expected an IP address, got {_quote(value)}") from None


if TYPE_CHECKING:
    _Dict = dict[str, Any]
else:
    _Dict = dict


class _FrozenDict(_Dict):
    """A dict that refuses changes, for mapping-valued settings."""

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("configuration is read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


def _opt(convert: Callable[[object], Any], default: Any) -> Any:
    return field(default, convert)


_section = section


@record
class TLS(Record):
    certificate: str = _opt(_str, "")
    key: str = _opt(_str, "")


@record
class Smtpd(Record):
    max_message_size: int = _opt(parse_size, 35 * 1024 * 1024)
    max_recipients: int = _opt(_int, 100)
    timeout: float = _opt(parse_duration, 300.0)
    max_errors: int = _opt(_int, 10)
    max_connections: int = _opt(_int, 100)
    max_connections_per_client: int = _opt(_int, 10)
    # Clients in relay_networks are exempt from max_connections_per_client
    # unless this is true (as Postfix exempts $mynetworks).
    limit_relay_networks: bool = _opt(_bool, False)
    idle_exit: float = _opt(parse_duration, 60.0)
    # How long a client must stay quiet before the greeting (talking early is
    # refused); 0 greets at once and only catches what arrived before it.
    greet_pause: float = _opt(parse_duration, 0.2)
    # relay_networks are greeted at once unless this is true (postscreen's
    # permit_mynetworks).
    greet_pause_relay_networks: bool = _opt(_bool, False)
    banner: str = _opt(_str, "")
    # A DATA line ending in a bare LF: taken as a line end, or the message refused.
    bare_lf: str = _opt(_choice("normalize", "reject"), "normalize")
    # A deadline for each command and for the whole DATA phase (Postfix's
    # smtpd_per_request_deadline and smtpd_min_data_rate): `timeout` is per read,
    # so a client trickling a byte now and then would otherwise never be dropped.
    command_deadline: float = _opt(parse_duration, 300.0)
    min_data_rate: int = _opt(_int, 500)  # bytes/s that DATA earns beyond the deadline
    # When connections run short (warm-parent mode; STRESS_FRACTION of
    # max_connections in use): the timeout and the deadline of every session
    # shrink to this, and a client outside relay_networks gets this many at once.
    stress_timeout: float = _opt(parse_duration, 10.0)
    stress_max_connections_per_client: int = _opt(_int, 2)
    tls: TLS = _section(TLS)


def _addresses(value: object) -> tuple[str, ...]:
    """One address or ``@domain``, or a list of them (auth.senders)."""
    items = _list(_nonempty_str)(value if isinstance(value, list) else [value])
    out = []
    for item in items:
        local, at, domain = item.rpartition("@")
        if not at or not domain or (local and any(c in local for c in " <>")):
            raise _Bad(f"expected an address or @domain, got {_quote(item)}")
        out.append(f"{local}@{_domain(domain)}" if local else f"@{_domain(domain)}")
    return tuple(out)


@record
class RateLimit(Record):
    # Per login and clock hour; 0: no limit.
    messages: int = _opt(_int, 200)
    recipients: int = _opt(_int, 1000)
    # The counters (one small file per login), writable by mailgrave-smtpd.
    directory: str = _opt(_nonempty_str, "/var/lib/mailgrave/smtpd/rate")


@record
class Auth(Record):
    users_file: str = _opt(_nonempty_str, "/etc/mailgrave/users")
    # A running Dovecot's auth socket (unix_listener of service auth): when set, it
    # checks AUTH PLAIN and LOGIN credentials instead of users_file.
    dovecot_socket: str = _opt(_str, "")
    # login -> the envelope senders and From: domains it may use (address or
    # @domain); a login without an entry: login@ each local domain.
    senders: Mapping[str, tuple[str, ...]] = _opt(_mapping(_addresses), _FrozenDict())
    rate_limit: RateLimit = _section(RateLimit)
    record_login: bool = _opt(_bool, False)
    # Failed AUTH attempts after which the connection is closed (0: never).
    max_failures: int = _opt(_int, 3)


@record
class Local(Record):
    mailbox: str = _opt(_choice("maildir", "mbox"), "maildir")
    maildir: str = _opt(_nonempty_str, "Maildir/")
    mbox_dir: str = _opt(_nonempty_str, "/var/mail")
    aliases: str = _opt(_str, "/etc/aliases")
    recipient_delimiter: str = _opt(_str, "+")
    forward: bool = _opt(_bool, True)
    virtual: Mapping[str, str] = _opt(_mapping(_nonempty_str, _mailbox), _FrozenDict())
    virtual_user: str = _opt(_nonempty_str, "mail")
    default_user: str = _opt(_nonempty_str, "nobody")
    root_mailbox: str = _opt(_nonempty_str, "/var/mail/root")


@record
class Queue(Record):
    lifetime: float = _opt(parse_duration, 5 * 86400.0)
    bounce_lifetime: float = _opt(parse_duration, 2 * 86400.0)
    warn_after: float = _opt(parse_duration, 4 * 3600.0)
    retry: tuple[float, ...] = _opt(_list(parse_duration), (300.0, 600.0, 1200.0, 2400.0, 3600.0))
    max_parallel: int = _opt(_int, 20)
    max_message_size: int = _opt(parse_size, 100 * 1024 * 1024)
    idle_exit: float = _opt(parse_duration, 30.0)
    trusted_users: tuple[str, ...] = _opt(_list(_nonempty_str), ("root", "mailgrave-smtpd"))
    # Free space the spool keeps for deliveries and bounces (Postfix's
    # queue_minfree): new mail is refused below it, null-sender mail below half.
    min_free: int = _opt(parse_size, 16 * 1024 * 1024)


@record
class Smarthost(Record):
    host: str = _opt(_str, "")
    port: int = _opt(_int, 587)
    login: str = _opt(_str, "")
    password_file: str = _opt(_str, "")


@record
class DNS(Record):
    nameservers: tuple[str, ...] = _opt(_list(_ip), ())
    port: int = _opt(_int, 53)
    timeout: float = _opt(parse_duration, 10.0)


@record
class Remote(Record):
    tls: str = _opt(_choice("none", "opportunistic", "required", "verify"), "opportunistic")
    ca_file: str = _opt(_str, "")
    routes: Mapping[str, str] = _opt(_mapping(_hostport), _FrozenDict())
    smarthost: Smarthost = _section(Smarthost)
    dns: DNS = _section(DNS)
    ip_version: str = _opt(_choice("any", "4", "6"), "any")
    port: int = _opt(_int, 25)
    helo: str = _opt(_str, "")
    connect_timeout: float = _opt(parse_duration, 30.0)
    # RFC 5321 §4.5.3.2: greeting and commands 5 min; the final dot gets twice this.
    timeout: float = _opt(parse_duration, 300.0)
    max_parallel: int = _opt(_int, 10)
    destination_concurrency: int = _opt(_int, 4)  # connections per destination domain
    # MTA-STS (RFC 8461) for MX deliveries; the cache: see mailgrave.yaml(5).
    mta_sts: str = _opt(_on_off, "on")
    mta_sts_cache: str = _opt(_nonempty_str, "/var/lib/mailgrave-remote/mta-sts")
    mta_sts_timeout: float = _opt(parse_duration, 30.0)
    mta_sts_port: int = _opt(_int, 443)  # of the policy host: for tests only


@record
class Checks(Record):
    # Sender authentication on receipt (mailgrave-smtpd, clients outside
    # relay_networks): record adds Authentication-Results:, enforce also refuses.
    spf: str = _opt(_choice("off", "record", "enforce"), "record")
    # verified by mailgrave-queue once the message is in; enforce: DNS trouble defers
    dkim: str = _opt(_choice("off", "record", "enforce"), "record")
    # enforce: a failure under p=reject is refused after DATA, DNS trouble deferred
    dmarc: str = _opt(_choice("off", "record", "enforce"), "record")


def _dkim_key(value: object) -> tuple[str, str, str]:
    """One dkim.sign entry: {selector, key, algorithm} as (selector, key path, algorithm)."""
    import re

    if not isinstance(value, dict):
        raise _Bad(f"expected a mapping with selector, key and algorithm, got {_quote(value)}")
    unknown = sorted(str(k) for k in value if k not in ("selector", "key", "algorithm"))
    if unknown:
        raise _Bad(f"{unknown[0]}: unknown key")
    if "selector" not in value or "key" not in value:
        raise _Bad("selector and key are required")
    selector = _nonempty_str(value["selector"])
    # RFC 6376 §3.1: a selector is one or more DNS labels.
    label = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    if not re.fullmatch(rf"{label}(?:\.{label})*", selector):
        raise _Bad(f"selector: expected DNS labels, got {_quote(selector)}")
    key = _nonempty_str(value["key"])
    if not key.startswith("/"):
        raise _Bad(f"key: expected an absolute path, got {_quote(key)}")
    algorithm = _choice("rsa-sha256", "ed25519-sha256")(value.get("algorithm", "rsa-sha256"))
    return (selector.lower(), key, algorithm)


@record
class Dkim(Record):
    # From: domain -> (selector, private key file, algorithm): mail from trusted
    # origins (local, authenticated, relay_networks) is signed by mailgrave-queue.
    sign: Mapping[str, tuple[str, str, str]] = _opt(_mapping(_dkim_key, _domain), _FrozenDict())


@record
class Config(Record):
    path: str = ""
    hostname: str = _opt(_domain, "")
    origin: str = _opt(_domain, "")  # domain for bare local names; default: hostname
    spool: str = _opt(_nonempty_str, "/var/spool/mailgrave")
    run_dir: str = _opt(_nonempty_str, "/run/mailgrave")
    local_domains: tuple[str, ...] = _opt(_list(_domain), ())
    relay_networks: tuple[str, ...] = _opt(_list(_network), ("127.0.0.0/8", "::1/128"))
    smtpd: Smtpd = _section(Smtpd)
    local: Local = _section(Local)
    queue: Queue = _section(Queue)
    remote: Remote = _section(Remote)
    checks: Checks = _section(Checks)
    auth: Auth = _section(Auth)
    dkim: Dkim = _section(Dkim)

    def is_local_domain(self, domain: str) -> bool:
        """local_domains, the hostname, localhost, and every domain of a virtual mailbox."""
        domain = domain.lower()
        if domain in self.local_domains or domain in (self.hostname, "localhost"):
            return True
        return any(addr.rpartition("@")[2] == domain for addr in self.local.virtual)

    def may_relay(self, ip: str) -> bool:
        """Is ``ip`` (an IPv4-mapped IPv6 address counts as IPv4) in relay_networks?"""
        addr = _ip_bits(ip)
        if addr is None:
            return False
        nets = self.__dict__.get("_relay_nets")
        if nets is None:
            nets = self.__dict__["_relay_nets"] = [_net_bits(n) for n in self.relay_networks]
        width, value = addr
        return any(w == width and value >> (w - plen) == net >> (w - plen) for w, net, plen in nets)

    def socket_path(self, name: str) -> str:
        """Control socket ``name``: in run_dir, unless a program's --in or --out
        named another path for it (:meth:`with_socket`)."""
        moved = self.__dict__.get("_moved_sockets")
        if moved and name in moved:
            return str(moved[name])
        return os.path.join(self.run_dir, name)

    def with_socket(self, name: str, path: str) -> Config:
        """This configuration with control socket ``name`` at ``path`` (--in/--out:
        the flag overrides run_dir for that one socket)."""
        copy = self.replace()
        copy.__dict__["_moved_sockets"] = {**self.__dict__.get("_moved_sockets", {}), name: path}
        return copy


def _ip_bits(ip: str) -> tuple[int, int] | None:
    """(32, n) for IPv4 (also IPv4-mapped IPv6), (128, n) for IPv6, None if not an address.

    With inet_pton rather than :mod:`ipaddress`, whose import the smtpd path avoids.
    """
    try:
        return 32, int.from_bytes(_socket.inet_pton(_socket.AF_INET, ip), "big")
    except (OSError, ValueError):  # ValueError: a NUL in the text
        pass
    try:
        value = int.from_bytes(_socket.inet_pton(_socket.AF_INET6, ip), "big")
    except (OSError, ValueError):
        return None
    if value >> 32 == 0xFFFF:
        return 32, value & 0xFFFFFFFF
    return 128, value


def _net_bits(net: str) -> tuple[int, int, int]:
    """(width, network, prefix length) of a network in relay_networks' normal form."""
    addr, _, plen = net.partition("/")
    bits = _ip_bits(addr)
    if bits is None or (":" in addr and bits[0] == 32):
        # ::ffff:a.b.c.d/n: compare as IPv6, as ipaddress would.
        bits = 128, int.from_bytes(_socket.inet_pton(_socket.AF_INET6, addr), "big")
    width, value = bits
    return width, value, int(plen) if plen else width


def default_hostname() -> str:
    """``/etc/mailname`` if present, else the FQDN."""
    try:
        with open("/etc/mailname", encoding="utf-8") as f:
            name = f.readline().strip()
            if name:
                return name.lower()
    except OSError:
        pass
    import socket

    return socket.getfqdn().lower()


def _build(cls: type[Any], data: object, where: str, path: str, problems: list[str]) -> Any:
    """Convert the YAML mapping ``data`` into the plain settings of record ``cls``.

    The result maps each key the file sets to its converted value (a sub-dict
    for a section; a mapping setting stays a plain dict): what :func:`_make`
    turns into records, and what the cache stores.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path}: {where or 'top level'}: expected a mapping, got {_quote(data)}")
        return {}
    settings: dict[str, Any] = {}
    fields = specs(cls)
    for key, value in data.items():
        name = str(key)
        keypath = f"{where}.{name}" if where else name
        f = fields.get(name)
        if f is None:
            problems.append(f"{path}: {keypath}: unknown key{_did_you_mean(name, fields)}")
            continue
        if f.section is not None:
            settings[name] = _build(f.section, value, keypath, path, problems)
            continue
        assert f.convert is not None
        try:
            converted = f.convert(value)
        except _Bad as exc:
            for text in getattr(exc, "problems", [str(exc)]):
                problems.append(f"{path}: {keypath}: {text}")
            continue
        except (TypeError, ValueError, AttributeError):  # a converter surprised by a type
            problems.append(f"{path}: {keypath}: unexpected value {_quote(value)}")
            continue
        settings[name] = dict(converted) if isinstance(converted, dict) else converted
    return settings


def _did_you_mean(name: str, known: Mapping[str, Any]) -> str:
    import difflib  # only for a mistyped key

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


_loader: type[Any] | None = None


def _unique_key_loader() -> type[Any]:
    """A ``yaml.SafeLoader`` that notes every key given twice in one mapping in
    ``duplicates`` (YAML itself would keep the last one silently)."""
    global _loader
    if _loader is None:
        import yaml

        class UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc]
            duplicates: list[str]

            def construct_mapping(self, node: Any, deep: bool = False) -> Any:
                if isinstance(node, yaml.MappingNode):
                    seen: dict[str, int] = {}
                    for key_node, _value in node.value:
                        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(
                            ":merge"
                        ):
                            continue
                        line = key_node.start_mark.line + 1
                        if key_node.value in seen:
                            self.duplicates.append(
                                f"{key_node.value}: given twice (line {seen[key_node.value]}"
                                f" and line {line}); YAML would keep only the last"
                            )
                        seen.setdefault(key_node.value, line)
                return super().construct_mapping(node, deep)

        _loader = UniqueKeyLoader
    return _loader


def _make(cls: type[Any], settings: dict[str, Any]) -> Any:
    """The record ``cls`` from plain settings (from :func:`_build` or the cache)."""
    fields = specs(cls)
    kwargs: dict[str, Any] = {}
    for name, value in settings.items():
        f = fields[name]
        if f.section is not None:
            kwargs[name] = _make(f.section, value)
        elif isinstance(value, dict):
            kwargs[name] = _FrozenDict(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _parse(text: str, path: str) -> dict[str, Any]:
    settings, problems = _parse_all(text, path)
    if problems:
        raise ConfigError(problems)
    return settings


def _parse_all(text: str, path: str) -> tuple[dict[str, Any], list[str]]:
    """The settings that are valid, and every problem (none hides another)."""
    import yaml

    loader = _unique_key_loader()(text)
    loader.duplicates = []
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError([f"{path}: not valid YAML{line}"]) from None
    finally:
        loader.dispose()
    problems: list[str] = [f"{path}: {d}" for d in loader.duplicates]
    settings: dict[str, Any] = _build(Config, data, "", path, problems)
    return settings, problems


def check_file(path: str) -> tuple[Config, list[str]]:
    """For ``mailgrave check``: the file's configuration (its valid settings over the
    defaults) and every problem in it. Raises :class:`ConfigError` only when
    there is nothing to check (unreadable, not YAML)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: cannot read: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError([f"{path}: cannot read: {reason.lower()}"]) from None
    settings, problems = _parse_all(text, path)
    return _finish(settings, path), problems


def _finish(settings: dict[str, Any], path: str) -> Config:
    config: Config = _make(Config, settings)
    # Not part of the file (nor of the cache): the host's name when the file has none.
    if not config.hostname:
        config = config.replace(hostname=default_hostname())
    return config.replace(path=path)


def parse_text(text: str, path: str = "<string>") -> Config:
    """Parse YAML text into a :class:`Config`; raise :class:`ConfigError` listing every problem."""
    return _finish(_parse(text, path), path)


# --- the compiled cache

CACHE_ROOT = "/var/cache/mailgrave"
_CACHE_FORMAT = "mailgrave-config-cache 1"
# The file: this magic, the CRC-32 of the rest (big-endian), then marshal data.
_CACHE_MAGIC = b"MGc1"


def cache_dir() -> str | None:
    """This user's cache directory, ``CACHE_ROOT/USER``, or None without a user name."""
    try:
        name = pwd.getpwuid(os.geteuid()).pw_name
    except (KeyError, OSError):
        return None
    if not name or "/" in name or name.startswith("."):
        return None
    return f"{CACHE_ROOT}/{name}"


def _cache_key(path: str, st: os.stat_result) -> tuple[Any, ...]:
    """What a cache must match: the file (path, identity, size, times) and this code."""
    code = os.stat(__file__)
    return (
        _CACHE_FORMAT,
        __version__,
        code.st_size,
        code.st_mtime_ns,
        os.path.abspath(path),
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )


def _trusted(st: os.stat_result) -> bool:
    """Owned by this user or by root, a regular file, and nobody else may write it."""
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_uid in (0, os.geteuid())
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def read_cache(key: tuple[Any, ...], directory: str | None) -> dict[str, Any] | None:
    """The cached settings for ``key``, or None (absent, stale, untrusted or unreadable)."""
    if directory is None:
        return None
    try:
        fd = os.open(f"{directory}/config", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not _trusted(os.fstat(fd)):
            return None
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    payload = data[8:]
    # The checksum keeps a torn or damaged file away from marshal, which is only
    # safe on data it wrote itself; the owner check keeps other users' files away.
    if data[:4] != _CACHE_MAGIC or int.from_bytes(data[4:8], "big") != zlib.crc32(payload):
        return None
    try:
        stored_key, settings = marshal.loads(payload)  # noqa: S302 (see above)
    except Exception:
        return None
    if stored_key != key or not isinstance(settings, dict):
        return None
    return settings


def write_cache(
    key: tuple[Any, ...],
    settings: dict[str, Any],
    directory: str | None,
    owner: tuple[int, int] | None = None,
) -> bool:
    """Store ``settings`` under ``key``, atomically (temporary file, then rename); True if done.

    Root creates its own directory when missing; other users need theirs
    (the package creates them). Failures only cost the next start a parse.
    ``owner`` (root only): the uid and gid the file is given.
    """
    if directory is None:
        return False
    if os.geteuid() == 0 and directory.startswith(CACHE_ROOT + "/"):
        try:
            os.makedirs(CACHE_ROOT, 0o755, exist_ok=True)
            os.mkdir(directory, 0o700)
        except OSError:
            pass
    try:
        payload = marshal.dumps((key, settings))
        data = _CACHE_MAGIC + zlib.crc32(payload).to_bytes(4, "big") + payload
        # No fsync: a cache lost in a crash only costs the next start a parse.
        replace_file(
            f"{directory}/config", data, directory, False, mode=0o600, fsync=False, owner=owner
        )
    except (OSError, ValueError):
        return False
    return True


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (
        b.st_dev,
        b.st_ino,
        b.st_size,
        b.st_mtime_ns,
        b.st_ctime_ns,
    )


def load(path: str | None = None, *, cache: bool = True) -> Config:
    """Load ``path`` (default ``/etc/mailgrave/mailgrave.yaml``; if that is absent, defaults).

    With ``cache``, the compiled cache stands in for the YAML when it matches
    the file, and a parse refreshes it (see the module's docstring).
    """
    explicit = path is not None
    path = path or DEFAULT_PATH
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if explicit:
            raise ConfigError([f"{path}: cannot read: no such file"]) from None
        return Config(hostname=default_hostname(), path=path)
    except OSError as exc:
        reason = exc.strerror or "error"
        raise ConfigError([f"{path}: cannot read: {reason.lower()}"]) from None
    try:
        before = os.fstat(fd)
        key = _cache_key(path, before)
        directory = cache_dir() if cache else None
        settings = read_cache(key, directory)
        if settings is not None:
            try:
                return _finish(settings, path)
            except Exception:  # a cache that does not fit these records: parse instead
                pass
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            text = b"".join(chunks).decode("utf-8")
            after = os.fstat(fd)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise ConfigError([f"{path}: cannot read: {reason.lower()}"]) from None
    finally:
        os.close(fd)
    settings = _parse(text, path)
    if directory is not None and _same_file(before, after):
        write_cache(key, settings, directory)
    return _finish(settings, path)


def refresh_caches(path: str) -> list[str]:
    """Parse ``path`` (never from a cache) and write the cache: this user's, or as
    root every user's directory under :data:`CACHE_ROOT` (each file given to the
    directory's owner). Raise :class:`ConfigError` for a bad file; return the
    directories written. ``mailgrave check`` calls it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {(exc.strerror or 'error').lower()}"]) from None
    try:
        before = os.fstat(fd)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: cannot read: not utf-8 text"]) from None
    settings = _parse(text, path)
    if not _same_file(before, after):
        return []  # being edited: the next start parses it
    key = _cache_key(path, before)
    targets: list[tuple[str, tuple[int, int] | None]] = []
    written: list[str] = []
    if os.geteuid() == 0:
        own = cache_dir()
        # First root's own (write_cache creates the directories if need be).
        if own is not None and write_cache(key, settings, own):
            written.append(own)
        try:
            entries = list(os.scandir(CACHE_ROOT))
        except OSError:
            entries = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and entry.path != own:
                st = entry.stat(follow_symlinks=False)
                targets.append((entry.path, (st.st_uid, st.st_gid)))
    else:
        targets.append((cache_dir() or "", None))
    for directory, owner in targets:
        if directory and write_cache(key, settings, directory, owner):
            written.append(directory)
    return sorted(written)


def load_or_exit(path: str | None, prog: str, status: int = 111) -> Config:
    """:func:`load` for a program's start: each problem on one line of stderr, then exit."""
    try:
        return load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{prog}: {problem}", file=sys.stderr)
        raise SystemExit(status) from None
