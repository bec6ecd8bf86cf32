"""The accept loop shared by the threaded stages (queue, remote): one thread per
connection, exit after ``idle_exit`` seconds with no connection (systemd
starts the service again on the next one)."""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def serve_threads(
    listeners: list[socket.socket],
    handle: Callable[[socket.socket], None],
    idle_exit: float,
    tick: Callable[[], None] | None = None,
) -> None:
    """Accept on every listener and run ``handle(conn)`` in a thread per connection.

    Returns once nothing has been connected for ``idle_exit`` seconds (never
    when it is 0). ``tick`` runs about once a second (housekeeping).
    """
    active = 0
    lock = threading.Lock()
    last = time.monotonic()

    def run(conn: socket.socket) -> None:
        nonlocal active, last
        try:
            handle(conn)
        except (BrokenPipeError, ConnectionResetError):
            log.info("the client went away before reading the answer")
        except Exception:
            log.exception("unexpected error serving a connection")
        finally:
            conn.close()
            with lock:
                active -= 1
                last = time.monotonic()

    sel = selectors.DefaultSelector()
    for listener in listeners:
        listener.setblocking(False)
        sel.register(listener, selectors.EVENT_READ, listener)
    while True:
        for key, _ in sel.select(timeout=1.0):
            ready: socket.socket = key.data
            try:
                conn, _addr = ready.accept()
            except (BlockingIOError, InterruptedError):
                continue
            conn.setblocking(True)
            with lock:
                active += 1
                last = time.monotonic()
            threading.Thread(target=run, args=(conn,), daemon=True).start()
        if tick is not None:
            tick()
        with lock:
            if active == 0 and idle_exit > 0 and time.monotonic() - last >= idle_exit:
                return


def bind_unix(path: str, mode: int, backlog: int = 256) -> socket.socket:
    """A listening Unix stream socket at ``path`` (replacing a stale one) with ``mode``."""
    import os

    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    sock.listen(backlog)
    return sock
