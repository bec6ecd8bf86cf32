"""MailGrave against Postfix on loopback: one table with the ratio MailGrave / Postfix.

Run as root through ``make bench`` (which installs Postfix without starting
it). Both systems run side by side from a scratch directory under /var/tmp
(their spools on the same disk, both fsyncing before 250), on ports chosen at
run time; Postfix runs from its own config dir and is stopped at the end,
also on failure or Ctrl-C. Counts are bounded (--count) so a run takes a few
minutes. The load generator is Postfix's smtp-source; the remote end is
smtp-sink.

Rows (issue 6): accepted msgs/s at 1/10/50 sessions, 1 and 10 messages per
connection, 2 KB and 100 KB; end-to-end to smtp-sink (accepted, delivered);
local Maildir delivery; connect->greeting and end-of-data->250 latency;
smtpd RSS per connection; the largest RSS growth while a 50 MB message goes
through; CPU seconds per 1,000 messages; MailGrave's plain Accept=yes mode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
SBIN = Path("/usr/sbin")
SINK_DOMAIN = "sink.test"
LOCAL_DOMAIN = "example.org"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
NOBODY = pwd.getpwnam("nobody")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def connectable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.recv(512)
        return True
    except OSError:
        return False


def count_files(*dirs: Path) -> int:
    n = 0
    for d in dirs:
        for _, _, files in os.walk(d):
            n += len(files)
    return n


# ---------------------------------------------------------------- processes


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces: fields after the last ')'.
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    return [str(pid), comm, *raw[raw.rindex(")") + 2 :].split()]


def tree(root: int) -> list[int]:
    """root and all its descendants (by /proc ppid)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st:
                children.setdefault(int(st[3]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def tree_cpu(root: int) -> float:
    """CPU seconds of a process tree: every live member's own time plus its reaped children's.

    A child that exits is reaped by its parent in the tree, so its time moves
    into the parent's cutime/cstime: deltas of this sum are the tree's CPU.
    """
    total = 0
    for pid in tree(root):
        st = _stat(pid)
        if st:
            total += sum(int(x) for x in st[13:17])
    return total / CLK_TCK


def tree_cpu_by_program(root: int) -> dict[str, float]:
    """tree_cpu, split by program (a process's reaped children count for it)."""
    out: dict[str, float] = {}
    for pid in tree(root):
        st = _stat(pid)
        if st:
            name = short_name(pid)
            out[name] = out.get(name, 0.0) + sum(int(x) for x in st[13:17]) / CLK_TCK
    return out


def cpu_split(before: dict[str, float], after: dict[str, float], n: int) -> str:
    """CPU seconds per 1,000 messages by program, largest first."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    parts = sorted(delta.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / n * 1000:.2f}" for k, v in parts if v > 0)


def rss_kb(pid: int) -> int | None:
    st = _stat(pid)
    return int(st[23]) * PAGE // 1024 if st else None


def pss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def short_name(pid: int) -> str:
    cmd = cmdline(pid).split()
    for word in cmd:
        base = os.path.basename(word)
        if base == "mailgrave":
            return "mailgrave run"
        if base.startswith("mailgrave"):
            return base.replace("mailgrave.", "mailgrave-")
    return os.path.basename(cmd[0]) if cmd else "?"


# ---------------------------------------------------------------- systems


class System:
    name = ""
    port = 0

    def root_pid(self) -> int:
        raise NotImplementedError

    def pending(self) -> int:
        """Messages (files) still in the queue."""
        raise NotImplementedError

    def maildir_count(self) -> int:
        raise NotImplementedError

    def smtpd_connection_pids(self, before: set[int]) -> list[int]:
        raise NotImplementedError

    def wait_idle(self, timeout: float) -> None:
        wait_for(lambda: self.pending() == 0, timeout, f"{self.name} queue to drain", 0.1)


class Postfix(System):
    name = "Postfix"

    def __init__(self, base: Path, sink_port: int) -> None:
        self.base = base
        self.conf = base / "etc"
        self.queue = base / "queue"
        self.mail = base / "mail"
        self.port = free_port()
        self.started = False
        for d in (self.conf, base / "data", self.mail, self.queue):
            d.mkdir(parents=True)
        shutil.chown(self.mail, NOBODY.pw_uid, NOBODY.pw_gid)
        shutil.chown(base / "data", "postfix", "postfix")
        (self.conf / "transport").write_text(f"{SINK_DOMAIN} smtp:[127.0.0.1]:{sink_port}\n")
        (self.conf / "vmailbox").write_text(f"alice@{LOCAL_DOMAIN} alice/Maildir/\n")
        (self.conf / "main.cf").write_text(
            f"""\
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.bench.test
mydomain = bench.test
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
transport_maps = texthash:{self.conf}/transport
virtual_mailbox_domains = {LOCAL_DOMAIN}
virtual_mailbox_base = {self.mail}
virtual_mailbox_maps = texthash:{self.conf}/vmailbox
virtual_uid_maps = static:{NOBODY.pw_uid}
virtual_gid_maps = static:{NOBODY.pw_gid}
virtual_mailbox_limit = 0
message_size_limit = 60000000
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
"""
        )
        chroot_n = "n"
        services = [
            (f"127.0.0.1:{self.port}", "inet", "n", "-", "-", "smtpd"),
            ("pickup", "unix", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "300", "1", "qmgr"),
            ("rewrite", "unix", "-", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "1", "verify"),
            ("flush", "unix", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "-", "proxymap"),
            ("proxywrite", "unix", "-", "-", "1", "proxymap"),
            ("smtp", "unix", "-", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "-", "smtp"),
            ("showq", "unix", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "-", "error"),
            ("retry", "unix", "-", "-", "-", "error"),
            ("discard", "unix", "-", "-", "-", "discard"),
            ("local", "unix", "-", "-", "-", "local"),
            ("virtual", "unix", "-", "-", "-", "virtual"),
            ("anvil", "unix", "-", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "1", "postlogd"),
        ]
        lines = []
        for svc, typ, private, wakeup, limit, cmd in services:
            unpriv = "n" if cmd in ("local", "virtual") else "-"
            lines.append(f"{svc} {typ} {private} {unpriv} {chroot_n} {wakeup} {limit} {cmd}")
        (self.conf / "master.cf").write_text("\n".join(lines) + "\n")

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SBIN / "postfix"), "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def start(self) -> None:
        self.started = True
        result = self.postfix("start", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed: {result.stderr.strip()}")
        wait_for(lambda: connectable(self.port), 30, "Postfix smtpd")

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        result = self.postfix("stop", check=False)
        if result.returncode != 0:
            log(f"postfix stop: {result.stderr.strip()}")

    def root_pid(self) -> int:
        return int((self.queue / "pid" / "master.pid").read_text().split()[0])

    def pending(self) -> int:
        dirs = ("maildrop", "incoming", "active", "deferred", "hold")
        return count_files(*(self.queue / d for d in dirs))

    def maildir_count(self) -> int:
        new = self.mail / "alice" / "Maildir" / "new"
        return len(os.listdir(new)) if new.is_dir() else 0

    def smtpd_connection_pids(self, before: set[int]) -> list[int]:
        # Postfix reuses smtpd processes; every smtpd in the tree serves at most one.
        return [p for p in tree(self.root_pid()) if (_stat(p) or ["", ""])[1] == "smtpd"]


class MailGrave(System):
    name = "MailGrave"

    def __init__(self, base: Path, sink_port: int) -> None:
        self.base = base
        self.spool = base / "spool"
        self.run_dir = base / "run"
        self.mail = base / "mail"
        self.config = base / "mailgrave.yaml"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.mail.mkdir(parents=True)
        shutil.chown(self.mail, NOBODY.pw_uid, NOBODY.pw_gid)
        (base / "aliases").touch()
        settings = {
            "hostname": "mailgrave.bench.test",
            "spool": str(self.spool),
            "run_dir": str(self.run_dir),
            "local_domains": [LOCAL_DOMAIN],
            # Postfix exempts mynetworks from its per-client limits; so does the bench.
            "smtpd": {
                "max_message_size": "60M",
                "max_connections": 200,
                "max_connections_per_client": 0,
                # Postfix's smtpd greets at once (postscreen's pregreet test is
                # off by default); MailGrave's default waits 0.2 s to catch early talkers.
                "greet_pause": 0,
            },
            "local": {
                "aliases": str(base / "aliases"),
                "mbox_dir": str(self.mail / "spool"),
                "virtual_user": "nobody",
                "virtual": {f"alice@{LOCAL_DOMAIN}": str(self.mail / "alice" / "Maildir") + "/"},
            },
            "remote": {
                "tls": "none",
                "routes": {SINK_DOMAIN: f"[127.0.0.1]:{sink_port}"},
                "dns": {"nameservers": ["127.0.0.1"], "port": free_port(), "timeout": "2s"},
            },
        }
        # JSON is YAML: no yaml import needed here.
        self.config.write_text(json.dumps(settings, indent=1) + "\n")

    def start(self) -> None:
        args = [str(launchers() / "mailgrave"), "--config", str(self.config), "run"]
        args += ["--listen", f"127.0.0.1:{self.port}"]
        with (self.base / "run.log").open("wb") as errlog:
            self.proc = subprocess.Popen(
                args,
                stdout=subprocess.DEVNULL,
                stderr=errlog,
                start_new_session=True,
                env=mailgrave_env(),
                cwd=self.base,  # `python -m` puts the cwd first on sys.path
            )
        wait_for(lambda: connectable(self.port) or self.proc.poll() is not None, 30, "MailGrave")  # type: ignore[union-attr]
        if self.proc.poll() is not None:
            raise RuntimeError(
                "mailgrave run exited: " + (self.base / "run.log").read_text()[-2000:]
            )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def root_pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def pending(self) -> int:
        return count_files(*(self.spool / d for d in ("tmp", "todo", "mess", "info")))

    def maildir_count(self) -> int:
        new = self.mail / "alice" / "Maildir" / "new"
        return len(os.listdir(new)) if new.is_dir() else 0

    def smtpd_connection_pids(self, before: set[int]) -> list[int]:
        return [p for p in tree(self.root_pid()) if p not in before]


SOURCE: Path | None = None  # --source: a snapshot of the package instead of the checkout


def launchers() -> Path:
    """Where the programs' launchers are: a --source tree's own venv when it has
    one (``make venv`` there), since launchers name the modules of their own layout."""
    if SOURCE and (SOURCE / ".venv" / "bin" / "mailgrave").exists():
        return SOURCE / ".venv" / "bin"
    return VENV_BIN


def mailgrave_env() -> dict[str, str]:
    """The environment MailGrave runs with: bytecode caches on, as in a package install.

    With PYTHONDONTWRITEBYTECODE every per-connection child would compile the
    modules it imports lazily after the fork.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    if SOURCE:
        env["PYTHONPATH"] = str(SOURCE)
    return env


def precompile() -> None:
    pkg = (SOURCE or ROOT) / "mailgrave"
    subprocess.run([str(VENV_BIN / "python"), "-m", "compileall", "-q", str(pkg)], check=True)


class Sink:
    """smtp-sink on a free port; counts what it received."""

    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.out = base / "sink.out"
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(SBIN / "smtp-sink"), "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "256"],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(lambda: connectable(self.port), 10, "smtp-sink")

    def received(self) -> int:
        # -c prints "sess=N quit=N mesg=N" counters separated by CR.
        last = self.out.read_bytes().rsplit(b"mesg=", 1)
        digits = last[1][:12].split(b"\r")[0].strip() if len(last) == 2 else b""
        return int(digits) if digits.isdigit() else 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# ---------------------------------------------------------------- load


def smtp_source(port: int, count: int, sessions: int, per_conn: int, size: int, to: str) -> float:
    """Send ``count`` messages with smtp-source; wall seconds until the last 250.

    With per_conn > 1 each smtp-source run sends per_conn x sessions messages
    with -d (each session keeps its connection), so every connection carries
    per_conn messages.
    """
    base = [str(SBIN / "smtp-source"), "-4", "-M", "client.bench.test", "-f", "src@client.test"]
    base += ["-t", to, "-l", str(size), "-s", str(sessions)]
    t0 = time.perf_counter()
    if per_conn == 1:
        runs = [count]
    else:
        chunk = per_conn * sessions
        runs = [chunk] * max(1, count // chunk)
    for m in runs:
        args = [*base, "-m", str(m)] + (["-d"] if per_conn > 1 else [])
        subprocess.run([*args, f"127.0.0.1:{port}"], check=True, timeout=600)
    return time.perf_counter() - t0


def sent_count(count: int, sessions: int, per_conn: int) -> int:
    if per_conn == 1:
        return count
    chunk = per_conn * sessions
    return chunk * max(1, count // chunk)


def _read_reply(f: Any) -> bytes:
    while True:
        line = f.readline()
        if not line:
            raise RuntimeError("connection closed")
        if line[3:4] != b"-":
            return bytes(line)


def latency(port: int, n: int, to: str) -> tuple[list[float], list[float]]:
    """One session, n connections in sequence; seconds connect->greeting and end-of-data->250."""
    body = b"Subject: latency\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26
    greet, eod = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            f = s.makefile("rb")
            if not _read_reply(f).startswith(b"220"):
                raise RuntimeError("no greeting")
            greet.append(time.perf_counter() - t0)
            for cmd in (
                b"EHLO client.bench.test",
                b"MAIL FROM:<lat@client.test>",
                f"RCPT TO:<{to}>".encode(),
                b"DATA",
            ):
                s.sendall(cmd + b"\r\n")
                _read_reply(f)
            s.sendall(body + b".\r\n")
            t1 = time.perf_counter()
            reply = _read_reply(f)
            eod.append(time.perf_counter() - t1)
            if not reply.startswith(b"250"):
                raise RuntimeError(f"DATA refused: {reply[:60]!r}")
            s.sendall(b"QUIT\r\n")
            _read_reply(f)
    return greet, eod


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


@contextlib.contextmanager
def open_sessions(port: int, n: int) -> Iterator[None]:
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            f = s.makefile("rb")
            _read_reply(f)
            s.sendall(b"EHLO client.bench.test\r\n")
            _read_reply(f)
            socks.append(s)
        time.sleep(0.3)
        yield
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.sendall(b"QUIT\r\n")
            s.close()


def rss_per_connection(system: System, n: int = 20) -> tuple[float, float]:
    """Mean RSS and PSS (MB) of the processes serving n idle sessions (after EHLO)."""
    before = set(tree(system.root_pid()))
    with open_sessions(system.port, n):
        pids = system.smtpd_connection_pids(before)
        rss = [r for r in (rss_kb(p) for p in pids) if r]
        pss = [r for r in (pss_kb(p) for p in pids) if r]
    if not rss:
        return float("nan"), float("nan")
    return statistics.mean(rss) / 1024, statistics.mean(pss or [0]) / 1024


def send_big(port: int, size: int, to: str) -> None:
    """One message of about ``size`` bytes, streamed (never whole in memory here)."""
    line = b"y" * 998 + b"\r\n"
    with socket.create_connection(("127.0.0.1", port)) as s:
        f = s.makefile("rb")
        _read_reply(f)
        for cmd in (
            b"EHLO client.bench.test",
            b"MAIL FROM:<big@client.test>",
            f"RCPT TO:<{to}>".encode(),
            b"DATA",
        ):
            s.sendall(cmd + b"\r\n")
            reply = _read_reply(f)
            if reply[:1] not in (b"2", b"3"):
                raise RuntimeError(f"{cmd!r} refused: {reply[:80]!r}")
        s.sendall(b"Subject: big\r\n\r\n")
        block = line * 64
        for _ in range(size // len(block)):
            s.sendall(block)
        s.sendall(b".\r\n")
        reply = _read_reply(f)
        if not reply.startswith(b"250"):
            raise RuntimeError(f"big message refused: {reply[:80]!r}")
        s.sendall(b"QUIT\r\n")


def peak_rss_by_program(system: System, size: int, to: str) -> dict[str, int]:
    """Peak RSS (kB) of each program of the system while one message of ``size`` goes through."""
    peak: dict[str, int] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for pid in tree(system.root_pid()):
                st = _stat(pid)
                if st is None or st[2] == "Z":
                    continue
                name = short_name(pid)
                peak[name] = max(peak.get(name, 0), int(st[23]) * PAGE // 1024)
            time.sleep(0.005)

    system.wait_idle(120)
    delivered = system.maildir_count()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(0.2)
    try:
        send_big(system.port, size, to)
        wait_for(lambda: system.maildir_count() > delivered, 120, "message delivery")
        time.sleep(0.3)
    finally:
        stop.set()
        sampler.join()
    return peak


def big_message_rss(system: System, size: int, to: str) -> tuple[float, str]:
    """Largest growth (MB) of any program's peak RSS: a ``size`` message against a 2 KB one.

    Programs started per message (a delivery child, mailgrave-send) grow
    while their interpreter starts; comparing with a small message's peak
    leaves only what the big message costs.
    """
    small = peak_rss_by_program(system, 2048, to)
    big = peak_rss_by_program(system, size, to)
    growth = {k: v - small.get(k, 0) for k, v in big.items() if k in small}
    worst = max(growth, key=lambda k: growth[k])
    return growth[worst] / 1024, f"{worst} (+{growth[worst] / 1024:.1f} MB)"


# ---------------------------------------------------------------- the run


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, str, bool]] = []

    def add(self, label: str, mg: float, pf: float, unit: str, higher_better: bool = True) -> None:
        self.rows.append((label, mg, pf, unit, higher_better))
        log(f"{label}: MailGrave {mg:.4g} {unit}, Postfix {pf:.4g} {unit}")

    def render(self) -> str:
        head = ("", "MailGrave", "Postfix", "MG/PF")
        lines = [f"| {head[0]:<52} | {head[1]:>10} | {head[2]:>10} | {head[3]:>6} |"]
        lines.append(f"|{'-' * 54}|{'-' * 11}:|{'-' * 11}:|{'-' * 7}:|")
        for label, mg, pf, unit, _ in self.rows:
            ratio = fmt(mg / pf) if pf and pf == pf and mg == mg else "-"
            name = f"{label} ({unit})"
            lines.append(f"| {name:<52} | {fmt(mg):>10} | {fmt(pf):>10} | {ratio:>6} |")
        return "\n".join(lines)


def fmt(v: float) -> str:
    if v != v:
        return "-"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def measure_throughput(
    system: System, count: int, sessions: int, per_conn: int, size: int, to: str
) -> tuple[float, float, int]:
    """(accepted msgs/s, delivered msgs/s, messages) for one smtp-source load."""
    system.wait_idle(300)
    n = sent_count(count, sessions, per_conn)
    t0 = time.perf_counter()
    accept_s = smtp_source(system.port, count, sessions, per_conn, size, to)
    system.wait_idle(600)
    total = time.perf_counter() - t0
    return n / accept_s, n / total, n


def profile(mg: MailGrave, args: argparse.Namespace, *recipients: str) -> str:
    """py-spy (wall-clock samples, all MailGrave processes) during one more load, summarised."""
    spy = VENV_BIN / "py-spy"
    if not spy.exists():
        return "py-spy not installed (make bench installs it)"
    out = []
    for to in recipients:
        mg.wait_idle(300)
        raw = Path(args.profile + f".{to.split('@')[1]}.txt").resolve()
        raw.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(spy), "record", "--pid", str(mg.root_pid()), "--subprocesses", "--nonblocking"]
        cmd += ["--rate", "250", "--format", "raw", "-o", str(raw)]
        rec = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.5)
        smtp_source(mg.port, args.count // 2, 50, 1, 2048, to)
        mg.wait_idle(300)
        rec.send_signal(signal.SIGINT)
        rec.wait(60)
        from pyspy_summary import summarise

        out.append(f"### py-spy, 50 sessions, 2 KB, to {to} ({raw})\n{summarise(str(raw), 8)}")
    return "\n\n".join(out)


def run(args: argparse.Namespace) -> tuple[str, list[tuple[str, float, float, str, bool]]]:
    base = Path(tempfile.mkdtemp(prefix="mailgrave-bench-", dir=args.workdir))
    os.chmod(base, 0o755)
    log(f"scratch directory {base}")
    table = Table()
    sink = Sink(base)
    pf = Postfix(base / "postfix", sink.port)
    mg = MailGrave(base / "mailgrave", sink.port)
    systems: list[System] = [mg, pf]
    extra: dict[str, Any] = {}
    only = set(args.only.split(","))
    try:
        pf.start()
        mg.start()
        sink_to = f"bench@{SINK_DOMAIN}"
        local_to = f"alice@{LOCAL_DOMAIN}"
        # Warm both up (first-use costs: process start, caches).
        for s in systems:
            smtp_source(s.port, 50, 5, 1, 2048, sink_to)
            s.wait_idle(120)

        if "accept" in only:
            for size, count in ((2048, args.count), (102400, args.count_100k)):
                for per_conn in (1, 10):
                    for sessions in (1, 10, 50):
                        res = {}
                        n = min(count, args.per_session * sessions)
                        for s in systems:
                            res[s.name] = measure_throughput(
                                s, n, sessions, per_conn, size, sink_to
                            )
                        label = f"accepted, {size // 1024} KB, {sessions} sess, {per_conn}/conn"
                        table.add(label, res["MailGrave"][0], res["Postfix"][0], "msgs/s")

        if "e2e" in only:
            # End-to-end to smtp-sink and local Maildir, with CPU per 1,000 messages.
            for what, to in (
                ("end-to-end to smtp-sink", sink_to),
                ("local Maildir delivery", local_to),
            ):
                res, cpu = {}, {}
                for s in systems:
                    s.wait_idle(300)
                    sink_before, md_before = sink.received(), s.maildir_count()
                    c0 = tree_cpu(s.root_pid())
                    split0 = tree_cpu_by_program(s.root_pid())
                    res[s.name] = measure_throughput(s, args.count, 10, 1, 2048, to)
                    # The queue is empty: every message was delivered (or bounced). Check.
                    time.sleep(0.2)
                    got = (
                        s.maildir_count() - md_before
                        if to == local_to
                        else sink.received() - sink_before
                    )
                    if got < res[s.name][2]:
                        log(f"warning: {s.name}: {got} of {res[s.name][2]} arrived")
                    cpu[s.name] = (tree_cpu(s.root_pid()) - c0) / res[s.name][2] * 1000
                    split = cpu_split(split0, tree_cpu_by_program(s.root_pid()), res[s.name][2])
                    extra[f"CPU s/1,000 msgs by program, {what}, {s.name}"] = split
                if to == sink_to:
                    table.add(
                        f"{what}, 10 sess: accepted",
                        res["MailGrave"][0],
                        res["Postfix"][0],
                        "msgs/s",
                    )
                table.add(
                    f"{what}, 10 sess: delivered", res["MailGrave"][1], res["Postfix"][1], "msgs/s"
                )
                table.add(
                    f"CPU per 1,000 msgs, {what}", cpu["MailGrave"], cpu["Postfix"], "s", False
                )

        if "latency" in only:
            lat = {s.name: latency(s.port, args.latency_count, sink_to) for s in systems}
            for i, what in enumerate(("connect->greeting", "end-of-data->250")):
                for q, qn in ((0.5, "p50"), (0.99, "p99")):
                    vals = {k: pct(v[i], q) * 1000 for k, v in lat.items()}
                    table.add(
                        f"{what} {qn}, 1 sess", vals["MailGrave"], vals["Postfix"], "ms", False
                    )

        if "rss" in only:
            for s in systems:
                s.wait_idle(300)
            rss = {s.name: rss_per_connection(s) for s in systems}
            table.add(
                "smtpd RSS per connection", rss["MailGrave"][0], rss["Postfix"][0], "MB", False
            )
            table.add(
                "smtpd PSS per connection", rss["MailGrave"][1], rss["Postfix"][1], "MB", False
            )

        if "big" in only:
            big = {s.name: big_message_rss(s, 50 * 1024 * 1024, local_to) for s in systems}
            table.add(
                "largest RSS growth, 50 MB vs 2 KB message",
                big["MailGrave"][0],
                big["Postfix"][0],
                "MB",
                False,
            )
            extra["big_message_worst_process"] = {k: v[1] for k, v in big.items()}

        if "acceptyes" in only:
            # Plain Accept=yes mode: an interpreter per connection, the queue of `mailgrave run`.
            mg.wait_idle(300)
            port = free_port()
            sa = subprocess.Popen(
                [
                    "systemd-socket-activate",
                    "-l",
                    f"127.0.0.1:{port}",
                    "--inetd",
                    "-a",
                    # It passes only the variables named with -E to the program.
                    *[f"-E{k}={v}" for k, v in mailgrave_env().items() if k == "PYTHONPATH"],
                    str(launchers() / "mailgrave-smtpd"),
                    "--config",
                    str(mg.config),
                ],
                stdout=subprocess.DEVNULL,
                stderr=(base / "socket-activate.log").open("wb"),
                start_new_session=True,
                env=mailgrave_env(),
                cwd=base,
            )
            try:
                wait_for(lambda: connectable(port), 30, "systemd-socket-activate")
                t = smtp_source(port, args.count_accept, 10, 1, 2048, sink_to)
                mg.wait_idle(300)
            finally:
                os.killpg(sa.pid, signal.SIGTERM)
                sa.wait(10)
            pf_10 = next(
                (r[2] for r in table.rows if r[0] == "accepted, 2 KB, 10 sess, 1/conn"),
                float("nan"),
            )
            table.add(
                "Accept=yes (interpreter per conn), 10 sess", args.count_accept / t, pf_10, "conn/s"
            )
        if args.profile:
            extra["profile"] = profile(mg, args, sink_to, local_to)
        if args.keep:
            log(f"kept {base}")
    finally:
        for s in systems:
            try:
                s.stop()  # type: ignore[attr-defined]
            except Exception as e:  # keep stopping the others
                log(f"stopping {s.name}: {e}")
        sink.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    out = table.render()
    if extra:
        out += "\n\n" + "\n\n".join(f"{k}: {v}" for k, v in extra.items())
    return out, table.rows


def machine() -> str:
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    pf = subprocess.run(
        [str(SBIN / "postconf"), "-d", "-h", "mail_version"], capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{os.cpu_count()} CPUs ({model}), {int(mem) // 1024} MB RAM, "
        f"Debian {Path('/etc/debian_version').read_text().strip()}, "
        f"kernel {os.uname().release}, Postfix {pf}, Python {sys.version.split()[0]}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=2000, help="messages per 2 KB row")
    p.add_argument("--count-100k", type=int, default=1000, help="messages per 100 KB row")
    p.add_argument("--count-accept", type=int, default=1000, help="connections, Accept=yes row")
    p.add_argument("--latency-count", type=int, default=200, help="connections for latency")
    p.add_argument(
        "--per-session", type=int, default=100, help="at most this many messages per session a row"
    )
    p.add_argument("--workdir", default="/var/tmp", help="where the scratch directory goes")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument(
        "--only",
        default="accept,e2e,latency,rss,big,acceptyes",
        help="comma-separated row groups: accept,e2e,latency,rss,big,acceptyes",
    )
    p.add_argument("--source", help="run the mailgrave package from this directory (a snapshot)")
    p.add_argument("--json", help="also write the table here")
    p.add_argument(
        "--profile", metavar="PREFIX", help="py-spy MailGrave afterwards; raw files here"
    )
    args = p.parse_args(argv)
    if os.getuid() != 0:
        print("bench: run as root (Postfix, delivery as nobody)", file=sys.stderr)
        return 1

    def interrupted(signum: int, frame: object) -> None:
        raise SystemExit(f"bench: signal {signum}, stopping Postfix and MailGrave")

    # Postfix and MailGrave are stopped in run()'s finally, also on these.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    global SOURCE
    SOURCE = Path(args.source).resolve() if args.source else None
    precompile()
    t0 = time.monotonic()
    header = f"Machine: {machine()}\nDisk: {disk(args.workdir)}"
    table, rows = run(args)
    print(f"\n{header}\nRun: {time.monotonic() - t0:.0f} s, --count {args.count}\n\n{table}")
    if args.json:
        record = {"machine": header, "table": table, "rows": rows}
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


def disk(path: str) -> str:
    src = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", path], capture_output=True, text=True
    ).stdout.strip()
    return src or "?"


if __name__ == "__main__":
    sys.exit(main())
