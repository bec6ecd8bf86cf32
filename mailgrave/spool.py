"""The spool: its file format, the commit point, each message's state, the admin actions.

See docs/queue.md for the states and the commit point.  In short:

* ``tmp/QID`` is a :class:`Submission` being written by mailgrave-queue: a
  header with the envelope (:data:`TAG`), then the message, LF line ends;
* ``todo/QID`` is a committed new message: its rename into ``todo/``
  followed by an fsync of ``todo/`` (shared by concurrent submissions,
  :class:`GroupSync`) is the commit point;
* ``mess/QID`` + ``info/QID`` is a message that mailgrave-send has taken over
  and that still has recipients to deliver (``info`` holds the
  :class:`Entry`: the envelope and each recipient's state, as JSON);
* ``ctl/QID.ACTION`` is an administrator's request for the running
  mailgrave-send (:meth:`Spool.request`), applied by :meth:`Spool.apply`.

This module is the only one that knows the format: every reader of a message
goes through :func:`blocks` (which skips the header).
"""

from __future__ import annotations

import enum
import fcntl
import json
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from mailgrave import maillog
from mailgrave.envelope import Envelope, EnvelopeError, decode
from mailgrave.errors import PermFail
from mailgrave.fileio import fsync_dir, replace_file, write_all
from mailgrave.record import Record, factory, record

SUBDIRS = ("tmp", "todo", "mess", "info", "ctl", "bad")
ACTIONS = ("delete", "hold", "release", "retry")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

# --- queue ids ---------------------------------------------------------------------


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


# --- the file format -----------------------------------------------------------------

# A spool file starts with a header: this tag, the length of the envelope in
# decimal, LF, then the envelope (text0); the message follows, LF line ends.
TAG = b"MGQ1 "
BLOCK = 1 << 16
_HEADER_PEEK = 32


def entry_header(envelope: bytes) -> bytes:
    """The header a spool file starts with: the tag, the envelope's length, LF,
    the envelope (text0)."""
    return TAG + b"%d\n" % len(envelope) + envelope


def message_start(fd: int) -> int:
    """Where the message begins in the spool file ``fd``: just after its header.

    Raises EnvelopeError when the file has no valid header (damaged).
    """
    head = os.pread(fd, _HEADER_PEEK, 0)
    line, newline, _ = head.partition(b"\n")
    digits = line[len(TAG) :]
    if not head.startswith(TAG) or not newline or not digits.isdigit():
        raise EnvelopeError("damaged spool header")
    return len(line) + 1 + int(digits)


def message_size(fd: int) -> int:
    """The size of the message in the spool file ``fd``, without the header."""
    return max(0, os.fstat(fd).st_size - message_start(fd))


def blocks(fd: int, start: int | None = None) -> Iterator[bytes]:
    """A message's bytes with ``pread`` (the fd's position is shared with whoever
    passed it, so it is never moved), in bounded pieces; the spool header is
    skipped (``start``: from there instead, 0 for a file that is a bare message)."""
    offset = message_start(fd) if start is None else start
    while True:
        data = os.pread(fd, BLOCK, offset)
        if not data:
            return
        offset += len(data)
        yield data


def lines(fd: int, start: int | None = None) -> Iterator[bytes]:
    """The message line by line (the last line may lack its LF)."""
    rest = b""
    for data in blocks(fd, start):
        data = rest + data
        parts = data.split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield part + b"\n"
    if rest:
        yield rest


def header_lines(fd: int, start: int | None = None) -> Iterator[bytes]:
    """The message's header lines, up to the blank line."""
    for line in lines(fd, start):
        if line in (b"\n", b"\r\n"):
            return
        yield line


def scratch_entry(source: BinaryIO, envelope: bytes) -> int:
    """A message given by hand to mailgrave-local or mailgrave-remote, as a spool
    file: an unlinked temporary file with the header, then the message from
    ``source`` with LF line ends. Returns its descriptor (closed at exit)."""
    tmp = tempfile.TemporaryFile()  # noqa: SIM115 - the caller owns the descriptor
    fd = os.dup(tmp.fileno())
    tmp.close()
    write_all(fd, entry_header(envelope))
    held = b""
    while data := source.read(BLOCK):
        data = held + data
        held = b"\r" if data.endswith(b"\r") else b""
        write_all(fd, data[: len(data) - len(held)].replace(b"\r\n", b"\n"))
    write_all(fd, held)
    return fd


