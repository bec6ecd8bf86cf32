"""DKIM verification (RFC 6376) and DMARC (RFC 7489) of a message mailgrave-smtpd
asks to be checked, and the one Authentication-Results: field (RFC 8601) they
and smtpd's SPF result go into.

DKIM in bounded memory: :class:`mailgrave.queue.inbound.Inbound` hashes the
body as it streams into the spool (relaxed or simple, ``l=``); dkimpy then
verifies each signature over the header section alone, with our body hash
standing in for its own (:class:`_HeaderVerifier`). Look-ups go through
``remote.dns``; DNS trouble is temperror, never a pass. All the look-ups of one
message share one ``remote.dns.timeout`` (:class:`Lookups`): a DNS server that
never answers delays the reply to the final dot by that much, not once per
signature.
"""

from __future__ import annotations

import base64
import email.utils
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import authres  # type: ignore[import-untyped]  # python3-authres
import authres.dmarc  # type: ignore[import-untyped]
import dkim  # python3-dkim
import dkim.util
import publicsuffix2  # type: ignore[import-untyped]  # python3-publicsuffix2
from dns import exception as dns_exception
from dns import resolver as dns_resolver

from mailgrave import config as configmod
from mailgrave import log as logmod
from mailgrave.dnsconf import resolver
from mailgrave.errors import PermFail, TempFail
from mailgrave.queue.inbound import BodyKey, Inbound

log = logmod.getLogger(__name__)

PUBLIC_SUFFIX_LIST = "/usr/share/publicsuffix/public_suffix_list.dat"  # Debian's publicsuffix
MAX_SIGNATURES = 8  # verified per message (each costs a DNS look-up); the rest are ignored
_DMARC1 = re.compile(rb"(?i)v\s*=\s*dmarc1\s*(;|$)")
HASHES = {b"rsa-sha256": "sha256", b"rsa-sha1": "sha1", b"ed25519-sha256": "sha256"}

DMARC_REJECT = "5.7.1 message rejected by the DMARC policy of its From: domain"
DMARC_TEMPFAIL = "4.7.5 DMARC policy could not be checked (DNS), try again later"
DKIM_TEMPFAIL = "4.7.5 DKIM signature could not be checked (DNS), try again later"


# RFC 7489 §6.6.4: a message the pct= sample spares gets the next policy down.
LOWER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


def percent(pct_tag: str | None) -> int:
    """A ``pct=`` tag's value: 0-100; 100 when absent or malformed (RFC 7489
    §6.3: a bad value gives way to the default)."""
    if pct_tag and pct_tag.isdigit() and len(pct_tag) <= 3 and int(pct_tag) <= 100:
        return int(pct_tag)
    return 100


def disposition(p: str, pct: int, roll: int) -> str:
    """What a DMARC failure under policy ``p`` (none, quarantine, reject) and
    ``pct`` comes to: the policy itself when the sample ``roll`` (0-99) is
    below pct, else the next lower one (RFC 7489 §6.6.4)."""
    return p if roll < pct else LOWER[p]


class DnsTrouble(Exception):
    """A look-up failed for a reason other than "no such record"."""


