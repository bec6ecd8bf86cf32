"""Load and slowness (issue 13): the command and DATA deadlines drop a client that
trickles; stress mode keeps a new legitimate client served while idle or trickling
connections from other addresses fill the listener; every timeout fires; the
RSS of the listener, the queue and the scheduler stays bounded."""

from __future__ import annotations

import select
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import stressreport
from tests.conftest import Instance, Processes, free_port, wait_for
from tests.integration.test_smtpd import _status_kb, recv_reply, smtpd_pid_children


class Slow:
    def __init__(self, inst: Instance, port: int, run_pid: int) -> None:
        self.inst, self.port, self.run_pid = inst, port, run_pid
        self.held = False  # the message to dead.test is queued

    def connect(self, source: str = "127.0.0.1", timeout: float = 30) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", self.port))
        return sock

    def stage_pids(self) -> dict[str, int]:
        """The running stages under ``mailgrave run``: listener, queue, send."""
        found = {}
        for pid in smtpd_pid_children(self.run_pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            for stage, module in (("listener", b"mailgrave.smtpd"), ("queue", b"mailgrave.queue")):
                if module in cmdline:
                    found[stage] = pid
            if b"mailgrave.send" in cmdline:
                found["send"] = pid
        return found

    def listener_pid(self) -> int:
        pid = self.stage_pids().get("listener")
        if pid is None:
            raise AssertionError("no smtpd listener under mailgrave run")
        return pid

    def legitimate_client(self) -> float:
        """A full transaction from 127.0.0.1 (in relay_networks); seconds it took."""
        start = time.monotonic()
        with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as smtp:
            smtp.sendmail("a@client.test", ["alice@example.org"], b"Subject: legit\r\n\r\nhi\r\n")
        return time.monotonic() - start


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slow]:
    procs = Processes()
    inst = Instance(
        tmp_path_factory.mktemp("slow"),
        relay_networks=["127.0.0.1/32"],  # 127.0.0.2 and up are untrusted clients
        smtpd={
            "greet_pause": "0s",
            "timeout": "60s",
            "command_deadline": "3s",
            "min_data_rate": 100,
            "stress_timeout": "3s",
            "max_connections": 100,
            "max_connections_per_client": 10,
        },
        # The queue and the scheduler stay up through a flood (their RSS is
        # measured before and after): the queue does not idle out, and a message
        # deferred every second keeps mailgrave-send lingering.
        queue={"idle_exit": "10m", "retry": ["1s"]},
        remote={"routes": {"dead.test": f"[127.0.0.1]:{free_port()}"}},
    )
    port = free_port()
    try:
        proc = inst.start(procs, listen=f"127.0.0.1:{port}")
        yield Slow(inst, port, proc.pid)
    finally:
        procs.stop_all()


def _dropped_within(sock: socket.socket, trickle: bytes, bound: float) -> tuple[float, bytes]:
    """Send ``trickle`` a byte every 0.25 s until the server ends the session."""
    start, got, i = time.monotonic(), b"", 0
    sock.setblocking(False)
    while time.monotonic() - start < bound:
        ready, _, _ = select.select([sock], [], [], 0.25)
        if ready:
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                return time.monotonic() - start, got
            got += data
            continue
        try:
            sock.send(trickle[i % len(trickle) : i % len(trickle) + 1])
        except OSError:
            return time.monotonic() - start, got
        i += 1
    raise AssertionError(f"still connected after {bound}s: {got!r}")


def test_one_byte_at_a_time_command_hits_the_deadline(slow: Slow) -> None:
    """timeout is 60 s per read; the 3 s command deadline drops the trickler."""
    with slow.connect() as sock:
        assert recv_reply(sock).startswith(b"220")
        took, got = _dropped_within(sock, b"NOOP", bound=15)
    assert b"421 4.4.2" in got
    assert took < 15


def test_slow_data_hits_the_data_deadline_and_nothing_is_queued(slow: Slow) -> None:
    """4 bytes/s in DATA, below min_data_rate: dropped after about 3 s, nothing kept."""
    with slow.connect() as sock:
        assert recv_reply(sock).startswith(b"220")
        for cmd in (b"EHLO c", b"MAIL FROM:<a@client.test>", b"RCPT TO:<bob@example.org>"):
            sock.sendall(cmd + b"\r\n")
            assert recv_reply(sock).startswith(b"250")
        sock.sendall(b"DATA\r\n")
        assert recv_reply(sock).startswith(b"354")
        _took, got = _dropped_within(sock, b"Subject: slow\r\n\r\nxxxxxxxx\r\n", bound=15)
    assert b"421 4.4.2" in got
    assert not [m for m in slow.inst.messages("bob") if b"Subject: slow" in m]


