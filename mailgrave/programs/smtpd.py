"""mailgrave-smtpd: the SMTP listener; drives mailgrave.smtp.server over one connection.

Modes: inetd (the connection on stdin/stdout, systemd ``Accept=yes``);
``LISTEN_FDS`` (systemd ``Accept=no`` or ``mailgrave run``: a warm parent
accepts and forks one child per connection); ``--bind ADDR --port N`` (the
same as ``LISTEN_FDS``, with a socket of its own).
"""

from __future__ import annotations

import gc
import os
import select
import sys
import time

from mailgrave import config as configmod
from mailgrave import log as mglog
from mailgrave.errors import EXIT_OK, EXIT_TEMP, PermFail, TempFail
from mailgrave.fileio import write_all
from mailgrave.smtp import replies as R
from mailgrave.smtp import server as S

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import socket
    from collections.abc import Callable
    from typing import Any, NoReturn

    from mailgrave import maillog
    from mailgrave.queueclient import QueueClient
else:
    import _socket

    class _LazyModule:
        """A module imported when first used. In Accept=yes mode every import is paid
        per connection: ``signal`` (only the listener needs it), ``socket`` (enum,
        selectors) and ``maillog`` (refusals) are not imported for a plain session;
        a session's socket is a ``_socket.socket``, and the upper-case constants
        come from ``_socket``."""

        def __init__(self, name, constants=None):
            self._name = name
            self._constants = constants

        def __getattr__(self, attr):
            if self._constants is not None and attr.isupper():
                try:
                    return getattr(self._constants, attr)
                except AttributeError:
                    pass
            __import__(self._name)
            self.__dict__[attr] = value = getattr(sys.modules[self._name], attr)
            return value

    signal = _LazyModule("signal")
    socket = _LazyModule("socket", _socket)
    maillog = _LazyModule("mailgrave.maillog")

log = mglog.getLogger(__name__)

READ_SIZE = 64 * 1024
REAP_INTERVAL = 0.5
DRAIN_TIME = 1.0  # seconds spent reading what the client still sends, on close
DRAIN_LIMIT = 1024 * 1024


class ConfigPolicy:
    """The server's policy from mailgrave.yaml for one client address."""

    def __init__(self, config: configmod.Config, client_ip: str) -> None:
        smtpd = config.smtpd
        self.config = config
        self.client_ip = client_ip
        self.hostname = config.hostname
        self.max_message_size = smtpd.max_message_size
        self.max_recipients = smtpd.max_recipients
        self.max_errors = smtpd.max_errors
        self.tls_available = bool(smtpd.tls.certificate and smtpd.tls.key)

    def is_local_domain(self, domain: str) -> bool:
        return self.config.is_local_domain(domain)

    def recipient_exists(self, local: str, domain: str) -> bool:
        try:
            from mailgrave.local.routing import recipient_exists
        except ImportError:  # pragma: no cover - the local stage is not installed
            return local.lower() == "postmaster" or f"{local}@{domain}" in self.config.local.virtual
        return recipient_exists(self.config, local, domain)

    def may_relay(self) -> bool:
        return self.config.may_relay(self.client_ip)


class Channel:
    """The connection: a socket (possibly TLS-wrapped) or a pair of pipes."""

    def __init__(self, sock: socket.socket | None, timeout: float) -> None:
        self.sock: Any = sock
        self.timeout = timeout or None

    def readable(self, wait: float) -> bool:
        if self.sock is not None and getattr(self.sock, "pending", lambda: 0)():
            return True
        fd = self.sock.fileno() if self.sock is not None else 0
        ready, _, _ = select.select([fd], [], [], wait)
        return bool(ready)

    def peek(self) -> bool:
        """Is there data waiting (as opposed to EOF)?"""
        if self.sock is None:
            return True
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK))
        except OSError:
            return False

    def recv(self) -> bytes:
        """Bytes from the client; b"" at EOF; TimeoutError when idle too long."""
        if self.sock is None:
            if self.timeout is not None and not self.readable(self.timeout):
                raise TimeoutError
            return os.read(0, READ_SIZE)
        self.sock.settimeout(self.timeout)
        try:
            return bytes(self.sock.recv(READ_SIZE))
        except TimeoutError as exc:
            raise TimeoutError from exc

    def send(self, data: bytes) -> None:
        if self.sock is None:
            write_all(1, data)
        else:
            self.sock.sendall(data)

    def start_tls(self, certificate: str, key: str) -> None:
        import ssl

        if self.sock is None:
            raise OSError("TLS needs a socket")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(certificate, key)
        self.sock.settimeout(self.timeout)
        self.sock = ctx.wrap_socket(self.sock, server_side=True)

    def tls_info(self) -> str:
        try:
            return f"{self.sock.version()} {self.sock.cipher()[0]}"
        except Exception:
            return "TLS"

    def close(self) -> None:
        """Close gracefully: a reply must not be lost to a reset caused by unread input."""
        if self.sock is None:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + DRAIN_TIME
            drained = 0
            while drained < DRAIN_LIMIT and time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = self.sock.recv(READ_SIZE)
                if not data:
                    break
                drained += len(data)
        except (OSError, ValueError):
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def _client_ip(sock: socket.socket | None) -> str:
    if sock is not None:
        try:
            peer = sock.getpeername()
            if isinstance(peer, tuple) and peer:
                return _plain_ip(str(peer[0]))
        except OSError:
            pass
    for var in ("REMOTE_ADDR", "TCPREMOTEIP"):
        if os.environ.get(var):
            return _plain_ip(os.environ[var])
    return "unknown"


