"""One run of mailgrave-send over the spool: the I/O around :mod:`mailgrave.send.policy`.

Takes what is due, hands local recipients to mailgrave-local (local.ctrl) and
remote ones to mailgrave-remote (remote.ctrl), keeps each recipient's state
durably, queues bounces and delay warnings, removes finished messages, and
returns when nothing has been due for a moment. Deliveries run in parallel,
at most ``queue.max_parallel`` at once and ``remote.destination_concurrency``
per remote domain: one slow destination never holds up the others.
"""

from __future__ import annotations

import errno
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from mailgrave import config as configmod
from mailgrave import ctrl, headers, maillog
from mailgrave import log as logmod
from mailgrave.envelope import Envelope, EnvelopeError
from mailgrave.errors import OK, PERMANENT, PermFail, Result, TempFail
from mailgrave.send import policy
from mailgrave.send.bounce import Failure, notification
from mailgrave.send.policy import Job
from mailgrave.spool import ACTIONS, Entry, Recipient, Spool

log = logmod.getLogger(__name__)

DEFERRED_RESCAN = 30.0
# The spool cannot be written (full, read-only): pause this long, doubling to
# BACKOFF_MAX, and say so at most once every BACKOFF_LOG_EVERY seconds.
BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
BACKOFF_LOG_EVERY = 60.0
UNWRITABLE = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})
LINGER = 2.0  # seconds an idle run waits for new mail before it exits
TODO_POLL = 0.05