# --- writing a new entry ----------------------------------------------------------------


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


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class Submission:
    """One new entry being written into ``tmp/QID``: the header (when the envelope
    is known first), then the message with LF line ends, at most ``limit`` bytes.
    :meth:`commit` is the commit point; until then :meth:`discard` (or any
    failure) leaves nothing behind."""

    def __init__(self, spool: Spool, limit: int) -> None:
        self.spool = spool
        self.limit = limit
        self.qid = new_qid()
        try:
            self.fd = spool.create_tmp(self.qid)
        except FileExistsError:
            self.qid = new_qid()
            self.fd = spool.create_tmp(self.qid)
        self.size = 0  # of the message, header not counted
        self.start = 0  # where the message begins in the file
        self._cr = False
        self._open = True

    def begin(self, envelope: bytes, first: bytes) -> None:
        """Write the header for ``envelope`` (text0), then ``first`` (the Received: line)."""
        header = entry_header(envelope)
        write_all(self.fd, header + first)
        self.start = len(header)
        self.size = len(first)

    def write(self, data: bytes) -> None:
        """Message bytes, CRLF or LF line ends (stored as LF); PermFail past the limit."""
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        data = data.replace(b"\r\n", b"\n")
        self.size += len(data)
        if self.size > self.limit:
            raise PermFail("5.3.4 message too big")
        write_all(self.fd, data)

    def prepend(self, envelope: bytes, first: bytes) -> None:
        """The envelope arrived after the message (qmail-queue's fd 1): write a new
        tmp/QID that is the header and ``first``, then what was written so far."""
        self._flush_cr()
        tmp = self.spool.path("tmp", self.qid)
        staging = self.spool.path("tmp", f"{self.qid}.old")
        os.rename(tmp, staging)
        old, self.fd = self.fd, self.spool.create_tmp(self.qid)
        try:
            size = self.size
            self.begin(envelope, first)
            self.size += size
            offset = 0
            while block := os.pread(old, 1 << 20, offset):
                write_all(self.fd, block)
                offset += len(block)
        finally:
            os.close(old)
            os.unlink(staging)

    def insert(self, data: bytes) -> None:
        """Put ``data`` (header fields, LF line ends) at the top of the message, before
        the Received: line: the file's message part is moved down in place, 1 MiB at a
        time from its end, so memory stays flat whatever the message's size."""
        self._flush_cr()
        if not data:
            return
        end = self.start + self.size
        pos = end
        while pos > self.start:
            n = min(1 << 20, pos - self.start)
            pos -= n
            _pwrite_all(self.fd, os.pread(self.fd, n, pos), pos + len(data))
        _pwrite_all(self.fd, data, self.start)
        os.lseek(self.fd, 0, os.SEEK_END)
        self.size += len(data)
        if self.size > self.limit:
            raise PermFail("5.3.4 message too big")

    def _flush_cr(self) -> None:
        if self._cr:
            self._cr = False
            self.size += 1
            write_all(self.fd, b"\r")

    def commit(self, todo_sync: GroupSync) -> None:
        """fsync the file, rename it into todo/, fsync todo/ (shared): the commit point."""
        self._flush_cr()
        os.fsync(self.fd)
        os.rename(self.spool.path("tmp", self.qid), self.spool.path("todo", self.qid))
        self._close()
        try:
            todo_sync.sync()
        except BaseException:
            # Not acknowledged: take it back (a crash here may leave it; see docs/queue.md).
            self.spool.unlink_quiet(self.spool.path("todo", self.qid))
            raise

    def discard(self) -> None:
        """Drop the submission: nothing stays in the spool."""
        if self._open:
            self._close()
            self.spool.unlink_quiet(self.spool.path("tmp", self.qid))

    def _close(self) -> None:
        if self._open:
            self._open = False
            os.close(self.fd)


# --- what mailgrave-send knows about a message -------------------------------------------


class RecipientState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@record(frozen=False)
class Recipient(Record):
    """One recipient's delivery state inside ``info/QID``."""

    addr: str
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""
    first_failure: float = 0.0
    status: str = ""  # the enhanced status code of the last reply
    remote: str = ""  # the host that gave it (remote deliveries)
    notify: str = ""  # DSN NOTIFY (RFC 3461): "" (the default), NEVER, or SUCCESS,FAILURE,DELAY
    orcpt: str = ""  # DSN ORCPT, decoded: "rfc822;user@example.org"
    # The success report it is owed once delivered: "delivered" (local),
    # "relayed" (to a host without DSN), "" (none: a DSN host took the request on).
    success: str = ""

    @property
    def done(self) -> bool:
        return self.state is not RecipientState.PENDING


