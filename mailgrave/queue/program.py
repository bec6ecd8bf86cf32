"""mailgrave-queue: the only writer of new messages into the spool.

By hand it reads the message on fd 0 and the envelope on fd 1, like
qmail-queue(8).  As a service it serves queue.ctrl (docs/flow.md): one
process, one thread per submission, directory fsyncs shared between
concurrent submissions (group commit, :class:`mailgrave.spool.GroupSync`),
exit after an idle period.
"""

from __future__ import annotations

import os
import pwd
import socket
import sys
from collections.abc import Callable, Iterator

from mailgrave import config as configmod
from mailgrave import ctrl, headers, maillog, privs
from mailgrave import log as logmod
from mailgrave.envelope import Envelope, EnvelopeError, decode, read_envelope
from mailgrave.errors import EXIT_OK, EXIT_PERM, EXIT_TEMP, PermFail, TempFail
from mailgrave.proc import bind_unix, serve_threads
from mailgrave.queue import dkimsign
from mailgrave.queue.authcheck import Checker
from mailgrave.queue.inbound import Inbound
from mailgrave.sd import listen_fds, peer_uid, stdin_socket
from mailgrave.spool import GroupSync, Spool, Submission
from mailgrave.stageargs import stage_parser

log = logmod.getLogger(__name__)

READ_TIMEOUT = 300.0


class Queue:
    """Commits submissions to the spool (shared by every thread of a service)."""

    def __init__(self, config: configmod.Config) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self.spool.create()
        self.todo_sync = GroupSync(self.spool.path("todo"))
        self.trusted = _trusted_uids(config.queue.trusted_users)
        self.checker = Checker(config)

    def submit(
        self,
        chunks: Iterator[bytes],
        envelope_source: bytes | Callable[[], bytes],
        attrs: dict[str, str] | None,
        uid: int | None,
    ) -> tuple[str, Envelope, int]:
        """Write the envelope and the message into one file, durably; return
        (qid, envelope, size of the message).

        ``envelope_source`` is the raw envelope when it arrives before the
        message (queue.ctrl), or a function that reads it after the message
        (by hand, like qmail-queue).  Raises PermFail/TempFail/EnvelopeError;
        on any failure nothing stays in the spool.
        """
        signer = self._signer(attrs, uid)
        if attrs and uid not in self.trusted:
            attrs = None
        self._check_room(envelope_source)
        entry: Submission | None = None
        qid = "-"
        try:
            entry = Submission(self.spool, self.config.queue.max_message_size)
            qid = entry.qid
            envelope = None
            # smtpd's ask (a trusted attribute): DKIM and DMARC, whose results go
            # into the header only once the message is in (then written by prepend)
            check = bool(attrs and attrs.get("check") and self.checker.active)
            if isinstance(envelope_source, bytes):
                envelope = decode(envelope_source)
                if not check:
                    entry.begin(envelope.encode(), self._received(qid, envelope, attrs, uid))
            # Every client's message loses fields claiming our authserv-id (RFC 8601 §5).
            inbound = self.checker.inbound() if check else Inbound(self.config.hostname)
            for chunk in chunks:
                data = inbound.feed(chunk)
                entry.write(data)
                if signer is not None:
                    signer.feed(data)
            tail = inbound.end()
            entry.write(tail)
            if signer is not None:
                signer.feed(tail)
            if inbound.removed:
                log.info("%s: removed %d forged Authentication-Results:", qid, inbound.removed)
            signature = signer.field() if signer is not None else None
            if check and envelope is not None and attrs is not None:
                attrs = self._checked(qid, inbound, attrs)
                first = (signature or b"") + self._received(qid, envelope, attrs, uid)
                entry.prepend(envelope.encode(), first)
                signature = None  # written above
            if envelope is None:
                assert callable(envelope_source)
                envelope = decode(envelope_source())
                first = (signature or b"") + self._received(qid, envelope, attrs, uid)
                entry.prepend(envelope.encode(), first)
            elif signature:
                entry.insert(signature)
            size = entry.size
            entry.commit(self.todo_sync)
            entry = None
            return qid, envelope, size
        except ConnectionError:
            raise  # the client ended before the message did (an abort): not a spool error
        except OSError as exc:
            log.error("%s: cannot write to the spool: %s", qid, exc.strerror or exc)
            raise TempFail("4.3.0 cannot write to the spool") from None
        finally:
            if entry is not None:
                entry.discard()

    def _checked(self, qid: str, inbound: Inbound, attrs: dict[str, str]) -> dict[str, str]:
        """DKIM and DMARC (checks.dkim, checks.dmarc): the attributes with the
        Authentication-Results: value; PermFail/TempFail when enforce refuses."""
        try:
            return self.checker.check(inbound, attrs)
        except (PermFail, TempFail) as exc:
            log.info("%s: refused from [%s]: %s", qid, attrs.get("addr", "?"), exc.text)
            raise

    def _check_room(self, envelope_source: bytes | Callable[[], bytes]) -> None:
        """Refuse (TempFail 4.3.1) below queue.min_free free bytes, null-sender mail
        (bounces) only below half of it: the reserve keeps room for deliveries'
        state and for bounces (docs/man/mailgrave.yaml.5)."""
        reserve = self.config.queue.min_free
        if not reserve:
            return
        free = _free_bytes(self.spool.path("tmp"))
        if free is None or free >= reserve:
            return
        if isinstance(envelope_source, bytes) and envelope_source.startswith(b"F\0"):
            reserve //= 2
        if free < reserve:
            log.warning("spool has %d bytes free, below queue.min_free: mail refused", free)
            raise TempFail("4.3.1 insufficient system storage")

    def _signer(self, attrs: dict[str, str] | None, uid: int | None) -> dkimsign.Signer | None:
        """A DKIM signer when dkim.sign has keys and the origin is trusted (dkimsign)."""
        keys = self.config.dkim.sign
        if keys and dkimsign.trusted_origin(self.config, attrs, uid in self.trusted):
            return dkimsign.Signer(keys)
        return None

    def _received(
        self, qid: str, envelope: Envelope, attrs: dict[str, str] | None, uid: int | None
    ) -> bytes:
        return headers.received(self.config.hostname, qid, envelope, attrs, uid)


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _trusted_uids(names: tuple[str, ...]) -> frozenset[int]:
    uids = {os.getuid(), 0}
    for name in names:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            pass
    return frozenset(uids)


