"""mailgrave-local: delivers to local mailboxes, as the recipient, never as root.

By hand: ``mailgrave-local --sender S --qid Q RCPT... < message``.  As a
service it serves local.ctrl (docs/flow.md): requests carry the spool's
message as a file descriptor.  A warm parent accepts connections and forks
one worker per connection (mailgrave-send keeps its connection for many
requests); the worker forks one child per destination user, which switches to
that user's uid for good before it opens anything of theirs, and then delivers
that user's mail, and only theirs, until the connection ends.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import select
import socket
import stat
import sys
import traceback

from mailgrave import config as configmod
from mailgrave import ctrl, maillog
from mailgrave import log as logmod
from mailgrave.config import Config
from mailgrave.envelope import Envelope
from mailgrave.errors import (
    EXIT_OK,
    EXIT_TEMP,
    OK,
    PERMANENT,
    TEMPORARY,
    DeliveryError,
    PermFail,
    Result,
    TempFail,
    exit_for,
)
from mailgrave.local import mailbox
from mailgrave.proc import bind_unix, serve_forks
from mailgrave.recipients import Router, Target, parse_alias_items
from mailgrave.sd import listen_fds, stdin_socket
from mailgrave.spool import blocks, scratch_entry
from mailgrave.stageargs import stage_parser

log = logmod.getLogger(__name__)

MAX_REQUEST = ctrl.MAX_REQUEST
MAX_FORWARD = 64 * 1024
# Descriptors a delivery child must not keep once it is the recipient (the
# local.ctrl connection: nobody but this process answers for the request).
_private_fds: set[int] = set()
# The local.ctrl connection being served (None: by hand), looked at before each
# delivery starts: see requester_gone().
_requester: list[socket.socket] = []


def requester_gone() -> bool:
    """Has mailgrave-send closed the connection whose request we serve? While it
    waits for our results it sends nothing, so readable means gone (killed): a
    delivery not yet started is then not started, since nobody would record it
    and the next send run delivers it again (a duplicate for nothing)."""
    if not _requester:
        return False
    sock = _requester[0]
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _prefix(sender: str, rcpt: str) -> bytes:
    return f"Return-Path: <{sender}>\nDelivered-To: {rcpt}\n".encode("utf-8", "surrogateescape")


class SwitchFailed(TempFail):
    """This process cannot become another user at all (a unit or container that took
    CAP_SETUID/CAP_SETGID away): no retry helps until the administrator fixes it."""

    def __init__(self, user: str) -> None:
        super().__init__(
            f"4.3.0 mailgrave-local cannot switch to user {user}: configuration problem,"
            " see docs/security.md"
        )


# The answer to every recipient once the start-up probe found we cannot switch.
MISCONFIGURED = Result(TEMPORARY, "4.3.0", "local delivery misconfigured: cannot switch users")


def _become(user: str, extra_groups: tuple[int, ...] = ()) -> pwd.struct_passwd:
    """Switch to ``user`` for good (as root), or check we already are them."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise TempFail(f"4.3.0 delivery user {user} does not exist") from None
    if os.getuid() == 0:
        if pw.pw_uid == 0:
            raise PermFail("5.7.0 refusing to deliver as root")
        try:
            os.setgroups(sorted({*os.getgrouplist(pw.pw_name, pw.pw_gid), *extra_groups}))
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
        except PermissionError:
            raise SwitchFailed(user) from None
    else:
        # A developer's `mailgrave run`: everything runs as that user.
        pw = pwd.getpwuid(os.getuid())
    return pw


def _mail_gid() -> tuple[int, ...]:
    try:
        return (grp.getgrnam("mail").gr_gid,)
    except KeyError:
        return ()


def _forward(config: Config, fd: int, sender: str, rcpt: str, addresses: list[str]) -> str:
    qc = ctrl.QueueClient(config.socket_path("queue.ctrl"), {}, Envelope(sender, tuple(addresses)))
    try:
        qc.write(f"Delivered-To: {rcpt}\n".encode("utf-8", "surrogateescape"))
        for data in blocks(fd):
            qc.write(data)
    except BaseException:
        qc.abort()
        raise
    qid = qc.commit()
    return f"2.0.0 forwarded to {', '.join(addresses)} as {qid}"