@record(frozen=False)
class Entry(Record):
    """What mailgrave-send knows about a message it has taken over (``info/QID``)."""

    qid: str
    sender: str
    recipients: list[Recipient]
    created: float
    size: int = 0
    held: bool = False
    warned: bool = False
    bounced: list[str] = factory(list)
    transcript: list[str] = factory(list)
    ret: str = ""  # DSN RET: "", FULL or HDRS
    envid: str = ""  # DSN ENVID
    reported: list[str] = factory(list)  # recipients whose success report is queued
    utf8: bool = False  # SMTPUTF8 was declared on MAIL FROM (RFC 6531)

    def envelope(self, recipients: list[Recipient] | tuple[Recipient, ...]) -> Envelope:
        """The envelope for a delivery request to some of its recipients."""
        dsn = any(r.notify or r.orcpt for r in recipients)
        return Envelope(
            self.sender,
            tuple(r.addr for r in recipients),
            self.ret,
            self.envid,
            tuple(r.notify for r in recipients) if dsn else (),
            tuple(r.orcpt for r in recipients) if dsn else (),
            self.utf8,
        )

    def next_attempt(self) -> float | None:
        """When a recipient is due next (epoch seconds); None when held or nothing is pending."""
        if self.held:
            return None
        return min((r.next_attempt for r in self.recipients if not r.done), default=None)

    def to_json(self) -> bytes:
        data: dict[str, Any] = {
            "qid": self.qid,
            "sender": self.sender,
            "created": self.created,
            "size": self.size,
            "held": self.held,
            "warned": self.warned,
            "bounced": self.bounced,
            "transcript": self.transcript[-200:],
            "ret": self.ret,
            "envid": self.envid,
            "reported": self.reported,
            "smtputf8": self.utf8,
            "recipients": [
                {name: getattr(r, name) for name in Recipient._fields} for r in self.recipients
            ],
        }
        return json.dumps(data, indent=1).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Entry:
        data = json.loads(raw)
        recipients = []
        for r in data["recipients"]:
            fields = {k: v for k, v in r.items() if k in Recipient._fields}
            fields["state"] = RecipientState(fields.get("state", "pending"))
            recipients.append(Recipient(**fields))
        return cls(
            qid=data["qid"],
            sender=data["sender"],
            created=float(data["created"]),
            size=int(data.get("size", 0)),
            held=bool(data.get("held", False)),
            warned=bool(data.get("warned", False)),
            bounced=list(data.get("bounced", [])),
            transcript=list(data.get("transcript", [])),
            recipients=recipients,
            ret=str(data.get("ret", "")),
            envid=str(data.get("envid", "")),
            reported=list(data.get("reported", [])),
            utf8=bool(data.get("smtputf8", False)),
        )


