"""The scheduler's rules on a made-up clock: what is due, grouping, back-off,
expiry, the delay warning, who gets a bounce (mailgrave.send.policy)."""

from __future__ import annotations

import pytest

from mailgrave.config import parse_text
from mailgrave.errors import Result
from mailgrave.send import policy
from mailgrave.spool import Entry, Recipient, RecipientState

CONFIG = parse_text(
    "hostname: mx.example.org\nlocal_domains: [example.org]\n"
    "queue: {lifetime: 1d, bounce_lifetime: 2h, warn_after: 4h, retry: [5m, 10m, 1h]}\n"
    "remote: {destination_concurrency: 3}\n"
)
T0 = 1_800_000_000.0
HOUR = 3600.0


def entry(*addrs: str, sender: str = "s@example.net", created: float = T0) -> Entry:
    return Entry("1K16M56R1FTXJPY", sender, [Recipient(a) for a in addrs], created)


def jobs(e: Entry, now: float) -> list[policy.Job]:
    return policy.jobs(e, False, now, CONFIG, CONFIG.is_local_domain)


def test_local_recipients_go_together_remote_ones_by_domain() -> None:
    e = entry("a@example.org", "b@example.org", "x@one.test", "y@two.test", "z@one.test")
    found = jobs(e, T0)
    assert [(j.channel, [r.addr for r in j.recipients]) for j in found] == [
        ("local", ["a@example.org", "b@example.org"]),
        ("remote", ["x@one.test", "z@one.test"]),
        ("remote", ["y@two.test"]),
    ]
    assert [j.destination for j in found] == [
        f"local:{e.qid}",
        "remote:one.test",
        "remote:two.test",
    ]
    assert policy.concurrency("remote:one.test", CONFIG) == 3
    assert policy.concurrency(f"local:{e.qid}", CONFIG) == 1


def test_back_off_follows_the_retry_steps_then_keeps_the_last() -> None:
    r = Recipient("x@one.test")
    later = Result("Z", "4.4.1", "connection refused")
    now = T0
    waits = []
    for _ in range(5):
        policy.record_result(r, later, now, CONFIG.queue.retry)
        waits.append(r.next_attempt - now)
        now = r.next_attempt
    assert waits == [300.0, 600.0, HOUR, HOUR, HOUR]
    assert r.state is RecipientState.PENDING and r.attempts == 5
    assert r.first_failure == T0
    assert r.last_reply == "4.4.1 connection refused" and r.status == "4.4.1"
    assert policy.retry_delay(1, ()) == policy.DEFAULT_RETRY


def test_a_deferred_recipient_is_due_only_at_its_next_attempt() -> None:
    e = entry("x@one.test")
    policy.record_result(e.recipients[0], Result("Z", "4.0.0", "later"), T0, CONFIG.queue.retry)
    assert jobs(e, T0 + 299) == []
    assert [j.channel for j in jobs(e, T0 + 300)] == ["remote"]


def test_results_decide_delivered_and_failed() -> None:
    ok, bad = Recipient("a@one.test"), Recipient("b@one.test")
    policy.record_result(ok, Result("K", "2.0.0", "250 2.0.0 ok", "mx[192.0.2.1]:25"), T0, ())
    policy.record_result(bad, Result("D", "5.1.1", "550 5.1.1 no", "mx[192.0.2.1]:25"), T0, ())
    assert ok.state is RecipientState.DELIVERED and ok.remote == "mx[192.0.2.1]:25"
    assert bad.state is RecipientState.FAILED and bad.status == "5.1.1"
    assert bad.last_reply == "mx[192.0.2.1]:25 said: 550 5.1.1 no"
    e = entry("a@one.test", "b@one.test")
    e.recipients[:] = [ok, bad]
    assert policy.unbounced(e) == [bad] and policy.finished(e)
    e.bounced.append(bad.addr)
    assert policy.unbounced(e) == []


def test_expiry_fails_what_was_tried_with_its_last_reply() -> None:
    e = entry("tried@one.test", "new@one.test")
    policy.record_result(e.recipients[0], Result("Z", "4.4.1", "refused"), T0, (60.0,))
    assert policy.expire(e, T0 + 23 * HOUR, CONFIG.queue) == []
    gone = policy.expire(e, T0 + 25 * HOUR, CONFIG.queue)
    assert [r.addr for r in gone] == ["tried@one.test"]
    assert gone[0].state is RecipientState.FAILED and gone[0].status == "5.4.7"
    assert gone[0].last_reply == "5.4.7 delivery time expired; last attempt: 4.4.1 refused"
    # never tried: gets its one attempt before it can expire
    assert [[r.addr for r in j.recipients] for j in jobs(e, T0 + 25 * HOUR)] == [["new@one.test"]]


def test_a_bounce_expires_after_bounce_lifetime() -> None:
    bounce = entry("s@one.test", sender="")
    assert policy.lifetime(bounce, CONFIG.queue) == 2 * HOUR
    assert policy.lifetime(entry("s@one.test"), CONFIG.queue) == 24 * HOUR
    assert policy.expired(bounce, T0 + 3 * HOUR, CONFIG.queue)


def test_the_delay_warning_is_owed_once_to_a_real_sender_after_warn_after() -> None:
    e = entry("x@one.test")
    assert not policy.needs_warning(e, T0 + 3 * HOUR, CONFIG.queue)
    assert policy.needs_warning(e, T0 + 5 * HOUR, CONFIG.queue)
    # nothing due then, but the warning is work: a job with no delivery
    e.recipients[0].next_attempt = T0 + 6 * HOUR
    assert [(j.channel, j.recipients) for j in jobs(e, T0 + 5 * HOUR)] == [("none", ())]
    e.warned = True
    assert not policy.needs_warning(e, T0 + 5 * HOUR, CONFIG.queue)
    assert jobs(e, T0 + 5 * HOUR) == []
    assert not policy.needs_warning(entry("x@one.test", sender=""), T0 + 5 * HOUR, CONFIG.queue)


def test_held_messages_have_no_jobs() -> None:
    e = entry("x@one.test")
    e.held = True
    assert jobs(e, T0) == []


def test_who_gets_a_notification() -> None:
    rcpts = [Recipient("x@one.test")]
    assert policy.notify_whom(entry("x@one.test"), rcpts, False, "mx.example.org") == (
        "s@example.net"
    )
    bounce = entry("s@one.test", sender="")
    # a bounce that failed goes to postmaster (double bounce), never a warning about it
    assert policy.notify_whom(bounce, rcpts, False, "mx.example.org") == "postmaster@mx.example.org"
    assert policy.notify_whom(bounce, rcpts, True, "mx.example.org") is None
    # a double bounce that failed too: dropped
    pm = [Recipient("Postmaster@mx.example.org")]
    assert policy.notify_whom(bounce, pm, False, "mx.example.org") is None


@pytest.mark.parametrize(
    ("status", "delay", "expected"),
    [
        ("5.1.1", False, "5.1.1"),
        ("4.3.0", True, "4.3.0"),
        ("", False, "5.0.0"),
        ("4.4.1", False, "5.0.0"),
        ("5.1.1", True, "4.0.0"),
    ],
)
def test_the_status_a_notification_gives(status: str, delay: bool, expected: str) -> None:
    assert policy.notice_status(Recipient("x@y.z", status=status), delay) == expected
