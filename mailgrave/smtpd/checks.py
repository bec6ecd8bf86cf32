"""Sender authentication on receipt: SPF (RFC 7208) at MAIL FROM, through
MailGrave's own resolver settings, and the Authentication-Results: header field
(RFC 8601) that records it.

Imported only when ``checks.spf`` is not ``off`` and the client is neither in
``relay_networks`` nor authenticated: spf, dns and authres cost every
connection that loads them (mailgrave-smtpd runs per connection).
"""

from __future__ import annotations

import spf  # type: ignore[import-untyped]  # python3-spf
from dns import exception as dns_exception
from dns import resolver as dns_resolver

from mailgrave import config as configmod
from mailgrave.dnsconf import resolver
from mailgrave.smtp.replies import Reply

# RFC 7208 §4.6.4: at least 20 seconds for the whole evaluation.
SPF_TOTAL_TIME = 20.0

SPF_FAIL = Reply(550, "5.7.23", "SPF check failed: the sender's domain does not allow this host")
SPF_TEMPERROR = Reply(451, "4.7.24", "SPF check could not be completed (DNS), try again later")
SPF_PERMERROR = Reply(550, "5.7.24", "SPF record of the sender's domain is invalid")


def _lookup(res: dns_resolver.Resolver) -> object:
    """pyspf's DNSLookup (name, qtype, strict, timeout) on ``res``: the answers as
    ((name, type), data); NXDOMAIN and no answer give none; a timeout or a
    failing server is TempError (never a pass)."""

    def lookup(name: str, qtype: str, strict: bool = True, timeout: float = 30) -> list[object]:
        out: list[object] = []
        try:
            # remote.dns.timeout bounds each lookup; pyspf's own timeout is for
            # the whole evaluation (a refusing server would otherwise cost all of it).
            answers = res.resolve(name, qtype, lifetime=min(timeout, res.lifetime), search=False)
        except (dns_resolver.NoAnswer, dns_resolver.NXDOMAIN):
            return out
        except (dns_exception.Timeout, dns_resolver.NoNameservers) as exc:
            raise spf.TempError(f"DNS {type(exc).__name__}") from None
        except dns_exception.DNSException as exc:
            raise spf.TempError(f"DNS {type(exc).__name__}") from None
        for rdata in answers:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                out.append(((name, qtype), (rdata.preference, rdata.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), rdata.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), list(rdata.strings)))
            elif qtype == "CNAME":
                out.append(((name, qtype), rdata.target.to_text(True)))
        return out

    return lookup


class SenderChecks:
    """The checks of one session; ``results`` holds its authres result clauses."""

    def __init__(self, config: configmod.Config, client_ip: str) -> None:
        self.config = config
        self.client_ip = client_ip
        self.spf_mode = config.checks.spf
        self.spf_result = ""
        self.spf_identity = ""
        spf.DNSLookup = _lookup(resolver(config))

    def mail_from(self, helo: str, sender: str) -> Reply | None:
        """SPF for MAIL FROM (for <> the HELO identity, RFC 7208 §2.4); a refusal
        under ``enforce``, None otherwise."""
        self.spf_result = ""
        if self.spf_mode == "off":
            return None
        identity = sender or f"postmaster@{helo}"
        try:
            result, _explanation = spf.check2(
                i=self.client_ip,
                s=identity,
                h=helo,
                timeout=self.config.remote.dns.timeout,
                querytime=SPF_TOTAL_TIME,
            )
        except Exception:  # pyspf raises on addresses it cannot parse: not a pass
            result = "permerror"
        self.spf_result, self.spf_identity = result, identity
        if self.spf_mode != "enforce":
            return None
        if result == "fail":
            return SPF_FAIL
        if result == "temperror":
            return SPF_TEMPERROR
        return None

    def header_value(self) -> str:
        """``authserv-id; spf=... smtp.mailfrom=...`` for the queue's
        Authentication-Results: field, or '' when nothing was checked."""
        if not self.spf_result:
            return ""
        import authres  # type: ignore[import-untyped]

        clause = authres.SPFAuthenticationResult(
            result=self.spf_result, smtp_mailfrom=self.spf_identity
        )
        header = authres.AuthenticationResultsHeader(
            authserv_id=self.config.hostname, results=[clause]
        )
        return str(header).partition(": ")[2]
