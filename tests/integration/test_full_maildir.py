"""A full Maildir file system (issue 13): the mailbox on a small tmpfs this test
mounts (root), filled to the last byte. Delivery defers (4.3.1, the message
stays queued, nothing partial left in tmp/), other mailboxes still get their
mail, and once space is freed the message is delivered once."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import VIRTUAL_USER, Instance, Processes, wait_for
from tests.integration.test_dead_peers import queue_show
from tests.integration.test_full_disk import fill

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="mounts a tmpfs")


@pytest.fixture
def full_maildir(tmp_path: Path) -> Iterator[tuple[Instance, Path]]:
    """An instance whose alice@example.org Maildir is on a 1 MB tmpfs; yields
    (the instance, the filler file that fills it)."""
    inst = Instance(tmp_path, queue={"retry": ["1s"]})
    top = inst.maildir("alice").parent
    top.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(top)], check=True
    )
    try:
        pw = pwd.getpwnam(VIRTUAL_USER)
        for sub in ("", "tmp", "new", "cur"):
            d = inst.maildir("alice") / sub
            d.mkdir(exist_ok=True)
            os.chown(d, pw.pw_uid, pw.pw_gid)
        os.chown(top, pw.pw_uid, pw.pw_gid)
        yield inst, fill(top)
    finally:
        subprocess.run(["umount", "-l", str(top)], check=False)


@needs_root
def test_full_maildir_defers_never_loses_and_delivers_once_there_is_room(
    full_maildir: tuple[Instance, Path], processes: Processes
) -> None:
    inst, filler = full_maildir
    inst.start(processes, retry_interval=0.5)
    body = b"Subject: to a full disk\n\n" + b"x" * 20_000 + b"\n"
    assert inst.sendmail("alice@example.org", data=body).returncode == 0
    assert inst.sendmail("bob@example.org", data=b"Subject: elsewhere\n\nbody\n").returncode == 0
    wait_for(lambda: inst.messages("bob"), timeout=30)  # another mailbox: not held up

    def deferred() -> str | None:
        shown = queue_show(inst).get("alice@example.org", "")
        return shown if "pending attempts=" in shown and "Last reply" in shown else None

    shown = wait_for(deferred, timeout=30)
    assert "4.3.1" in shown and "no space left" in shown, shown
    wait_for(lambda: "attempts=1" not in (deferred() or "attempts=1"), timeout=30)  # retried
    maildir = inst.maildir("alice")
    assert os.listdir(maildir / "tmp") == []  # nothing partial left behind
    assert os.listdir(maildir / "new") == []
    assert inst.messages("alice") == []
    filler.unlink()
    wait_for(lambda: inst.messages("alice"), timeout=30)
    wait_for(lambda: inst.spool_entries() == [], timeout=30)
    [msg] = inst.messages("alice")  # delivered once
    assert b"Subject: to a full disk" in msg
    assert os.listdir(maildir / "tmp") == []
