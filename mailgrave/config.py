"""mailgrave.yaml: loaded with ``yaml.safe_load`` into frozen, validated objects.

Every section is a frozen dataclass whose fields carry a converter in their
metadata; :func:`load` walks the YAML mapping, converts each value, and
collects every problem as ``FILE: key.path: message`` so that
``mailgrave check`` can report them all at once.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PATH = "/etc/mailgrave/mailgrave.yaml"


class ConfigError(Exception):
    """One or more problems in a configuration file, each a one-line message."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Bad(ValueError):
    pass


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
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", str(value), re.IGNORECASE)
    if isinstance(value, bool) or not m:
        raise _Bad(f"expected a size such as 10M, got {_quote(value)}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def parse_duration(value: object) -> float:
    """``90s``, ``5m``, ``4h``, ``5d`` → seconds; plain numbers are seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
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


def _mapping(item: Callable[[object], Any]) -> Callable[[object], Mapping[str, Any]]:
    def convert(value: object) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise _Bad(f"expected a mapping, got {_quote(value)}")
        out = {}
        for k, v in value.items():
            try:
                out[_str(k).lower()] = item(v)
            except _Bad as exc:
                raise _Bad(f"{k}: {exc}") from None
        return _FrozenDict(out)

    return convert


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(_str(value), strict=False)
    except ValueError:
        raise _Bad(f"expected a network such as 192.0.2.0/24, got {_quote(value)}") from None


def _domain(value: object) -> str:
    from mailgrave.address import AddressError, to_ascii_domain

    try:
        return to_ascii_domain(_nonempty_str(value))
    except AddressError as exc:
        raise _Bad(f"{exc}: {_quote(value)}") from None


def _hostport(value: object) -> str:
    text = _nonempty_str(value)
    if not re.fullmatch(r"(\[[^\]]+\]|[^\s:\[\]]+)(:\d{1,5})?", text):
        raise _Bad(f"expected host, [host], host:port or [host]:port, got {_quote(value)}")
    return text


def _ip(value: object) -> str:
    try:
        return str(ipaddress.ip_address(_str(value)))
    except ValueError:
        raise _Bad(f"expected an IP address, got {_quote(value)}") from None


class _FrozenDict(dict[str, Any]):
    """A dict that refuses changes, for mapping-valued settings."""

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("configuration is read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


def _opt(convert: Callable[[object], Any], default: Any, doc: str = "") -> Any:
    return field(default=default, metadata={"convert": convert, "doc": doc})


def _section(cls: type[Any]) -> Any:
    return field(default_factory=cls, metadata={"section": cls})


@dataclass(frozen=True)
class TLS:
    certificate: str = _opt(_str, "")
    key: str = _opt(_str, "")


@dataclass(frozen=True)
class Smtpd:
    max_message_size: int = _opt(parse_size, 35 * 1024 * 1024)
    max_recipients: int = _opt(_int, 100)
    timeout: float = _opt(parse_duration, 300.0)
    max_errors: int = _opt(_int, 10)
    max_connections: int = _opt(_int, 100)
    max_connections_per_client: int = _opt(_int, 10)
    idle_exit: float = _opt(parse_duration, 60.0)
    # How long a client must stay quiet before the greeting (talking early is
    # refused); 0 greets at once and only catches what arrived before it.
    greet_pause: float = _opt(parse_duration, 0.2)
    banner: str = _opt(_str, "")
    tls: TLS = _section(TLS)


@dataclass(frozen=True)
class Local:
    mailbox: str = _opt(_choice("maildir", "mbox"), "maildir")
    maildir: str = _opt(_nonempty_str, "Maildir/")
    mbox_dir: str = _opt(_nonempty_str, "/var/mail")
    aliases: str = _opt(_str, "/etc/aliases")
    recipient_delimiter: str = _opt(_str, "+")
    forward: bool = _opt(_bool, True)
    virtual: Mapping[str, str] = _opt(_mapping(_nonempty_str), _FrozenDict())
    virtual_user: str = _opt(_nonempty_str, "mail")
    default_user: str = _opt(_nonempty_str, "nobody")
    root_mailbox: str = _opt(_nonempty_str, "/var/mail/root")


@dataclass(frozen=True)
class Queue:
    lifetime: float = _opt(parse_duration, 5 * 86400.0)
    bounce_lifetime: float = _opt(parse_duration, 2 * 86400.0)
    warn_after: float = _opt(parse_duration, 4 * 3600.0)
    retry: tuple[float, ...] = _opt(_list(parse_duration), (300.0, 600.0, 1200.0, 2400.0, 3600.0))
    max_parallel: int = _opt(_int, 20)
    max_message_size: int = _opt(parse_size, 100 * 1024 * 1024)
    idle_exit: float = _opt(parse_duration, 30.0)
    trusted_users: tuple[str, ...] = _opt(_list(_nonempty_str), ("root", "mailgrave-smtpd"))


@dataclass(frozen=True)
class Smarthost:
    host: str = _opt(_str, "")
    port: int = _opt(_int, 587)
    login: str = _opt(_str, "")
    password_file: str = _opt(_str, "")


@dataclass(frozen=True)
class DNS:
    nameservers: tuple[str, ...] = _opt(_list(_ip), ())
    port: int = _opt(_int, 53)
    timeout: float = _opt(parse_duration, 10.0)


@dataclass(frozen=True)
class Remote:
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


@dataclass(frozen=True)
class Config:
    path: str = ""
    hostname: str = _opt(_domain, "")
    origin: str = _opt(_domain, "")  # domain for bare local names; default: hostname
    spool: str = _opt(_nonempty_str, "/var/spool/mailgrave")
    run_dir: str = _opt(_nonempty_str, "/run/mailgrave")
    local_domains: tuple[str, ...] = _opt(_list(_domain), ())
    relay_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _opt(
        _list(_network),
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
    )
    smtpd: Smtpd = _section(Smtpd)
    local: Local = _section(Local)
    queue: Queue = _section(Queue)
    remote: Remote = _section(Remote)

    def is_local_domain(self, domain: str) -> bool:
        """local_domains, the hostname, localhost, and every domain of a virtual mailbox."""
        domain = domain.lower()
        if domain in self.local_domains or domain in (self.hostname, "localhost"):
            return True
        return any(addr.rpartition("@")[2] == domain for addr in self.local.virtual)

    def may_relay(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.relay_networks)

    def socket_path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)


def default_hostname() -> str:
    """``/etc/mailname`` if present, else the FQDN."""
    try:
        with open("/etc/mailname", encoding="utf-8") as f:
            name = f.readline().strip()
            if name:
                return name.lower()
    except OSError:
        pass
    return socket.getfqdn().lower()


def _build(cls: type[Any], data: object, where: str, path: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path}: {where or 'top level'}: expected a mapping, got {_quote(data)}")
        return cls()
    kwargs: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata}
    for key, value in data.items():
        name = str(key)
        keypath = f"{where}.{name}" if where else name
        f = fields.get(name)
        if f is None:
            problems.append(f"{path}: {keypath}: unknown key")
            continue
        if "section" in f.metadata:
            kwargs[name] = _build(f.metadata["section"], value, keypath, path, problems)
            continue
        try:
            kwargs[name] = f.metadata["convert"](value)
        except _Bad as exc:
            problems.append(f"{path}: {keypath}: {exc}")
    return cls(**kwargs)


def parse_text(text: str, path: str = "<string>") -> Config:
    """Parse YAML text into a :class:`Config`; raise :class:`ConfigError` listing every problem."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError([f"{path}: not valid YAML{line}"]) from None
    problems: list[str] = []
    config: Config = _build(Config, data, "", path, problems)
    if problems:
        raise ConfigError(problems)
    if not config.hostname:
        config = dataclasses.replace(config, hostname=default_hostname())
    return dataclasses.replace(config, path=path)


def load(path: str | None = None) -> Config:
    """Load ``path`` (default ``/etc/mailgrave/mailgrave.yaml``; if that is absent, defaults)."""
    explicit = path is not None
    path = path or DEFAULT_PATH
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError([f"{path}: cannot read: no such file"]) from None
        return dataclasses.replace(Config(hostname=default_hostname()), path=path)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError([f"{path}: cannot read: {reason.lower()}"]) from None
    return parse_text(text, path)


def load_or_exit(path: str | None, prog: str, status: int = 111) -> Config:
    """:func:`load` for a program's start: each problem on one line of stderr, then exit."""
    import sys

    try:
        return load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{prog}: {problem}", file=sys.stderr)
        raise SystemExit(status) from None
