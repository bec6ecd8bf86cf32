"""The spool: directories, queue ids, durable writes, per-message state.

See docs/queue.md for the states and the commit point.  In short:

* ``tmp/QID`` is being written by mailgrave-queue: a header with the envelope
  (:data:`mailgrave.fileio.SPOOL_TAG`), then the message;
* ``todo/QID`` is a committed new message — its rename into ``todo/``
  followed by an fsync of ``todo/`` is the commit point;
* ``mess/QID`` + ``info/QID`` is a message that mailgrave-send has taken over
  and that still has recipients to deliver (``info`` holds the envelope and
  each recipient's state as JSON).

Spools written before the one-file format hold ``todo/QID`` (the envelope
alone) beside ``todo/QID.msg`` (the message, no header); they are still read
and delivered, and :meth:`Spool.stale` tells their debris from new entries.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mailgrave.envelope import EnvelopeError
from mailgrave.fileio import SPOOL_TAG, fsync_dir, message_start, write_all

SUBDIRS = ("tmp", "todo", "mess", "info", "ctl", "bad")
# An old-format message file in todo/ without its envelope was there for the
# instant between two renames; older than this it is the debris of a crash.
TODO_ORPHAN_AGE = 60.0
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_qid(now: float | None = None) -> str:
    """A queue id: microseconds since the epoch (11 base-32 digits) + 4 random ones.

    Sorts by time as text, uses only [0-9A-Z], safe in file names and logs.
    """
    micros = int((time.time() if now is None else now) * 1_000_000)
    digits = []
    for _ in range(11):
        micros, r = divmod(micros, 32)
        digits.append(_CROCKFORD[r])
    rand = secrets.randbits(20)
    tail = []
    for _ in range(4):
        rand, r = divmod(rand, 32)
        tail.append(_CROCKFORD[r])
    return "".join(reversed(digits)) + "".join(tail)


def is_qid(name: str) -> bool:
    return len(name) == 15 and all(c in _CROCKFORD for c in name)


def qid_time(qid: str) -> float:
    """The creation time encoded in a queue id."""
    micros = 0
    for c in qid[:11]:
        micros = micros * 32 + _CROCKFORD.index(c)
    return micros / 1_000_000


class GroupSync:
    """fsync a directory on behalf of many threads: one fsync serves every
    caller that arrived before it started (group commit)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        self._running = False
        self._error: OSError | None = None

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            mine = self._requested
            while self._done < mine:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                target = self._requested
                self._cond.release()
                error = None
                try:
                    fsync_dir(self.path)
                except OSError as exc:
                    error = exc
                finally:
                    self._cond.acquire()
                self._running = False
                self._done = target
                self._error = error
                self._cond.notify_all()
                if error is not None:
                    raise error
            # Another thread's fsync covered us; share its failure if any.
            if self._error is not None and self._done == mine:
                raise self._error


@dataclass
class Recipient:
    """One recipient's delivery state inside ``info/QID``."""

    addr: str
    state: str = "pending"  # pending | delivered | failed
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""
    first_failure: float = 0.0

    @property
    def done(self) -> bool:
        return self.state in ("delivered", "failed")


@dataclass
class State:
    """What mailgrave-send knows about a message it has taken over."""

    qid: str
    sender: str
    recipients: list[Recipient]
    created: float
    size: int = 0
    held: bool = False
    warned: bool = False
    bounced: list[str] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        import json

        data: dict[str, Any] = {
            "qid": self.qid,
            "sender": self.sender,
            "created": self.created,
            "size": self.size,
            "held": self.held,
            "warned": self.warned,
            "bounced": self.bounced,
            "transcript": self.transcript[-200:],
            "recipients": [vars(r) for r in self.recipients],
        }
        return json.dumps(data, indent=1).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> State:
        import json

        data = json.loads(raw)
        return cls(
            qid=data["qid"],
            sender=data["sender"],
            created=float(data["created"]),
            size=int(data.get("size", 0)),
            held=bool(data.get("held", False)),
            warned=bool(data.get("warned", False)),
            bounced=list(data.get("bounced", [])),
            transcript=list(data.get("transcript", [])),
            recipients=[Recipient(**r) for r in data["recipients"]],
        )


