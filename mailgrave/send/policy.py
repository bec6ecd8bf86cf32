"""What mailgrave-send decides, without I/O: which recipients are due, how they are
grouped into delivery jobs, the back-off after a temporary failure, expiry,
the delay warning, and who gets a bounce. Every function takes the time it
should consider "now", so the scheduler's rules are tested on a made-up clock
(tests/unit/test_send_policy.py); :mod:`mailgrave.send.scheduler` does the I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from mailgrave.config import Config, Queue
from mailgrave.errors import Result
from mailgrave.record import Record, record
from mailgrave.spool import Entry, Recipient, RecipientState

DEFAULT_RETRY = 300.0
LOCAL = "local"
REMOTE = "remote"
NONE = "none"  # no delivery: only expiry, a warning or a bounce to finish
# RFC 3461 §4.1 leaves the default to the MTA: failures and delays, as before DSN.
DEFAULT_NOTIFY = "FAILURE,DELAY"
SUCCESS, FAILURE, DELAY = "SUCCESS", "FAILURE", "DELAY"


@record
class Job(Record):
    """One delivery attempt: some recipients of one message over one channel."""

    entry: Entry
    channel: str  # LOCAL, REMOTE or NONE
    recipients: tuple[Recipient, ...]
    new: bool  # the message is still in todo/

    @property
    def destination(self) -> str:
        """What the concurrency limits count: a remote domain, or the message itself."""
        if self.channel == REMOTE and self.recipients:
            return "remote:" + domain_of(self.recipients[0].addr)
        return f"{self.channel}:{self.entry.qid}"


def domain_of(addr: str) -> str:
    return addr.rpartition("@")[2]


def lifetime(entry: Entry, queue: Queue) -> float:
    """How long the message may stay: bounce_lifetime for a bounce (null sender)."""
    if not entry.sender and queue.bounce_lifetime:
        return queue.bounce_lifetime
    return queue.lifetime


def expired(entry: Entry, now: float, queue: Queue) -> bool:
    return now - entry.created > lifetime(entry, queue)


def retry_delay(attempts: int, retry: tuple[float, ...]) -> float:
    """The wait after the ``attempts``-th temporary failure: the retry steps in
    order, then the last one for ever."""
    if not retry:
        return DEFAULT_RETRY
    return retry[min(attempts - 1, len(retry) - 1)]


def expire(entry: Entry, now: float, queue: Queue) -> list[Recipient]:
    """Fail every pending recipient of an expired message that has been tried at
    least once (its last reply becomes the reason); return them."""
    if not expired(entry, now, queue):
        return []
    gone = [r for r in entry.recipients if not r.done and r.attempts > 0]
    for r in gone:
        r.state = RecipientState.FAILED
        r.status = "5.4.7"
        r.last_reply = f"5.4.7 delivery time expired; last attempt: {r.last_reply}"
    return gone


def wants(r: Recipient, kind: str) -> bool:
    """Does the recipient's DSN NOTIFY ask for a report of ``kind`` (SUCCESS,
    FAILURE or DELAY)? NEVER asks for none."""
    return kind in (r.notify or DEFAULT_NOTIFY).split(",")


def delayed(entry: Entry) -> list[Recipient]:
    """The pending recipients a delay warning is about (NOTIFY with DELAY)."""
    return [r for r in entry.recipients if not r.done and wants(r, DELAY)]


def needs_warning(entry: Entry, now: float, queue: Queue) -> bool:
    """A delay warning is owed: once, to a real sender, after warn_after, for
    recipients whose NOTIFY asks for one."""
    return (
        bool(entry.sender)
        and not entry.warned
        and now - entry.created > queue.warn_after
        and bool(delayed(entry))
    )


def unbounced(entry: Entry) -> list[Recipient]:
    """Failed recipients whose bounce has not been sent yet (or, for NOTIFY
    without FAILURE, not yet marked as needing none: see :func:`to_bounce`)."""
    return [
        r
        for r in entry.recipients
        if r.state is RecipientState.FAILED and r.addr not in entry.bounced
    ]


def to_bounce(failed: list[Recipient]) -> list[Recipient]:
    """Those of ``failed`` whose NOTIFY asks for a failure report."""
    return [r for r in failed if wants(r, FAILURE)]


def unreported(entry: Entry) -> list[Recipient]:
    """Delivered recipients owed a success report (NOTIFY=SUCCESS, delivered
    locally or relayed to a host without DSN) not queued yet; a message with
    the null sender gets none."""
    if not entry.sender:
        return []
    return [
        r
        for r in entry.recipients
        if r.state is RecipientState.DELIVERED
        and r.success
        and wants(r, SUCCESS)
        and r.addr not in entry.reported
    ]


def return_content(entry: Entry, success: bool) -> str:
    """What of the message a report returns: ``full`` (up to bounce.MAX_RETURNED)
    or ``headers``. RET=HDRS: headers; RET=FULL: the message; no RET: the
    message for a failure, the headers for a success (RFC 3461 §4.3)."""
    if entry.ret == "HDRS" or (success and entry.ret != "FULL"):
        return "headers"
    return "full"


def finished(entry: Entry) -> bool:
    return all(r.done for r in entry.recipients)


def jobs(
    entry: Entry, new: bool, now: float, config: Config, is_local: Callable[[str], bool]
) -> list[Job]:
    """The jobs due now for ``entry`` (after :func:`expire`): its due local
    recipients together, its due remote recipients one job per domain, or a
    NONE job when there is nothing to attempt but something to finish."""
    if entry.held:
        return []
    due = [r for r in entry.recipients if not r.done and r.next_attempt <= now]
    local = tuple(r for r in due if is_local(domain_of(r.addr)))
    by_domain: dict[str, list[Recipient]] = {}
    for r in due:
        if r not in local:
            by_domain.setdefault(domain_of(r.addr), []).append(r)
    found = [Job(entry, LOCAL, local, new)] if local else []
    found += [Job(entry, REMOTE, tuple(rs), new) for rs in by_domain.values()]
    if not found and (
        expired(entry, now, config.queue)
        or needs_warning(entry, now, config.queue)
        or finished(entry)
        or unbounced(entry)
        or unreported(entry)
    ):
        found.append(Job(entry, NONE, (), new))
    return found


def record_result(
    r: Recipient, result: Result, now: float, retry: tuple[float, ...], channel: str = LOCAL
) -> None:
    """What one attempt means for the recipient: delivered, failed, or deferred
    with the next attempt after the back-off. A delivery notes the success
    report it may owe: "delivered" by mailgrave-local, "relayed" to a host
    without DSN, none when the next hop took the DSN request on."""
    r.attempts += 1
    r.last_reply = result.reply_text()
    r.status = result.status
    r.remote = result.host
    if result.ok:
        r.state = RecipientState.DELIVERED
        if channel == LOCAL:
            r.success = "delivered"
        else:
            r.success = "" if result.dsn else "relayed"
    elif result.permanent:
        r.state = RecipientState.FAILED
    else:
        if not r.first_failure:
            r.first_failure = now
        r.next_attempt = now + retry_delay(r.attempts, retry)


def notify_whom(
    entry: Entry, recipients: list[Recipient], delay: bool, hostname: str
) -> str | None:
    """Who gets the notification about ``recipients``: the sender; postmaster
    for a bounce that failed (a double bounce); nobody for a warning about a
    bounce, or for a double bounce that failed too."""
    if entry.sender:
        return entry.sender
    if delay:
        return None
    postmaster = f"postmaster@{hostname}"
    if all(r.addr.lower() == postmaster for r in recipients):
        return None
    return postmaster


def concurrency(destination: str, config: Config) -> int:
    """Connections at once to one destination: remote.destination_concurrency for
    a remote domain, one for a local delivery (one message at a time)."""
    if destination.startswith("remote:"):
        return max(1, config.remote.destination_concurrency)
    return 1


def notice_status(r: Recipient, delay: bool) -> str:
    """The enhanced status code a notification gives for ``r``: its last one when
    it fits the notification (5.x.x in a bounce, 4.x.x in a delay warning)."""
    if r.status and (r.status[0] == "5") == (not delay):
        return r.status
    return "4.0.0" if delay else "5.0.0"


# mailgrave-send.timer starts send at most OnUnitInactiveSec=1min (+ AccuracySec=5s)
# after a run ends. A run that stays while the next attempt is at most this far
# away therefore sees every attempt time: each is retried when due, not at the
# next tick of the timer.
LINGER_HORIZON = 90.0


def linger_for(next_attempt: float | None, now: float) -> bool:
    """Should an idle run stay for the next attempt (rather than leave it to the timer)?"""
    return next_attempt is not None and next_attempt - now <= LINGER_HORIZON
