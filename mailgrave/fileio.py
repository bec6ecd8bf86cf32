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


# A spool file (docs/queue.md) starts with a header: this tag, the length of
# the envelope in decimal, LF, then the envelope (text0); the message follows.
# Files written before that format are the message alone.
SPOOL_TAG = b"MGQ1 "
_HEADER_PEEK = 32


def message_start(fd: int) -> int:
    """Where the message begins in the spool file ``fd``: just after its header,
    or 0 in a file without one (a message never starts with the tag: the queue's
    ``Received:`` line comes first)."""
    head = os.pread(fd, _HEADER_PEEK, 0)
    if not head.startswith(SPOOL_TAG):
        return 0
    line, newline, _ = head.partition(b"\n")
    digits = line[len(SPOOL_TAG) :]
    if not newline or not digits.isdigit():
        return 0
    return len(line) + 1 + int(digits)


def message_size(fd: int) -> int:
    """The size of the message in the spool file ``fd``, without the header."""
    return max(0, os.fstat(fd).st_size - message_start(fd))


def blocks(fd: int) -> Iterator[bytes]:
    """A spool message's bytes with ``pread`` (the fd's position is shared with
    whoever passed it, so it is never moved), in bounded pieces, header skipped."""
    offset = message_start(fd)
    while True:
        data = os.pread(fd, BLOCK, offset)
        if not data:
            return
        offset += len(data)
        yield data


def lines(fd: int) -> Iterator[bytes]:
    """The spool message line by line (the last line may lack its LF)."""
    rest = b""
    for data in blocks(fd):
        data = rest + data
        parts = data.split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield part + b"\n"
    if rest:
        yield rest


def header_lines(fd: int) -> Iterator[bytes]:
    """The spool message's header lines, up to the blank line."""
    for line in lines(fd):
        if line in (b"\n", b"\r\n"):
            return
        yield line
