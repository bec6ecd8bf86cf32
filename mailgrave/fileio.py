"""Durable writes: every file MailGrave creates goes through :func:`write_new`."""

from __future__ import annotations

import _thread
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte of ``data`` is written (writes may be partial)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: str) -> None:
    """fsync a directory, so that the entries created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(
    path: str,
    chunks: Iterable[bytes],
    mode: int = 0o600,
    *,
    fsync: bool = True,
    owner: tuple[int, int] | None = None,
) -> None:
    """Create ``path`` (which must not exist, nor be a symbolic link), write
    ``chunks``, fsync it (unless ``fsync`` is false) and close it; ``owner``
    (root only) is the uid and gid it is given. On any failure the file is
    removed: nothing half-written stays behind.

    Callers give the file its real name afterwards: a rename over the old
    version (:func:`replace_file`), a link into a Maildir's ``new/``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    try:
        for data in chunks:
            write_all(fd, data)
        if owner is not None:
            os.fchown(fd, *owner)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def replace_file(
    path: str,
    data: bytes,
    tmp_dir: str,
    sync_dir: bool = True,
    *,
    mode: int = 0o640,
    fsync: bool = True,
    owner: tuple[int, int] | None = None,
) -> None:
    """Replace ``path`` with ``data`` atomically: a temporary file in ``tmp_dir``
    (:func:`write_new`), renamed over ``path``, then (``sync_dir``) an fsync of
    ``path``'s directory so that the new version is durable."""
    tmp = os.path.join(tmp_dir, f".{os.path.basename(path)}.{os.getpid()}.{_thread.get_ident()}")
    try:
        write_new(tmp, (data,), mode, fsync=fsync, owner=owner)
    except FileExistsError:
        # Left by a process that crashed with this pid and thread id: ours now.
        os.unlink(tmp)
        write_new(tmp, (data,), mode, fsync=fsync, owner=owner)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(os.path.dirname(path))