class Lookups:
    """The TXT look-ups of one message, on ``remote.dns``, within one time budget
    (``remote.dns.timeout`` for all of them): once it is spent, every further
    look-up is DnsTrouble at once."""

    def __init__(self, config: configmod.Config) -> None:
        self.res = resolver(config)
        self.deadline = time.monotonic() + config.remote.dns.timeout

    def txt(self, name: str) -> list[bytes]:
        """The TXT records of ``name`` (each one's strings joined); [] when there
        are none; DnsTrouble on a timeout, a failing server or a spent budget."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DnsTrouble("the DNS time of this message is spent")
        try:
            answers = self.res.resolve(name, "TXT", search=False, lifetime=left)
        except (dns_resolver.NoAnswer, dns_resolver.NXDOMAIN):
            return []
        except dns_exception.DNSException as exc:
            raise DnsTrouble(type(exc).__name__) from None
        return [b"".join(r.strings) for r in answers]


class _HeaderVerifier(dkim.DKIM):  # type: ignore[misc]
    """dkimpy's verifier on the header section alone: the body hash is checked
    here against the one computed while the message streamed."""

    body_hash: bytes | None = None

    def verify_sig_process(
        self, sig: dict[bytes, bytes], include_headers: Any, sig_header: Any, dnsfunc: Any
    ) -> bool:
        try:
            bh = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
        except (ValueError, TypeError):
            raise dkim.MessageFormatError("bad bh=") from None
        if bh != self.body_hash:
            raise dkim.ValidationError("body hash mismatch")
        sig = {k: v for k, v in sig.items() if k != b"bh"}
        return bool(super().verify_sig_process(sig, include_headers, sig_header, dnsfunc))


def signatures(header: bytes) -> list[dict[bytes, bytes]]:
    """The tags of each DKIM-Signature: field ({} for one that does not parse)."""
    fields, _body = dkim.rfc822_parse(header + b"\r\n")
    out: list[dict[bytes, bytes]] = []
    for name, value in fields:
        if name.lower() == b"dkim-signature":
            try:
                out.append(dkim.util.parse_tag_value(value))
            except dkim.util.InvalidTagValueList:
                out.append({})
    return out[:MAX_SIGNATURES]


def body_key(sig: dict[bytes, bytes]) -> BodyKey | None:
    """What the body hash of a signature needs: (relaxed, algorithm, l=)."""
    try:
        c = sig.get(b"c", b"simple/simple").split(b"/")
        body = c[1] if len(c) > 1 else b"simple"
        limit = int(sig[b"l"]) if b"l" in sig else None
        if body not in (b"simple", b"relaxed") or (limit is not None and limit < 0):
            return None
        return (body == b"relaxed", HASHES[sig.get(b"a", b"")], limit)
    except (KeyError, ValueError):
        return None


class DkimResult:
    def __init__(self, result: str, sig: dict[bytes, bytes], reason: str = "") -> None:
        self.result = result
        self.domain = sig.get(b"d", b"").decode("ascii", "replace").lower()
        self.selector = sig.get(b"s", b"").decode("ascii", "replace")
        self.identity = sig.get(b"i", b"").decode("ascii", "replace")
        self.reason = reason

    def clause(self) -> Any:
        return authres.DKIMAuthenticationResult(
            result=self.result,
            result_comment=self.reason or None,
            header_d=self.domain or None,
            header_s=self.selector or None,
            header_i=self.identity or None,
        )


class Checker:
    """DKIM and DMARC for one queue process (the public suffix list loaded once)."""

    def __init__(self, config: configmod.Config, roll: Callable[[], int] | None = None) -> None:
        self.config = config
        self.dkim_mode = config.checks.dkim
        self.dmarc_mode = config.checks.dmarc
        self._psl: Any = None
        # the pct= sample: 0-99, uniform (injectable for tests)
        self.roll = roll or (lambda: secrets.randbelow(100))

    @property
    def active(self) -> bool:
        return self.dkim_mode != "off" or self.dmarc_mode != "off"

    def inbound(self) -> Inbound:
        """The filter that keeps what verification needs."""
        return Inbound(self.config.hostname, keep=True, on_header=self._body_keys)

    @staticmethod
    def _body_keys(header: bytes) -> list[BodyKey]:
        return [k for k in map(body_key, signatures(header)) if k is not None]

    # --- DKIM

    def dkim(self, inbound: Inbound, lookups: Lookups | None = None) -> list[DkimResult]:
        """One result for each signature (at most MAX_SIGNATURES)."""
        header = bytes(inbound.header)
        if inbound.header_too_big:
            return [DkimResult("permerror", {}, "header section too big")]
        sigs = signatures(header)
        hashes = inbound.body_hashes()
        lookups = lookups or Lookups(self.config)
        results = []
        for idx, sig in enumerate(sigs):
            results.append(self._verify(header, idx, sig, hashes, lookups))
        return results

    def _verify(
        self,
        header: bytes,
        idx: int,
        sig: dict[bytes, bytes],
        hashes: dict[BodyKey, bytes] | None,
        lookups: Lookups,
    ) -> DkimResult:
        key = body_key(sig)
        if not sig or key is None or not sig.get(b"d") or not sig.get(b"s"):
            return DkimResult("neutral", sig, "bad signature")
        if hashes is None:
            return DkimResult("permerror", sig, "body line too long")
        name = b"%s._domainkey.%s" % (sig[b"s"], sig[b"d"])
        try:
            records = lookups.txt(name.decode("ascii", "replace"))
        except DnsTrouble:
            return DkimResult("temperror", sig, "key lookup failed")
        if not records:
            return DkimResult("permerror", sig, "no key")
        try:
            dkim.evaluate_pk(name, records[0])
        except dkim.DKIMException:
            return DkimResult("permerror", sig, "bad key")
        verifier = _HeaderVerifier(header + b"\r\n", minkey=1024)
        verifier.body_hash = hashes[key]
        try:
            ok = verifier.verify(idx, dnsfunc=lambda _name, timeout=5: records[0])
        except dkim.ValidationError:
            return DkimResult("fail", sig, "body hash mismatch")
        except dkim.DKIMException:
            return DkimResult("neutral", sig, "bad signature")
        return DkimResult("pass" if ok else "fail", sig)

    # --- DMARC

    def org_domain(self, domain: str) -> str:
        """RFC 7489 §3.2: the public suffix plus one label."""
        if self._psl is None:
            self._psl = publicsuffix2.PublicSuffixList(PUBLIC_SUFFIX_LIST)
        # get_tld is right for names under unknown TLDs (the "*" rule); get_sld is not
        suffix = str(self._psl.get_tld(domain) or domain.rpartition(".")[2])
        labels = domain.split(".")
        keep = min(len(labels), suffix.count(".") + 2)
        return ".".join(labels[-keep:])

    def _aligned(self, a: str, b: str, mode: str) -> bool:
        if not a or not b:
            return False
        return a == b if mode == "s" else self.org_domain(a) == self.org_domain(b)

    def _policy(self, lookups: Lookups, domain: str) -> dict[str, str] | None:
        """The DMARC record of ``domain`` as tags, or None."""
        records = [r for r in lookups.txt(f"_dmarc.{domain}") if _DMARC1.match(r)]
        if len(records) != 1:  # none, or several: no policy (RFC 7489 §6.6.3)
            return None
        tags = {}
        for part in records[0].decode("ascii", "replace").split(";"):
            k, eq, v = part.partition("=")
            if eq:
                tags[k.strip().lower()] = v.strip().lower()
        return tags

    def dmarc(
        self,
        header: bytes,
        spf_result: str,
        spf_domain: str,
        dkims: list[DkimResult],
        lookups: Lookups | None = None,
    ) -> tuple[Any, bool]:
        """(the dmarc clause, whether the message is to be refused by its policy);
        TempFail-worthy trouble is the clause temperror."""
        from_domain = from_header_domain(header)
        if from_domain is None:
            clause = authres.dmarc.DMARCAuthenticationResult(
                result="permerror", result_comment="no single From: domain"
            )
            return clause, False
        lookups = lookups or Lookups(self.config)
        org = self.org_domain(from_domain)
        try:
            policy = self._policy(lookups, from_domain)
            inherited = False
            if policy is None and org != from_domain:
                policy, inherited = self._policy(lookups, org), True
        except DnsTrouble:
            return _dmarc_clause("temperror", from_domain), False
        if policy is None:
            return _dmarc_clause("none", from_domain), False
        spf_ok = spf_result == "pass" and self._aligned(
            spf_domain, from_domain, policy.get("aspf", "r")
        )
        dkim_ok = any(
            d.result == "pass" and self._aligned(d.domain, from_domain, policy.get("adkim", "r"))
            for d in dkims
        )
        p = policy.get("p", "none")
        if inherited and "sp" in policy:
            p = policy["sp"]
        if p not in LOWER:
            p = "none"  # an unknown policy asks for nothing (RFC 7489 §6.6.3)
        if spf_ok or dkim_ok:
            return _dmarc_clause("pass", from_domain, p), False
        pct = percent(policy.get("pct"))
        dis = disposition(p, pct, self.roll())
        if dis != p:
            log.info(
                "DMARC of %s: fail under p=%s pct=%s; not in the sample, disposition %s",
                from_domain,
                p,
                pct,
                dis,
            )
        # the policy and what it came to, as Gmail writes it: (p=reject pct=10 dis=quarantine);
        # MailGrave has no quarantine: such a message is delivered, this note in its header
        note = f"{p}{f' pct={pct}' if 'pct' in policy else ''} dis={dis}"
        return _dmarc_clause("fail", from_domain, note), dis == "reject"

    # --- both, and the header

    def check(self, inbound: Inbound, attrs: dict[str, str]) -> dict[str, str]:
        """The attributes with ``authres`` carrying SPF (from smtpd), DKIM and
        DMARC; PermFail/TempFail when ``enforce`` refuses the message."""
        spf_clauses: list[Any] = []
        if attrs.get("authres"):
            try:
                spf_clauses = authres.AuthenticationResultsHeader.parse(
                    "Authentication-Results: " + attrs["authres"]
                ).results
            except Exception:  # smtpd built it with authres: never expected
                log.warning("cannot parse the authres attribute from smtpd")
        spf_result, spf_domain = "", ""
        for c in spf_clauses:
            if c.method == "spf":
                spf_result = c.result
                spf_domain = str(c.smtp_mailfrom or "").rpartition("@")[2].lower()
        lookups = Lookups(self.config)  # one time budget for the whole message
        dkims = self.dkim(inbound, lookups)
        clauses = list(spf_clauses)
        if self.dkim_mode != "off":
            clauses += [d.clause() for d in dkims] or [
                authres.DKIMAuthenticationResult(result="none")
            ]
        refuse, temp = False, False
        if self.dmarc_mode != "off":
            head = bytes(inbound.header)
            clause, refuse = self.dmarc(head, spf_result, spf_domain, dkims, lookups)
            clauses.append(clause)
            temp = clause.result == "temperror"
        if self.dmarc_mode == "enforce" and refuse:
            raise PermFail(DMARC_REJECT)
        if self.dmarc_mode == "enforce" and temp:
            raise TempFail(DMARC_TEMPFAIL)
        if self.dkim_mode == "enforce" and any(d.result == "temperror" for d in dkims):
            raise TempFail(DKIM_TEMPFAIL)
        header = authres.AuthenticationResultsHeader(
            authserv_id=self.config.hostname, results=clauses
        )
        out = dict(attrs)
        out["authres"] = str(header).partition(": ")[2].replace("\r", "").replace("\n", "")
        return out


def _dmarc_clause(result: str, from_domain: str, policy: str = "") -> Any:
    return authres.dmarc.DMARCAuthenticationResult(
        result=result,
        result_comment=f"p={policy}" if policy else None,
        header_from=from_domain,
    )


def from_header_domain(header: bytes) -> str | None:
    """The domain of the one address of the one From: field, lower-case; None otherwise."""
    fields, _body = dkim.rfc822_parse(header + b"\r\n")
    values = [v for n, v in fields if n.strip().lower() == b"from"]
    if len(values) != 1:
        return None
    text = values[0].decode("utf-8", "replace").replace("\r\n", " ")
    addresses = [a for _n, a in email.utils.getaddresses([text]) if a]
    domains = {a.rpartition("@")[2].strip().lower().rstrip(".") for a in addresses}
    if len(domains) != 1 or "" in domains:
        return None
    return domains.pop()