# --- queue.ctrl service ---------------------------------------------------------


def serve_connection(queue: Queue, sock: socket.socket) -> None:
    """Handle one submission on a connected queue.ctrl socket."""
    uid = peer_uid(sock)
    sock.settimeout(READ_TIMEOUT)
    stream = sock.makefile("rb")
    reply: bytes
    try:
        attrs = ctrl.read_attrs(stream)
        raw_env = read_envelope(stream)
        qid, envelope, size = queue.submit(ctrl.read_chunks(stream), raw_env, attrs, uid)
    except (ConnectionError, TimeoutError, OSError):
        log.info("submission from uid %s aborted before its end", uid)
        return
    except EnvelopeError as exc:
        reply = ctrl.queue_answer("D", f"5.1.3 {exc}")
    except (PermFail, TempFail) as exc:
        reply = ctrl.queue_answer(exc.code, exc.text)
    else:
        origin = _origin(attrs if uid in queue.trusted else {}, uid)
        maillog.queued(qid, envelope.sender, envelope.recipients, size, origin)
        reply = ctrl.queue_answer("K", f"{qid} queued")
    finally:
        stream.close()
    try:
        sock.sendall(reply)
    except OSError:
        pass


def _origin(attrs: dict[str, str], uid: int | None) -> str:
    if attrs.get("addr"):
        return f"smtp [{attrs['addr']}]"
    return f"uid {uid}"


def serve(queue: Queue, listeners: list[socket.socket], idle_exit: float) -> int:
    """Accept on every listener, one thread per submission; exit when idle."""
    serve_threads(listeners, lambda conn: serve_connection(queue, conn), idle_exit)
    return EXIT_OK


def by_hand(queue: Queue) -> int:
    """qmail-queue's interface: message on fd 0, envelope on fd 1."""
    message = os.fdopen(0, "rb", buffering=0)
    envelope_in = os.fdopen(1, "rb", buffering=1 << 16, closefd=False)

    def chunks() -> Iterator[bytes]:
        while True:
            block = message.read(1 << 16)
            if not block:
                return
            yield block

    try:
        qid, env, size = queue.submit(
            chunks(), lambda: read_envelope(envelope_in), None, os.getuid()
        )
    except EnvelopeError as exc:
        print(f"mailgrave-queue: bad envelope: {exc}", file=sys.stderr)
        return EXIT_PERM
    except (PermFail, TempFail) as exc:
        print(f"mailgrave-queue: {exc.text}", file=sys.stderr)
        return exc.exit_code
    maillog.queued(qid, env.sender, env.recipients, size, f"uid {os.getuid()}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    defaults = configmod.Config()
    parser = stage_parser(
        "mailgrave-queue",
        "Put a message into the MailGrave spool, durably. By hand: message "
        "on fd 0, envelope on fd 1 (like qmail-queue). As a service: queue.ctrl "
        "sockets from LISTEN_FDS, or --in PATH.",
    )
    parser.add_argument(
        "--in",
        dest="listen",
        metavar="PATH",
        help="serve queue.ctrl at PATH (bound before --user takes effect; default: the "
        f"sockets in LISTEN_FDS; the units' is {defaults.socket_path('queue.ctrl')})",
    )
    parser.add_argument(
        "--user",
        metavar="NAME",
        help="started as root: become NAME (and its groups) once --in is bound; required "
        "as root unless the sockets are handed over (default: stay who we are)",
    )
    args = parser.parse_args(argv)
    logmod.setup("queue", args.debug)
    config = configmod.load_or_exit(args.config, "mailgrave-queue")
    listeners = listen_fds()
    conn = None if listeners or args.listen else stdin_socket()
    handed = bool(listeners) or conn is not None
    plan = privs.plan_or_exit("mailgrave-queue", args.user, None, handed)
    if args.listen:
        try:
            listeners.append(bind_unix(args.listen, 0o666))
        except OSError as exc:
            print(f"mailgrave-queue: cannot serve {args.listen}: {exc.strerror}", file=sys.stderr)
            return EXIT_TEMP
    privs.drop_or_exit("mailgrave-queue", plan)
    try:
        queue = Queue(config)
    except OSError as exc:
        print(f"mailgrave-queue: cannot use spool {config.spool}: {exc.strerror}", file=sys.stderr)
        return EXIT_TEMP
    if listeners:
        return serve(queue, listeners, config.queue.idle_exit)
    if conn is not None:
        serve_connection(queue, conn)
        return EXIT_OK
    return by_hand(queue)