class Scheduler:
    """One run of mailgrave-send over the spool."""

    def __init__(self, config: configmod.Config, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self.lock = threading.Lock()
        self.inflight: dict[str, int] = {}
        self.new: set[str] = set()
        self.now = now
        # Set by SIGTERM (systemctl stop): finish what is in flight, start nothing new.
        self.stopping = False
        self.agents = ctrl.Agents()
        self.backoff = SpoolBackoff()
        # Messages whose new state could not be written: kept here (what was
        # delivered stays known) and saved again when the back-off ends, never
        # delivered again meanwhile.
        self.unsaved: dict[str, Entry] = {}

    # --- what is due ---------------------------------------------------------

    def _new_entry(self, qid: str) -> Entry | None:
        try:
            return self.spool.new_entry(qid)
        except EnvelopeError as exc:
            log.error("%s: unreadable envelope (%s); moved to bad/", qid, exc)
            self.spool.quarantine(qid)
            return None

    def collect(self, rescan_deferred: bool) -> list[Job]:
        """Jobs due now for messages not already in flight."""
        jobs: list[Job] = []
        for qid in self.spool.todo():
            if qid in self.inflight or qid in self.unsaved:
                continue
            entry = self.spool.read_entry(qid) or self._new_entry(qid)
            if entry is None:
                continue
            self.new.add(qid)
            jobs += self._jobs_for(entry, new=True)
        if rescan_deferred:
            for qid in self.spool.deferred():
                if qid in self.inflight or qid in self.new or qid in self.unsaved:
                    continue
                entry = self.spool.read_entry(qid)
                if entry is not None:
                    jobs += self._jobs_for(entry, new=False)
        return jobs

    def _jobs_for(self, entry: Entry, new: bool) -> list[Job]:
        if entry.held:
            return []
        now = self.now()
        for r in policy.expire(entry, now, self.config.queue):
            maillog.failed(entry.qid, r.addr, "queue", r.last_reply)
        return policy.jobs(entry, new, now, self.config, self.config.is_local_domain)

    # --- doing it --------------------------------------------------------------

    def run_job(self, job: Job) -> list[Result]:
        """One delivery attempt (in a worker thread); each result is recorded as it
        arrives (:meth:`record`), the last one of the message finishes it."""
        qid = job.entry.qid
        n = len(job.recipients)
        recorded = 0
        seen = 0  # transcript lines already kept

        def got(first: int, results: list[Result], transcript: list[str]) -> None:
            nonlocal recorded, seen
            recorded = first + len(results)
            new, seen = transcript[seen:], len(transcript)
            self.record(job, first, results, new)

        if not job.recipients:
            self.record(job, 0, [], [])
            return []
        name = "local.ctrl" if job.channel == policy.LOCAL else "remote.ctrl"
        try:
            results, _ = ctrl.request(
                self.config.socket_path(name),
                qid,
                job.entry.sender,
                [r.addr for r in job.recipients],
                self.spool.message_path(qid),
                self.agents,
                job.entry.envelope(job.recipients),
                on_results=got,
            )
        except FileNotFoundError:
            results = [Result("Z", "4.3.0", "message file missing")] * n
        except Exception:
            log.exception("%s: delivery attempt crashed", qid)
            results = [Result("Z", "4.3.0", "internal error")] * n
        if recorded < n:
            got(recorded, results[recorded:], [])
        return results

    def record(self, job: Job, first: int, results: list[Result], transcript: list[str]) -> None:
        """Results for ``job.recipients[first:]`` as they arrive (a worker thread),
        kept on disk at once: the message's last outstanding result finishes it
        (removed, or its state written); a result while other recipients of the
        message are still being delivered has the state written (info/QID), so
        that a kill of send repeats only the deliveries that were in flight."""
        entry = job.entry
        qid = entry.qid
        with self.lock:
            if transcript:
                entry.transcript = [*entry.transcript, *transcript][-200:]
            self.apply(job, results, first)
            if first + len(results) < len(job.recipients):
                self._save_progress(entry)
                return
            self.inflight[qid] -= 1
            if self.inflight[qid] > 0:
                if results:
                    self._save_progress(entry)
                return
            try:
                self.finish(entry)
            except (TempFail, OSError) as exc:
                log.error("%s: cannot update the queue: %s", qid, exc)
                self._keep_on_error(entry)
            finally:
                # Only now: collect() takes a message that is not in flight again.
                del self.inflight[qid]

    def _save_progress(self, entry: Entry) -> None:
        """The state so far, while other recipients are in flight (a new message
        gets info/QID beside todo/QID: S3 in docs/queue.md). Only duplicates
        depend on it, never a loss (the message stays until finish()), so the
        directory is not fsynced, and a failure is only logged."""
        try:
            self.spool.write_entry(entry, sync_dir=False)
        except OSError as exc:
            log.warning("%s: cannot record the results so far: %s", entry.qid, exc)

    def apply(self, job: Job, results: list[Result], first: int = 0) -> None:
        now = self.now()
        rcpts = job.recipients[first : first + len(results)]
        for r, res in zip(rcpts, results, strict=True):
            policy.record_result(r, res, now, self.config.queue.retry, job.channel)
            if res.code == OK:
                maillog.delivered(job.entry.qid, r.addr, job.channel, r.last_reply)
            elif res.code == PERMANENT:
                maillog.failed(job.entry.qid, r.addr, job.channel, r.last_reply)
            else:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.next_attempt))
                maillog.deferred(job.entry.qid, r.addr, job.channel, r.last_reply, when)

    def finish(self, entry: Entry) -> None:
        """After every job of a message: notify, then remove it or keep its state."""
        qid = entry.qid
        succeeded = policy.unreported(entry)
        if succeeded:
            self._notify(entry, succeeded, delay=False, success=True)
            entry.reported += [r.addr for r in succeeded]
        failed = policy.unbounced(entry)
        if failed:
            # NOTIFY=NEVER (or without FAILURE): done, with no report.
            if policy.to_bounce(failed):
                self._notify(entry, policy.to_bounce(failed), delay=False)
            entry.bounced += [r.addr for r in failed]
        elif policy.needs_warning(entry, self.now(), self.config.queue):
            self._notify(entry, policy.delayed(entry), delay=True)
            entry.warned = True
        if policy.finished(entry):
            self.spool.remove(qid)
            maillog.removed(qid, "all recipients done")
        elif qid in self.new:
            self.spool.take_over(entry)
        else:
            self.spool.write_entry(entry)
        self.new.discard(qid)

    def _notify(
        self, entry: Entry, recipients: list[Recipient], delay: bool, success: bool = False
    ) -> None:
        """Queue a bounce, a delay warning or a success report for ``recipients``."""
        to = entry.sender if success else None
        if not success:
            to = policy.notify_whom(entry, recipients, delay, self.config.hostname)
        if to is None:
            if not delay:
                log.error(
                    "%s: double bounce to %s failed too; dropped",
                    entry.qid,
                    ", ".join(r.addr for r in recipients),
                )
            return
        failures = [
            Failure(
                r.addr,
                r.last_reply,
                r.status or "2.0.0" if success else policy.notice_status(r, delay),
                remote=r.remote,
                orcpt=r.orcpt,
                action=r.success if success else "",
            )
            for r in recipients
        ]
        try:
            qc = ctrl.QueueClient(self.config.socket_path("queue.ctrl"), {}, Envelope("", (to,)))
            for chunk in notification(
                hostname=self.config.hostname,
                sender=to,
                qid=entry.qid,
                arrival=headers.rfc5322_date(entry.created),
                failures=failures,
                message_path=self.spool.message_path(entry.qid),
                delay=delay,
                success=success,
                content=policy.return_content(entry, success),
                envid=entry.envid,
                date=headers.rfc5322_date(),
            ):
                qc.write(chunk)
            bounce_qid = qc.commit()
        except (TempFail, PermFail, OSError) as exc:
            # Keep the message: the notification is retried on the next run.
            log.error("%s: cannot queue notification: %s", entry.qid, exc)
            raise TempFail("cannot queue notification") from exc
        maillog.bounced(entry.qid, bounce_qid, to, [r.addr for r in recipients])

    # --- the loop ------------------------------------------------------------------

    def run(self) -> int:
        pool = ThreadPoolExecutor(max_workers=max(1, self.config.queue.max_parallel))
        futures: dict[Future[list[Result]], Job] = {}
        # Jobs wait per destination, so that one destination gets at most
        # remote.destination_concurrency connections and messages due together
        # go over the same (reused) connection one after another.
        waiting: dict[str, deque[Job]] = {}
        active: dict[str, int] = {}
        last_deferred_scan = -DEFERRED_RESCAN
        last_work = time.monotonic()
        # When idle: the earliest next attempt of a deferred message (None: not
        # looked up since the last work; inf: nothing waits).
        wake_at: float | None = None
        woke = False  # a rescan was made for wake_at and found nothing to do yet
        try:
            while True:
                if not self.stopping and self.backoff.paused():
                    # The spool cannot be written: deliver nothing new (its
                    # state could not be kept), finish what is in flight.
                    if not futures:
                        time.sleep(min(0.2, self.backoff.remaining()))
                        continue
                elif not self.stopping:
                    if self.unsaved and not self._save_unsaved():
                        continue
                    if self.apply_control_requests():
                        wake_at, woke = None, False
                    if wake_at is not None and self.now() >= wake_at:
                        wake_at, last_deferred_scan = None, -DEFERRED_RESCAN  # due now
                        woke = True
                    rescan = time.monotonic() - last_deferred_scan >= DEFERRED_RESCAN
                    if rescan:
                        last_deferred_scan = time.monotonic()
                    for job in self.collect(rescan):
                        qid = job.entry.qid
                        with self.lock:
                            self.inflight[qid] = self.inflight.get(qid, 0) + 1
                        waiting.setdefault(job.destination, deque()).append(job)
                    self._start(pool, futures, waiting, active)
                if futures:
                    last_work = time.monotonic()
                    wake_at, woke = None, False
                elif self.stopping:
                    break
                else:
                    # Nothing due: stay a moment for mail that is arriving (a
                    # burst), and for a retry due soon (policy.LINGER_HORIZON),
                    # instead of exiting and waiting for the timer.
                    if wake_at is None:
                        due = self.spool.next_attempt()
                        # Due, yet the rescan found nothing to start: not a reason to stay.
                        stuck = due is not None and woke and due <= self.now()
                        wake_at = float("inf") if due is None or stuck else due
                    idle = time.monotonic() - last_work >= LINGER
                    if idle and not policy.linger_for(wake_at, self.now()):
                        break
                    time.sleep(TODO_POLL)
                    continue
                done, _ = wait(list(futures), timeout=0.2, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = futures.pop(fut)
                    active[job.destination] -= 1
                    self._done(job, fut)
        finally:
            pool.shutdown(wait=True)
            self.agents.close()
        self.clean()
        return 0

    def _start(
        self,
        pool: ThreadPoolExecutor,
        futures: dict[Future[list[Result]], Job],
        waiting: dict[str, deque[Job]],
        active: dict[str, int],
    ) -> None:
        """Start the waiting jobs that the concurrency limits allow."""
        remote_total = sum(n for d, n in active.items() if d.startswith("remote:"))
        for dest, jobs in waiting.items():
            limit = policy.concurrency(dest, self.config)
            is_remote = dest.startswith("remote:")
            while jobs and active.get(dest, 0) < limit:
                if is_remote and remote_total >= self.config.remote.max_parallel:
                    break
                remote_total += is_remote
                job = jobs.popleft()
                active[dest] = active.get(dest, 0) + 1
                futures[pool.submit(self.run_job, job)] = job

    def _done(self, job: Job, fut: Future[list[Result]]) -> None:
        """A job came back; its results were recorded as they arrived (:meth:`record`)."""
        exc = fut.exception()
        if exc is not None:  # run_job catches everything: never expected
            log.error("%s: delivery job failed: %r", job.entry.qid, exc)

    def _keep_on_error(self, entry: Entry) -> None:
        """Save what we know so that nothing is lost; it is retried next run."""
        try:
            self._save(entry)
        except OSError as exc:
            if exc.errno in UNWRITABLE:
                self.unsaved[entry.qid] = entry
                self.backoff.failed(exc)
            else:
                log.error("%s: cannot save state: %s", entry.qid, exc)

    def _save(self, entry: Entry) -> None:
        if entry.qid in self.new:
            self.spool.take_over(entry)
            self.new.discard(entry.qid)
        else:
            self.spool.write_entry(entry)

    def _save_unsaved(self) -> bool:
        """After a back-off: write the states kept in memory; False if it still fails."""
        for qid, entry in list(self.unsaved.items()):
            try:
                self.finish(entry)
            except (TempFail, OSError) as exc:
                cause = exc if isinstance(exc, OSError) else exc.__cause__
                if isinstance(cause, OSError) and cause.errno in UNWRITABLE:
                    self.backoff.failed(cause)
                    return False
                log.error("%s: cannot update the queue: %s", qid, exc)
                try:
                    self._save(entry)
                except OSError as exc2:
                    if exc2.errno in UNWRITABLE:
                        self.backoff.failed(exc2)
                        return False
                    log.error("%s: cannot save state: %s", qid, exc2)
            del self.unsaved[qid]
        self.backoff.recovered()
        return True

    def apply_control_requests(self) -> bool:
        """Requests that `mailgrave queue` left in ctl/ while this run held the lock;
        True when there were any."""
        found = False
        for qid, action, path in self.spool.requests():
            if qid in self.inflight:
                continue
            if action in ACTIONS:
                self.spool.apply(qid, action)
            Spool.unlink_quiet(path)
            found = True
        return found

    def clean(self) -> None:
        for path in self.spool.stale():
            log.info("removing leftover %s", path)
            Spool.unlink_quiet(path)


class SpoolBackoff:
    """A spool that cannot be written (ENOSPC, EROFS, EDQUOT): pause deliveries for
    a growing interval, and log the condition once per BACKOFF_LOG_EVERY seconds
    with the number of failures since, not once per attempt."""

    def __init__(self) -> None:
        self.interval = 0.0
        self.until = 0.0
        self.last_log = float("-inf")
        self.failures = 0

    def paused(self) -> bool:
        return time.monotonic() < self.until

    def remaining(self) -> float:
        return max(0.0, self.until - time.monotonic())

    def failed(self, exc: OSError) -> None:
        now = time.monotonic()
        self.interval = min(BACKOFF_MAX, max(BACKOFF_MIN, self.interval * 2))
        self.until = now + self.interval
        self.failures += 1
        if now - self.last_log >= BACKOFF_LOG_EVERY:
            log.error(
                "spool not writable (%s); deliveries paused, retrying every %gs at most "
                "(%d failure(s) since the last report)",
                errno.errorcode.get(exc.errno or 0, exc.errno),
                BACKOFF_MAX,
                self.failures,
            )
            self.last_log, self.failures = now, 0

    def recovered(self) -> None:
        if self.interval:
            log.info("spool writable again; deliveries resume")
        self.interval = 0.0
        self.until = 0.0