def _read_forward(pw: pwd.struct_passwd) -> list[str] | None:
    """The user's ~/.forward items, read as the user; None when there is none.

    As sendmail does, a .forward that others could have written (not owned by
    the user or root, or group/world writable) is ignored: mail stays in the
    user's own mailbox.
    """
    path = os.path.join(pw.pw_dir, ".forward")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            log.warning("%s: .forward is a symbolic link, ignored", pw.pw_name)
            return None
        raise TempFail("4.3.0 cannot read .forward") from None
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (pw.pw_uid, 0) or st.st_mode & 0o022:
            log.warning("%s: .forward is not a private regular file, ignored", pw.pw_name)
            return None
        try:
            text = f.read(MAX_FORWARD)
        except OSError:
            raise TempFail("4.3.0 cannot read .forward") from None
    text = ",".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    items = parse_alias_items(text)
    return items or None


def _is_self(config: Config, pw: pwd.struct_passwd, item: str) -> bool:
    """Does a .forward item name the user's own mailbox (``\\user``, ``user``, ``user@local``)?"""
    local, at, domain = item.lstrip("\\").rpartition("@")
    if not at:
        local, domain = item.lstrip("\\"), config.hostname
    return local.lower() == pw.pw_name.lower() and config.is_local_domain(domain)


def _forward_items(config: Config, target: Target) -> list[str]:
    """In a child that becomes the user (no extra groups): their ~/.forward items."""
    pw = _become(target.user)
    return (_read_forward(pw) if config.local.forward else None) or []


def expand_user(
    config: Config, target: Target, fd: int, sender: str, rcpt: str, qid: str
) -> Result:
    """A system user: what their ~/.forward says (read as them), else their own mailbox.

    Runs in the privileged parent: the .forward is read, and each destination
    delivered, by a child that is the user (without group mail, which only a
    write into the mail spool gets, never a .forward command).
    """
    line = _as_user(config, "forward", target, -1, sender, rcpt, qid)
    if line[:1] != OK:
        return Result.from_line(line)
    items = [i for i in line[1:].split("\0") if i]
    pw = pwd.getpwnam(target.user)
    if not items:
        return _run_child(config, Target("own", pw.pw_name, pw.pw_name), fd, sender, rcpt, qid)
    results: list[Result] = []
    forwards: list[str] = []
    for item in items:
        if item.startswith("|"):
            t = Target("pipe", item[1:].strip(), pw.pw_name, target.extension)
        elif item.startswith("/"):
            t = Target("file", item, pw.pw_name)
        elif _is_self(config, pw, item):
            t = Target("own", pw.pw_name, pw.pw_name)
        else:
            name = item.lstrip("\\")
            forwards.append(name if "@" in name else f"{name}@{config.origin or config.hostname}")
            continue
        results.append(_run_child(config, t, fd, sender, rcpt, qid))
    if forwards:
        results.append(
            _run_child(
                config, Target("forward", "\0".join(forwards), pw.pw_name), fd, sender, rcpt, qid
            )
        )
    return _combine(results)


def _in_spool(config: Config, target: Target) -> bool:
    """Does this delivery write into the mail spool? Only that (Debian policy 11.6:
    dotlock in the 2775 root:mail directory) gets group mail, never a command or a file."""
    return target.kind == "mbox" or (target.kind == "own" and config.local.mailbox == "mbox")


