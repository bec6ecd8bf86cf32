"""One SMTP session of mailgrave-smtpd: the connection (a socket, TLS or not, or
fds 0/1), the policy from mailgrave.yaml, and the loop that feeds the protocol
core (:mod:`mailgrave.smtp.server`) and carries out its events.

Every module this one imports is paid for on every connection in
``Accept=yes`` mode: see :data:`mailgrave.smtpd.IMPORT_BUDGET`.
"""

from __future__ import annotations

# _socket, not socket: socket.py imports enum and selectors, which a session
# does without; a session's socket is a ``_socket.socket``.
import _socket
import os
import select
import time

from mailgrave import config as configmod
from mailgrave import log as mglog
from mailgrave import maillog
from mailgrave.ctrl import QueueClient
from mailgrave.envelope import Envelope
from mailgrave.errors import PermFail, TempFail, leading_status
from mailgrave.fileio import write_all
from mailgrave.recipients import recipient_exists
from mailgrave.smtp import replies as R
from mailgrave.smtp import server as S

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable
    from typing import Any

log = mglog.getLogger(__name__)

READ_SIZE = 64 * 1024
DRAIN_TIME = 1.0  # seconds spent reading what the client still sends, on close
DRAIN_LIMIT = 1024 * 1024
MAX_HEADER = 64 * 1024  # octets of header kept for an authenticated client's From: check


MODES = ("smtp", "submission", "smtps")


class ConfigPolicy:
    """The server's policy from mailgrave.yaml for one client address.

    ``mode``: ``smtp`` (port 25), ``submission`` (587: STARTTLS, then AUTH before
    MAIL) or ``smtps`` (465: TLS from the first byte, then AUTH before MAIL).
    """

    def __init__(self, config: configmod.Config, client_ip: str, mode: str = "smtp") -> None:
        smtpd = config.smtpd
        self.config = config
        self.client_ip = client_ip
        self.hostname = config.hostname
        self.max_message_size = smtpd.max_message_size
        self.max_recipients = smtpd.max_recipients
        self.max_errors = smtpd.max_errors
        self.tls_available = bool(smtpd.tls.certificate and smtpd.tls.key)
        self.bare_lf = smtpd.bare_lf
        self.checks: Any = None  # mailgrave.smtpd.checks.SenderChecks, loaded when needed
        self.sender_checks = True  # False in the listener's warm-up session (no DNS)
        self.submission = mode != "smtp"
        # One stat per connection; the file itself is read only when a client authenticates.
        # With auth.dovecot_socket, AUTH is offered whenever TLS is: Dovecot down is a 454.
        self.auth_available = self.tls_available and (
            bool(config.auth.dovecot_socket) or os.path.exists(config.auth.users_file)
        )
        self.max_auth_failures = config.auth.max_failures
        self._rate: Any = None

    def sender_allowed(self, login: str, sender: str) -> bool:
        from mailgrave.smtpd import auth  # only for authenticated sessions

        return auth.sender_allowed(self.config, login, sender)

    def within_rate(self, login: str, recipients: int) -> bool:
        return bool(self.rate_limiter().allows(login, recipients))

    def rate_limiter(self) -> Any:
        if self._rate is None:
            from mailgrave.smtpd import auth  # only for authenticated sessions

            self._rate = auth.RateLimiter(self.config)
        return self._rate

    def is_local_domain(self, domain: str) -> bool:
        return self.config.is_local_domain(domain)

    def recipient_exists(self, local: str, domain: str) -> bool:
        return recipient_exists(self.config, local, domain)

    def may_relay(self) -> bool:
        return self.config.may_relay(self.client_ip)

    def checks_apply(self) -> bool:
        """Whether sender authentication (checks.spf, .dkim, .dmarc) applies to this
        client: the one place that says so (an untrusted client on port 25, not
        in relay_networks; authenticated sessions are skipped where the login is
        known: the core's MAIL, the session's queue attributes). Never in the
        listener's warm-up session (no DNS before serving)."""
        return self.sender_checks and not self.may_relay() and not self.submission

    def check_message(self) -> bool:
        """Whether mailgrave-queue is to verify DKIM and DMARC (the 'check' attribute)."""
        checks = self.config.checks
        return (checks.dkim != "off" or checks.dmarc != "off") and self.checks_apply()

    def check_mail(self, helo: str, sender: str) -> R.Reply | None:
        """Sender authentication (checks.spf) for mail from outside (checks_apply)."""
        if self.config.checks.spf == "off" or not self.checks_apply():
            return None
        if self.checks is None:
            # Lazy: spf, dns and authres load only for a session that checks.
            from mailgrave.smtpd.checks import SenderChecks

            self.checks = SenderChecks(self.config, self.client_ip)
        refusal: R.Reply | None = self.checks.mail_from(helo, sender)
        return refusal

    def auth_results(self) -> str:
        """The Authentication-Results: value for the queue ('' when nothing was checked)."""
        return str(self.checks.header_value()) if self.checks is not None else ""


