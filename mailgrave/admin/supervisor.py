"""``mailgrave run``: the whole chain in the foreground, started the way systemd would.

The supervisor binds the control sockets (and SMTP listeners), then behaves
like systemd's socket and path units: when a listening socket becomes
readable and its service is not running, it starts the service with the
socket as fd 3 (``LISTEN_FDS=1``); when ``todo/`` has an entry, ``ctl/`` a
request, or the earliest next attempt of a deferred message has come, it starts
mailgrave-send (``--retry-interval`` is only the fallback, as the systemd
timer).  It reaps every child and stops them all on SIGINT or SIGTERM.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import signal
import socket
import sys
import time
from importlib.util import find_spec

from mailgrave import log as logmod
from mailgrave.config import Config
from mailgrave.proc import Children, bind_unix
from mailgrave.record import Record, factory, record
from mailgrave.spool import Spool

log = logmod.getLogger(__name__)

SEND_POLL = 0.1
# Started as root, the chain keeps root, and says so: mailgrave-send, the one stage
# not handed a socket, refuses root without --user (mailgrave-send(8)).
SEND_USER = ["--user", "root"] if os.geteuid() == 0 else []
START_BURST = 10
START_INTERVAL = 10.0
TODO_RECHECK = 2.0


@record(frozen=False)
class Service(Record):
    """A socket-activated stage: its listener(s) and its running process, if any."""

    name: str
    module: str
    listeners: list[socket.socket]
    extra_args: list[str] = factory(list)
    pid: int = 0
    recent: list[float] = factory(list)
    limited: bool = False


def bind_tcp(spec: str) -> socket.socket:
    """``ADDR:PORT`` or ``[V6]:PORT`` → a listening TCP socket."""
    host, _, port = spec.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(256)
    return sock


class AlreadyRunning(Exception):
    """Another chain serves this run_dir: its sockets must not be replaced."""


def _claim(config: Config) -> int:
    """Lock run_dir/run.lock for this supervisor's lifetime (its fd), or raise
    AlreadyRunning when another ``mailgrave run`` holds it or a control socket
    answers (the chain under systemd, or a stage started by hand)."""
    import fcntl

    fd = os.open(config.socket_path("run.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"another mailgrave run uses {config.run_dir}") from None
    for name in ("queue.ctrl", "local.ctrl", "remote.ctrl"):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(config.socket_path(name))
        except OSError:
            continue  # absent or stale: ours to replace
        finally:
            probe.close()
        os.close(fd)
        raise AlreadyRunning(f"{config.socket_path(name)} is served by a running mailgrave")
    return fd


class Supervisor:
    def __init__(
        self,
        config: Config,
        listen: list[str],
        retry_interval: float,
        submission: list[str] | None = None,
        smtps: list[str] | None = None,
    ) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self.retry_interval = retry_interval
        self.stopping = False
        self.send_pid = 0
        self.children = Children()
        self.last_send = 0.0
        self.last_todo: frozenset[str] = frozenset()
        self.next_due: float | None = None  # earliest next attempt, read after each send run
        self.next_due_known = False
        cfg = ["--config", config.path]
        os.makedirs(config.run_dir, exist_ok=True)
        self.lock_fd = _claim(config)
        self.spool.create()
        run = config.socket_path
        self.services = [
            Service(name, f"mailgrave.{name}", [bind_unix(run(f"{name}.ctrl"), mode)], cfg)
            for name, mode in (("queue", 0o666), ("local", 0o600), ("remote", 0o600))
            if _installed(f"mailgrave.{name}")
        ]
        # One mailgrave-smtpd per kind of port, as the systemd units have it.
        for name, specs, mode in (
            ("smtpd", listen, "smtp"),
            ("smtpd-submission", submission or [], "submission"),
            ("smtpd-smtps", smtps or [], "smtps"),
        ):
            if specs:
                args = [*cfg, "--mode", mode] if mode != "smtp" else cfg
                self.services.append(
                    Service(name, "mailgrave.smtpd", [bind_tcp(s) for s in specs], args)
                )

    def spawn(
        self, tag: object, module: str, args: list[str], listeners: list[socket.socket]
    ) -> int:
        """Start ``python -m module args`` with ``listeners`` as fds 3, 4, ... (LISTEN_FDS)."""

        def exec_stage() -> None:
            # Move every listener out of the way first, then to 3, 4, ...
            high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 512) for s in listeners]
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i, inheritable=True)
            os.closerange(3 + len(listeners), 1024)
            env = dict(os.environ)
            if listeners:
                env["LISTEN_FDS"] = str(len(listeners))
                env["LISTEN_PID"] = str(os.getpid())
            # -P: never import from the current directory (python -m would).
            argv = [sys.executable, "-P", "-m", module, *args]
            os.execve(sys.executable, argv, env)

        return self.children.fork(tag, exec_stage)

    def _may_start(self, svc: Service) -> bool:
        """A start limit: after START_BURST failures within START_INTERVAL seconds, rest."""
        now = time.monotonic()
        svc.recent = [t for t in svc.recent if now - t < START_INTERVAL]
        if len(svc.recent) >= START_BURST:
            if not svc.limited:
                log.error("mailgrave-%s keeps failing; not restarting it for a while", svc.name)
                svc.limited = True
            return False
        svc.limited = False
        return True

    def reap(self) -> None:
        for _pid, tag, code in self.children.reap():
            if tag == "send":
                self.send_pid = 0
                self.next_due_known = False
                if code != 0:
                    log.warning("mailgrave-send exited with %s", code)
                continue
            assert isinstance(tag, Service)
            tag.pid = 0
            if code != 0:
                tag.recent.append(time.monotonic())
                log.warning("mailgrave-%s exited with %s", tag.name, code)

    def send_due(self) -> bool:
        if self.send_pid:
            return False
        since = time.monotonic() - self.last_send
        try:
            todo = frozenset(os.listdir(self.spool.path("todo")))
            # Like a .path unit: new entries start a run at once; entries that a
            # run left behind (being written, or broken) only every few seconds.
            if todo and (todo != self.last_todo or since >= TODO_RECHECK):
                self.last_todo = todo
                return True
            if os.listdir(self.spool.path("ctl")) and since >= 1.0:
                return True
            deferred = bool(os.listdir(self.spool.path("info")))
        except FileNotFoundError:
            return False
        if not deferred:
            return False
        if not self.next_due_known or since >= self.retry_interval:
            self.next_due, self.next_due_known = self.spool.next_attempt(), True
        if since >= self.retry_interval:
            return True
        return self.next_due is not None and time.time() >= self.next_due and since >= 1.0

    def run(self) -> int:
        sel = selectors.DefaultSelector()
        for svc in self.services:
            for sock in svc.listeners:
                sel.register(sock, selectors.EVENT_READ, svc)

        def stop(_signum: int, _frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        log.info("mailgrave run: chain ready (config %s)", self.config.path)
        try:
            while not self.stopping:
                for key, _ in sel.select(timeout=SEND_POLL):
                    svc = key.data
                    if not svc.pid and self._may_start(svc):
                        svc.pid = self.spawn(svc, svc.module, svc.extra_args, svc.listeners)
                    for sock in svc.listeners:
                        sel.unregister(sock)
                self.reap()
                for svc in self.services:
                    resting = svc.limited and time.monotonic() - svc.recent[0] < START_INTERVAL
                    if not svc.pid and not resting and not _registered(sel, svc.listeners[0]):
                        for sock in svc.listeners:
                            sel.register(sock, selectors.EVENT_READ, svc)
                if self.send_due():
                    self.last_send = time.monotonic()
                    args = ["--config", self.config.path, *SEND_USER]
                    self.send_pid = self.spawn("send", "mailgrave.send", args, [])
        finally:
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        self.children.stop(timeout=10)
        for svc in self.services:
            for sock in svc.listeners:
                if sock.family == socket.AF_UNIX:
                    try:
                        os.unlink(sock.getsockname())
                    except OSError:
                        pass
                sock.close()


def _installed(module: str) -> bool:
    """Is this stage's program present? A missing one is not started (a unit not installed)."""
    return find_spec(module) is not None


def _registered(sel: selectors.BaseSelector, sock: socket.socket) -> bool:
    try:
        sel.get_key(sock)
    except KeyError:
        return False
    return True
