"""A full disk (issue 13): the spool on a small tmpfs this test mounts (root).
mailgrave-send backs off and says so once per interval; smtpd and sendmail
never acknowledge what was not stored; once space is freed everything
acknowledged is delivered."""

from __future__ import annotations

import os
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Instance, Processes, free_port, wait_for, write_spool_file

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="mounts a tmpfs")


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(spool)], check=True
    )
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def fill(path: Path) -> Path:
    """Fill the file system of ``path`` to the last byte; returns the filler file."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


@needs_root
def test_send_backs_off_when_the_spool_is_full(
    tmp_path: Path, small_spool: Path, processes: Processes
) -> None:
    """A deferred delivery must write info/: on a full spool send pauses and logs
    the condition once, instead of thousands of lines a second; after space is
    freed the state is written."""
    dead = free_port()  # nothing listens: every attempt is deferred
    inst = Instance(
        tmp_path, spool=str(small_spool), remote={"routes": {"far.test": f"[127.0.0.1]:{dead}"}}
    )
    for sub in ("tmp", "todo", "mess", "info", "ctl", "bad"):
        (small_spool / sub).mkdir()
    (small_spool / "send.lock").touch()
    qid = "0" * 11 + "ABCD"
    write_spool_file(
        small_spool / "todo" / qid, b"Subject: full\n\nbody\n", b"Fa@client.test\0Tz@far.test\0\0"
    )
    filler = fill(small_spool)
    inst.start(processes)
    time.sleep(6)
    log = inst.log.read_text()
    reports = log.count("spool not writable")
    assert reports == 1, log[-3000:]
    assert log.count("cannot save state") == 0
    assert not (small_spool / "info" / qid).exists()
    assert (small_spool / "todo" / qid).exists()  # kept: nothing lost
    filler.unlink()
    wait_for(lambda: (small_spool / "info" / qid).exists(), timeout=90)
    assert (small_spool / "mess" / qid).exists()


@needs_root
def test_full_spool_refuses_smtp_and_sendmail_then_delivers(
    tmp_path: Path, small_spool: Path, processes: Processes
) -> None:
    inst = Instance(
        tmp_path, spool=str(small_spool), queue={"min_free": 0}, smtpd={"greet_pause": "0s"}
    )
    port = free_port()
    inst.start(processes, listen=f"127.0.0.1:{port}")
    ok = inst.sendmail("alice@example.org", data=b"Subject: before\n\nbody\n")
    assert ok.returncode == 0, ok.stderr
    filler = fill(small_spool)
    res = inst.sendmail("alice@example.org", data=b"Subject: while full\n\n" + b"x" * 200_000)
    assert res.returncode == 75, (res.returncode, res.stderr)
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.ehlo("c")
        code, _ = smtp.mail("a@client.test")
        if code == 250:
            assert smtp.rcpt("alice@example.org")[0] == 250
            body = b"Subject: smtp while full\r\n\r\n" + b"y" * 998 + b"\r\n"
            code, _reply = smtp.data(body * 200)
        assert code in (451, 452), code  # never 250 for what was not stored
    leftovers = [e for e in inst.spool_entries() if e.startswith("tmp/")]
    assert leftovers == []
    filler.unlink()
    ok = inst.sendmail("alice@example.org", data=b"Subject: after\n\nbody\n")
    assert ok.returncode == 0, ok.stderr
    msgs = wait_for(lambda: len(inst.messages("alice")) >= 2 and inst.messages("alice"), timeout=30)
    subjects = [m for m in msgs if b"Subject: before" in m or b"Subject: after" in m]
    assert len(subjects) == 2
    assert not [m for m in msgs if b"while full" in m]


@needs_root
def test_reserve_refuses_before_the_spool_is_full(
    tmp_path: Path, small_spool: Path, processes: Processes
) -> None:
    """queue.min_free: 452 4.3.1 / exit 75 while space remains; bounces still fit."""
    inst = Instance(
        tmp_path, spool=str(small_spool), queue={"min_free": "1M"}, smtpd={"greet_pause": "0s"}
    )
    port = free_port()
    inst.start(processes, listen=f"127.0.0.1:{port}")
    st = os.statvfs(small_spool)
    # Leave about 700 KB: below the 1M reserve, above half of it.
    ballast = small_spool / "ballast"
    ballast.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 700 * 1024))
    res = inst.sendmail("alice@example.org", data=b"Subject: reserve\n\nbody\n")
    assert res.returncode == 75, (res.returncode, res.stderr)
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.ehlo("c")
        assert smtp.mail("a@client.test")[0] == 250
        assert smtp.rcpt("alice@example.org")[0] == 250
        code, reply = smtp.data(b"Subject: reserve smtp\r\n\r\nbody\r\n")
        assert (code, reply[:5]) == (452, b"4.3.1"), (code, reply)
        # The null sender (a bounce) still has room.
        assert smtp.mail("<>")[0] == 250
        assert smtp.rcpt("alice@example.org")[0] == 250
        assert smtp.data(b"Subject: a bounce\r\n\r\nbody\r\n")[0] == 250
    ballast.unlink()
    assert inst.sendmail("alice@example.org", data=b"Subject: room\n\nbody\n").returncode == 0
    msgs = wait_for(lambda: len(inst.messages("alice")) >= 2 and inst.messages("alice"), timeout=30)
    assert not [m for m in msgs if b"Subject: reserve" in m]
    assert not [e for e in inst.spool_entries() if e.startswith("tmp/")]  # nothing half-written