# Server contexts loaded before --chroot (preload_tls): the files are out of reach then.
_tls_contexts: dict[tuple[str, str], Any] = {}


def _tls_context(certificate: str, key: str) -> Any:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certificate, key)
    return ctx


def preload_tls(config: configmod.Config) -> None:
    """Load smtpd.tls's certificate and key now, for every later STARTTLS or smtps
    session of this process and its children (before mailgrave-smtpd --chroot)."""
    tls = config.smtpd.tls
    if tls.certificate and tls.key:
        _tls_contexts[(tls.certificate, tls.key)] = _tls_context(tls.certificate, tls.key)


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
            return bool(self.sock.recv(1, _socket.MSG_PEEK))
        except OSError:
            return False

    def recv(self, wait: float | None = None) -> bytes:
        """Bytes from the client; b"" at EOF; TimeoutError when idle too long
        (``wait`` seconds if given, else the channel's timeout)."""
        timeout = self.timeout if wait is None else max(wait, 0.0)
        if self.sock is None:
            if timeout is not None and not self.readable(timeout):
                raise TimeoutError
            return os.read(0, READ_SIZE)
        self.sock.settimeout(timeout)
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
        if self.sock is None:
            raise OSError("TLS needs a socket")
        ctx = _tls_contexts.get((certificate, key)) or _tls_context(certificate, key)
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
            self.sock.shutdown(_socket.SHUT_WR)
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


class Stress:
    """Whether connections run short (warm-parent mode): the listener says so with
    SIGUSR1 to its children, or before it forks one; sessions then use
    ``smtpd.stress_timeout``. A plain flag: set from a signal handler."""

    active = False

    @staticmethod
    def enter(_signum: object = None, _frame: object = None) -> None:
        Stress.active = True


class Deadline:
    """When the client must have finished its current command, or its DATA.

    Postfix's smtpd_per_request_deadline and smtpd_min_data_rate: a request
    starts when the server has answered the previous one; a command line must be
    complete ``command_deadline`` seconds later however slowly it trickles in,
    and DATA earns 1/``min_data_rate`` seconds more for each byte received. The
    idle timeout (``smtpd.timeout``) still applies to each read. Under stress
    both shrink to ``stress_timeout``.
    """

    def __init__(self, smtpd: configmod.Smtpd) -> None:
        self.smtpd = smtpd
        self.start = time.monotonic()
        self.data_bytes = 0

    def restart(self) -> None:
        self.start = time.monotonic()
        self.data_bytes = 0

    def _limits(self) -> tuple[float, float]:
        timeout, deadline = self.smtpd.timeout, self.smtpd.command_deadline
        if Stress.active and self.smtpd.stress_timeout:
            stress = self.smtpd.stress_timeout
            timeout = min(timeout, stress) if timeout else stress
            deadline = min(deadline, stress) if deadline else stress
        return timeout, deadline

    def wait(self, in_data: bool) -> float | None:
        """How long the next read may wait: the idle timeout or what is left of
        the deadline, whichever ends first; at most ``stress_timeout`` while not
        under stress, so that a session notices the listener's SIGUSR1 in time."""
        timeout, deadline = self._limits()
        waits = []
        if timeout:
            waits.append(timeout)
        if deadline:
            end = self.start + deadline
            rate = self.smtpd.min_data_rate
            if in_data and rate:
                end += self.data_bytes / rate
            waits.append(end - time.monotonic())
        if not Stress.active and self.smtpd.stress_timeout:
            waits.append(self.smtpd.stress_timeout)
        return min(waits) if waits else None

    def expired(self, in_data: bool) -> bool:
        """Did the read that just timed out hit the idle timeout or the deadline?"""
        deadline = self._limits()[1]
        if not deadline:
            return False
        end = self.start + deadline
        if in_data and self.smtpd.min_data_rate:
            end += self.data_bytes / self.smtpd.min_data_rate
        return time.monotonic() >= end