def _plain_ip(ip: str) -> str:
    """The address in its usual text form; an IPv4-mapped IPv6 address as IPv4.

    With inet_pton/inet_ntop rather than :mod:`ipaddress` (an import per
    connection in Accept=yes mode); the rare forms whose text inet_ntop writes
    differently from ipaddress (IPv4-compatible ``::a.b.c.d``) go to ipaddress.
    """
    import _socket

    text, ip = ip, ip.split("%")[0]
    try:
        return _socket.inet_ntop(_socket.AF_INET, _socket.inet_pton(_socket.AF_INET, ip))
    except (OSError, ValueError):  # ValueError: a NUL in the text
        pass
    try:
        packed = _socket.inet_pton(_socket.AF_INET6, ip)
    except (OSError, ValueError):
        return text  # not an address: as it came
    if packed[:12] == b"\0" * 10 + b"\xff\xff":
        return _socket.inet_ntop(_socket.AF_INET, packed[12:])
    if packed[:12] != b"\0" * 12:
        return _socket.inet_ntop(_socket.AF_INET6, packed)
    import ipaddress

    return str(ipaddress.IPv6Address(packed))


class Session:
    """One connection: reads, feeds the protocol core, carries out its events."""

    def __init__(self, config: configmod.Config, channel: Channel, client_ip: str) -> None:
        self.config = config
        self.channel = channel
        self.client_ip = client_ip
        self.server = S.Server(ConfigPolicy(config, client_ip))
        self.queue: QueueClient | None = None
        self.queue_error: R.Reply | None = None
        self.current: S.MessageStart | None = None
        self.closed = False
        self.close_reason = "connection lost"
        self.rejections = 0

    def run(self) -> None:
        log.info("connect from [%s]", self.client_ip)
        try:
            self._run()
        except (OSError, TimeoutError) as exc:
            self.close_reason = f"connection lost: {type(exc).__name__}"
        finally:
            self._abort_queue()
            self.channel.close()
            log.info(
                "disconnect from [%s] messages=%d errors=%d (%s)",
                self.client_ip,
                self.server.messages,
                self.server.errors,
                self.close_reason,
            )

    def _run(self) -> None:
        pause = self.config.smtpd.greet_pause
        if pause and self.channel.readable(pause):
            if not self.channel.peek():
                self.close_reason = "client left before the greeting"
                return  # a port probe
            maillog.rejected("connect", f"[{self.client_ip}]", "talked before the greeting")
            self.channel.send(R.EARLY_TALKER.encode())
            self.close_reason = "talked before the greeting"
            return
        self.channel.send(self.server.greeting())
        while not self.closed:
            try:
                data = self.channel.recv()
            except TimeoutError:
                self._handle(self.server.timeout())
                return
            self._handle(self.server.receive_data(data))

    def _handle(self, events: list[S.Event]) -> None:
        pending = bytearray()

        def flush() -> None:
            if pending:
                self.channel.send(bytes(pending))
                pending.clear()

        queue = list(events)
        while queue:
            ev = queue.pop(0)
            if isinstance(ev, S.Output):
                pending += ev.data
            elif isinstance(ev, S.MessageStart):
                self._open_queue(ev)
            elif isinstance(ev, S.MessageData):
                self._write_queue(ev.data)
            elif isinstance(ev, S.MessageComplete):
                flush()
                queue[:0] = self._commit(ev.size)
            elif isinstance(ev, S.MessageAborted):
                self._abort_queue()
            elif isinstance(ev, S.Rejected):
                self.rejections += 1
                maillog.rejected(ev.stage, f"[{self.client_ip}]", ev.reason)
            elif isinstance(ev, S.StartTLS):
                flush()
                self._start_tls()
                queue[:0] = self.server.tls_started()
            elif isinstance(ev, S.Close):
                flush()
                self.close_reason = ev.reason
                self.closed = True
                return
        flush()

    def _start_tls(self) -> None:
        tls = self.config.smtpd.tls
        try:
            self.channel.start_tls(tls.certificate, tls.key)
        except OSError as exc:
            log.info("TLS handshake with [%s] failed: %s", self.client_ip, type(exc).__name__)
            self.closed = True
            raise
        log.info("TLS with [%s]: %s", self.client_ip, self.channel.tls_info())

    def _open_queue(self, ev: S.MessageStart) -> None:
        from mailgrave.envelope import Envelope
        from mailgrave.queueclient import QueueClient

        self.current, self.queue, self.queue_error = ev, None, None
        attrs = {"proto": ev.proto, "helo": ev.helo, "addr": self.client_ip}
        attrs = {k: v.replace("\0", "").replace("\n", "") for k, v in attrs.items()}
        try:
            self.queue = QueueClient(
                self.config.socket_path("queue.ctrl"),
                attrs=attrs,
                envelope=Envelope(ev.sender, ev.recipients),
            )
        except (TempFail, OSError, ValueError) as exc:
            log.warning("cannot submit to the queue: %s", exc)
            self.queue_error = R.QUEUE_TEMPFAIL

    def _write_queue(self, data: bytes) -> None:
        if self.queue is None:
            return
        try:
            self.queue.write(data)
        except OSError as exc:
            log.warning("queue connection failed: %s", type(exc).__name__)
            self._abort_queue()
            self.queue_error = R.QUEUE_TEMPFAIL

    def _commit(self, size: int) -> list[S.Event]:
        qc, self.queue = self.queue, None
        if qc is None:
            return self.server.message_failed(self.queue_error or R.QUEUE_TEMPFAIL)
        try:
            qid = qc.commit()
        except TempFail as exc:
            log.warning("queue refused the message temporarily: %s", exc.text)
            return self.server.message_failed(R.QUEUE_TEMPFAIL)
        except PermFail as exc:
            log.warning("queue refused the message: %s", exc.text)
            return self.server.message_failed(R.Reply(554, "5.3.0", "Message refused"))
        except OSError as exc:
            log.warning("queue connection failed: %s", type(exc).__name__)
            return self.server.message_failed(R.QUEUE_TEMPFAIL)
        ev = self.current
        if ev is not None:
            log.info(
                "%s: accepted from [%s] sender=<%s> rcpts=<%s> size=%d",
                qid,
                self.client_ip,
                ev.sender,
                ">,<".join(ev.recipients),
                size,
                extra={"fields": {"MAILGRAVE_QID": qid}},
            )
        return self.server.message_queued(qid)

    def _abort_queue(self) -> None:
        if self.queue is not None:
            self.queue.abort()
            self.queue = None