# --- the spool directory --------------------------------------------------------------


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

    def create_tmp(self, qid: str) -> int:
        return os.open(
            self.path("tmp", qid),
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
            0o640,
        )

    def todo(self) -> list[str]:
        """Committed new messages, oldest first."""
        return sorted(n for n in os.listdir(self.path("todo")) if is_qid(n))

    def deferred(self) -> list[str]:
        """Messages mailgrave-send has taken over, oldest first."""
        return sorted(n for n in os.listdir(self.path("info")) if is_qid(n))

    def message_path(self, qid: str) -> str:
        """The file that holds the message: mess/QID once taken over, todo/QID while new."""
        mess = self.path("mess", qid)
        return mess if os.path.exists(mess) else self.path("todo", qid)

    def read_new(self, qid: str) -> tuple[bytes, int] | None:
        """The envelope and message size of the new entry todo/QID; None when it is gone.

        Raises EnvelopeError for a file without a valid header (damaged: the
        caller moves it to bad/).
        """
        try:
            fd = os.open(self.path("todo", qid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            start = message_start(fd)
            size = os.fstat(fd).st_size
            if start > size:
                raise EnvelopeError("damaged spool header")
            head = os.pread(fd, start, 0)
        finally:
            os.close(fd)
        return head[head.index(b"\n") + 1 :], size - start

    def new_entry(self, qid: str, validate: bool = True) -> Entry | None:
        """The :class:`Entry` of a new message in todo/ (no recipient tried yet);
        None when it is gone. Raises EnvelopeError (see :meth:`read_new`)."""
        found = self.read_new(qid)
        if found is None:
            return None
        env = decode(found[0], validate=validate)
        recipients = [
            Recipient(addr, notify=env.notify_of(i), orcpt=env.orcpt_of(i))
            for i, addr in enumerate(env.recipients)
        ]
        return Entry(
            qid,
            env.sender,
            recipients,
            qid_time(qid),
            found[1],
            ret=env.ret,
            envid=env.envid,
            utf8=env.utf8,
        )

    def read_entry(self, qid: str) -> Entry | None:
        try:
            with open(self.path("info", qid), "rb") as f:
                return Entry.from_json(f.read())
        except FileNotFoundError:
            return None

    def write_entry(self, entry: Entry, sync_dir: bool = True) -> None:
        """Replace ``info/QID`` atomically and durably."""
        replace_file(self.path("info", entry.qid), entry.to_json(), self.path("tmp"), sync_dir)

    def entries(self) -> list[Entry]:
        """Every message in the queue, taken over or new, oldest first (for listings)."""
        found = {}
        for qid in self.deferred():
            entry = self.read_entry(qid)
            if entry is not None:
                found[qid] = entry
        for qid in self.todo():
            if qid in found:
                continue
            try:
                entry = self.new_entry(qid, validate=False)
            except (OSError, EnvelopeError):
                continue
            if entry is not None:
                found[qid] = entry
        return [found[qid] for qid in sorted(found)]

    def next_attempt(self) -> float | None:
        """The earliest next attempt of any taken-over message (None: nothing waits)."""
        due = None
        for qid in self.deferred():
            try:
                entry = self.read_entry(qid)
            except (OSError, ValueError, KeyError):
                continue
            when = entry.next_attempt() if entry is not None else None
            if when is not None and (due is None or when < due):
                due = when
        return due

    def targets(self, action: str) -> list[str]:
        """The messages ``mailgrave queue ACTION --all`` acts on: every one, except
        that a flush (retry) leaves held messages held."""
        return [e.qid for e in self.entries() if not (action == "retry" and e.held)]

    def take_over(self, entry: Entry) -> None:
        """Move a new message out of todo/ into mess/ + info/ (it has work left).

        Its state first, so that a crash before the rename leaves todo/QID with
        info/QID, which send resumes from the state.
        """
        self.write_entry(entry)
        try:
            os.rename(self.path("todo", entry.qid), self.path("mess", entry.qid))
        except FileNotFoundError:
            return
        fsync_dir(self.path("mess"))

    def remove(self, qid: str) -> None:
        """Forget a message: state first, then the message, wherever they are."""
        self.unlink_quiet(self.path("info", qid), self.path("todo", qid), self.path("mess", qid))

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
        try:
            os.rename(self.path("todo", qid), self.path("bad", qid))
        except FileNotFoundError:
            pass

    def stale(self, max_age: float = 86400.0) -> Iterator[str]:
        """Leftovers of a crash older than ``max_age`` (younger ones may still be
        being written): tmp files, and messages in mess/ without a state."""
        now = time.time()
        tmp = self.path("tmp")
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            if _older(path, now, max_age):
                yield path
        todo = set(os.listdir(self.path("todo")))
        info = set(os.listdir(self.path("info")))
        for name in os.listdir(self.path("mess")):
            if name not in info and name not in todo:
                path = self.path("mess", name)
                if _older(path, now, max_age):
                    yield path

    # --- the administrator's actions ---------------------------------------------------

    def with_send_lock(self, blocking: bool, body: Callable[[], int]) -> int | None:
        """Run ``body`` holding spool/send.lock (one scheduler, or one admin action,
        at a time); None when another holds it and ``blocking`` is false."""
        fd = os.open(self.path("send.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                return None
            return body()
        finally:
            os.close(fd)

    def request(self, qid: str, action: str) -> None:
        """Leave ``action`` on ``qid`` in ctl/ for the running mailgrave-send."""
        open(self.path("ctl", f"{qid}.{action}"), "w").close()

    def wake(self) -> None:
        """Start a delivery run (ctl/ not empty wakes mailgrave-send.path)."""
        open(self.path("ctl", "wake"), "w").close()

    def requests(self) -> list[tuple[str, str, str]]:
        """(qid, action, path) of each request in ctl/, in order."""
        ctl = self.path("ctl")
        try:
            names = sorted(os.listdir(ctl))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            qid, _, action = name.partition(".")
            out.append((qid, action, os.path.join(ctl, name)))
        return out

    def apply(self, qid: str, action: str) -> bool:
        """delete / hold / release / retry one message; True when it exists.

        The caller holds the send lock (or is the running mailgrave-send).
        """
        entry = self.read_entry(qid)
        if entry is None:
            # A message still in todo/: take it over so that it has a state to change.
            if not os.path.exists(self.path("todo", qid)):
                return False
            if action == "delete":
                self.remove(qid)
                maillog.removed(qid, "deleted by the administrator")
                return True
            if action in ("release", "retry"):
                return True
            try:
                entry = self.new_entry(qid, validate=False)
            except (OSError, EnvelopeError):
                return False
            if entry is None:
                return False
            entry.held = True
            self.take_over(entry)
            return True
        if action == "delete":
            self.remove(qid)
            maillog.removed(qid, "deleted by the administrator")
            return True
        if action == "hold":
            entry.held = True
        elif action == "release":
            entry.held = False
        elif action == "retry":
            entry.held = False  # retry of this very message releases it (mailgrave(8))
            for r in entry.recipients:
                if not r.done:
                    r.next_attempt = 0.0
        self.write_entry(entry)
        return True


def _older(path: str, now: float, max_age: float) -> bool:
    try:
        return now - os.stat(path).st_mtime > max_age
    except FileNotFoundError:
        return False
