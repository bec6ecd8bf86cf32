"""systemd's socket-activation contract (sd_listen_fds) without libsystemd."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import Any

SD_LISTEN_FDS_START = 3


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """The sockets passed in ``LISTEN_FDS`` (fd 3 onwards), as socket objects.

    As sd_listen_fds(3): only when ``LISTEN_PID`` names this process (or is
    absent, for supervisors that cannot know the child's pid); the variables
    are removed so that children do not inherit them.
    """
    count = os.environ.get("LISTEN_FDS", "")
    pid = os.environ.get("LISTEN_PID", "")
    if unset_environment:
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not count.isdigit() or (pid and pid != str(os.getpid())):
        return []
    import socket

    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


def stdin_socket() -> socket.socket | None:
    """fd 0 as a socket when it is one (inetd style, systemd ``Accept=yes``)."""
    import socket

    sock: socket.socket | None = _stdin_as(socket)
    return sock


def stdin_raw_socket() -> socket.socket | None:
    """:func:`stdin_socket` as a ``_socket.socket``, for a process started per
    connection: the methods a byte-stream session needs (recv, sendall,
    shutdown, settimeout, getpeername; ssl can wrap it), but no ``makefile``,
    and no import of :mod:`socket` (enum, selectors)."""
    import _socket

    sock: socket.socket | None = _stdin_as(_socket)
    return sock


def _stdin_as(module: Any) -> Any:
    """A ``module.socket`` on a duplicate of fd 0, or None when fd 0 is no socket."""
    try:
        fd = os.dup(0)
    except OSError:
        return None
    try:
        sock = module.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return None
    try:
        sock.getsockopt(module.SOL_SOCKET, module.SO_TYPE)
    except OSError:
        sock.close()
        return None
    return sock


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of a Unix-socket peer (SO_PEERCRED), or None."""
    import socket
    import struct

    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)