def serve_connection(
    config: configmod.Config, sock: socket.socket | None, client_ip: str | None = None
) -> None:
    """Run one SMTP session on ``sock`` (or on fds 0/1 when None)."""
    channel = Channel(sock, config.smtpd.timeout)
    Session(config, channel, client_ip or _client_ip(sock)).run()


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

    def __init__(self, config: configmod.Config, sockets: list[socket.socket]) -> None:
        self.config = config
        self.sockets = sockets
        self.children: dict[int, str] = {}  # pid -> client address, one per connection
        self.spares: dict[int, socket.socket] = {}  # pid -> our end of its socketpair
        self.leaving: set[int] = set()  # spares sent away, not yet reaped
        self.last_accept = 0.0
        self.stopping = False

    def run(self) -> int:
        # Import once in the warm parent what every child would import per
        # connection (the children inherit it through fork).
        import mailgrave.envelope
        import mailgrave.local.routing
        import mailgrave.queueclient  # noqa: F401

        if self.config.smtpd.tls.certificate:
            import ssl  # noqa: F401
        _warm_up(self.config)

        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for sock in self.sockets:
            sock.setblocking(False)
        idle_exit = self.config.smtpd.idle_exit
        last_activity = time.monotonic()
        while not self.stopping:
            self.reap()
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

    def reap(self) -> None:
        while self.children or self.spares or self.leaving:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                self._drop_spares()
                self.leaving.clear()
                return
            if pid == 0:
                return
            self.children.pop(pid, None)
            self.leaving.discard(pid)
            spare = self.spares.pop(pid, None)
            if spare is not None:
                spare.close()

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
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            for sock in [*self.sockets, *self.spares.values()]:
                sock.close()
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
            theirs.close()
            if fds:  # nothing (the socketpair closed): no longer needed
                conn = socket.socket(fileno=fds[0])
                serve_connection(self.config, conn, data.decode("ascii", "replace"))

        _serve_and_exit(wait_and_serve)

    def _hand_to_spare(self, conn: socket.socket, ip: str) -> bool:
        while self.spares:
            pid, sock = self.spares.popitem()
            try:
                socket.send_fds(sock, [ip.encode("ascii", "replace")], [conn.fileno()])
            except OSError:
                continue  # that spare is gone; reap() collects it
            finally:
                sock.close()
            self.children[pid] = ip
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
        per_client = sum(1 for c in self.children.values() if c == ip)
        if (smtpd.max_connections and len(self.children) >= smtpd.max_connections) or (
            smtpd.max_connections_per_client and per_client >= smtpd.max_connections_per_client
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
        pid = self._fork()
        if pid == 0:
            _serve_and_exit(lambda: serve_connection(self.config, conn, ip))
        self.children[pid] = ip
        conn.close()


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
            session.channel.send(session.server.greeting())
            for line in WARM_UP:
                session._handle(session.server.receive_data(line))
                ours.recv(READ_SIZE)
    except Exception as exc:  # only an optimisation: never a reason not to serve
        log.debug("warm-up session failed: %s", type(exc).__name__)


def _serve_and_exit(session: Callable[[], None]) -> NoReturn:
    """In a child: run the session, then leave without the interpreter's teardown."""
    code = 0
    try:
        session()
    except BaseException:
        log.exception("session failed")
        code = EXIT_TEMP
    finally:
        mglog.shutdown()
        os._exit(code)


def _bind(addr: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr.strip("[]"), port))
    sock.listen(128)
    return sock