def deliver_target(
    config: Config, target: Target, fd: int, sender: str, rcpt: str, qid: str
) -> str:
    """In a child process: become the target's user, then deliver. Returns the result text."""
    prefix = _prefix(sender, rcpt)
    pw = _become(target.user, _mail_gid() if _in_spool(config, target) else ())
    os.umask(0o077)
    env = {
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "SHELL": "/bin/sh",
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "SENDER": sender,
        "RECIPIENT": rcpt,
        "LOCAL": rcpt.rpartition("@")[0],
        "DOMAIN": rcpt.rpartition("@")[2],
        "EXTENSION": target.extension,
        "MAILGRAVE_QID": qid,
    }
    if target.kind == "maildir":
        return mailbox.maildir(target.value, fd, prefix)
    if target.kind == "mbox":
        return mailbox.mbox(target.value, fd, sender, prefix, spool=True)
    if target.kind == "file":
        return mailbox.mbox(target.value, fd, sender, prefix)
    if target.kind == "pipe":
        return mailbox.pipe(target.value, fd, prefix, env)
    if target.kind == "forward":
        return _forward(config, fd, sender, rcpt, target.value.split("\0"))
    if target.kind == "own":
        return _own_mailbox(config, pw, fd, sender, prefix)
    raise TempFail(f"4.3.0 unknown delivery kind {target.kind}")


def _own_mailbox(config: Config, pw: pwd.struct_passwd, fd: int, sender: str, prefix: bytes) -> str:
    if config.local.mailbox == "mbox":
        path = os.path.join(config.local.mbox_dir, pw.pw_name)
        return mailbox.mbox(path, fd, sender, prefix, spool=True)
    return mailbox.maildir(os.path.join(pw.pw_dir, config.local.maildir), fd, prefix)


class _UserChild:
    """A child that becomes one user (for good) and delivers for them, one request
    at a time, while this process lives: one fork per user instead of one per
    delivery. It is sent only that user's deliveries and holds nothing else.
    """

    pid: int
    sock: socket.socket

    def __init__(self, config: Config) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            for private in [*_private_fds, *(c.sock.fileno() for c in _children.values())]:
                try:
                    os.close(private)
                except OSError:
                    pass
            code = 0
            try:
                _child_loop(config, theirs)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self.sock = ours

    def ask(self, fields: list[str], fd: int) -> str | None:
        """Send a request; the result line, or None when the child has died."""
        data = "\0".join(fields).encode("utf-8", "surrogateescape")
        try:
            ctrl.send_fds(self.sock, data, [fd] if fd >= 0 else [])
            reply = self.sock.recv(MAX_FORWARD * 2 + 16)
        except OSError:
            return None
        return reply.decode("utf-8", "surrogateescape") if reply else None

    def alive(self) -> bool:
        """Between requests a child sends nothing: readable means it has gone."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return not readable

    def close(self) -> None:
        self.sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _where(exc: BaseException) -> str:
    """``TypeError at mailgrave/local/mailbox.py:88``: the type and the last frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    path = last.filename
    top = path.rfind("/mailgrave/")
    return f"{type(exc).__name__} at {path[top + 1 :] if top >= 0 else path}:{last.lineno}"


def _log_unexpected(exc: BaseException, what: str) -> None:
    """One error line for a bug (never the exception text: it may quote mail); the
    whole traceback only with --debug."""
    log.error("%s: %s", what, _where(exc))
    if log.isEnabledFor(logmod.DEBUG):
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        log.debug("%s", text.rstrip("\n"))


GONE = Result(TEMPORARY, "4.3.0", "mailgrave-send went away; not delivered")


def _child_loop(config: Config, sock: socket.socket) -> None:
    """In a user child: answer requests until the parent closes the socketpair."""
    while True:
        data, fds = ctrl.recv_fds(sock, MAX_REQUEST, 1)
        for extra in fds[1:]:
            os.close(extra)
        if not data:
            for extra in fds[:1]:
                os.close(extra)
            return
        fd = fds[0] if fds else -1
        fields = data.decode("utf-8", "surrogateescape").split("\0")
        qid, rcpt = fields[-1], fields[-2]
        try:
            op, kind, value, user, extension, sender, rcpt, qid = fields
            target = Target(kind, value, user, extension)
            if op == "forward":
                text, limit = OK + "\0".join(_forward_items(config, target)), MAX_FORWARD * 2
            else:
                line = deliver_target(config, target, fd, sender, rcpt, qid)
                text, limit = Result.of(OK, line).line(), 2000
        except DeliveryError as exc:
            text, limit = exc.result().line(), 2000
        except Exception as exc:
            _log_unexpected(exc, f"{qid}: delivery to {rcpt} failed unexpectedly")
            text = Result(TEMPORARY, "4.3.0", "internal error in local delivery").line()
            limit = 2000
        finally:
            if fd >= 0:
                os.close(fd)
        sock.send(text.encode("utf-8", "surrogateescape")[:limit])