class Session:
    """One connection: reads, feeds the protocol core, carries out its events."""

    def __init__(
        self, config: configmod.Config, channel: Channel, client_ip: str, mode: str = "smtp"
    ) -> None:
        self.config = config
        self.channel = channel
        self.client_ip = client_ip
        self.mode = mode
        self.policy = ConfigPolicy(config, client_ip, mode)
        self.server = S.Server(self.policy, tls_active=mode == "smtps")
        # The header block of the message being received (authenticated sessions:
        # the From: check), bounded.
        self.header: bytearray | None = None
        self.queue: QueueClient | None = None
        self.queue_error: R.Reply | None = None
        self.current: S.MessageStart | None = None
        self.closed = False
        self.close_reason = "connection lost"
        self.rejections = 0
        self.deadline = Deadline(config.smtpd)
        self._last_read = time.monotonic()
        # Called once when the session is over, before its last reply goes out:
        # the warm parent counts only live sessions against the limits.
        self.on_end: Callable[[], None] | None = None

    def _ended(self) -> None:
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end()

    def run(self) -> None:
        log.info("connect from [%s]", self.client_ip)
        try:
            self._run()
        except (OSError, TimeoutError) as exc:
            self.close_reason = f"connection lost: {type(exc).__name__}"
        finally:
            self._ended()
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
        if self.mode == "smtps":
            # RFC 8314: TLS from the first byte, then the greeting inside it.
            self._start_tls()
        # No pause on submission (RFC 6409 clients are not spam robots, and
        # their users wait for it), nor for relay_networks unless configured.
        smtpd = self.config.smtpd
        pause = smtpd.greet_pause if self.mode == "smtp" else 0.0
        if pause and not smtpd.greet_pause_relay_networks and self.config.may_relay(self.client_ip):
            pause = 0.0  # a trusted client: greeted at once
        if pause and self.channel.readable(pause):
            if not self.channel.peek():
                self.close_reason = "client left before the greeting"
                return  # a port probe
            maillog.rejected("connect", f"[{self.client_ip}]", "talked before the greeting")
            self.channel.send(R.EARLY_TALKER.encode())
            self.close_reason = "talked before the greeting"
            return
        self.channel.send(self.server.greeting())
        deadline = self.deadline
        deadline.restart()
        self._last_read = time.monotonic()
        while not self.closed:
            in_data = self.server.state == S.State.DATA
            try:
                data = self.channel.recv(deadline.wait(in_data))
            except TimeoutError:
                if not self._timed_out(in_data):
                    continue  # only the stress poll: nothing ran out
                return
            self._last_read = time.monotonic()
            if in_data:
                deadline.data_bytes += len(data)
            self._handle(self.server.receive_data(data))

    def _timed_out(self, in_data: bool) -> bool:
        """A read timed out: close if the idle timeout or the deadline ran out."""
        deadline = self.deadline
        timeout = deadline._limits()[0]
        idle = bool(timeout) and time.monotonic() - self._last_read >= timeout - 0.01
        late = deadline.expired(in_data)
        if not (idle or late):
            return False
        self._handle(self.server.timeout())
        what = "DATA" if in_data else "command"
        self.close_reason = f"{what} deadline" if late else "idle timeout"
        if late:
            maillog.rejected("timeout", f"[{self.client_ip}]", f"{what} deadline exceeded")
        return True

    def _handle(self, events: list[S.Event]) -> None:
        pending = bytearray()

        def flush() -> None:
            if pending:
                self.channel.send(bytes(pending))
                pending.clear()
                self.deadline.restart()  # a reply: the next request starts now

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
            elif isinstance(ev, S.Authenticate):
                flush()
                queue[:0] = self._authenticate(ev)
            elif isinstance(ev, S.AuthFailed):
                maillog.auth_failed(self.client_ip, ev.mechanism, ev.login, ev.reason)
            elif isinstance(ev, S.StartTLS):
                flush()
                self._start_tls()
                queue[:0] = self.server.tls_started()
            elif isinstance(ev, S.Close):
                self._ended()
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
            log.info("TLS handshake with [%s] failed: %s", self.client_ip, _tls_reason(exc))
            self.closed = True
            raise
        log.info("TLS with [%s]: %s", self.client_ip, self.channel.tls_info())

    def _authenticate(self, ev: S.Authenticate) -> list[S.Event]:
        """Check the credentials in this process (no other session waits for the hash)."""
        if self.config.auth.dovecot_socket:
            return self._authenticate_dovecot(ev)
        from mailgrave import users  # argon2 only for sessions that authenticate

        try:
            ok = users.verify(self.config.auth.users_file, ev.login, ev.password)
        except users.UsersError as exc:
            log.warning("AUTH unavailable: %s", exc)
            return self.server.auth_unavailable()
        if ok:
            log.info("[%s] authenticated as %s", self.client_ip, mglog.quote(ev.login))
        return self.server.auth_result(ok)

    def _authenticate_dovecot(self, ev: S.Authenticate) -> list[S.Event]:
        """Ask Dovecot (auth.dovecot_socket); no verdict is a 454, never a pass."""
        from mailgrave import dovecot  # only for sessions that authenticate

        try:
            name = dovecot.authenticate(
                self.config.auth.dovecot_socket,
                ev.login,
                ev.password,
                client_ip=self.client_ip,
                secured=self.server.tls,
            )
        except dovecot.DovecotError as exc:
            log.warning("AUTH unavailable: Dovecot: %s", exc)
            return self.server.auth_unavailable()
        if name is not None:
            log.info("[%s] authenticated as %s", self.client_ip, mglog.quote(name))
        return self.server.auth_result(name is not None, name or "")

    def _open_queue(self, ev: S.MessageStart) -> None:
        self.current, self.queue, self.queue_error = ev, None, None
        self.header = bytearray() if self.server.login else None
        attrs = {"proto": ev.proto, "helo": ev.helo, "addr": self.client_ip}
        auth_results = self.policy.auth_results()
        if auth_results:
            attrs["authres"] = auth_results
        if self.server.login and self.config.auth.record_login:
            attrs["login"] = self.server.login
        if self.policy.check_message() and not self.server.login:
            attrs["check"] = "1"
        attrs = {k: v.replace("\0", "").replace("\n", "") for k, v in attrs.items()}
        try:
            self.queue = QueueClient(
                self.config.socket_path("queue.ctrl"),
                attrs=attrs,
                envelope=Envelope(
                    ev.sender, ev.recipients, ev.ret, ev.envid, ev.notify, ev.orcpt, ev.utf8
                ),
            )
        except (TempFail, OSError, ValueError) as exc:
            log.warning("cannot submit to the queue: %s", exc)
            self.queue_error = R.QUEUE_TEMPFAIL

    def _write_queue(self, data: bytes) -> None:
        if self.queue is None:
            return
        header = self.header
        if header is not None and len(header) < MAX_HEADER and b"\r\n\r\n" not in header:
            header += data[: MAX_HEADER - len(header)]
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
        login = self.server.login
        if login and self.header is not None:
            from mailgrave.smtpd import auth  # only for authenticated sessions

            head, blank, _ = bytes(self.header).partition(b"\r\n\r\n")
            complete = blank or len(self.header) < MAX_HEADER
            if not complete or not auth.from_allowed(self.config, login, head + b"\r\n\r\n"):
                qc.abort()
                maillog.rejected("DATA", f"[{self.client_ip}]", "From: not owned by the login")
                return self.server.message_failed(R.FROM_NOT_OWNED)
        try:
            qid = qc.commit()
        except TempFail as exc:
            log.warning("queue refused the message temporarily: %s", exc.text)
            if exc.text.startswith("4.3.1"):
                return self.server.message_failed(
                    R.Reply(452, "4.3.1", "Insufficient system storage")
                )
            return self.server.message_failed(_policy_reply(exc.text, 451) or R.QUEUE_TEMPFAIL)
        except PermFail as exc:
            log.warning("queue refused the message: %s", exc.text)
            refused = _policy_reply(exc.text, 550) or R.Reply(554, "5.3.0", "Message refused")
            return self.server.message_failed(refused)
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
            if login:
                self.policy.rate_limiter().record(login, len(ev.recipients))
        return self.server.message_queued(qid)

    def _abort_queue(self) -> None:
        if self.queue is not None:
            self.queue.abort()
            self.queue = None


def _policy_reply(text: str, code: int) -> R.Reply | None:
    """The queue's own refusal of a checked message (DKIM, DMARC: status 4.7.x or
    5.7.x) passed on to the client; None for any other queue failure."""
    status, rest = leading_status(text)
    if not status.startswith(("4.7.", "5.7.")):
        return None
    return R.Reply(code, status, rest)


def serve_connection(
    config: configmod.Config,
    sock: socket.socket | None,
    client_ip: str | None = None,
    mode: str = "smtp",
    on_end: Callable[[], None] | None = None,
) -> None:
    """Run one SMTP session on ``sock`` (or on fds 0/1 when None); ``on_end`` is
    called when the session is over, before its last reply is sent."""
    channel = Channel(sock, config.smtpd.timeout)
    session = Session(config, channel, client_ip or _client_ip(sock), mode)
    session.on_end = on_end
    session.run()


def _tls_reason(exc: OSError) -> str:
    """What went wrong in a handshake, as OpenSSL says it ("wrong version number",
    "certificate verify failed: ..."); the exception's type when it says nothing."""
    reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
    if not reason:
        return type(exc).__name__
    return str(reason).replace("_", " ").lower()
