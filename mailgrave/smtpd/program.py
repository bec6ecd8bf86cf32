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


def _parser() -> Any:
    import argparse  # only for --help and errors: see _parse_args

    parser = argparse.ArgumentParser(
        prog="mailgrave-smtpd",
        description="MailGrave's SMTP server. With no listening socket (LISTEN_FDS) and no "
        "--bind/--port, serves one connection on stdin/stdout (inetd style).",
    )
    parser.add_argument("--config", metavar="PATH", help="configuration file")
    parser.add_argument("--bind", metavar="ADDR", help="listen on ADDR (with --port)")
    parser.add_argument("--port", metavar="N", type=int, help="listen on TCP port N")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="smtp",
        help="smtp (port 25, the default), submission (587: STARTTLS, then AUTH before "
        "MAIL) or smtps (465: implicit TLS, then AUTH before MAIL)",
    )
    parser.add_argument("--debug", action="store_true", help="log debugging details")
    return parser


class _Args:
    config: str | None = None
    bind: str | None = None
    port: int | None = None
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
    # Nothing smtpd runs uses the stdlib's logging: not importing it (nor the
    # threading it brings, whose fork hooks every child would run) also makes
    # each fork of the listener cheaper.
    mglog.setup("smtpd", debug=args.debug, stdlib=False)
    listeners = sd.listen_fds()
    if listeners or args.bind or args.port is not None:
        # The warm parent: socket, signal and the rest, imported once.
        from mailgrave.smtpd.listener import Listener, bind

        if not listeners:
            try:
                listeners = [bind(args.bind or "127.0.0.1", args.port or 25)]
            except OSError as exc:
                print(f"mailgrave-smtpd: cannot listen: {exc.strerror}", file=sys.stderr)
                return EXIT_TEMP
        return Listener(config, listeners, args.mode).run()
    sock = sd.stdin_raw_socket()
    try:
        serve_connection(config, sock, mode=args.mode)
    except Exception:
        log.exception("session failed")
        return EXIT_TEMP
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
