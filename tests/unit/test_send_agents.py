"""mailgrave-send's connections to the delivery agents: reused, and replaced when closed."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from mailgrave.ctrl import Agents, request
from tests.conftest import wait_for


class Agent:
    """A local.ctrl stand-in on a Unix socket: answers K per recipient; with
    ``one_shot`` it closes each connection after its first request."""

    def __init__(self, path: Path, one_shot: bool) -> None:
        self.connections = 0
        self.closed = 0
        self.requests = 0
        self.one_shot = one_shot
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._requests(conn)
        finally:
            conn.close()
            self.closed += 1

    def _requests(self, conn: socket.socket) -> None:
        while True:
            data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 1)
            for fd in fds:
                os.close(fd)
            if not data:
                return
            self.requests += 1
            rcpts = [f for f in data.split(b"\0") if f.startswith(b"T")]
            conn.sendall(b"|transcript line\n" + b"K2.0.0 ok\n" * len(rcpts))
            if self.one_shot:
                return


def _message(tmp_path: Path) -> str:
    path = tmp_path / "msg"
    path.write_bytes(b"Subject: x\n\nbody\n")
    return str(path)


def test_one_connection_serves_many_requests(tmp_path: Path) -> None:
    agent = Agent(tmp_path / "local.ctrl", one_shot=False)
    agents = Agents()
    try:
        for i in range(5):
            results, transcript = request(
                str(tmp_path / "local.ctrl"),
                f"Q{i}",
                "s@x.test",
                ["a@x", "b@x"],
                _message(tmp_path),
                agents,
            )
            assert [r.code for r in results] == ["K", "K"]
            assert transcript == ["transcript line"]
    finally:
        agents.close()
    assert (agent.requests, agent.connections) == (5, 1)


def test_a_connection_the_agent_closed_is_replaced(tmp_path: Path) -> None:
    """An agent restarted between two messages: the next request goes over a new
    connection instead of failing on the closed one."""
    agent = Agent(tmp_path / "local.ctrl", one_shot=True)
    agents = Agents()
    try:
        for i in range(3):
            results, _ = request(
                str(tmp_path / "local.ctrl"), f"Q{i}", "", ["a@x"], _message(tmp_path), agents
            )
            assert [r.code for r in results] == ["K"]
            wait_for(lambda n=i + 1: agent.closed == n)  # its end is closed: stale in the pool
    finally:
        agents.close()
    assert (agent.requests, agent.connections) == (3, 3)


def test_unreachable_agent_is_a_temporary_failure(tmp_path: Path) -> None:
    results, _ = request(
        str(tmp_path / "absent.ctrl"), "Q", "", ["a@x", "b@x"], _message(tmp_path), Agents()
    )
    assert [r.code for r in results] == ["Z", "Z"]
    assert "unreachable" in results[0].text
