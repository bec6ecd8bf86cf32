"""The whole chain under `mailgrave run`: sendmail → queue → send → local → Maildir."""

from __future__ import annotations

import email
import email.policy
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import Instance, Processes, free_port, wait_for
from tests.integration.killstages import proc_table


def delivered(inst: Instance, user: str) -> list[email.message.EmailMessage]:
    out = []
    for raw in inst.messages(user):
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        out.append(msg)
    return out


def test_sendmail_to_virtual_maildir(instance: Instance, processes: Processes) -> None:
    instance.start(processes)
    res = instance.sendmail("alice@example.org", data=b"Subject: hi\n\nhello\n")
    assert res.returncode == 0, res.stderr
    wait_for(lambda: delivered(instance, "alice"))
    # The spool file's header (the envelope) never reaches the mailbox.
    [raw] = instance.messages("alice")
    assert raw.startswith(b"Return-Path: <") and b"\0" not in raw and b"MGQ1" not in raw
    [msg] = delivered(instance, "alice")
    assert msg["Subject"] == "hi"
    assert msg["Delivered-To"] == "alice@example.org"
    assert msg["Return-Path"] and msg["Received"]
    assert msg.get_content() == "hello\n"
    wait_for(lambda: instance.spool_entries() == [])
    # The journal line says the status once: 'reply="2.0.0 delivered to maildir ..."'.
    log = instance.log.read_text()
    assert 'via=local reply="2.0.0 delivered to maildir ' in log, log


@pytest.mark.parametrize(
    "damaged",
    [
        b"MGQ1 99999\nFa@b.c\0Tx@y.z\0\0Subject: short\n",
        b"MGQ1 x\nSubject: no length\n",
        b"Fbob@example.org\0Talice@example.org\0\0",
    ],
    ids=["length past the end", "no length", "no header"],
)
def test_damaged_spool_file_is_moved_to_bad(
    instance: Instance, processes: Processes, damaged: bytes
) -> None:
    # A file without a valid header (never written so: a disk fault) is neither
    # delivered nor left to be read again at every run.
    from mailgrave.spool import new_qid

    (instance.spool / "todo").mkdir(parents=True, exist_ok=True)
    qid = new_qid()
    (instance.spool / "todo" / qid).write_bytes(damaged)
    instance.start(processes)
    wait_for(lambda: (instance.spool / "bad" / qid).exists())
    assert (instance.spool / "bad" / qid).read_bytes() == damaged
    assert os.listdir(instance.spool / "todo") == [] and instance.messages("alice") == []


def test_remote_recipient_stays_queued_and_is_listed(tmp_path: Path, processes: Processes) -> None:
    inst = Instance(tmp_path)
    inst.start(processes)
    res = inst.sendmail("alice@example.org", "someone@elsewhere.test", data=b"Subject: two\n\nx\n")
    assert res.returncode == 0
    wait_for(lambda: delivered(inst, "alice"))
    # The remote recipient is kept (deferred), never dropped.
    wait_for(lambda: any(e.startswith("info/") for e in inst.spool_entries()))
    listing = inst.run("mailgrave", "queue").stdout.decode()
    assert "<someone@elsewhere.test> pending" in listing
    assert "<alice@example.org> delivered" in listing
    assert "<someone@elsewhere.test> pending" in inst.run("sendmail", "-bp").stdout.decode()


def test_unknown_local_user_bounces_to_sender(instance: Instance, processes: Processes) -> None:
    instance.start(processes)
    res = instance.sendmail(
        "-f", "alice@example.org", "nosuchuser@example.org", data=b"Subject: lost\n\nx\n"
    )
    assert res.returncode == 0
    wait_for(lambda: delivered(instance, "alice"), timeout=20)
    [bounce] = delivered(instance, "alice")
    assert bounce.get_content_type() == "multipart/report"
    assert bounce["Return-Path"] == "<>"
    report = list(bounce.iter_parts())[1].get_payload()
    assert report[1]["Final-Recipient"] == "rfc822; nosuchuser@example.org"
    assert report[1]["Action"] == "failed"
    assert report[1]["Status"].startswith("5.")
    wait_for(lambda: instance.spool_entries() == [])


@pytest.mark.slow
def test_thousand_parallel_injections_each_delivered_once(
    instance: Instance, processes: Processes
) -> None:
    instance.start(processes)
    n = 1000

    def inject(i: int) -> int:
        return instance.sendmail(
            "bob@example.org", data=f"Subject: msg {i}\n\nbody {i}\n".encode()
        ).returncode

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(inject, range(n)))
    assert codes == [0] * n
    wait_for(lambda: len(instance.messages("bob")) >= n, timeout=180, interval=0.5)
    wait_for(lambda: instance.spool_entries() == [], timeout=60)
    subjects = sorted(m["Subject"] for m in delivered(instance, "bob"))
    assert subjects == sorted(f"msg {i}" for i in range(n))  # each exactly once
    # Maildir names carry the writer's pid: send reuses its local.ctrl connections
    # and mailgrave-local its delivery child per user, so a few processes wrote all.
    writers = {
        p.name.split("P", 1)[1].split("Q", 1)[0]
        for p in (instance.maildir("bob") / "new").iterdir()
    }
    assert len(writers) <= n // 20, len(writers)


def _children(pid: int) -> list[tuple[int, str]]:
    return [(child, cmd) for child, (ppid, cmd) in proc_table().items() if ppid == pid]


