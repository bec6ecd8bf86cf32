"""Processes and connections: the one accept loop, the one fork/reap helper.

* :func:`serve` accepts on every listener and hands each connection on, until
  nothing has been busy for ``idle_exit`` seconds (systemd starts the service
  again on the next connection): mailgrave-local forks a worker per
  connection (:class:`Children`), the queue and remote stages give it to a
  thread (:func:`serve_threads`, threads reused).
* :class:`Children` forks children with a tag each, reaps them without
  waiting, and stops them: the local stage's workers, the smtpd listener's
  sessions and spares, ``mailgrave run``'s stages.

No threading at import time: a forking parent (the smtpd listener) that had
imported it would make every child run its at-fork hooks.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, NoReturn

from mailgrave import log as logmod
from mailgrave.errors import EXIT_OK, EXIT_TEMP

log = logmod.getLogger(__name__)

THREAD_IDLE = 10.0  # seconds a finished thread waits for another connection
TICK = 1.0  # seconds between two housekeeping rounds of the accept loop


def run_and_exit(body: Callable[[], object]) -> NoReturn:
    """In a forked child: run ``body``, then leave without the interpreter's
    teardown (0, or 111 after an exception, which is logged)."""
    code = EXIT_OK
    try:
        body()
    except BaseException:
        log.exception("child process failed")
        code = EXIT_TEMP
    finally:
        logmod.shutdown()
        os._exit(code)


class Children:
    """The processes this one forked, each with a tag (what it is for)."""

    def __init__(self) -> None:
        self.tags: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.tags)

    def fork(self, tag: Any, child: Callable[[], object]) -> int:
        """Run ``child()`` in a new process (see :func:`run_and_exit`); its pid."""
        pid = self.fork_here(tag)
        if pid == 0:
            run_and_exit(child)
        return pid

    def fork_here(self, tag: Any) -> int:
        """``os.fork()`` for a parent whose child goes on inline (the smtpd
        listener prepares each child itself): 0 in the child, which owns no
        children, the pid in the parent, which remembers it with ``tag``."""
        pid = os.fork()
        if pid == 0:
            self.tags.clear()
        else:
            self.tags[pid] = tag
        return pid

    def reap(self) -> list[tuple[int, Any, int]]:
        """(pid, tag, exit status) of each child that has ended, without waiting."""
        ended: list[tuple[int, Any, int]] = []
        while self.tags:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                ended += [(pid, tag, -1) for pid, tag in self.tags.items()]
                self.tags.clear()
                break
            if pid == 0:
                break
            if pid in self.tags:
                ended.append((pid, self.tags.pop(pid), os.waitstatus_to_exitcode(status)))
        return ended

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every child, wait up to ``timeout`` seconds, then SIGKILL the rest."""
        for pid in self.tags:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while self.tags and time.monotonic() < deadline:
            if not self.reap():
                time.sleep(0.05)
        for pid in list(self.tags):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            del self.tags[pid]


def serve(
    listeners: list[socket.socket],
    start: Callable[[socket.socket], None],
    idle_exit: float,
    busy: Callable[[], bool],
    tick: Callable[[], object] | None = None,
) -> None:
    """Accept on every listener and ``start(conn)`` each connection (a blocking
    socket). Returns once ``busy()`` has been false and nothing was accepted
    for ``idle_exit`` seconds (never when it is 0). ``tick`` runs at least every
    :data:`TICK` seconds and after every wake-up (housekeeping, reaping)."""
    for listener in listeners:
        listener.setblocking(False)
    last = time.monotonic()
    while True:
        try:
            ready, _, _ = select.select(listeners, [], [], TICK)
        except InterruptedError:  # SIGCHLD: a child to reap
            ready = []
        for listener in ready:
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            conn.setblocking(True)
            last = time.monotonic()
            start(conn)
        if tick is not None:
            tick()
        if busy():
            last = time.monotonic()
        elif idle_exit > 0 and time.monotonic() - last >= idle_exit:
            return


def serve_forks(
    listeners: list[socket.socket], handle: Callable[[socket.socket], None], idle_exit: float
) -> None:
    """:func:`serve` with a child process per connection (mailgrave-local's workers)."""
    children = Children()
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select() to reap at once

    def in_child(conn: socket.socket) -> None:
        for listener in listeners:
            listener.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        handle(conn)

    def start(conn: socket.socket) -> None:
        children.fork("worker", lambda: in_child(conn))
        conn.close()

    serve(listeners, start, idle_exit, busy=lambda: bool(children), tick=children.reap)


class Workers:
    """Threads that each serve one connection at a time and then wait for the
    next: a new thread only when none is waiting, so that a burst does not pay
    for a thread start per connection (about 0.2 ms of CPU each) and a slow
    connection never waits for a busy one."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        import queue
        import threading  # not at the top: see the module's docstring

        self._serve = serve
        self._jobs: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self._empty = queue.Empty
        self._thread = threading.Thread
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, conn: socket.socket) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1  # that waiting thread takes it
                self._jobs.put(conn)
                return
        self._thread(target=self._work, args=(conn,), daemon=True).start()

    def _work(self, conn: socket.socket | None) -> None:
        while conn is not None:
            self._serve(conn)
            conn = self._next()

    def _next(self) -> socket.socket | None:
        with self._lock:
            self._idle += 1
        try:
            return self._jobs.get(timeout=THREAD_IDLE)
        except self._empty:
            pass
        with self._lock:
            # submit() counts on an idle thread under this lock: if one was
            # handed to us in the meantime, it is in the queue now.
            try:
                return self._jobs.get_nowait()
            except self._empty:
                self._idle -= 1
                return None


def serve_threads(
    listeners: list[socket.socket],
    handle: Callable[[socket.socket], None],
    idle_exit: float,
    tick: Callable[[], None] | None = None,
) -> None:
    """:func:`serve` with ``handle(conn)`` in a thread of its own per connection
    (the queue and remote stages); ``tick`` runs about once a second."""
    import threading  # not at the top: see the module's docstring

    active = 0
    lock = threading.Lock()

    def run(conn: socket.socket) -> None:
        nonlocal active
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

    workers = Workers(run)

    def start(conn: socket.socket) -> None:
        nonlocal active
        with lock:
            active += 1
        workers.submit(conn)

    serve(listeners, start, idle_exit, busy=lambda: active > 0, tick=tick)


def bind_unix(path: str, mode: int, backlog: int = 256, dir_owner: bool = False) -> socket.socket:
    """A listening Unix stream socket at ``path`` (replacing a stale one) with ``mode``;
    ``dir_owner`` (a stage's ``--in`` as root): owned by its directory's owner and
    group, so that whoever may use the directory may connect (the 2006 layout)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    if dir_owner and os.geteuid() == 0:
        st = os.stat(os.path.dirname(os.path.abspath(path)))
        os.chown(path, st.st_uid, st.st_gid)
    sock.listen(backlog)
    return sock
