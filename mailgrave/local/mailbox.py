"""Writing one message into a mailbox: Maildir, mbox (and /file aliases), or a |command.

Each function runs in a child that already is the recipient's uid; it reads
the spool message from ``fd`` (LF line ends) with ``pread``
(:func:`mailgrave.spool.blocks`, which skips the spool file's header), so
every recipient starts at the message's first byte and nothing is held in
memory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

from mailgrave.errors import PermFail, TempFail
from mailgrave.fileio import fsync_dir, write_all, write_new
from mailgrave.spool import blocks, header_lines, lines

BLOCK = 1 << 16  # write buffer for mbox quoting
DOTLOCK_STALE = 300.0
PIPE_TIMEOUT = 600.0
_counter = 0


def has_delivered_to(fd: int, rcpt: str) -> bool:
    """True when the header already carries ``Delivered-To: rcpt`` (a mail loop)."""
    want = rcpt.lower().encode("utf-8", "surrogateescape")
    for line in header_lines(fd):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"delivered-to" and value.strip().lower() == want:
            return True
    return False


def _io_failure(exc: OSError, what: str) -> TempFail | PermFail:
    if exc.errno in (errno.EDQUOT,):
        return TempFail(f"4.2.2 mailbox full ({what})")
    if exc.errno == errno.ENOSPC:
        return TempFail(f"4.3.1 no space left on device ({what})")
    return TempFail(f"4.2.0 cannot write {what}: {os.strerror(exc.errno or 0)}")


def maildir(path: str, fd: int, prefix: bytes) -> str:
    """Deliver into the Maildir ``path``: tmp/ → fsync → link into new/ → fsync new/.

    A missing Maildir (or part of one) is created when the first attempt finds
    it missing.  The unlink of the tmp/ name is not made durable: after a crash
    readers ignore tmp/, and the message is already in new/.
    """
    global _counter
    try:
        _counter += 1
        now = time.time()
        host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        name = f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}Q{_counter}.{host}"
        tmp = os.path.join(path, "tmp", name)
        try:
            write_new(tmp, _prefixed(prefix, fd))
        except FileNotFoundError:
            _make_maildir(path)
            write_new(tmp, _prefixed(prefix, fd))
        new = os.path.join(path, "new", name)
        try:
            try:
                _link_or_rename(tmp, new)
            except FileNotFoundError:  # tmp/ was there, new/ was not
                _make_maildir(path)
                _link_or_rename(tmp, new)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(os.path.join(path, "new"))
    except OSError as exc:
        raise _io_failure(exc, f"maildir {path}") from None
    return f"2.0.0 delivered to maildir {path}"


def _prefixed(prefix: bytes, fd: int) -> Iterator[bytes]:
    yield prefix
    yield from blocks(fd)


def _make_maildir(path: str) -> None:
    for sub in ("", "tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)


def _link_or_rename(tmp: str, new: str) -> None:
    """Give the message its name in new/: link then unlink (Maildir's way: never
    replaces a file), or rename on a file system without hard links."""
    try:
        os.link(tmp, new)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        os.rename(tmp, new)  # the name is unique anyway
    else:
        os.unlink(tmp)


def _dotlock(path: str) -> str | None:
    """Create ``path.lock`` (Debian policy 11.6); None when the directory does not allow it."""
    lock = f"{path}.lock"
    deadline = time.monotonic() + 30
    while True:
        try:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return lock
        except FileExistsError:
            try:
                if time.time() - os.stat(lock).st_mtime > DOTLOCK_STALE:
                    os.unlink(lock)
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                raise TempFail("4.2.0 mailbox is locked") from None
            time.sleep(0.2)
        except PermissionError:
            return None  # no write access to the spool directory: fcntl lock only


def _open_mbox(path: str, spool: bool) -> int:
    """Open (or create) an mbox for appending; a new spool mailbox is USER:mail 0660."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            out = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return os.open(path, flags)
    if spool:  # Debian policy 11.6; the setgid spool directory gives group mail
        os.fchmod(out, 0o660)
    return out


def mbox(path: str, fd: int, sender: str, prefix: bytes, spool: bool = False) -> str:
    """Append to the mbox ``path`` (mboxrd quoting), locked with fcntl and a dotlock.

    On any error the file is truncated back to its old size: nothing half-written.
    ``spool``: a mailbox in the mail spool (/var/mail/USER), created 0660.
    """
    lock = _dotlock(path)
    try:
        try:
            out = _open_mbox(path, spool)
        except OSError as exc:
            raise _io_failure(exc, f"mailbox {path}") from None
        try:
            fcntl.lockf(out, fcntl.LOCK_EX)
            start = os.lseek(out, 0, os.SEEK_END)
            try:
                date = time.strftime("%a %b %d %H:%M:%S %Y", time.localtime())
                who = "_".join((sender or "MAILER-DAEMON").split())  # one word for readers
                buf = bytearray(f"From {who} {date}\n".encode("utf-8", "surrogateescape"))
                buf += prefix
                last = b"\n"
                for line in lines(fd):
                    if line.lstrip(b">").startswith(b"From "):
                        buf += b">"
                    buf += line
                    last = line
                    if len(buf) >= BLOCK:
                        write_all(out, bytes(buf))
                        buf.clear()
                if not last.endswith(b"\n"):
                    buf += b"\n"
                buf += b"\n"
                write_all(out, bytes(buf))
                os.fsync(out)
            except OSError as exc:
                os.ftruncate(out, start)
                raise _io_failure(exc, f"mailbox {path}") from None
            except BaseException:
                os.ftruncate(out, start)
                raise
        finally:
            os.close(out)
    finally:
        if lock:
            try:
                os.unlink(lock)
            except OSError:
                pass
    return f"2.0.0 delivered to mailbox {path}"


# sysexits that mean "do not try again" (as qmail-local and Postfix's local treat them)
_PERMANENT_EXITS = {64, 65, 67, 68, 69, 70, 76, 77, 78, 100}


def pipe(command: str, fd: int, prefix: bytes, env: dict[str, str]) -> str:
    """Run ``/bin/sh -c command`` with the message on its standard input."""
    errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            env=env,
            cwd=env["HOME"] if os.path.isdir(env.get("HOME", "")) else "/",
            start_new_session=True,
        )
    except OSError as exc:
        errors.close()
        raise TempFail(f"4.3.0 cannot run command: {os.strerror(exc.errno or 0)}") from None
    assert proc.stdin is not None
    try:
        proc.stdin.write(prefix)
        for data in blocks(fd):
            proc.stdin.write(data)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the command did not want all of it; its exit status decides
    try:
        proc.wait(timeout=PIPE_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        raise TempFail("4.3.0 command timed out") from None
    errors.seek(0)
    text = " ".join(errors.read(4096).decode("utf-8", "replace").split())[:200]
    errors.close()
    if proc.returncode == 0:
        return "2.0.0 delivered to command"
    if proc.returncode in _PERMANENT_EXITS:
        raise PermFail(f"5.3.0 command failed with status {proc.returncode}: {text}")
    raise TempFail(f"4.3.0 command failed with status {proc.returncode}: {text}")
