"""kill -9 of each stage under load (issue 13, item 2): the harness behind `make stress`'s
kill rows (bench/stress.py) and their short form in `make test`
(tests/integration/test_kill_stages.py).

One :func:`run_stage` is one row: a `mailgrave run` on a fresh spool in ``base``,
local Maildirs and a route to a real SMTP sink on loopback (tests/peers/id_sink.py,
which fsyncs every Message id it accepts before its 250). A load of ``messages``
messages, half over SMTP (smtplib, parallel clients), half through sendmail
(mailgrave-inject), half to local Maildirs, half relayed to the sink, one in ten
to both; each carries a unique ``X-Stress-Id`` recorded per recipient when
acknowledged (250 after DATA, exit 0). Meanwhile a killer SIGKILLs the stage's
processes at random moments, found in /proc by their parent (this harness's own
`mailgrave run`) and by this spool's config path in their command line, never
any other process. ``whole-group`` kills the supervisor's process group and
starts `mailgrave run` again on the same spool. Then the spool must drain, and
every acknowledged recipient must have its message, complete, in its Maildir's
new/ or in the sink's log.
"""

from __future__ import annotations

import os
import random
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, SimpleQueue

from tests.conftest import Instance, Processes, _connectable, free_port, program, wait_for

STAGES = ("smtpd-listener", "smtpd-child", "queue", "send", "local", "remote", "whole-group")
MODULE = {"queue": "queue", "send": "send", "local": "local", "remote": "remote"}
LOCAL_USERS = ("alice", "bob")
RELAY = "relay.test"
SINK = Path(__file__).resolve().parent.parent / "peers" / "id_sink.py"
MAX_ATTEMPTS = 8  # a message refused (4xx, dropped connection) is sent again, new id
CLIENT_TIMEOUT = 60.0
EX_TEMPFAIL = 75


@dataclass
class Outcome:
    """One row: what was sent, acknowledged, delivered, and what went wrong."""

    stage: str
    messages: int = 0  # submissions tried (each attempt its own id)
    acked: int = 0  # messages acknowledged (every recipient accepted)
    delivered: int = 0  # acknowledged messages delivered to every accepted recipient
    lost: int = 0  # acknowledged messages with an accepted recipient never delivered
    dups: int = 0  # copies beyond the first, per (id, recipient)
    wrong: int = 0  # 5xx replies, unexpected exit codes, bounces
    crashes: int = 0  # tracebacks in any stage's stderr
    hangs: int = 0  # client timeouts, a spool that did not drain
    kills: int = 0
    half_visible: int = 0  # incomplete messages in new/ or at the sink
    debris: int = 0  # files left in a Maildir's tmp/ or the spool's tmp/ (by design: aged out)
    refused: int = 0  # attempts not acknowledged (4xx, dropped connections)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self) -> list[object]:
        return [
            f"kill -9 {self.stage} ({self.kills} kills)",
            self.messages,
            self.acked,
            self.delivered,
            self.lost,
            self.dups,
            self.wrong,
            self.crashes,
            self.hangs,
        ]

    def detail(self) -> str:
        per_kill = self.dups / self.kills if self.kills else 0.0
        return (
            f"{self.stage}: {self.kills} kills, {self.dups} duplicates ({per_kill:.2f}/kill), "
            f"{self.refused} attempts refused, {self.half_visible} half-visible, "
            f"{self.debris} tmp debris, {self.seconds:.0f}s"
            + ("".join(f"\n  {n}" for n in self.notes[:10]))
        )


# --- processes -------------------------------------------------------------------------


def proc_table(session: int | None = None) -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) of every process now (in ``session``, if given)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if session is None or int(fields[3]) == session:
            out[int(entry)] = (int(fields[1]), cmd)
    return out


def ours(config: Path, session: int) -> dict[int, tuple[int, str]]:
    """The processes of this harness's chain: in the session of its `mailgrave run`
    (started with a session of its own; the load's sendmail processes are not in
    it) and with its config path in their command line."""
    needle = f"--config {config} "
    return {pid: pc for pid, pc in proc_table(session).items() if needle in pc[1] + " "}


