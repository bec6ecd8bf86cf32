"""The accept loop shared by the threaded stages (queue, remote): one thread per
connection at a time (threads are reused), exit after ``idle_exit`` seconds
with no connection (systemd starts the service again on the next one)."""

from __future__ import annotations

import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable

from mailgrave import log as logmod

log = logmod.getLogger(__name__)

THREAD_IDLE = 10.0  # seconds a finished thread waits for another connection


class Workers:
    """Threads that each serve one connection at a time and then wait for the
    next: a new thread only when none is waiting, so that a burst does not pay
    for a thread start per connection (about 0.2 ms of CPU each) and a slow
    connection never waits for a busy one."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self._serve = serve
        self._jobs: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, conn: socket.socket) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1  # that waiting thread takes it
                self._jobs.put(conn)
                return
        threading.Thread(target=self._work, args=(conn,), daemon=True).start()

    def _work(self, conn: socket.socket | None) -> None:
        while conn is not None:
            self._serve(conn)
            conn = self._next()

    def _next(self) -> socket.socket | None:
        with self._lock:
            self._idle += 1
        try:
            return self._jobs.get(timeout=THREAD_IDLE)
        except queue.Empty:
            pass
        with self._lock:
            # submit() counts on an idle thread under this lock: if one was
            # handed to us in the meantime, it is in the queue now.
            try:
                return self._jobs.get_nowait()
            except queue.Empty:
                self._idle -= 1
                return None


def serve_threads(
    listeners: list[socket.socket],
    handle: Callable[[socket.socket], None],
    idle_exit: float,
    tick: Callable[[], None] | None = None,
) -> None:
    """Accept on every listener and run ``handle(conn)`` in a thread of its own.

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

    workers = Workers(run)
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
            workers.submit(conn)
        if tick is not None:
            tick()
        with lock:
            if active == 0 and idle_exit > 0 and time.monotonic() - last >= idle_exit:
                return


def bind_unix(path: str, mode: int, backlog: int = 256) -> socket.socket:
    """A listening Unix stream socket at ``path`` (replacing a stale one) with ``mode``."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    sock.listen(backlog)
    return sock