# The user children of this process, least recently used first.
_children: dict[tuple[str, bool], _UserChild] = {}
MAX_USER_CHILDREN = 8


def _as_user(
    config: Config, op: str, target: Target, fd: int, sender: str, rcpt: str, qid: str
) -> str:
    """Run ``op`` for ``target`` in the child that is its user (started if needed)."""
    key = (target.user, op == "deliver" and _in_spool(config, target))
    child = _children.pop(key, None)
    if child is not None and not child.alive():
        child.close()  # it died between two requests: start another
        child = None
    if child is None:
        while len(_children) >= MAX_USER_CHILDREN:
            _children.pop(next(iter(_children))).close()
        child = _UserChild(config)
    fields = [op, target.kind, target.value, target.user, target.extension, sender, rcpt, qid]
    if op == "deliver" and requester_gone():
        _children[key] = child
        return GONE.line()
    line = child.ask(fields, fd)
    if line is None:
        child.close()
        return Result(TEMPORARY, "4.3.0", "delivery process died").line()
    _children[key] = child
    return line


def close_user_children() -> None:
    while _children:
        _children.popitem()[1].close()


def _run_child(config: Config, target: Target, fd: int, sender: str, rcpt: str, qid: str) -> Result:
    """Deliver to one destination as its user."""
    if target.kind == "user":
        return expand_user(config, target, fd, sender, rcpt, qid)
    return Result.from_line(_as_user(config, "deliver", target, fd, sender, rcpt, qid))


def _combine(results: list[Result]) -> Result:
    """One result for a recipient with several destinations: any temporary failure
    means the whole recipient is tried again, then any permanent one bounces."""
    for code in (TEMPORARY, PERMANENT):
        for r in results:
            if r.code == code:
                return r
    if len(results) == 1:
        return results[0]
    return Result(OK, "2.0.0", "; ".join(r.text for r in results))


def deliver(config: Config, router: Router, fd: int, sender: str, rcpt: str, qid: str) -> Result:
    """Deliver one recipient: resolve, check for a loop, then each target."""
    try:
        if mailbox.has_delivered_to(fd, rcpt):
            raise PermFail("5.4.6 mail loop: message already delivered to this address")
        targets = router.resolve(rcpt)
    except DeliveryError as exc:
        result = exc.result()
        maillog.attempt(qid, rcpt, "local", result)
        return result
    except OSError:
        return Result(TEMPORARY, "4.3.0", "cannot read the message")
    result = _combine([_run_child(config, t, fd, sender, rcpt, qid) for t in targets])
    maillog.attempt(qid, rcpt, "local", result)
    return result


# --- local.ctrl -----------------------------------------------------------------


def serve_connection(config: Config, sock: socket.socket) -> None:
    try:
        _serve_requests(config, sock)
    finally:
        close_user_children()


def _serve_requests(config: Config, sock: socket.socket) -> None:
    router = Router(config)
    _private_fds.add(sock.fileno())
    _requester[:] = [sock]
    while True:
        req = ctrl.recv_request(sock)
        if req is None:
            return
        try:
            for rcpt in req.recipients:
                if req.fd < 0:
                    result = Result(TEMPORARY, "4.3.0", "no message file in the request")
                elif requester_gone():
                    log.info("%s: mailgrave-send went away; %s not delivered", req.qid, rcpt)
                    return
                else:
                    result = deliver(config, router, req.fd, req.sender, rcpt, req.qid)
                sock.sendall(ctrl.results_text([result]))
        finally:
            if req.fd >= 0:
                os.close(req.fd)


