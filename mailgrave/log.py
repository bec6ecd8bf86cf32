"""Logging: journald with structured MAILGRAVE_* fields when there is a journal, else stderr.

A small logger of MailGrave's own, so that a program started per connection
(``mailgrave-smtpd`` in ``Accept=yes`` mode) does not import :mod:`logging`
(about 5 ms with what it pulls in). :func:`getLogger` returns a
:class:`Logger` with the part of the stdlib API MailGrave uses (``info``,
``warning``, ``exception``..., ``%`` arguments, ``extra={"fields": {...}}``
for journal fields). :func:`setup` chooses where records go, and by default
also routes the stdlib root logger there, so modules that use
:mod:`logging` write to the same place with the same fields.

journald is written with its native protocol (one datagram per record:
``KEY=value`` lines, the binary form for values with newlines; a memfd when a
record is too big for a datagram), with MESSAGE, PRIORITY,
SYSLOG_IDENTIFIER, SYSLOG_PID and the record's fields.
"""

from __future__ import annotations

import _socket
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"

CRITICAL = 50
ERROR = 40
WARNING = 30
INFO = 20
DEBUG = 10

_PRIORITY = {CRITICAL: 2, ERROR: 3, WARNING: 4, INFO: 6, DEBUG: 7}


def quote(text: str | bytes, limit: int = 100) -> str:
    """Client-supplied text made safe for one log line: escaped, truncated, quoted."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    cut = len(text) > limit
    text = text[:limit].encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return '"' + text + ('..."' if cut else '"')


class _Output:
    """Where records go; before :func:`setup`, as the stdlib's last resort: WARNING
    and above to stderr, the bare message."""

    identifier = ""
    level = WARNING
    journal: object | None = None  # a _socket.socket (AF_UNIX datagram) once set up
    stderr = True
    journal_connected = False  # keep_journal: sent without an address


_out = _Output()


def _journal_field(key: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" not in data:
        return key.encode("ascii") + b"=" + data + b"\n"
    return key.encode("ascii") + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"


def _send_journal(sock: object, fields: Mapping[str, str]) -> bool:
    assert isinstance(sock, _socket.socket)
    data = b"".join(_journal_field(k, v) for k, v in fields.items())
    try:
        if _out.journal_connected:
            sock.send(data)
        else:
            sock.sendto(data, JOURNAL_SOCKET)
        return True
    except OSError as exc:
        import errno  # here and below: only for a record too big for a datagram

        if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
            return False
    # Too big for a datagram: journald also takes the record in a sealed memfd.
    try:
        fd = os.memfd_create("mailgrave-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            import fcntl

            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))]
            if _out.journal_connected:
                sock.sendmsg([], rights)
            else:
                sock.sendmsg([], rights, 0, JOURNAL_SOCKET)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def emit(level: int, message: str, fields: Mapping[str, object] | None = None) -> None:
    """Write one record (already formatted) if ``level`` passes the threshold."""
    if level < _out.level:
        return
    written = False
    if _out.journal is not None:
        record = {
            "MESSAGE": message,
            "PRIORITY": str(_PRIORITY.get(level, 6)),
            "SYSLOG_IDENTIFIER": _out.identifier,
            "SYSLOG_PID": str(os.getpid()),
        }
        if fields:
            record.update({k: str(v) for k, v in fields.items() if v is not None})
        written = _send_journal(_out.journal, record)
    if _out.stderr or not written:
        prefix = f"{_out.identifier}[{os.getpid()}]: " if _out.identifier else ""
        try:
            sys.stderr.write(f"{prefix}{message}\n")
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass


def _format(msg: object, args: tuple[object, ...], exc_info: bool) -> str:
    text = str(msg) % args if args else str(msg)
    if exc_info and sys.exc_info()[0] is not None:
        import traceback  # only when there is an exception to show

        text += "\n" + "".join(traceback.format_exc()).rstrip("\n")
    return text


class Logger:
    """The part of :class:`logging.Logger` that MailGrave uses."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def isEnabledFor(self, level: int) -> bool:
        return level >= _out.level

    def log(
        self,
        level: int,
        msg: object,
        *args: object,
        extra: Mapping[str, object] | None = None,
        exc_info: bool = False,
    ) -> None:
        if level < _out.level:
            return
        fields = extra.get("fields") if extra else None
        emit(level, _format(msg, args, exc_info), fields)  # type: ignore[arg-type]

    def debug(self, msg: object, *args: object, extra: Mapping[str, object] | None = None) -> None:
        self.log(DEBUG, msg, *args, extra=extra)

    def info(self, msg: object, *args: object, extra: Mapping[str, object] | None = None) -> None:
        self.log(INFO, msg, *args, extra=extra)

    def warning(
        self, msg: object, *args: object, extra: Mapping[str, object] | None = None
    ) -> None:
        self.log(WARNING, msg, *args, extra=extra)

    def error(self, msg: object, *args: object, extra: Mapping[str, object] | None = None) -> None:
        self.log(ERROR, msg, *args, extra=extra)

    def exception(
        self, msg: object, *args: object, extra: Mapping[str, object] | None = None
    ) -> None:
        self.log(ERROR, msg, *args, extra=extra, exc_info=True)


_loggers: dict[str, Logger] = {}


def getLogger(name: str = "mailgrave") -> Logger:
    logger = _loggers.get(name)
    if logger is None:
        logger = _loggers[name] = Logger(name)
    return logger


class muted:
    """``with muted():`` nothing is logged (a benchmark's sessions, for one)."""

    def __enter__(self) -> None:
        self._level, _out.level = _out.level, CRITICAL + 1

    def __exit__(self, *exc: object) -> None:
        _out.level = self._level


def shutdown() -> None:
    """Flush what is buffered (before ``os._exit`` in a forked child)."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()


def _journal_socket() -> object | None:
    if os.environ.get("MAILGRAVE_LOG") == "stderr":
        return None
    if not os.path.exists(JOURNAL_SOCKET):
        return None
    try:
        return _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    except OSError:
        return None


def setup(program: str, debug: bool = False, stdlib: bool = True) -> None:
    """Send the records of ``mailgrave-<program>`` to journald or stderr.

    journald when its socket exists (with stderr too when stderr is a terminal,
    for an administrator running a stage by hand); stderr otherwise, one line
    per event prefixed with the program name. With ``stdlib``, records of the
    :mod:`logging` root logger go the same way (programs whose modules use it).
    """
    _out.identifier = f"mailgrave-{program}" if not program.startswith("mailgrave") else program
    _out.level = DEBUG if debug else INFO
    old, _out.journal = _out.journal, _journal_socket()
    _out.journal_connected = False
    if old is not None:
        old.close()  # type: ignore[attr-defined]
    _out.stderr = _out.journal is None or sys.stderr.isatty()
    if stdlib:
        _route_stdlib(debug)


def keep_journal() -> None:
    """Connect to journald now, so that records still reach it once the program
    has changed its root directory (``--chroot``), where the socket's path is gone."""
    sock = _out.journal
    if sock is None:
        return
    assert isinstance(sock, _socket.socket)
    try:
        sock.connect(JOURNAL_SOCKET)
    except OSError:
        return
    _out.journal_connected = True


def _route_stdlib(debug: bool) -> None:
    import logging  # for libraries that log with it; MailGrave's own code does not

    class Bridge(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                text = record.getMessage()
                if record.exc_info:
                    text += "\n" + logging.Formatter().formatException(record.exc_info)
                emit(record.levelno, text, getattr(record, "fields", None))
            except Exception:
                self.handleError(record)

    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.addHandler(Bridge())
