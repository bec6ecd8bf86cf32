"""The short form of `make stress`'s kill -9 rows (tests/integration/killstages.py):
each stage killed at random moments while a small load goes through; nothing
acknowledged may be lost or half-visible, no stage may crash, and the
duplicates (printed) are bounded by what was in flight."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import Instance, Processes, free_port, wait_for
from tests.integration.killstages import STAGES, run_stage, stage_pids

PEERS = Path(__file__).resolve().parent.parent / "peers"

MESSAGES = 40  # per stage: 280 in all
MAX_PARALLEL = 20  # queue.max_parallel's default: the deliveries one send run has in flight

# A kill before the queue's answer makes the client send again, under a new id:
# those stages must never deliver a message twice.
NO_DUPLICATES = ("smtpd-listener", "smtpd-child", "queue")


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_kill_9_of_a_stage_loses_nothing_acknowledged(
    tmp_path: Path, processes: Processes, stage: str
) -> None:
    out = run_stage(tmp_path / stage, stage, MESSAGES, drain_timeout=90, processes=processes)
    print(out.detail())
    assert out.kills >= 1, out.detail()
    assert out.acked >= MESSAGES // 2, out.detail()
    assert out.lost == 0, out.detail()
    assert out.half_visible == 0, out.detail()
    assert out.crashes == 0, out.detail()
    assert out.wrong == 0, out.detail()
    assert out.hangs == 0, out.detail()
    if stage in NO_DUPLICATES:
        assert out.dups == 0, out.detail()
    else:
        # Each kill repeats at most what one send run had in flight.
        assert out.dups <= out.kills * MAX_PARALLEL, out.detail()


def test_a_kill_of_send_repeats_no_recipient_already_delivered(
    tmp_path: Path, processes: Processes
) -> None:
    # One message to a local recipient and to a host that accepts the connection
    # and then says nothing: the local result is recorded (info/QID) while the
    # remote delivery is still in flight, so a kill -9 of send then repeats only
    # the remote one, never the local delivery already done.
    hang_port = free_port()
    peer = tmp_path / "peer"
    peer_args = ["--port", str(hang_port), "--outdir", str(peer), "--mode", "hang"]
    processes.start([sys.executable, str(PEERS / "smtp_peer.py"), *peer_args])
    wait_for(lambda: (peer / "ready").exists())
    (tmp_path / "mg").mkdir()
    inst = Instance(
        tmp_path / "mg",
        queue={"retry": ["1s"]},
        remote={"routes": {"hang.test": f"[127.0.0.1]:{hang_port}"}, "tls": "none"},
    )
    sup = inst.start(processes)
    res = inst.sendmail("alice@example.org", "someone@hang.test", data=b"Subject: two\n\nx\n")
    assert res.returncode == 0, res.stderr
    wait_for(lambda: len(inst.messages("alice")) == 1)
    [qid] = wait_for(lambda: os.listdir(inst.spool / "info"))
    state = json.loads((inst.spool / "info" / qid).read_text())
    assert [r["state"] for r in state["recipients"]] == ["delivered", "pending"]

    def send_pids() -> list[int]:
        return stage_pids("send", sup.pid, inst.config_path)

    def connections() -> int:
        events = peer / "events.jsonl"
        return events.read_text().count('"connect"') if events.exists() else 0

    wait_for(lambda: connections() == 1)  # the remote delivery is in flight
    [first] = wait_for(send_pids)
    os.kill(first, signal.SIGKILL)
    # The next run (todo/QID is still there) tries the remote recipient again...
    wait_for(lambda: connections() >= 2, timeout=30)
    assert first not in send_pids()
    # ...and only it.
    assert len(inst.messages("alice")) == 1
