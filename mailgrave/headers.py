"""Header fields MailGrave writes: Received: (RFC 5321 §4.4), Date: (RFC 5322), Message-ID:."""

from __future__ import annotations

import secrets
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mailgrave.envelope import Envelope

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def rfc5322_date(now: float | None = None) -> str:
    """``Thu, 26 Nov 2026 22:00:00 +0100`` in local time, independent of the locale."""
    t = time.localtime(now)
    offset = t.tm_gmtoff // 60
    sign = "+" if offset >= 0 else "-"
    hh, mm = divmod(abs(offset), 60)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{hh:02d}{mm:02d}"
    )


def _clean(text: str, limit: int = 100) -> str:
    """Client text fit for a header comment: printable ASCII, no parentheses, bounded."""
    out = "".join(c if 0x21 <= ord(c) < 0x7F and c not in "()\\" else "?" for c in text)
    return out[:limit] or "unknown"


def received(
    hostname: str, qid: str, envelope: Envelope, attrs: dict[str, str] | None, uid: int | None
) -> bytes:
    """The queue's ``Received:`` header (RFC 5321 §4.4), folded, LF line ends."""
    date = rfc5322_date()
    if attrs and attrs.get("addr"):
        helo = _clean(attrs.get("helo", ""))
        addr = _clean(attrs["addr"], 60)
        host = attrs.get("host")
        peer = f"{_clean(host)} [{addr}]" if host else f"[{addr}]"
        proto = _clean(attrs.get("proto", "SMTP"), 20)
        if attrs.get("login"):  # only with auth.record_login: true (privacy)
            peer += f" (authenticated as {_clean(attrs['login'])})"
        line = f"Received: from {helo} ({peer})\n\tby {hostname} (MailGrave) with {proto} id {qid}"
    else:
        who = f"from userid {uid}" if uid is not None else "local"
        line = f"Received: by {hostname} (MailGrave, {who})\n\tid {qid}"
    if len(envelope.recipients) == 1:
        line += f"\n\tfor <{envelope.recipients[0]}>"
    line += f"; {date}\n"
    if attrs and attrs.get("authres"):
        # mailgrave-smtpd's checks (RFC 8601), below this host's Received: line
        value = "".join(c if c.isprintable() else "?" for c in attrs["authres"])[:8000]
        # one result a line (RFC 5322 §2.1.1: lines under 998 octets)
        line += "Authentication-Results: " + ";\n\t".join(value.split("; ")) + "\n"
    return line.encode("utf-8", "surrogateescape")


def message_id(hostname: str) -> str:
    """A new ``<time.random@hostname>`` Message-ID."""
    return f"<{int(time.time())}.{secrets.token_hex(8)}@{hostname}>"