def stage_pids(stage: str, sup: int, config: Path) -> list[int]:
    """The processes a kill of ``stage`` may hit: for smtpd, the listener or its session
    children; for the others, the stage's process and every process it forked."""
    table = ours(config, sup)
    top = [pid for pid, (ppid, cmd) in table.items() if ppid == sup]
    if stage.startswith("smtpd"):
        listeners = [p for p in top if "-m mailgrave.smtpd " in table[p][1] + " "]
        if stage == "smtpd-listener":
            return listeners
        return [p for p, (ppid, _) in table.items() if ppid in listeners]
    module = f"-m mailgrave.{MODULE[stage]} "
    found = [p for p in top if module in table[p][1] + " "]
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        kids = [p for p, (ppid, _) in table.items() if ppid == parent]
        found += kids
        frontier += kids
    return found


class Chain:
    """`mailgrave run` for one instance; restartable on the same spool."""

    def __init__(self, inst: Instance, processes: Processes, port: int) -> None:
        self.inst = inst
        self.processes = processes
        self.port = port
        self.log = inst.base / "run.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()  # held while the chain is being restarted

    def start(self) -> None:
        args = [program("mailgrave"), "--config", str(self.inst.config_path), "run"]
        args += ["--retry-interval", "1", "--listen", f"127.0.0.1:{self.port}"]
        with self.log.open("ab") as log:
            self.proc = self.processes.start(args, stdout=subprocess.DEVNULL, stderr=log)
        proc = self.proc
        wait_for(lambda: _connectable("127.0.0.1", self.port) or proc.poll() is not None, 30)
        assert proc.poll() is None, self.log.read_text()[-3000:]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill_all(self) -> None:
        """kill -9 the supervisor's process group, then any process of this chain left."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for _ in range(50):
            left = ours(self.inst.config_path, self.proc.pid)
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)


# --- the load --------------------------------------------------------------------------


def recipients(i: int) -> list[str]:
    local = f"{LOCAL_USERS[(i // 4) % 2]}@example.org"
    remote = f"u{i % 7}@{RELAY}"
    if i % 10 == 9:
        return [local, remote]
    return [local] if (i // 2) % 2 == 0 else [remote]


def message(msg_id: str, i: int) -> bytes:
    body = "".join(f"line {n} of message {msg_id}\n" for n in range(20))
    return (
        f"From: load@example.org\nSubject: stress {msg_id}\n"
        f"Message-ID: <{msg_id}@stress.test>\nX-Stress-Id: {msg_id}\n\n{body}END\n"
    ).encode()


class Load:
    """The submissions and what each got back."""

    def __init__(self, stage: str, inst: Instance, port: int, total: int) -> None:
        self.stage = stage
        self.inst = inst
        self.port = port
        self.lock = threading.Lock()
        self.acked: set[tuple[str, str]] = set()  # (id, recipient)
        self.acked_ids: dict[str, list[str]] = {}
        self.tried = 0
        self.refused = 0
        self.wrong: list[str] = []
        self.hangs = 0
        # One queue per kind of client: even messages go over SMTP, odd ones through sendmail.
        self.todo: tuple[SimpleQueue[tuple[int, int]], ...] = (SimpleQueue(), SimpleQueue())
        for i in range(total):
            self.todo[i % 2].put((i, 0))

    def _result(self, i: int, attempt: int, msg_id: str, ok: list[str], again: bool) -> None:
        with self.lock:
            self.tried += 1
            if ok:
                self.acked_ids[msg_id] = ok
                self.acked.update((msg_id, r) for r in ok)
            elif again:
                self.refused += 1
        if again and not ok and attempt + 1 < MAX_ATTEMPTS:
            # As a client would: later, not at once (a stage may be restarting).
            time.sleep(min(2.0, 0.1 * 2**attempt))
            self.todo[i % 2].put((i, attempt + 1))

    def _wrong(self, what: str) -> None:
        with self.lock:
            self.wrong.append(what)

    def _next(self, via: int) -> tuple[int, int] | None:
        try:
            return self.todo[via].get(timeout=0.5)
        except Empty:
            return None

    def smtp_client(self) -> None:
        client: smtplib.SMTP | None = None
        sent = 0
        while (job := self._next(0)) is not None:
            i, attempt = job
            msg_id = f"{self.stage}.{i}.{attempt}"
            rcpts = recipients(i)
            data = message(msg_id, i).replace(b"\n", b"\r\n")
            try:
                if client is None or sent >= 5:
                    if client is not None:
                        _quit(client)
                    client, sent = smtplib.SMTP("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT), 0
                    client.ehlo("load.test")
                sent += 1
                refused = client.sendmail("load@example.org", rcpts, data)
            except smtplib.SMTPRecipientsRefused as exc:
                codes = [c for c, _ in exc.recipients.values()]
                self._classify(codes, f"RCPT {exc.recipients}")
                self._result(i, attempt, msg_id, [], True)
                continue
            except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
                self._classify([exc.smtp_code], f"{type(exc).__name__} {exc.smtp_code}")
                self._result(i, attempt, msg_id, [], exc.smtp_code < 500)
                client = _drop(client)
                continue
            except TimeoutError:
                with self.lock:
                    self.hangs += 1
                self._result(i, attempt, msg_id, [], True)
                client = _drop(client)
                continue
            except (OSError, smtplib.SMTPException):
                # A dropped connection (a killed session or listener): not acknowledged.
                self._result(i, attempt, msg_id, [], True)
                client = _drop(client)
                continue
            if refused:
                self._classify([c for c, _ in refused.values()], f"RCPT {refused}")
            self._result(i, attempt, msg_id, [r for r in rcpts if r not in refused], True)
        if client is not None:
            _quit(client)

    def _classify(self, codes: list[int], what: str) -> None:
        if any(c >= 500 or c < 400 for c in codes):
            self._wrong(what)

    def inject_client(self) -> None:
        inject = program("mailgrave-inject")
        while (job := self._next(1)) is not None:
            i, attempt = job
            msg_id = f"{self.stage}.{i}.{attempt}"
            rcpts = recipients(i)
            args = [inject, "--config", str(self.inst.config_path), "-f", "load@example.org"]
            try:
                res = subprocess.run(
                    [*args, *rcpts],
                    input=message(msg_id, i),
                    capture_output=True,
                    timeout=CLIENT_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                with self.lock:
                    self.hangs += 1
                self._result(i, attempt, msg_id, [], True)
                continue
            if res.returncode == 0:
                self._result(i, attempt, msg_id, rcpts, False)
            elif res.returncode == EX_TEMPFAIL:
                self._result(i, attempt, msg_id, [], True)
            else:
                self._wrong(f"inject exit {res.returncode}: {res.stderr[-200:]!r}")
                self._result(i, attempt, msg_id, [], False)


def _quit(client: smtplib.SMTP) -> None:
    try:
        client.quit()
    except (OSError, smtplib.SMTPException):
        client.close()


def _drop(client: smtplib.SMTP | None) -> None:
    if client is not None:
        client.close()
    return None


# --- counting --------------------------------------------------------------------------


def deliveries(inst: Instance, sink_log: Path) -> tuple[Counter[tuple[str, str]], int, list[str]]:
    """(id, recipient) -> copies delivered; the number of incomplete ones; other mail."""
    got: Counter[tuple[str, str]] = Counter()
    partial = 0
    other = []
    for user in (*LOCAL_USERS, "postmaster"):
        for sub in ("new", "cur"):
            d = inst.maildir(user) / sub
            if not d.is_dir():
                continue
            for p in d.iterdir():
                raw = p.read_bytes()
                head = raw.split(b"\n\n", 1)[0]
                msg_id = next(
                    (
                        line.split(b":", 1)[1].strip().decode()
                        for line in head.split(b"\n")
                        if line.lower().startswith(b"x-stress-id:")
                    ),
                    None,
                )
                if msg_id is None:
                    other.append(f"{user}/{sub}/{p.name}")
                    continue
                if not raw.endswith(b"\nEND\n"):
                    partial += 1
                got[(msg_id, f"{user}@example.org")] += 1
    if sink_log.exists():
        for line in sink_log.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2:
                if len(parts) > 2:
                    partial += 1
                got[(parts[0], parts[1])] += 1
    return got, partial, other


def debris(inst: Instance) -> int:
    n = sum(
        len(os.listdir(inst.maildir(u) / "tmp"))
        for u in (*LOCAL_USERS, "postmaster")
        if (inst.maildir(u) / "tmp").is_dir()
    )
    tmp = inst.spool / "tmp"
    return n + (len(os.listdir(tmp)) if tmp.is_dir() else 0)


def undrained(inst: Instance) -> list[str]:
    """Spool entries still waiting: todo/, info/ (a mess/ file alone is debris)."""
    return [e for e in inst.spool_entries() if e.split("/")[0] in ("todo", "info")]


def crashes(log: Path) -> list[str]:
    text = log.read_text(errors="replace") if log.exists() else ""
    out = []
    pos = 0
    while (pos := text.find("Traceback (most recent call last)", pos)) >= 0:
        out.append(text[pos : pos + 1500])
        pos += 1
    return out


# --- one row ---------------------------------------------------------------------------


def run_stage(
    base: Path,
    stage: str,
    messages: int,
    seed: int = 13,
    clients: int = 4,
    drain_timeout: float = 180.0,
    processes: Processes | None = None,
    max_parallel: int | None = None,
    min_kills: int = 1,
) -> Outcome:
    """Send ``messages`` through a chain while ``stage`` is killed; count what arrived."""
    assert stage in STAGES, stage
    started = time.monotonic()
    own = processes is None
    procs = processes or Processes()
    out = Outcome(stage)
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o711)
    try:
        sink_port, port = free_port(), free_port()
        sink_log = base / "sink.log"
        with (base / "sink.err").open("wb") as sink_err:
            procs.start(
                [sys.executable, str(SINK), "--port", str(sink_port), "--log", str(sink_log)],
                stdout=subprocess.DEVNULL,
                stderr=sink_err,
            )
        queue: dict[str, object] = {"retry": ["1s"]}
        if max_parallel is not None:
            queue["max_parallel"] = max_parallel
        inst = Instance(
            base,
            queue=queue,
            remote={
                "routes": {RELAY: f"[127.0.0.1]:{sink_port}"},
                "tls": "none",
                "mta_sts": "off",
            },
        )
        wait_for(lambda: Path(str(sink_log) + ".ready").exists(), 30)
        chain = Chain(inst, procs, port)
        chain.start()
        load = Load(stage, inst, port, messages)
        stop = threading.Event()
        rng = random.Random(f"{seed}:{stage}")

        def killer() -> None:
            # Until the load is done, and at least min_kills times (a short load
            # may end before the first kill: then it comes during the deliveries).
            while not stop.is_set() or out.kills < min_kills:
                if stage == "whole-group":
                    # The chain needs a moment to start its stages again each time.
                    if stop.wait(rng.uniform(1.0, 3.0)) and out.kills >= min_kills:
                        return
                    chain.kill_all()
                    out.kills += 1
                    chain.start()
                    continue
                if stop.wait(rng.uniform(0.2, 1.0)) and out.kills >= min_kills:
                    return
                pids = stage_pids(stage, chain.pid, inst.config_path)
                if not pids:
                    continue
                try:
                    os.kill(rng.choice(sorted(pids)), signal.SIGKILL)
                    out.kills += 1
                except ProcessLookupError:
                    pass

        threads = [threading.Thread(target=load.smtp_client) for _ in range(clients)]
        threads += [threading.Thread(target=load.inject_client) for _ in range(clients)]
        kill_thread = threading.Thread(target=killer)
        kill_thread.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        kill_thread.join()
        # Drain: every acknowledged message delivered and the spool empty.
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline:
            got, _, _ = deliveries(inst, sink_log)
            if not undrained(inst) and all(got[k] for k in load.acked):
                break
            time.sleep(0.5)
        else:
            out.hangs += 1
            out.notes.append(f"not drained after {drain_timeout:.0f}s: {undrained(inst)[:5]}")
        time.sleep(0.5)  # deliveries still in flight for unacknowledged messages
        got, partial, other = deliveries(inst, sink_log)
        out.messages = load.tried
        out.acked = len(load.acked_ids)
        lost_ids = {msg_id for msg_id, r in load.acked if not got[(msg_id, r)]}
        out.lost = len(lost_ids)
        out.delivered = out.acked - out.lost
        out.dups = sum(n - 1 for n in got.values() if n > 1)
        out.wrong = len(load.wrong) + len(other)
        out.hangs += load.hangs
        out.refused = load.refused
        out.half_visible = partial
        out.debris = debris(inst)
        found = crashes(chain.log) + crashes(base / "sink.err")
        out.crashes = len(found)
        out.notes += [f"lost: {sorted(lost_ids)[:10]}"] if lost_ids else []
        out.notes += [f"wrong: {w}" for w in load.wrong[:5]]
        out.notes += [f"other mail: {o}" for o in other[:5]]
        out.notes += [f"crash: {c[:800]}" for c in found[:3]]
        dup_keys = [k for k, n in got.items() if n > 1]
        out.notes += [f"duplicated: {dup_keys[:8]}"] if dup_keys else []
    finally:
        if own:
            procs.stop_all()
        out.seconds = time.monotonic() - started
    return out
