"""Logging: journald with structured MAILGRAVE_* fields when there is a journal, else stderr."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def quote(text: str | bytes, limit: int = 100) -> str:
    """Client-supplied text made safe for one log line: escaped, truncated, quoted."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    cut = len(text) > limit
    text = text[:limit].encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return '"' + text + ('..."' if cut else '"')


class JournalHandler(logging.Handler):
    """Send records to journald with SYSLOG_IDENTIFIER and the record's ``fields``."""

    def __init__(self, identifier: str) -> None:
        super().__init__()
        from systemd import journal

        self._send = journal.send
        self.identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {
                k: str(v) for k, v in getattr(record, "fields", {}).items() if v is not None
            }
            self._send(
                self.format(record),
                PRIORITY=str(_PRIORITY.get(record.levelno, 6)),
                SYSLOG_IDENTIFIER=self.identifier,
                SYSLOG_PID=str(os.getpid()),
                **fields,
            )
        except Exception:
            self.handleError(record)


def _journal_available() -> bool:
    if os.environ.get("MAILGRAVE_LOG") == "stderr":
        return False
    if not os.path.exists(JOURNAL_SOCKET):
        return False
    try:
        import systemd.journal  # noqa: F401
    except ImportError:
        return False
    return True


def setup(program: str, debug: bool = False) -> None:
    """Configure the root logger for ``mailgrave-<program>``.

    journald when its socket exists (with stderr too when stderr is a terminal,
    for an administrator running a stage by hand); stderr otherwise, one line
    per event prefixed with the program name.
    """
    identifier = f"mailgrave-{program}" if not program.startswith("mailgrave") else program
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handlers: list[logging.Handler] = []
    if _journal_available():
        handlers.append(JournalHandler(identifier))
    if not handlers or sys.stderr.isatty():
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(f"{identifier}[%(process)d]: %(message)s"))
        handlers.append(stream)
    for handler in handlers:
        root.addHandler(handler)
