"""mailgrave-queue by hand (qmail-queue's fd contract) and as the queue.ctrl service."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from mailgrave.ctrl import QueueClient
from mailgrave.envelope import Envelope
from mailgrave.errors import PermFail
from tests.conftest import SAME_USER, Instance, Processes, program, wait_for


def queue_by_hand(
    inst: Instance, message: bytes, envelope: bytes
) -> subprocess.CompletedProcess[bytes]:
    """Message on fd 0, envelope on fd 1, exactly as qmail-queue(8)."""
    r, w = os.pipe()
    os.write(w, envelope)
    os.close(w)
    try:
        return subprocess.run(
            [program("mailgrave-queue"), "--config", str(inst.config_path), *SAME_USER],
            input=message,
            stdout=r,
            stderr=subprocess.PIPE,
            timeout=30,
        )
    finally:
        os.close(r)


def start_queue(inst: Instance, processes: Processes) -> str:
    inst.run_dir.mkdir(exist_ok=True)
    path = str(inst.run_dir / "queue.ctrl")
    processes.start(
        [program("mailgrave-queue"), "--config", str(inst.config_path), *SAME_USER, "--in", path]
    )
    wait_for(lambda: os.path.exists(path))
    return path


def test_by_hand_commits_message_with_received_line(instance: Instance) -> None:
    res = queue_by_hand(
        instance, b"Subject: hi\r\n\r\nhello\r\n", b"Fme@example.org\0Talice@example.org\0\0"
    )
    assert res.returncode == 0, res.stderr
    # One file: the envelope in its header (read after the message here, as
    # qmail-queue does), then the message.
    [(qid, envelope, msg)] = instance.queued()
    assert os.listdir(instance.spool / "todo") == [qid]
    assert envelope == b"Fme@example.org\0Talice@example.org\0\0"
    assert msg.startswith(b"Received: by mx.example.org (MailGrave, from userid ")
    assert f"id {qid}".encode() in msg and b"for <alice@example.org>" in msg
    assert msg.endswith(b"Subject: hi\n\nhello\n")  # spool stores LF line ends
    assert os.listdir(instance.spool / "tmp") == []


@pytest.mark.parametrize(
    "envelope",
    [b"Fme@example.org\0Talice\0\0", b"Fme@example.org\0\0", b"garbage", b"Fa@b.c\0Tx@y.z\0"],
)
def test_by_hand_bad_envelope_is_permanent_and_leaves_nothing(
    instance: Instance, envelope: bytes
) -> None:
    res = queue_by_hand(instance, b"Subject: x\n\nbody\n", envelope)
    assert res.returncode == 100, res.stderr
    assert instance.spool_entries() == []


def test_service_commit_abort_and_trusted_attributes(
    instance: Instance, processes: Processes
) -> None:
    path = start_queue(instance, processes)
    env = Envelope("me@example.org", ("alice@example.org", "bob@example.org"))
    qc = QueueClient(path, {"proto": "ESMTP", "helo": "client.example", "addr": "192.0.2.7"}, env)
    qc.write(b"Subject: one\r\n\r\n")
    qc.write(b"body\r\n" * 1000)
    qid = qc.commit()
    [(found, envelope, msg)] = instance.queued()
    assert found == qid and envelope == env.encode()
    # The test runs as the queue's own uid, which the queue trusts.
    assert msg.startswith(
        b"Received: from client.example ([192.0.2.7])\n\tby mx.example.org (MailGrave) with ESMTP id "
        + qid.encode()
    )
    assert b"\r" not in msg

    # A submission that stops before its end leaves nothing behind.
    qc = QueueClient(path, {}, env)
    qc.write(b"Subject: two\n\npartial")
    qc.abort()
    wait_for(lambda: os.listdir(instance.spool / "tmp") == [])
    assert os.listdir(instance.spool / "todo") == [qid]


def test_service_refuses_bad_envelope_and_oversize(tmp_path: Path, processes: Processes) -> None:
    inst = Instance(tmp_path, queue={"max_message_size": "100K"})
    path = start_queue(inst, processes)
    with pytest.raises(PermFail):
        qc = QueueClient(path, {}, Envelope("me@example.org", ("nodomain",)))
        qc.write(b"x\n")
        qc.commit()
    qc = QueueClient(path, {}, Envelope("me@example.org", ("alice@example.org",)))
    with pytest.raises(PermFail, match="too big"):
        qc.write(b"x" * 99 + b"\n")
        for _ in range(2000):
            qc.write(b"y" * 99 + b"\n")
        qc.commit()
    wait_for(lambda: inst.spool_entries() == [])


def test_parallel_submissions_get_unique_ids(instance: Instance, processes: Processes) -> None:
    path = start_queue(instance, processes)
    qids: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        qc = QueueClient(path, {}, Envelope("me@example.org", (f"user{i}@example.org",)))
        qc.write(f"Subject: {i}\n\nmessage {i}\n".encode())
        q = qc.commit()
        with lock:
            qids.append(q)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(qids)) == 60
    entries = instance.queued()
    assert sorted(qid for qid, _, _ in entries) == sorted(qids)
    for _, envelope, message in entries:  # each envelope beside its own message
        i = message.rpartition(b"message ")[2].strip()
        assert envelope == b"Fme@example.org\0Tuser" + i + b"@example.org\0\0"


@pytest.mark.skipif(os.getuid() != 0, reason="mounts a tiny tmpfs")
def test_disk_full_is_temporary_and_leaves_nothing(tmp_path: Path) -> None:
    inst = Instance(tmp_path, queue={"min_free": 0})  # the disk itself fills, not the reserve
    inst.spool.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(inst.spool)], check=True
    )
    try:
        res = queue_by_hand(
            inst,
            b"Subject: big\n\n" + b"z" * 1024 * 1024,
            b"Fme@example.org\0Talice@example.org\0\0",
        )
        assert res.returncode == 111
        assert b"cannot write to the spool" in res.stderr
        assert inst.spool_entries() == []
        # Once there is room again, the same message goes in.
        res = queue_by_hand(
            inst, b"Subject: small\n\nok\n", b"Fme@example.org\0Talice@example.org\0\0"
        )
        assert res.returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(inst.spool)], check=False)


def _hwm_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1])


def test_fifty_megabytes_in_bounded_memory(instance: Instance, processes: Processes) -> None:
    path = start_queue(instance, processes)
    proc = processes.procs[-1]
    env = Envelope("me@example.org", ("alice@example.org",))
    warm = QueueClient(path, {}, env)
    warm.write(b"Subject: small\r\n\r\nwarm-up\r\n")
    warm.commit()
    baseline = _hwm_kb(proc.pid)
    qc = QueueClient(path, {}, env)
    line = b"0123456789" * 9 + b"abcdefgh\r\n"
    block = line * 10_000  # 1 MB
    qc.write(b"Subject: big\r\n\r\n")
    for _ in range(50):
        qc.write(block)
    qid = qc.commit()
    [msg] = [message for found, _, message in instance.queued() if found == qid]
    assert len(msg) > 50 * 990_000 and msg.endswith(line.replace(b"\r", b""))
    del msg
    growth = _hwm_kb(proc.pid) - baseline
    assert growth < 10 * 1024, f"queue RSS grew {growth} kB for a 50 MB message"
