"""Where mail for a remote domain goes: remote.routes, the smarthost, or MX records.

A route ``[host]:port`` names the host itself (no MX lookup), ``host:port``
means "the MX hosts of host" (qmail's smtproutes, Postfix's transport).
Without a route, the smarthost if one is set, else the domain's MX records
(A/AAAA when there is none; a null MX or NXDOMAIN is permanent, SERVFAIL and
timeouts temporary).  DNS goes to ``remote.dns.nameservers`` when set.
"""

from __future__ import annotations

import ipaddress
import os
import random
from typing import Any

import dns.exception
import dns.resolver

from mailgrave.config import Config
from mailgrave.errors import PermFail, TempFail
from mailgrave.record import Record, record


@record
class Hop(Record):
    """One host to try: its name (for TLS and messages), its addresses, the port."""

    host: str
    addresses: tuple[str, ...]
    port: int
    smarthost: bool = False


def split_spec(spec: str, default_port: int) -> tuple[str, int, bool]:
    """``[host]:port`` / ``host:port`` → (host, port, is_bracketed)."""
    bracketed = spec.startswith("[")
    if bracketed:
        host, _, rest = spec[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
        return host, port, True
    host, colon, port_text = spec.rpartition(":")
    if not colon:
        return spec, default_port, False
    return host, int(port_text), False


def smarthost_password(config: Config) -> str:
    """From password_file, the systemd credential smtp-password, or SMTP_AUTH_PASSWORD."""
    candidates = []
    if config.remote.smarthost.password_file:
        candidates.append(config.remote.smarthost.password_file)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        candidates.append(os.path.join(creds, "smtp-password"))
    for path in candidates:
        try:
            with open(path, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except FileNotFoundError:
            continue
        except OSError:
            raise TempFail("4.7.0 cannot read the smarthost password") from None
    return os.environ.get("SMTP_AUTH_PASSWORD", "")


class Resolver:
    """DNS look-ups for delivery, with the configured nameservers (dnspython)."""

    def __init__(self, config: Config) -> None:
        dnsconf = config.remote.dns
        if dnsconf.nameservers:
            res = dns.resolver.Resolver(configure=False)
            res.nameservers = list(dnsconf.nameservers)
            res.port = dnsconf.port
        else:
            res = dns.resolver.Resolver()
        res.lifetime = dnsconf.timeout
        res.timeout = min(dnsconf.timeout, 5.0)
        self.resolver = res
        self.ip_version = config.remote.ip_version

    def _query(self, name: str, rdtype: str) -> list[Any] | None:
        """Records, or None for "no such record"; NXDOMAIN → PermFail; failures → TempFail."""
        try:
            return list(self.resolver.resolve(name, rdtype, search=False))
        except dns.resolver.NXDOMAIN:
            raise PermFail(f"5.1.2 domain {name} does not exist") from None
        except dns.resolver.NoAnswer:
            return None
        except (dns.resolver.NoNameservers, dns.exception.Timeout):
            raise TempFail(f"4.4.3 DNS lookup of {name} ({rdtype}) failed") from None
        except dns.exception.DNSException:
            raise TempFail(f"4.4.3 DNS lookup of {name} ({rdtype}) failed") from None

    def txt(self, name: str) -> list[str]:
        """The TXT records of ``name`` (each one's strings joined); [] when there is
        none or the lookup fails (MTA-STS then keeps what it has cached)."""
        try:
            records = self._query(name, "TXT") or []
        except (PermFail, TempFail):
            return []
        return [b"".join(r.strings).decode("utf-8", "replace") for r in records]

    def addresses(self, host: str) -> tuple[str, ...]:
        try:
            return (str(ipaddress.ip_address(host)),)
        except ValueError:
            pass
        found: list[str] = []
        kinds = {"any": ("AAAA", "A"), "4": ("A",), "6": ("AAAA",)}[self.ip_version]
        for kind in kinds:
            try:
                found += [r.address for r in self._query(host, kind) or []]
            except PermFail:
                return ()
        return tuple(found)

    def mx(self, domain: str) -> list[str]:
        """MX hosts in preference order (equal ones shuffled); [domain] when there is no MX."""
        records = self._query(domain, "MX")
        if records is None:
            return [domain]
        if len(records) == 1 and str(records[0].exchange) == ".":
            raise PermFail(f"5.1.10 {domain} accepts no mail (null MX)")
        by_pref: dict[int, list[str]] = {}
        for r in records:
            name = str(r.exchange).rstrip(".")
            if name:
                by_pref.setdefault(int(r.preference), []).append(name)
        hosts = []
        for pref in sorted(by_pref):
            group = by_pref[pref]
            random.shuffle(group)
            hosts += group
        return hosts


def route_for(config: Config, domain: str) -> tuple[str, bool]:
    """The route spec for ``domain`` and whether it is the smarthost ('' for MX)."""
    routes = config.remote.routes
    for key in (
        domain,
        *(f".{'.'.join(domain.split('.')[i:])}" for i in range(1, domain.count(".") + 1)),
        "*",
    ):
        if key in routes:
            return routes[key], False
    if config.remote.smarthost.host:
        host = config.remote.smarthost.host
        spec = host if host.startswith("[") else f"[{host}]"
        return f"{spec}:{config.remote.smarthost.port}", True
    return "", False


def hops(
    config: Config, domain: str, resolver: Resolver | None = None, route: str | None = None
) -> list[Hop]:
    """Every host to try for ``domain``, in order; ``route`` (a route spec such as
    ``[host]:port``) replaces the configured routing. Raises PermFail/TempFail."""
    spec, smart = (route, False) if route else route_for(config, domain)
    if spec:
        host, port, bracketed = split_spec(spec, config.remote.port)
    else:
        host, port, bracketed = domain, config.remote.port, False
    if not 0 < port <= 65535:
        # A route given by hand (--host, --relay --port): the config refuses these.
        raise TempFail(f"4.3.5 route {spec or host}: port {port} is not 1-65535")
    try:
        literal = str(ipaddress.ip_address(host))
    except ValueError:
        literal = ""
    if literal:
        return [Hop(literal, (literal,), port, smart)]
    resolver = resolver or Resolver(config)
    names = [host] if bracketed else resolver.mx(host)
    out = []
    for name in names:
        addrs = resolver.addresses(name)
        if addrs:
            out.append(Hop(name, addrs, port, smart))
    if not out:
        raise TempFail(f"4.4.4 no address found for {', '.join(names)}")
    return out
