"""mailgrave-smtpd's warm parent: accepts, hands each connection to a process of
its own (forked ahead of time when connections keep coming), reaps, enforces
the connection limits."""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import time

from mailgrave import config as configmod
from mailgrave import log as mglog
from mailgrave import maillog
from mailgrave.errors import EXIT_OK
from mailgrave.proc import Children, run_and_exit
from mailgrave.smtp import replies as R
from mailgrave.smtpd.session import (
    READ_SIZE,
    Channel,
    Session,
    Stress,
    _plain_ip,
    serve_connection,
)

log = mglog.getLogger(__name__)

REAP_INTERVAL = 0.5
# Connections run short (Postfix's stress mode) from this share of max_connections;
# beyond RESERVE_FRACTION, only clients in relay_networks are admitted.
STRESS_FRACTION = 0.8
RESERVE_FRACTION = 0.9


class Listener:
    """The warm parent: accept, hand each connection to a child of its own, reap,
    enforce limits.

    Each connection gets a fresh process that serves it alone and exits. While
    connections keep coming, the parent keeps SPARES children forked ahead of
    time; a spare waits for its connection over a socketpair, so that a client
    does not wait for a fork. Spares leave after SPARE_IDLE
    seconds without a connection; when none is ready the parent forks on the spot.
    """

    SPARES = 2
    SPARE_IDLE = 2.0

    def __init__(
        self, config: configmod.Config, sockets: list[socket.socket], mode: str = "smtp"
    ) -> None:
        self.config = config
        self.mode = mode
        self.sockets = sockets
        self.children: dict[int, str] = {}  # pid -> client address, one per connection
        # pid -> our end of a pipe or socketpair whose other end the child closes
        # when its session is over (before its last reply): only these count
        # against the limits, not children that are still exiting.
        self.live: dict[int, int] = {}
        self.spares: dict[int, socket.socket] = {}  # pid -> our end of its socketpair
        self.leaving: set[int] = set()  # spares sent away, not yet reaped
        self.last_accept = 0.0
        self.stopping = False
        self.stress = False  # connections run short: see _check_stress
        self.procs = Children()  # every child: sessions, spares, leaving spares

    def run(self) -> int:
        if self.config.smtpd.tls.certificate:
            # Once in the warm parent, not in every child that does STARTTLS.
            import ssl  # noqa: F401
        _warm_up(self.config)

        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        # Set here, before any fork, so that no child can get SIGUSR1 without it.
        signal.signal(signal.SIGUSR1, Stress.enter)
        for sock in self.sockets:
            sock.setblocking(False)
        idle_exit = self.config.smtpd.idle_exit
        last_activity = time.monotonic()
        while not self.stopping:
            self.reap()
            self._check_stress()
            now = time.monotonic()
            if self.children:
                last_activity = now
            elif idle_exit and now - last_activity >= idle_exit:
                log.info("no connection for %gs, exiting", idle_exit)
                break
            if now - self.last_accept < self.SPARE_IDLE:
                while len(self.spares) < self.SPARES:
                    self._fork_spare()
            elif self.spares:
                self._drop_spares()
            try:
                ready, _, _ = select.select(self.sockets, [], [], REAP_INTERVAL)
            except InterruptedError:
                continue
            for sock in ready:
                self.accept(sock)
                last_activity = self.last_accept = time.monotonic()
        self._drop_spares()
        self.reap()
        return EXIT_OK

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _check_stress(self) -> None:
        """Enter or leave stress mode as the share of connections in use crosses
        STRESS_FRACTION; on entry every session is told (SIGUSR1) to use
        smtpd.stress_timeout, so idle and trickling clients make room."""
        limit = self.config.smtpd.max_connections
        stressed = bool(limit) and len(self.children) >= STRESS_FRACTION * limit
        if stressed == self.stress:
            return
        self.stress = stressed
        if stressed:
            log.warning(
                "%d of %d connections in use: stress mode (timeouts %gs, %d per untrusted client)",
                len(self.children),
                limit,
                self.config.smtpd.stress_timeout,
                self.config.smtpd.stress_max_connections_per_client,
            )
            for pid in list(self.children):
                self._tell_stress(pid)
        else:
            log.info("%d of %d connections in use: stress mode ends", len(self.children), limit)

    @staticmethod
    def _tell_stress(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass

    def _stress_refuses(self, ip: str, per_client: int) -> bool:
        """Under stress, a client outside relay_networks gets only
        smtpd.stress_max_connections_per_client connections at once, and none
        of the last slots (RESERVE_FRACTION): those stay for relay_networks."""
        if not self.stress or self.config.may_relay(ip):
            return False
        cap = self.config.smtpd.stress_max_connections_per_client
        reserve = RESERVE_FRACTION * self.config.smtpd.max_connections
        return (bool(cap) and per_client >= cap) or len(self.children) >= reserve

    def reap(self) -> None:
        for pid, _tag, status in self.procs.reap():
            ip = self.children.pop(pid, None)
            if status < 0 and not self.stopping:
                # A session the kernel or someone ended (OOM killer, a crash, kill -9):
                # the child could not say so itself.
                who = f"client [{ip}]" if ip else "no client yet"
                log.warning("session process %d (%s) killed by %s", pid, who, _signame(-status))
            self._forget_live(pid)
            self.leaving.discard(pid)
            spare = self.spares.pop(pid, None)
            if spare is not None:
                spare.close()

    def _forget_live(self, pid: int) -> None:
        fd = self.live.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def _sessions_ended(self) -> None:
        """Forget the sessions that have said they are over (their end of the pipe closed)."""
        if not self.live:
            return
        by_fd = {fd: pid for pid, fd in self.live.items()}
        ended, _, _ = select.select(list(by_fd), [], [], 0)
        for fd in ended:
            self._forget_live(by_fd[fd])

    def live_sessions(self, ip: str | None = None) -> int:
        """Sessions still open (from ``ip``), as of the last :meth:`_sessions_ended`."""
        return sum(1 for pid in self.live if ip is None or self.children.get(pid) == ip)

    def _drop_spares(self) -> None:
        """Send the spares away: each leaves when its socketpair closes."""
        for sock in self.spares.values():
            sock.close()
        self.leaving.update(self.spares)
        self.spares.clear()

    def _fork(self) -> int:
        # Objects the parent made so far are never collected in a child: a
        # collection there would touch (copy-on-write) every page of the heap.
        gc.freeze()
        pid = self.procs.fork_here("smtpd")
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            Stress.active = self.stress
            for sock in [*self.sockets, *self.spares.values()]:
                sock.close()
            for fd in self.live.values():
                os.close(fd)
            self.live.clear()
        return pid

    def _fork_spare(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = self._fork()
        if pid:
            theirs.close()
            self.spares[pid] = ours
            return
        ours.close()

        def wait_and_serve() -> None:
            data, fds, _flags, _addr = socket.recv_fds(theirs, 256, 1)
            if fds:  # nothing (the socketpair closed): no longer needed
                conn = socket.socket(fileno=fds[0])
                # The socketpair stays open while the session lives: see Listener.live.
                ip = data.decode("ascii", "replace")
                serve_connection(self.config, conn, ip, self.mode, on_end=theirs.close)
            theirs.close()

        run_and_exit(wait_and_serve)

    def _hand_to_spare(self, conn: socket.socket, ip: str) -> bool:
        while self.spares:
            pid, sock = self.spares.popitem()
            try:
                socket.send_fds(sock, [ip.encode("ascii", "replace")], [conn.fileno()])
            except OSError:
                sock.close()
                continue  # that spare is gone; reap() collects it
            self.children[pid] = ip
            self.live[pid] = sock.detach()
            if self.stress:
                self._tell_stress(pid)  # forked before the stress began
            return True
        return False

    def accept(self, listener: socket.socket) -> None:
        try:
            conn, addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            return
        # Replies are small writes that must not wait for delayed ACKs (Nagle).
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setblocking(True)
        ip = _plain_ip(str(addr[0])) if isinstance(addr, tuple) and addr else "unknown"
        smtpd = self.config.smtpd
        self.reap()
        limit_client = smtpd.max_connections_per_client
        if limit_client and not smtpd.limit_relay_networks and self.config.may_relay(ip):
            limit_client = 0  # relay_networks are exempt, as Postfix exempts $mynetworks
        self._sessions_ended()  # one poll of the sessions' pipes for both counts
        per_client = self.live_sessions(ip)
        self._check_stress()
        if (
            (smtpd.max_connections and self.live_sessions() >= smtpd.max_connections)
            or (limit_client and per_client >= limit_client)
            or self._stress_refuses(ip, per_client)
        ):
            maillog.rejected("connect", f"[{ip}]", "too many connections")
            try:
                conn.settimeout(1.0)
                conn.sendall(R.TOO_MANY_CONNECTIONS.encode())
            except OSError:
                pass
            conn.close()
            return
        if self._hand_to_spare(conn, ip):
            conn.close()
            return
        ours, theirs = os.pipe()
        pid = self._fork()
        if pid == 0:
            run_and_exit(
                lambda: serve_connection(
                    self.config, conn, ip, self.mode, on_end=lambda: os.close(theirs)
                )
            )
        os.close(theirs)
        self.children[pid] = ip
        self.live[pid] = ours
        conn.close()
        self._check_stress()


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


WARM_UP = (
    b"EHLO warm-up.invalid\r\n",
    b"MAIL FROM:<warm-up@warm-up.invalid>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"RCPT TO:<nobody@warm-up.invalid>\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
)


def _warm_up(config: configmod.Config) -> None:
    """One session in the listener itself, over a socketpair, before any fork.

    CPython 3.11 specialises the bytecode of a function after its first
    executions, and the policy fills its caches (relay networks) on first
    use: done here once, in pages every child shares, instead of written
    (and so copied) in each child. No DATA: the queue is not involved.
    """
    ours, theirs = socket.socketpair()
    try:
        with mglog.muted(), ours, theirs:
            session = Session(config, Channel(theirs, 5.0), "127.0.0.1")
            session.policy.sender_checks = False  # never a DNS lookup before serving
            session.channel.send(session.server.greeting())
            for line in WARM_UP:
                session._handle(session.server.receive_data(line))
                ours.recv(READ_SIZE)
    except Exception as exc:  # only an optimisation: never a reason not to serve
        log.debug("warm-up session failed: %s", type(exc).__name__)


def bind(addr: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr.strip("[]"), port))
    sock.listen(128)
    return sock