def can_switch(config: Config) -> bool:
    """As root: can a child of ours become ``local.default_user``? Tried once at
    start, in a forked child, so that a unit or container without CAP_SETUID is
    reported once as what it is, not once per message per retry."""
    if os.getuid() != 0:
        return True
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _become(config.local.default_user)
        except SwitchFailed:
            code = 2
        except BaseException:
            code = 0  # another problem (no such user): each delivery reports its own
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 2:
        return True
    log.log(
        logmod.CRITICAL,
        "cannot switch to user %s (setuid/setgid not permitted): every local delivery is"
        " deferred until this is fixed, see docs/security.md",
        config.local.default_user,
        extra={"fields": {"MAILGRAVE_EVENT": "config-error"}},
    )
    return False


def serve_misconfigured(sock: socket.socket) -> None:
    """Answer every request at once with :data:`MISCONFIGURED`, logging nothing."""
    while True:
        req = ctrl.recv_request(sock)
        if req is None:
            return
        if req.fd >= 0:
            os.close(req.fd)
        sock.sendall(ctrl.results_text([MISCONFIGURED] * len(req.recipients)))


def _handle_connection(config: Config, conn: socket.socket, switching: bool) -> None:
    try:
        if switching:
            serve_connection(config, conn)
        else:
            serve_misconfigured(conn)
    except (BrokenPipeError, ConnectionResetError):
        log.info("mailgrave-send went away before reading every result")
    except Exception as exc:
        _log_unexpected(exc, "local.ctrl connection failed")


def serve(config: Config, listeners: list[socket.socket], idle_exit: float) -> int:
    """Warm parent: accept, fork a worker per connection, reap, exit when idle."""
    switching = can_switch(config)
    serve_forks(listeners, lambda conn: _handle_connection(config, conn, switching), idle_exit)
    return EXIT_OK


def by_hand(config: Config, sender: str, qid: str, rcpts: list[str]) -> int:
    """The message on standard input, copied into a spool file of its own."""
    fd = scratch_entry(sys.stdin.buffer, Envelope(sender, tuple(rcpts)).encode())
    router = Router(config)
    results = []
    try:
        for rcpt in rcpts:
            result = deliver(config, router, fd, sender, rcpt, qid)
            print(result.describe(), flush=True)
            results.append(result)
    finally:
        close_user_children()
    return exit_for(results)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "mailgrave-local",
        "Deliver to local mailboxes as the recipient. By hand: message on "
        "standard input, one K/Z/D result line per recipient. As a service: local.ctrl "
        "sockets from LISTEN_FDS, or the connection on standard input.",
        sender=True,
    )
    parser.add_argument(
        "--qid", default="-", help="queue id for the logs (by hand; default: %(default)s)"
    )
    parser.add_argument(
        "--in",
        dest="listen",
        metavar="PATH",
        help="serve local.ctrl at PATH (default: the sockets in LISTEN_FDS; the units' is "
        f"{configmod.Config().socket_path('local.ctrl')}). No --user: mailgrave-local starts "
        "as root and becomes each recipient",
    )
    parser.add_argument("recipients", nargs="*", metavar="RCPT")
    args = parser.parse_args(argv)
    logmod.setup("local", args.debug)
    config = configmod.load_or_exit(args.config, "mailgrave-local")
    if args.recipients:
        return by_hand(config, args.sender, args.qid, args.recipients)
    listeners = listen_fds()
    if args.listen:
        try:
            listeners.append(bind_unix(args.listen, 0o600, dir_owner=True))
        except OSError as exc:
            print(f"mailgrave-local: cannot serve {args.listen}: {exc.strerror}", file=sys.stderr)
            return EXIT_TEMP
    if listeners:
        return serve(config, listeners, config.queue.idle_exit)
    conn = stdin_socket()
    if conn is not None:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the connection stays only in ``conn``, kept from delivery children
        os.close(null)
        _handle_connection(config, conn, can_switch(config))
        return EXIT_OK
    parser.error("name recipients, give --in PATH, or run under systemd with local.ctrl")
    return EXIT_TEMP


if __name__ == "__main__":
    sys.exit(main())
