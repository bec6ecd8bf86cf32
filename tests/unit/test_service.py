"""The threads of the threaded stages (queue, remote): reused, never making a
connection wait for a busy one, gone when idle."""

from __future__ import annotations

import socket
import threading

import pytest

from mailgrave import proc as service
from tests.conftest import wait_for


def _conns(n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        a, b = socket.socketpair()
        b.close()
        out.append(a)
    return out


def test_connections_one_after_another_reuse_one_thread() -> None:
    served: list[int] = []
    done = threading.Semaphore(0)

    def serve(conn: socket.socket) -> None:
        served.append(threading.get_native_id())  # a kernel thread id, not reused at once
        conn.close()
        done.release()

    workers = service.Workers(serve)
    for conn in _conns(20):
        workers.submit(conn)
        assert done.acquire(timeout=5)
        wait_for(lambda: workers._idle == 1)  # back to waiting before the next one
    assert len(served) == 20
    assert len(set(served)) == 1


def test_a_busy_thread_never_holds_up_another_connection() -> None:
    release = threading.Event()
    finished: list[str] = []

    def serve(conn: socket.socket) -> None:
        if conn.fileno() == slow.fileno():
            release.wait(10)
        finished.append("slow" if conn.fileno() == slow.fileno() else "fast")
        conn.close()

    slow, fast = _conns(2)
    workers = service.Workers(serve)
    workers.submit(slow)
    workers.submit(fast)
    wait_for(lambda: finished == ["fast"])  # while the slow one still holds its thread
    release.set()
    wait_for(lambda: finished == ["fast", "slow"])


def test_idle_threads_leave_and_later_connections_are_still_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service, "THREAD_IDLE", 0.05)
    served: list[int] = []

    def serve(conn: socket.socket) -> None:
        served.append(threading.get_ident())
        conn.close()

    before = threading.active_count()
    workers = service.Workers(serve)
    first, second = _conns(2)
    workers.submit(first)
    wait_for(lambda: len(served) == 1)
    wait_for(lambda: workers._idle == 0 and threading.active_count() == before)  # it left
    workers.submit(second)
    wait_for(lambda: len(served) == 2)