@pytest.mark.slow
def test_kill_9_queue_and_send_loses_no_acknowledged_message(
    tmp_path: Path, processes: Processes
) -> None:
    # Deliveries refused while a stage was down are retried within a second.
    instance = Instance(tmp_path, queue={"retry": ["1s"]})
    sup = instance.start(processes)
    stop = threading.Event()
    kills = {"queue": 0, "send": 0}

    def killer() -> None:
        rng = random.Random(1)
        while not stop.is_set():
            time.sleep(rng.uniform(0.05, 0.3))
            for pid, cmd in _children(sup.pid):
                for name in kills:
                    if f"mailgrave.{name} " in cmd + " " and rng.random() < 0.5:
                        try:
                            os.kill(pid, signal.SIGKILL)
                            kills[name] += 1
                        except ProcessLookupError:
                            pass

    t = threading.Thread(target=killer)
    t.start()
    acknowledged = []

    def inject(i: int) -> None:
        body = f"Subject: crash {i}\n\n" + f"line {i}\n" * 2000 + "END\n"
        if instance.sendmail("alice@example.org", data=body.encode()).returncode == 0:
            acknowledged.append(i)

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(inject, range(200)))
    finally:
        stop.set()
        t.join()
    assert kills["queue"] + kills["send"] > 0
    assert len(acknowledged) > 50

    def all_there() -> bool:
        got = {m["Subject"] for m in delivered(instance, "alice")}
        return all(f"crash {i}" in got for i in acknowledged)

    wait_for(all_there, timeout=120, interval=0.5)
    for msg in delivered(instance, "alice"):
        # Never half-visible: every delivered message is complete.
        assert msg.get_content().endswith("END\n")


def _time_to_greeting(port: int) -> float:
    import socket

    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert s.recv(512).startswith(b"220 ")
        return time.monotonic() - start


def test_greet_pause_is_configurable(tmp_path: Path, processes: Processes) -> None:
    from tests.conftest import free_port

    slow_port, fast_port = free_port(), free_port()
    (tmp_path / "slow").mkdir()
    (tmp_path / "fast").mkdir()
    # Loopback is in relay_networks, greeted at once unless told otherwise.
    slow = Instance(tmp_path / "slow", smtpd={"greet_pause_relay_networks": True})
    fast = Instance(tmp_path / "fast", smtpd={"greet_pause": 0})
    slow.start(processes, listen=f"127.0.0.1:{slow_port}")
    fast.start(processes, listen=f"127.0.0.1:{fast_port}")
    _time_to_greeting(slow_port), _time_to_greeting(fast_port)  # warm both listeners
    assert _time_to_greeting(slow_port) >= 0.2
    assert _time_to_greeting(fast_port) < 0.15


def _attempts(inst: Instance, qid: str) -> int:
    shown = inst.run("mailgrave", "queue", "show", qid).stdout.decode()
    return int(shown.split("attempts=")[1].split()[0])


def _deferred_remote(inst: Instance, processes: Processes, retry: list[str]) -> str:
    """`mailgrave run` with its real 60 s fallback; one message to a route whose
    port refuses connections (deferred at once); its queue id once deferred."""
    inst.settings["queue"] = {"retry": retry}
    inst.settings["remote"]["routes"] = {"remote.test": f"[127.0.0.1]:{free_port()}"}
    inst.write_config()
    inst.start(processes, retry_interval=60.0)
    assert inst.sendmail("user@remote.test", data=b"Subject: r\n\nx\n").returncode == 0
    [qid] = wait_for(lambda: os.listdir(inst.spool / "info"))
    wait_for(lambda: _attempts(inst, qid) >= 1)
    return str(qid)


def test_retry_happens_when_due_under_mailgrave_run(
    instance: Instance, processes: Processes
) -> None:
    qid = _deferred_remote(instance, processes, ["2s", "1h"])
    # Due 2 s after the first attempt: retried then, not at the 60 s fallback.
    wait_for(lambda: _attempts(instance, qid) >= 2, timeout=2 + 5)


def test_queue_retry_delivers_now_when_send_is_idle(
    instance: Instance, processes: Processes
) -> None:
    qid = _deferred_remote(instance, processes, ["1h"])
    time.sleep(3)  # send has left: nothing due for an hour
    assert _attempts(instance, qid) == 1
    assert instance.run("mailgrave", "queue", "retry", qid).returncode == 0
    wait_for(lambda: _attempts(instance, qid) >= 2, timeout=10)


def test_message_refused_by_smtpd_is_no_queue_error(
    instance: Instance, processes: Processes
) -> None:
    import smtplib

    instance.settings["smtpd"] = {"max_message_size": 1000}
    instance.write_config()
    port = free_port()
    instance.start(processes, listen=f"127.0.0.1:{port}")
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # no SIZE=: refused only after the data, once the queue has the envelope
        sock.sendall(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.org>\r\n")
        sock.sendall(b"DATA\r\n" + (b"x" * 78 + b"\r\n") * 40 + b".\r\nQUIT\r\n")
        got = b""
        while b"221 " not in got:
            data = sock.recv(4096)
            assert data, got
            got += data
        assert b"\r\n552 5.3.4" in got, got
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@example.org", ["alice@example.org"], b"Subject: ok\r\n\r\nok\r\n")
    wait_for(lambda: instance.messages("alice"))
    log = instance.log.read_text()
    assert "truncated" not in log and "cannot write to the spool" not in log, log