def test_a_fast_client_is_not_cut_by_the_deadline(slow: Slow) -> None:
    """A DATA phase longer than the command deadline, at a good rate, is accepted."""
    body = b"Subject: big\r\n\r\n" + (b"b" * 998 + b"\r\n") * 400  # 400 KB
    with slow.connect() as sock:
        assert recv_reply(sock).startswith(b"220")
        for cmd in (b"EHLO c", b"MAIL FROM:<a@client.test>", b"RCPT TO:<bob@example.org>"):
            sock.sendall(cmd + b"\r\n")
            assert recv_reply(sock).startswith(b"250")
        sock.sendall(b"DATA\r\n")
        assert recv_reply(sock).startswith(b"354")
        # 4 s at 100 KB/s: past the 3 s deadline, well within 3 s + size/100 B/s.
        for i in range(0, len(body), 40_000):
            sock.sendall(body[i : i + 40_000])
            time.sleep(0.4)
        sock.sendall(b".\r\n")
        assert recv_reply(sock).startswith(b"250 2.0.0")


def _flood(slow: Slow, sources: list[str], per_source: int, trickle: bool) -> list[socket.socket]:
    socks = []
    for src in sources:
        for _ in range(per_source):
            try:
                socks.append(slow.connect(src, timeout=5))
            except OSError:
                pass
    for s in socks:
        s.setblocking(False)
    return socks


def _drive(socks: list[socket.socket], seconds: float, trickle: bool) -> None:
    """Read whatever comes, trickle a byte per second per socket; close at EOF."""
    end = time.monotonic() + seconds
    last = 0.0
    while socks and time.monotonic() < end:
        ready, _, _ = select.select(socks, [], [], 0.2)
        for s in ready:
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                socks.remove(s)
                s.close()
        if trickle and time.monotonic() - last >= 1.0:
            last = time.monotonic()
            for s in list(socks):
                try:
                    s.send(b"N")
                except OSError:
                    socks.remove(s)
                    s.close()


def _stages_up(slow: Slow) -> dict[str, int]:
    """Listener, queue and scheduler all running (a message to a dead route keeps
    mailgrave-send retrying every second)."""
    if not slow.inst.messages("alice"):
        slow.legitimate_client()  # starts the queue
    pids = slow.stage_pids()
    if not slow.held:
        slow.held = True
        assert slow.inst.sendmail("x@dead.test", data=b"Subject: held\n\nx\n").returncode == 0
    return pids if len(pids) == 3 else {}


def _rss(pids: dict[str, int]) -> dict[str, int]:
    out = {}
    for stage, pid in pids.items():
        try:
            out[stage] = _status_kb(pid, "VmRSS")
        except OSError:
            pass
    return out


def _settled_rss(pids: dict[str, int], limit: float = 15.0) -> dict[str, int]:
    """RSS once no stage is still growing: a scheduler that has just started has
    not yet imported what its first delivery attempt loads (10 MB of it)."""
    before = _rss(pids)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = _rss(pids)
        if all(abs(now[k] - before.get(k, 0)) < 1024 for k in now):
            return now
        before = now
    return before


@pytest.mark.parametrize(
    "count,sources,trickle",
    [(100, 10, True), (300, 30, False)],
    ids=["100 trickling from 10 addresses", "300 idle from 30 addresses"],
)
def test_flood_does_not_lock_out_a_legitimate_client(
    slow: Slow, count: int, sources: int, trickle: bool
) -> None:
    pids = wait_for(lambda: _stages_up(slow), timeout=30)
    listener = pids["listener"]
    rss_before = _settled_rss(pids)
    addrs = [f"127.0.0.{2 + i}" for i in range(sources)]
    socks = _flood(slow, addrs, count // sources, trickle)
    try:
        _drive(socks, 1.0, trickle)
        # A new client is served at once: the untrusted are capped under stress.
        assert slow.legitimate_client() < 10
        # Every flooding session ends: refused at once, or dropped by the stress
        # deadline (3 s) within a bound.
        _drive(socks, 20.0, trickle)
        assert socks == [], f"{len(socks)} flooding connections still open after 20 s"
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: len(smtpd_pid_children(listener)) <= 2, timeout=20)
    assert slow.legitimate_client() < 10
    wait_for(lambda: [m for m in slow.inst.messages("alice") if b"legit" in m], timeout=20)
    # The same processes after the load, their RSS grown by less than 10 MB each.
    assert {k: v for k, v in slow.stage_pids().items() if k in ("listener", "queue")} == {
        k: v for k, v in pids.items() if k in ("listener", "queue")
    }
    rss_after = _rss({k: v for k, v in slow.stage_pids().items() if pids.get(k) == v})
    load = f"{count} {'trickling' if trickle else 'idle'} from {sources} addresses"
    for stage, after in rss_after.items():
        stressreport.rss(load, stage, rss_before[stage], after)
        assert after < rss_before[stage] + 10_000, (stage, rss_before[stage], after)
    assert {"listener", "queue"} <= set(rss_after)
