"""``--user NAME`` and ``--chroot DIR``: a stage started by hand as root drops root.

The 2006 run scripts started each stage as root with ``--chroot DIR --user
NAME``; a stage binds or opens what needs root first, then calls
:func:`drop`. The rule every stage that takes ``--user`` follows
(:func:`plan`):

* as root without ``--user`` it refuses to start, unless a service manager
  handed it its sockets (``LISTEN_FDS``, or a connection on standard input:
  systemd, inetd, ``mailgrave run``): that manager chose its user (every unit
  but mailgrave-local's has ``User=``). ``--user root`` keeps root on purpose;
* not root, ``--user`` may only name the user it already is, and ``--chroot``
  is refused;
* the user is looked up (uid, primary gid, supplementary groups) before
  anything is changed, the chroot directory checked; then :func:`drop`
  enters the chroot (chdir, chroot, chdir "/"), sets the groups, the gid, the
  uid, in that order, and checks that root cannot be taken back.

Every problem is :class:`PrivsError`: one line and an exit code, never a
traceback.
"""

from __future__ import annotations

import os
import pwd
import sys

from mailgrave.errors import EXIT_TEMP, EXIT_USAGE
from mailgrave.record import Record, record


class PrivsError(Exception):
    """A one-line reason this stage will not run as asked, with its exit code."""

    def __init__(self, text: str, exit_code: int) -> None:
        super().__init__(text)
        self.text = text
        self.exit_code = exit_code


@record
class Plan(Record):
    """Who this process becomes, and where: resolved before anything is changed."""

    user: str | None = None  # None: stay who we are
    uid: int = -1
    gid: int = -1
    groups: tuple[int, ...] = ()
    chroot: str | None = None

    @property
    def changes(self) -> bool:
        return self.chroot is not None or (self.user is not None and self.uid != os.geteuid())


def plan(
    user: str | None, chroot: str | None = None, handed_over: bool = False, required: bool = True
) -> Plan:
    """Check ``--user``/``--chroot`` against who we are (see the module's rules).

    ``handed_over``: a service manager passed this process its sockets;
    ``required``: this stage refuses root without ``--user`` (every stage but
    mailgrave-local, which must start as root to become each recipient).
    """
    root = os.geteuid() == 0
    if user is None and chroot is None:  # stay who we are
        if root and required and not handed_over:
            raise PrivsError(
                "refusing to run as root: name the user to become with --user NAME"
                " (--user root to keep root on purpose)",
                EXIT_USAGE,
            )
        return Plan()
    if chroot is not None and user is None:
        raise PrivsError("--chroot needs --user NAME (the user to be inside it)", EXIT_USAGE)
    assert user is not None
    pw = _getpwnam(user)
    if not root:
        if pw.pw_uid != os.geteuid():
            raise PrivsError(f"--user {user}: only root can switch users", EXIT_USAGE)
        if chroot is not None:
            raise PrivsError("--chroot: only root can change its root directory", EXIT_USAGE)
        return Plan(user, pw.pw_uid, os.getegid(), tuple(os.getgroups()))
    if chroot is not None:
        if not os.path.isabs(chroot):
            raise PrivsError(f"--chroot {chroot}: give an absolute path", EXIT_USAGE)
        if not os.path.isdir(chroot):
            raise PrivsError(f"--chroot {chroot}: no such directory", EXIT_TEMP)
    groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid))))
    return Plan(user, pw.pw_uid, pw.pw_gid, groups, chroot)


def _getpwnam(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        pass
    if user.isdigit():
        try:
            return pwd.getpwuid(int(user))
        except KeyError:
            pass
    raise PrivsError(f"--user {user}: no such user", EXIT_USAGE)


def drop(p: Plan) -> None:
    """Enter the chroot, then become the user for good (groups, gid, uid)."""
    if not p.changes:
        return
    try:
        if p.chroot is not None:
            os.chdir(p.chroot)
            os.chroot(p.chroot)
            os.chdir("/")
        if p.uid != os.geteuid() or p.uid == 0:
            os.setgroups(list(p.groups))
            os.setgid(p.gid)
            os.setuid(p.uid)
    except OSError as exc:
        what = f"--chroot {p.chroot}" if p.chroot and os.geteuid() == 0 else f"--user {p.user}"
        raise PrivsError(f"{what}: {exc.strerror or exc}", EXIT_TEMP) from None
    if p.uid == 0:
        return  # --user root: kept on purpose
    ids = (os.getuid(), os.geteuid(), os.getgid(), os.getegid())
    if ids != (p.uid, p.uid, p.gid, p.gid):
        raise PrivsError(f"--user {p.user}: still uid/gid {ids} after the switch", EXIT_TEMP)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivsError(f"--user {p.user}: root could be taken back after the switch", EXIT_TEMP)


def preload(modules: tuple[str, ...]) -> None:
    """Import ``modules`` now (those not installed are skipped): inside a chroot
    the interpreter's library directories are out of reach."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def plan_or_exit(
    prog: str,
    user: str | None,
    chroot: str | None = None,
    handed_over: bool = False,
    required: bool = True,
) -> Plan:
    """:func:`plan` for a program's start: a problem is one line on stderr, then exit."""
    try:
        return plan(user, chroot, handed_over, required)
    except PrivsError as exc:
        print(f"{prog}: {exc.text}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


def drop_or_exit(prog: str, p: Plan) -> None:
    """:func:`drop` for a program's start: a problem is one line on stderr, then exit."""
    try:
        drop(p)
    except PrivsError as exc:
        print(f"{prog}: {exc.text}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