class Spool:
    """Paths and durable operations on one spool directory."""

    def __init__(self, root: str) -> None:
        self.root = root

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def create(self, mode: int = 0o750) -> None:
        """Create the spool tree if it is missing (mailgrave-queue does this at start)."""
        os.makedirs(self.root, mode=mode, exist_ok=True)
        for sub in SUBDIRS:
            os.makedirs(self.path(sub), mode=mode, exist_ok=True)

    # --- queue side ---------------------------------------------------------

    def create_tmp(self, qid: str) -> int:
        return os.open(
            self.path("tmp", qid),
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
            0o640,
        )

    def discard_tmp(self, qid: str) -> None:
        self.unlink_quiet(self.path("tmp", qid))

    # --- send side ----------------------------------------------------------

    def todo(self) -> list[str]:
        """Committed new messages, oldest first (old format: the envelope's name,
        its message beside it or, after an interrupted take-over, in mess/)."""
        return sorted(n for n in os.listdir(self.path("todo")) if is_qid(n))

    def deferred(self) -> list[str]:
        """Messages mailgrave-send has taken over, oldest first."""
        return sorted(n for n in os.listdir(self.path("info")) if is_qid(n))

    def message_path(self, qid: str) -> str:
        """The file that holds the message: mess/QID once taken over, todo/QID
        while new (old format: todo/QID.msg)."""
        for path in (self.path("mess", qid), self.path("todo", f"{qid}.msg")):
            if os.path.exists(path):
                return path
        return self.path("todo", qid)

    def read_new(self, qid: str) -> tuple[bytes, int] | None:
        """The envelope and message size of the new entry todo/QID; None when it
        is gone, or is an old-format envelope whose message is missing.

        Raises EnvelopeError for a file that has the spool tag but no valid
        header (damaged: the caller moves it to bad/).
        """
        try:
            fd = os.open(self.path("todo", qid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            start = message_start(fd)
            head = os.pread(fd, start or len(SPOOL_TAG), 0)
            size = os.fstat(fd).st_size
            if start and start <= size:
                return head[head.index(b"\n") + 1 :], size - start
            if head.startswith(SPOOL_TAG):
                raise EnvelopeError("damaged spool header")
            envelope = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        message = self.message_path(qid)
        if message == self.path("todo", qid):
            return None  # old format, and its message never landed
        try:
            return envelope, os.path.getsize(message)
        except FileNotFoundError:
            return None

    def read_state(self, qid: str) -> State | None:
        try:
            with open(self.path("info", qid), "rb") as f:
                return State.from_json(f.read())
        except FileNotFoundError:
            return None

    def write_state(self, state: State, sync_dir: bool = True) -> None:
        """Replace ``info/QID`` atomically and durably."""
        write_atomic(self.path("info", state.qid), state.to_json(), self.path("tmp"), sync_dir)

    def take_over(self, qid: str, state: State) -> None:
        """Move a new message out of todo/ into mess/ + info/ (it has work left)."""
        mess = self.path("mess", qid)
        old_format = self.path("todo", f"{qid}.msg")
        if os.path.exists(old_format):
            os.rename(old_format, mess)
            fsync_dir(self.path("mess"))
        if os.path.exists(mess):
            # Old format (or a repeated take-over): todo/QID is the envelope alone.
            self.write_state(state)
            self.unlink_quiet(self.path("todo", qid))
            return
        # One file: its state first, so that a crash before the rename leaves
        # todo/QID with info/QID, which send resumes from the state.
        self.write_state(state)
        try:
            os.rename(self.path("todo", qid), mess)
        except FileNotFoundError:
            return
        fsync_dir(self.path("mess"))

    def remove(self, qid: str) -> None:
        """Forget a message: state first, then the message, wherever they are."""
        self.unlink_quiet(
            self.path("info", qid),
            self.path("todo", qid),
            self.path("todo", f"{qid}.msg"),
            self.path("mess", qid),
        )

    @staticmethod
    def unlink_quiet(*paths: str) -> None:
        """Unlink each path that exists."""
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def quarantine(self, qid: str) -> None:
        """Move a corrupt new message out of todo/ into bad/ for the administrator."""
        for name in (qid, f"{qid}.msg"):
            try:
                os.rename(self.path("todo", name), self.path("bad", name))
            except FileNotFoundError:
                pass

    def stale(self, max_age: float = 86400.0) -> Iterator[str]:
        """Leftovers of a crash: tmp files, messages without an envelope or state,
        older than ``max_age`` (younger ones may still be being written)."""
        now = time.time()
        tmp = self.path("tmp")
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            if _older(path, now, max_age):
                yield path
        todo = set(os.listdir(self.path("todo")))
        for name in todo:
            if name.endswith(".msg") and name[:-4] not in todo:
                path = self.path("todo", name)
                if _older(path, now, TODO_ORPHAN_AGE):
                    yield path
            elif (
                is_qid(name)
                and f"{name}.msg" not in todo
                and not os.path.exists(self.path("mess", name))
                and not self._has_header(self.path("todo", name))
            ):
                yield self.path("todo", name)  # an old envelope whose message never landed
        info = set(os.listdir(self.path("info")))
        for name in os.listdir(self.path("mess")):
            if name not in info and name not in todo:
                path = self.path("mess", name)
                if _older(path, now, max_age):
                    yield path

    @staticmethod
    def _has_header(path: str) -> bool:
        """Is this a one-file entry (as opposed to an old-format envelope)?"""
        try:
            with open(path, "rb") as f:
                return f.read(len(SPOOL_TAG)) == SPOOL_TAG
        except FileNotFoundError:
            return True  # gone meanwhile: nothing to remove


def entry_header(envelope: bytes) -> bytes:
    """The header a spool file starts with: the tag, the envelope's length, LF,
    the envelope (text0)."""
    return SPOOL_TAG + b"%d\n" % len(envelope) + envelope


def _older(path: str, now: float, max_age: float) -> bool:
    try:
        return now - os.stat(path).st_mtime > max_age
    except FileNotFoundError:
        return False


def write_atomic(path: str, data: bytes, tmp_dir: str, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path``: temp file, fsync, rename, fsync the directory."""
    tmp = os.path.join(tmp_dir, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    if sync_dir:
        fsync_dir(os.path.dirname(path))
