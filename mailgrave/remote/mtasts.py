"""MTA-STS when sending (RFC 8461): the ``_mta-sts`` TXT record, the policy
fetched over verified HTTPS, its cache, and what a policy allows.

:class:`Policies` is what mailgrave-remote asks before an MX delivery: the
policy in force for a domain (or None), from the cache while its ``max_age``
lasts and the TXT record's id has not changed, else fetched again. A policy
that cannot be fetched is as no policy, unless an unexpired one is cached
(RFC 8461 §3.3, §5.1). The cache is one JSON file per domain in
``remote.mta_sts_cache``, written atomically.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import tempfile
import time

from mailgrave import log as logmod
from mailgrave.config import Config
from mailgrave.errors import DeliveryError
from mailgrave.record import Record, record
from mailgrave.remote.route import Resolver

log = logmod.getLogger(__name__)

MAX_POLICY = 64 * 1024  # RFC 8461 §3.3: bounded; 64 KB is what others use
MAX_AGE = 31557600  # RFC 8461 §3.2
WELL_KNOWN = "/.well-known/mta-sts.txt"


class PolicyError(Exception):
    """A policy that cannot be fetched or parsed (safe for the log)."""


@record
class Policy(Record):
    """One domain's policy: ``mode`` enforce, testing or none; ``mx`` patterns."""

    domain: str
    id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    fetched: float

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.max_age

    def allows(self, host: str) -> bool:
        """RFC 8461 §4.1: an MX host matches a pattern exactly, or ``*.`` one label."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                first, dot, rest = host.partition(".")
                if dot and first and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    def to_json(self) -> bytes:
        return json.dumps({k: getattr(self, k) for k in Policy._fields}).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Policy:
        d = json.loads(raw)
        return cls(
            str(d["domain"]),
            str(d["id"]),
            str(d["mode"]),
            tuple(str(m) for m in d["mx"]),
            int(d["max_age"]),
            float(d["fetched"]),
        )


def parse_txt(texts: list[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records, or None: exactly one
    record must start ``v=STSv1`` (RFC 8461 §3.1)."""
    found = [t for t in texts if t.startswith("v=STSv1;") or t == "v=STSv1"]
    if len(found) != 1:
        return None
    for part in found[0].split(";"):
        key, _, value = part.strip().partition("=")
        if key == "id" and value and len(value) <= 32 and value.isalnum():
            return value
    return None


def parse_policy(domain: str, policy_id: str, text: str, now: float) -> Policy:
    """The policy file (RFC 8461 §3.2); PolicyError when it is not valid."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if not colon:
            continue
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        elif key not in fields:
            fields[key] = value
    if fields.get("version") != "STSv1":
        raise PolicyError("policy has no version: STSv1")
    mode = fields.get("mode", "")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"policy mode {mode[:20]!r} is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise PolicyError("policy has no valid max_age")
    if mode != "none" and not mx:
        raise PolicyError("policy names no mx")
    return Policy(domain, policy_id, mode, tuple(mx), min(int(age), MAX_AGE), now)


class _Connection(http.client.HTTPSConnection):
    """HTTPS to a known address (resolved with remote.dns), the certificate
    verified against the policy host's name."""

    def __init__(
        self, host: str, address: str, port: int, context: ssl.SSLContext, timeout: float
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._ctx = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)


class Policies:
    """The MTA-STS policies mailgrave-remote delivers under (one per process)."""

    def __init__(self, config: Config, context: ssl.SSLContext) -> None:
        self.config = config
        self.context = context  # verifying, with remote.ca_file
        self.cache_dir = config.remote.mta_sts_cache
        self._resolver: Resolver | None = None

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:
            self._resolver = Resolver(self.config)
        return self._resolver

    def _cache_path(self, domain: str) -> str:
        return os.path.join(self.cache_dir, domain)

    def cached(self, domain: str) -> Policy | None:
        try:
            with open(self._cache_path(domain), "rb") as f:
                return Policy.from_json(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("MTA-STS cache for %s unreadable: %s", domain, type(exc).__name__)
            return None

    def _store(self, policy: Policy) -> None:
        try:
            os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-")
            try:
                os.write(fd, policy.to_json())
            finally:
                os.close(fd)
            os.replace(tmp, self._cache_path(policy.domain))
        except OSError as exc:
            log.warning("cannot cache the MTA-STS policy of %s: %s", policy.domain, exc)

    def fetch(self, domain: str, policy_id: str, now: float) -> Policy:
        """GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt: 200, text/plain,
        bounded in size and time, no redirects; PolicyError otherwise."""
        host = f"mta-sts.{domain}"
        try:
            addresses = self.resolver.addresses(host)
        except DeliveryError:
            addresses = ()
        if not addresses:
            raise PolicyError(f"{host} has no address")
        timeout = self.config.remote.mta_sts_timeout
        deadline = time.monotonic() + timeout
        port = self.config.remote.mta_sts_port
        conn = _Connection(host, addresses[0], port, self.context, timeout)
        try:
            conn.request("GET", WELL_KNOWN, headers={"Host": host, "User-Agent": "MailGrave"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise PolicyError(f"{host} answered HTTP {resp.status}")
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "text/plain":
                raise PolicyError(f"{host} sent {ctype[:40] or 'no content type'}, not text/plain")
            body = b""
            while len(body) <= MAX_POLICY:
                if time.monotonic() > deadline:
                    raise PolicyError(f"{host}: policy fetch took too long")
                chunk = resp.read(8192)
                if not chunk:
                    break
                body += chunk
            if len(body) > MAX_POLICY:
                raise PolicyError(f"{host}: policy larger than {MAX_POLICY} bytes")
        except ssl.SSLError as exc:
            reason = getattr(exc, "verify_message", None) or exc.reason or "TLS failure"
            raise PolicyError(f"TLS with {host} failed: {reason}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise PolicyError(
                f"cannot fetch the policy from {host}: {type(exc).__name__}"
            ) from None
        finally:
            conn.close()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(f"{host}: policy is not UTF-8") from None
        return parse_policy(domain, policy_id, text, now)

    def lookup(self, domain: str, now: float | None = None) -> Policy | None:
        """The policy in force for ``domain`` (mode enforce or testing), or None."""
        now = time.time() if now is None else now
        cached = self.cached(domain)
        if cached is not None and cached.expired(now):
            cached = None
        policy_id = parse_txt(self.resolver.txt(f"_mta-sts.{domain}"))
        policy = cached
        if policy_id is not None and (cached is None or cached.id != policy_id):
            try:
                policy = self.fetch(domain, policy_id, now)
            except PolicyError as exc:
                log.warning(
                    "MTA-STS policy of %s not used: %s%s",
                    domain,
                    exc,
                    " (the cached one is)" if cached else "",
                )
            else:
                log.info("MTA-STS policy of %s: mode %s, id %s", domain, policy.mode, policy_id)
                self._store(policy)
        if policy is None or policy.mode == "none":
            return None
        return policy
