"""mailgrave-smtpd: the SMTP listener; drives mailgrave.smtp.server over one connection.

Modes: inetd (the connection on stdin/stdout, systemd ``Accept=yes``);
``LISTEN_FDS`` (systemd ``Accept=no`` or ``mailgrave run``: a warm parent
accepts and forks one child per connection); ``--bind ADDR --port N`` (the
same as ``LISTEN_FDS``, with a socket of its own).

In ``Accept=yes`` mode this module's imports are paid on every connection:
the listener, argparse and the socket activation helpers are imported only
by the modes that need them (:data:`mailgrave.smtpd.IMPORT_BUDGET`).
"""

from __future__ import annotations

import sys

from mailgrave import config as configmod
from mailgrave import log as mglog
from mailgrave import sd
from mailgrave.errors import EXIT_OK, EXIT_TEMP
from mailgrave.smtpd.session import MODES, serve_connection

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = mglog.getLogger(__name__)


DEFAULT_BIND = "127.0.0.1"
DEFAULT_PORT = 25
# What a session may import or open after --chroot: imported by the parent first.
CHROOT_PRELOAD = (
    "ssl",
    "ipaddress",
    "encodings.idna",
    "idna",
    "email.parser",
    "email.policy",
    "email.utils",
    "email.header",
    "argon2",
    "argon2.exceptions",
    "authres",
    "dns.rdtypes.IN.A",
    "dns.rdtypes.IN.AAAA",
    "dns.rdtypes.ANY.MX",
    "dns.rdtypes.ANY.TXT",
    "dns.rdtypes.ANY.PTR",
    "dns.rdtypes.ANY.CNAME",
    "dns.rdtypes.ANY.SOA",
    "mailgrave.users",
    "mailgrave.smtpd.auth",
    "mailgrave.smtpd.checks",
    "mailgrave.smtpd.listener",
)


def _parser() -> Any:
    import argparse  # only for --help and errors: see _parse_args

    defaults = configmod.Config()
    parser = argparse.ArgumentParser(
        prog="mailgrave-smtpd",
        description="MailGrave's SMTP server. With no listening socket (LISTEN_FDS) and no "
        "--bind/--port, serves one connection on stdin/stdout (inetd style).",
    )
    parser.add_argument(
        "--config", metavar="PATH", help=f"configuration file (default: {configmod.DEFAULT_PATH})"
    )
    parser.add_argument(
        "--bind", metavar="ADDR", help=f"listen on ADDR (with --port; default: {DEFAULT_BIND})"
    )
    parser.add_argument(
        "--port", metavar="N", type=int, help=f"listen on TCP port N (default: {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--out",
        metavar="PATH",
        help="the queue.ctrl socket to submit to; relative to the chroot with --chroot "
        f"(default: run_dir/queue.ctrl, {defaults.socket_path('queue.ctrl')})",
    )
    parser.add_argument(
        "--user",
        metavar="NAME",
        help="started as root: become NAME (and its groups) once the listener is bound; "
        "required as root unless the sockets are handed over (default: stay who we are)",
    )
    parser.add_argument(
        "--chroot",
        metavar="DIR",
        help="with --user: serve inside DIR, everything a session needs loaded first "
        "(default: none)",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="smtp",
        help="smtp (port 25), submission (587: STARTTLS, then AUTH before "
        "MAIL) or smtps (465: implicit TLS, then AUTH before MAIL) (default: %(default)s)",
    )
    parser.add_argument("--debug", action="store_true", help="log debugging details")
    return parser


class _Args:
    config: str | None = None
    bind: str | None = None
    port: int | None = None
    out: str | None = None
    user: str | None = None
    chroot: str | None = None
    mode = "smtp"
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
        elif arg == "--mode" and rest and rest[0] in MODES:
            args.mode = rest.pop(0)
        elif arg.startswith("--mode=") and arg[len("--mode=") :] in MODES:
            args.mode = arg[len("--mode=") :]
        else:
            return _parser().parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    config = configmod.load_or_exit(args.config, "mailgrave-smtpd")
    if args.out:
        config = config.with_socket("queue.ctrl", args.out)
    # Nothing smtpd runs uses the stdlib's logging: not importing it (nor the
    # threading it brings, whose fork hooks every child would run) also makes
    # each fork of the listener cheaper.
    mglog.setup("smtpd", debug=args.debug, stdlib=False)
    listeners = sd.listen_fds()
    listening = bool(listeners) or bool(args.bind) or args.port is not None
    sock = None if listening else sd.stdin_raw_socket()
    drop = _privileges(args, handed_over=bool(listeners) or sock is not None)
    if listening:
        # The warm parent: socket, signal and the rest, imported once.
        from mailgrave.smtpd.listener import Listener, bind

        if not listeners:
            try:
                listeners = [bind(args.bind or DEFAULT_BIND, args.port or DEFAULT_PORT)]
            except OSError as exc:
                print(f"mailgrave-smtpd: cannot listen: {exc.strerror}", file=sys.stderr)
                return EXIT_TEMP
        drop(config)
        return Listener(config, listeners, args.mode).run()
    drop(config)
    try:
        serve_connection(config, sock, mode=args.mode)
    except Exception:
        log.exception("session failed")
        return EXIT_TEMP
    return EXIT_OK


def _privileges(args: Any, handed_over: bool) -> Any:
    """--user/--chroot checked now (before anything is bound); the function that
    drops root once it is. Nothing is imported for a start that has neither flag
    and is not root (every unit: User=)."""
    import os

    if args.user is None and args.chroot is None and (os.geteuid() != 0 or handed_over):
        return lambda _config: None
    from mailgrave import privs

    plan = privs.plan_or_exit("mailgrave-smtpd", args.user, args.chroot, handed_over)

    def drop(config: configmod.Config) -> None:
        if plan.chroot is not None:
            from mailgrave.smtpd.session import preload_tls

            privs.preload(CHROOT_PRELOAD)
            preload_tls(config)
            mglog.keep_journal()
        privs.drop_or_exit("mailgrave-smtpd", plan)

    return drop


if __name__ == "__main__":
    sys.exit(main())
