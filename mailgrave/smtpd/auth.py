"""What an authenticated client may do: which senders are its own (``auth.senders``),
the From: check, and the hourly limits (``auth.rate_limit``).

Imported only by sessions that authenticate (not on the plain per-connection
path: see mailgrave.smtpd.session).
"""

from __future__ import annotations

import fcntl
import os
import time

from mailgrave import config as configmod
from mailgrave import log as mglog

log = mglog.getLogger(__name__)


def owned(config: configmod.Config, login: str) -> tuple[str, ...]:
    """The addresses and ``@domain`` entries that belong to ``login``.

    ``auth.senders`` when it names the login; otherwise ``login@`` each local
    domain (and the hostname), or the login itself when it is an address.
    """
    entries = config.auth.senders.get(login.lower())
    if entries is not None:
        return tuple(entries)
    if "@" in login:
        return (login.lower(),)
    domains = dict.fromkeys((*config.local_domains, config.hostname))
    return tuple(f"{login.lower()}@{d}" for d in domains if d)


def sender_allowed(config: configmod.Config, login: str, sender: str) -> bool:
    """May ``login`` use the envelope sender ``sender``? (The null sender: yes, RFC 8098 MDNs.)"""
    if not sender:
        return True
    sender = sender.lower()
    domain = sender.rpartition("@")[2]
    return any(e == sender or e == "@" + domain for e in owned(config, login))


def domains_owned(config: configmod.Config, login: str) -> set[str]:
    return {e.rpartition("@")[2] for e in owned(config, login)}


def from_domains(header: bytes) -> list[str] | None:
    """The domains of every address in the From: fields of a header block; None if
    a From: field has an address without a domain (or cannot be parsed)."""
    # email only here: an authenticated session's header block, never the plain path.
    from email.parser import BytesHeaderParser
    from email.policy import compat32
    from email.utils import getaddresses

    msg = BytesHeaderParser(policy=compat32).parsebytes(header)
    values = [str(v) for v in msg.get_all("From", [])]
    domains = []
    for _name, addr in getaddresses(values):
        local, at, domain = addr.rpartition("@")
        if not at or not local or not domain:
            return None
        domains.append(domain.strip().lower().rstrip("."))
    return domains


def from_allowed(config: configmod.Config, login: str, header: bytes) -> bool:
    """Does every From: address of the message belong to ``login``'s domains?

    A message without From: passes (nothing to forge); one whose From: cannot be
    read does not."""
    domains = from_domains(header)
    if domains is None:
        return False
    own = domains_owned(config, login)
    from mailgrave.address import AddressError, to_ascii_domain

    try:
        return all(to_ascii_domain(d) in own for d in domains)
    except AddressError:
        return False


class RateLimiter:
    """Messages and recipients per login and clock hour, counted in small files
    (one per login, ``HOUR MESSAGES RECIPIENTS``) in ``auth.rate_limit.directory``,
    under flock: shared by every session process, kept across restarts."""

    def __init__(self, config: configmod.Config) -> None:
        self.limits = config.auth.rate_limit
        self.directory = self.limits.directory

    def _path(self, login: str) -> str:
        return os.path.join(self.directory, login.lower().encode("utf-8").hex())

    @staticmethod
    def _hour() -> int:
        return int(time.time() // 3600)

    def _read(self, fd: int) -> tuple[int, int]:
        os.lseek(fd, 0, os.SEEK_SET)
        words = os.read(fd, 100).split()
        if len(words) == 3 and all(w.isdigit() for w in words) and int(words[0]) == self._hour():
            return int(words[1]), int(words[2])
        return 0, 0

    def used(self, login: str) -> tuple[int, int]:
        """(messages, recipients) of ``login`` in this hour."""
        try:
            fd = os.open(self._path(login), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return 0, 0
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return self._read(fd)
        finally:
            os.close(fd)

    def allows(self, login: str, recipients: int) -> bool:
        """Is one more message with ``recipients`` recipients within this hour's limits?"""
        if not self.limits.messages and not self.limits.recipients:
            return True
        try:
            messages, rcpts = self.used(login)
        except OSError as exc:
            # Counting is a limit, not a gate: a broken directory must not stop mail.
            log.warning("rate counters unreadable: %s", exc.strerror or exc)
            return True
        if self.limits.messages and messages + 1 > self.limits.messages:
            return False
        return not (self.limits.recipients and rcpts + recipients > self.limits.recipients)

    def record(self, login: str, recipients: int) -> None:
        """Count one accepted message with ``recipients`` recipients."""
        if not self.limits.messages and not self.limits.recipients:
            return
        try:
            fd = os.open(
                self._path(login), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
            )
        except OSError as exc:
            log.warning("cannot count for the rate limit: %s", exc.strerror or exc)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            messages, rcpts = self._read(fd)
            data = f"{self._hour()} {messages + 1} {rcpts + recipients}\n".encode()
            # No fsync: the counters must survive a restart of the stage, not a crash
            # of the machine (the page cache outlives the process).
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as exc:
            log.warning("cannot count for the rate limit: %s", exc.strerror or exc)
        finally:
            os.close(fd)