def _parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="mailgrave-smtpd",
        description="MailGrave's SMTP server. With no listening socket (LISTEN_FDS) and no "
        "--bind/--port, serves one connection on stdin/stdout (inetd style).",
    )
    parser.add_argument("--config", metavar="PATH", help="configuration file")
    parser.add_argument("--bind", metavar="ADDR", help="listen on ADDR (with --port)")
    parser.add_argument("--port", metavar="N", type=int, help="listen on TCP port N")
    parser.add_argument("--debug", action="store_true", help="log debugging details")
    return parser


class _Args:
    config: str | None = None
    bind: str | None = None
    port: int | None = None
    debug = False


def _parse_args(argv: list[str]) -> Any:
    """The command line. The forms a unit uses (nothing, ``--config PATH``,
    ``--config=PATH``, ``--debug``) are read here; anything else, ``--help``
    and every error go to argparse, whose import a per-connection start avoids."""
    args = _Args()
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--debug":
            args.debug = True
        elif arg == "--config" and rest and not rest[0].startswith("-"):
            args.config = rest.pop(0)
        elif arg.startswith("--config=") and len(arg) > len("--config="):
            args.config = arg[len("--config=") :]
        else:
            return _parser().parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    config = configmod.load_or_exit(args.config, "mailgrave-smtpd")
    # Nothing smtpd runs uses the stdlib's logging: not importing it (nor the
    # threading it brings, whose fork hooks every child would run) also makes
    # each fork of the listener cheaper.
    mglog.setup("smtpd", debug=args.debug, stdlib=False)
    if args.bind or args.port is not None:
        try:
            sockets = [_bind(args.bind or "127.0.0.1", args.port or 25)]
        except OSError as exc:
            print(f"mailgrave-smtpd: cannot listen: {exc.strerror}", file=sys.stderr)
            return EXIT_TEMP
        return Listener(config, sockets).run()
    from mailgrave import sd

    listeners = sd.listen_fds()
    if listeners:
        return Listener(config, listeners).run()
    sock = sd.stdin_raw_socket()
    try:
        serve_connection(config, sock)
    except Exception:
        log.exception("session failed")
        return EXIT_TEMP
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
