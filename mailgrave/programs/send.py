"""mailgrave-send: the scheduler.

Started per queue event (a new entry in todo/, or a timer): takes what is
due, hands local recipients to mailgrave-local (local.ctrl) and remote ones
to mailgrave-remote (remote.ctrl), keeps each recipient's state durably,
sends bounces and delay warnings, removes finished messages, and exits when
nothing is due.  Deliveries run in parallel: one slow destination never
holds up the others.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from mailgrave import config as configmod
from mailgrave import log as logmod
from mailgrave import maillog
from mailgrave.envelope import EnvelopeError, decode
from mailgrave.errors import EXIT_OK, EXIT_TEMP, PermFail, TempFail
from mailgrave.spool import Recipient, Spool, State, qid_time

log = logging.getLogger(__name__)

DELIVERY_TIMEOUT = 3600.0
DEFERRED_RESCAN = 30.0
LINGER = 2.0  # seconds an idle run waits for new mail before it exits
TODO_POLL = 0.05
CONTROL_ACTIONS = ("delete", "hold", "release", "retry")


@dataclass
class Job:
    """One delivery attempt: some recipients of one message over one channel."""

    state: State
    channel: str  # "local" or "remote"
    recipients: list[Recipient]
    new: bool


@dataclass
class Result:
    code: str  # K, Z or D
    text: str


class Agents:
    """Connections to local.ctrl and remote.ctrl, kept open between requests.

    An agent answers any number of requests on one connection, one after
    another (docs/flow.md), so a send run reuses its connections instead of
    connecting (and having mailgrave-local fork a worker) per message.
    """

    def __init__(self) -> None:
        self._idle: dict[str, list[socket.socket]] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> socket.socket | None:
        """An idle connection to ``path`` still open at the other end, or None."""
        import select

        while True:
            with self._lock:
                idle = self._idle.get(path)
                if not idle:
                    return None
                sock = idle.pop()
            # Between requests an agent sends nothing: readable means it has
            # closed the connection (it was restarted, or it exited).
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return sock
            sock.close()

    def put(self, path: str, sock: socket.socket) -> None:
        with self._lock:
            self._idle.setdefault(path, []).append(sock)

    def close(self) -> None:
        with self._lock:
            for socks in self._idle.values():
                for sock in socks:
                    sock.close()
            self._idle.clear()


def deliver(
    socket_path: str,
    qid: str,
    sender: str,
    rcpts: list[str],
    message_path: str,
    agents: Agents,
) -> tuple[list[Result], list[str]]:
    """One request over local.ctrl / remote.ctrl (docs/flow.md); results and transcript."""
    fields = [f"Q{qid}", f"F{sender}", *(f"T{r}" for r in rcpts)]
    request = b"".join(f.encode("utf-8", "surrogateescape") + b"\0" for f in fields) + b"\0"
    transcript: list[str] = []
    results: list[Result] = []
    buf = bytearray()
    fd = os.open(message_path, os.O_RDONLY | os.O_CLOEXEC)
    sock = agents.get(socket_path)
    try:
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(DELIVERY_TIMEOUT)
            try:
                sock.connect(socket_path)
            except OSError:
                name = os.path.basename(socket_path)
                return [Result("Z", f"4.3.0 delivery agent unreachable ({name})")] * len(
                    rcpts
                ), transcript
        socket.send_fds(sock, [request], [fd])
        while len(results) < len(rcpts):
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > 65536:
                    break
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
                continue
            line, buf = bytes(buf[:end]), buf[end + 1 :]
            text = line.decode("utf-8", "replace").rstrip("\r")
            if text.startswith("|"):
                if len(transcript) < 200:
                    transcript.append(text[1:])
            elif text[:1] in ("K", "Z", "D"):
                results.append(Result(text[0], text[1:]))
    except (OSError, TimeoutError):
        pass
    finally:
        os.close(fd)
        if sock is not None:
            if len(results) == len(rcpts) and not buf:
                agents.put(socket_path, sock)
            else:
                sock.close()
    missing = len(rcpts) - len(results)
    if missing:
        results += [Result("Z", "4.3.0 delivery agent ended without an answer")] * missing
    return results, transcript


class Scheduler:
    """One run of mailgrave-send over the spool."""

    def __init__(self, config: configmod.Config) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self.lock = threading.Lock()
        self.inflight: dict[str, int] = {}
        self.states: dict[str, State] = {}
        self.new: set[str] = set()
        self.now = time.time
        # Set by SIGTERM (systemctl stop): finish what is in flight, start nothing new.
        self.stopping = False
        self.agents = Agents()

    # --- what is due ---------------------------------------------------------

    def _new_state(self, qid: str) -> State | None:
        try:
            entry = self.spool.read_new(qid)
            if entry is None:
                return None
            env = decode(entry[0])
        except EnvelopeError as exc:
            log.error("%s: unreadable envelope (%s); moved to bad/", qid, exc)
            self.spool.quarantine(qid)
            return None
        return State(
            qid=qid,
            sender=env.sender,
            recipients=[Recipient(addr) for addr in env.recipients],
            created=qid_time(qid),
            size=entry[1],
        )

    def collect(self, rescan_deferred: bool) -> list[Job]:
        """Jobs due now for messages not already in flight."""
        jobs: list[Job] = []
        for qid in self.spool.todo():
            if qid in self.inflight:
                continue
            state = self.spool.read_state(qid) or self._new_state(qid)
            if state is None:
                continue
            self.new.add(qid)
            jobs += self._jobs_for(state, new=True)
        if rescan_deferred:
            for qid in self.spool.deferred():
                if qid in self.inflight or qid in self.new:
                    continue
                state = self.spool.read_state(qid)
                if state is not None:
                    jobs += self._jobs_for(state, new=False)
        return jobs

    def _jobs_for(self, state: State, new: bool) -> list[Job]:
        now = self.now()
        if state.held:
            return []
        lifetime = self.config.queue.bounce_lifetime if not state.sender else None
        lifetime = lifetime or self.config.queue.lifetime
        expired = now - state.created > lifetime
        due: list[Recipient] = []
        for r in state.recipients:
            if r.done:
                continue
            if expired and r.attempts > 0:
                r.state = "failed"
                r.last_reply = f"5.4.7 delivery time expired; last attempt: {r.last_reply}"
                maillog.failed(state.qid, r.addr, "queue", r.last_reply)
                continue
            if r.next_attempt <= now:
                due.append(r)
        local = [r for r in due if self.config.is_local_domain(r.addr.rpartition("@")[2])]
        by_domain: dict[str, list[Recipient]] = {}
        for r in due:
            if r not in local:
                by_domain.setdefault(r.addr.rpartition("@")[2], []).append(r)
        jobs = [Job(state, "local", local, new)] if local else []
        jobs += [Job(state, "remote", rs, new) for rs in by_domain.values()]
        if not jobs and (expired or self._needs_warning(state) or self._unfinished(state)):
            # Nothing to attempt, but expiry, a warning or an earlier
            # interrupted run left work: finish() it.
            jobs.append(Job(state, "none", [], new))
        return jobs

    @staticmethod
    def _unfinished(state: State) -> bool:
        """Every recipient done, or a failure not yet bounced."""
        return all(r.done for r in state.recipients) or any(
            r.state == "failed" and r.addr not in state.bounced for r in state.recipients
        )

    def _needs_warning(self, state: State) -> bool:
        return (
            bool(state.sender)
            and not state.warned
            and self.now() - state.created > self.config.queue.warn_after
            and any(not r.done for r in state.recipients)
        )

    # --- doing it --------------------------------------------------------------

    @staticmethod
    def _destination(job: Job) -> str:
        if job.channel == "remote" and job.recipients:
            return "remote:" + job.recipients[0].addr.rpartition("@")[2]
        return f"{job.channel}:{job.state.qid}"

    def _concurrency(self, destination: str) -> int:
        if destination.startswith("remote:"):
            return max(1, self.config.remote.destination_concurrency)
        return 1

    def run_job(self, job: Job) -> list[Result]:
        if not job.recipients:
            return []
        qid = job.state.qid
        name = "local.ctrl" if job.channel == "local" else "remote.ctrl"
        try:
            results, transcript = deliver(
                self.config.socket_path(name),
                qid,
                job.state.sender,
                [r.addr for r in job.recipients],
                self.spool.message_path(qid),
                self.agents,
            )
        except FileNotFoundError:
            return [Result("Z", "4.3.0 message file missing")] * len(job.recipients)
        if transcript:
            with self.lock:
                job.state.transcript = [*job.state.transcript, *transcript][-200:]
        return results

    def apply(self, job: Job, results: list[Result]) -> None:
        now = self.now()
        retry = self.config.queue.retry
        for r, res in zip(job.recipients, results, strict=True):
            r.attempts += 1
            r.last_reply = res.text
            if res.code == "K":
                r.state = "delivered"
                maillog.delivered(job.state.qid, r.addr, job.channel, res.text)
            elif res.code == "D":
                r.state = "failed"
                maillog.failed(job.state.qid, r.addr, job.channel, res.text)
            else:
                if not r.first_failure:
                    r.first_failure = now
                delay = retry[min(r.attempts - 1, len(retry) - 1)] if retry else 300.0
                r.next_attempt = now + delay
                maillog.deferred(
                    job.state.qid,
                    r.addr,
                    job.channel,
                    res.text,
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.next_attempt)),
                )

    def finish(self, state: State) -> None:
        """After every job of a message: notify, then remove it or keep its state."""
        qid = state.qid
        failed = [
            r for r in state.recipients if r.state == "failed" and r.addr not in state.bounced
        ]
        if failed:
            self._notify(state, failed, delay=False)
            state.bounced += [r.addr for r in failed]
        elif self._needs_warning(state):
            pending = [r for r in state.recipients if not r.done]
            self._notify(state, pending, delay=True)
            state.warned = True
        if all(r.done for r in state.recipients):
            self.spool.remove(qid)
            maillog.removed(qid, "all recipients done")
        elif qid in self.new:
            self.spool.take_over(qid, state)
        else:
            self.spool.write_state(state)
        self.new.discard(qid)

    def _notify(self, state: State, recipients: list[Recipient], delay: bool) -> None:
        """Queue a bounce (or delay warning) for ``recipients`` of ``state``."""
        from mailgrave.bounce import Failure, notification, status_of
        from mailgrave.envelope import Envelope
        from mailgrave.programs.queue import rfc5322_date
        from mailgrave.queueclient import QueueClient

        postmaster = f"postmaster@{self.config.hostname}"
        if state.sender:
            to = state.sender
        elif delay:
            return  # never a warning about a bounce
        elif all(r.addr.lower() == postmaster for r in recipients):
            log.error(
                "%s: double bounce to %s failed too; dropped",
                state.qid,
                ", ".join(r.addr for r in recipients),
            )
            return
        else:
            to = postmaster  # a bounce that cannot be delivered: double bounce
        failures = [
            Failure(r.addr, r.last_reply, status_of(r.last_reply, not delay)) for r in recipients
        ]
        try:
            qc = QueueClient(self.config.socket_path("queue.ctrl"), {}, Envelope("", (to,)))
            for chunk in notification(
                hostname=self.config.hostname,
                sender=to,
                qid=state.qid,
                arrival=rfc5322_date(state.created),
                failures=failures,
                message_path=self.spool.message_path(state.qid),
                delay=delay,
                date=rfc5322_date(),
            ):
                qc.write(chunk)
            bounce_qid = qc.commit()
        except (TempFail, PermFail, OSError) as exc:
            # Keep the message: the notification is retried on the next run.
            log.error("%s: cannot queue notification: %s", state.qid, exc)
            raise TempFail("cannot queue notification") from exc
        maillog.bounced(state.qid, bounce_qid, to, [r.addr for r in recipients])

    # --- the loop ------------------------------------------------------------------

    def run(self) -> int:
        pool = ThreadPoolExecutor(max_workers=max(1, self.config.queue.max_parallel))
        futures: dict[Future[list[Result]], Job] = {}
        # Jobs wait per destination, so that one destination gets at most
        # remote.destination_concurrency connections and messages due together
        # go over the same (reused) connection one after another.
        waiting: dict[str, deque[Job]] = {}
        active: dict[str, int] = {}
        last_deferred_scan = 0.0
        last_work = time.monotonic()
        try:
            while True:
                if not self.stopping:
                    self.apply_control_requests()
                    rescan = time.monotonic() - last_deferred_scan >= DEFERRED_RESCAN
                    if rescan:
                        last_deferred_scan = time.monotonic()
                    for job in self.collect(rescan):
                        qid = job.state.qid
                        self.inflight[qid] = self.inflight.get(qid, 0) + 1
                        waiting.setdefault(self._destination(job), deque()).append(job)
                    remote_total = sum(n for d, n in active.items() if d.startswith("remote:"))
                    for dest, jobs in waiting.items():
                        limit = self._concurrency(dest)
                        is_remote = dest.startswith("remote:")
                        while jobs and active.get(dest, 0) < limit:
                            if is_remote and remote_total >= self.config.remote.max_parallel:
                                break
                            remote_total += is_remote
                            job = jobs.popleft()
                            active[dest] = active.get(dest, 0) + 1
                            futures[pool.submit(self.run_job, job)] = job
                if futures:
                    last_work = time.monotonic()
                elif self.stopping or time.monotonic() - last_work >= LINGER:
                    break
                else:
                    # Nothing due: stay a moment for mail that is arriving
                    # (a burst), instead of exiting and being started again.
                    time.sleep(TODO_POLL)
                    continue
                done, _ = wait(list(futures), timeout=0.2, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = futures.pop(fut)
                    active[self._destination(job)] -= 1
                    try:
                        results = fut.result()
                    except Exception:
                        log.exception("%s: delivery attempt crashed", job.state.qid)
                        results = [Result("Z", "4.3.0 internal error")] * len(job.recipients)
                    qid = job.state.qid
                    self.apply(job, results)
                    self.inflight[qid] -= 1
                    if self.inflight[qid] == 0:
                        del self.inflight[qid]
                        try:
                            self.finish(job.state)
                        except (TempFail, OSError) as exc:
                            log.error("%s: cannot update the queue: %s", qid, exc)
                            self._keep_on_error(job.state)
        finally:
            pool.shutdown(wait=True)
            self.agents.close()
        self.clean()
        return EXIT_OK

    def _keep_on_error(self, state: State) -> None:
        """Save what we know so that nothing is lost; it is retried next run."""
        try:
            if state.qid in self.new:
                self.spool.take_over(state.qid, state)
                self.new.discard(state.qid)
            else:
                self.spool.write_state(state)
        except OSError as exc:
            log.error("%s: cannot save state: %s", state.qid, exc)

    def apply_control_requests(self) -> None:
        """Requests that `mailgrave queue` left in ctl/ while this run held the lock."""
        ctl = self.spool.path("ctl")
        try:
            names = sorted(os.listdir(ctl))
        except FileNotFoundError:
            return
        for name in names:
            qid, _, action = name.partition(".")
            if qid in self.inflight:
                continue
            if action in CONTROL_ACTIONS:
                apply_control(self.spool, qid, action)
            Spool.unlink_quiet(os.path.join(ctl, name))

    def clean(self) -> None:
        for path in self.spool.stale():
            log.info("removing leftover %s", path)
            Spool.unlink_quiet(path)


def apply_control(spool: Spool, qid: str, action: str) -> bool:
    """delete / hold / release / retry one message; True when it exists."""
    state = spool.read_state(qid)
    if state is None:
        # A message still in todo/: take it over so that it has a state to change.
        if not os.path.exists(spool.path("todo", qid)):
            return False
        if action == "delete":
            spool.remove(qid)
            maillog.removed(qid, "deleted by the administrator")
            return True
        if action in ("release", "retry"):
            return True
        try:
            entry = spool.read_new(qid)
            if entry is None:
                return False
            env = decode(entry[0], validate=False)
        except (OSError, EnvelopeError):
            return False
        state = State(qid, env.sender, [Recipient(a) for a in env.recipients], qid_time(qid))
        state.size = entry[1]
        state.held = True
        spool.take_over(qid, state)
        return True
    if action == "delete":
        spool.remove(qid)
        maillog.removed(qid, "deleted by the administrator")
        return True
    if action == "hold":
        state.held = True
    elif action == "release":
        state.held = False
    elif action == "retry":
        state.held = False
        for r in state.recipients:
            if not r.done:
                r.next_attempt = 0.0
    spool.write_state(state)
    return True


def with_send_lock(spool: Spool, blocking: bool, body: Callable[[], int]) -> int | None:
    """Run ``body`` holding spool/send.lock; None when another run holds it."""
    fd = os.open(spool.path("send.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return None
        return body()
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mailgrave-send",
        description="Deliver what is due in the MailGrave spool, then exit. Started by "
        "mailgrave-send.path (new mail) and mailgrave-send.timer (retries), or by hand.",
    )
    parser.add_argument(
        "--config", help="configuration file (default /etc/mailgrave/mailgrave.yaml)"
    )
    parser.add_argument("--debug", action="store_true", help="log debugging detail")
    args = parser.parse_args(argv)
    logmod.setup("send", args.debug)
    config = configmod.load_or_exit(args.config, "mailgrave-send")
    spool = Spool(config.spool)
    if not os.path.isdir(spool.path("todo")):
        print(f"mailgrave-send: no spool at {config.spool}", file=sys.stderr)
        return EXIT_TEMP

    scheduler = Scheduler(config)

    def stop(_signum: int, _frame: object) -> None:
        scheduler.stopping = True

    signal.signal(signal.SIGTERM, stop)
    result = with_send_lock(spool, blocking=False, body=scheduler.run)
    if result is None:
        log.debug("another mailgrave-send is running; it will pick up new mail")
        return EXIT_OK
    return result


if __name__ == "__main__":
    sys.exit(main())
