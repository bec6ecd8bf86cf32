"""The two durable-write primitives every writer of mail uses."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

BLOCK = 1 << 16


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


def blocks(fd: int) -> Iterator[bytes]:
    """A spool message's bytes from offset 0 with ``pread`` (the fd's position is
    shared with whoever passed it, so it is never moved), in bounded pieces."""
    offset = 0
    while True:
        data = os.pread(fd, BLOCK, offset)
        if not data:
            return
        offset += len(data)
        yield data
