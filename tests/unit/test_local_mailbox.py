"""Mailbox writers (mailgrave.local.mailbox): Maildir names, mboxrd quoting, no half-writes."""

from __future__ import annotations

import errno
import mailbox as pymailbox
import os
import re
from pathlib import Path

import pytest

from mailgrave.errors import PermFail, TempFail
from mailgrave.local import mailbox
from mailgrave.spool import entry_header

MSG = b"Received: by test\nSubject: s\n\nFrom here\n>From there\n>>From far\nFromage\nlast"


def message_fd(tmp_path: Path, data: bytes = MSG, envelope: bytes = b"Fs@x\0Tr@y\0\0") -> int:
    """A spool file (docs/queue.md) holding ``data``, open for reading."""
    path = tmp_path / "spool.msg"
    path.write_bytes(entry_header(envelope) + data)
    return os.open(path, os.O_RDONLY)


def test_maildir_created_named_and_complete(tmp_path: Path) -> None:
    fd = message_fd(tmp_path)
    md = tmp_path / "box" / "Maildir"
    names = set()
    for _ in range(3):
        mailbox.maildir(str(md) + "/", fd, b"Delivered-To: a@b\n")
        names = {p.name for p in (md / "new").iterdir()}
    assert len(names) == 3  # unique names even within one second and one process
    for sub in ("tmp", "new", "cur"):
        assert (md / sub).stat().st_mode & 0o777 == 0o700
    assert list((md / "tmp").iterdir()) == []
    for name in names:
        assert re.fullmatch(r"\d+\.M\d+P\d+Q\d+\.[^/:]+", name), name
        assert (md / "new" / name).read_bytes() == b"Delivered-To: a@b\n" + MSG
        assert (md / "new" / name).stat().st_mode & 0o777 == 0o600
    box = pymailbox.Maildir(str(md), create=False)
    assert [m["Subject"] for m in box] == ["s"] * 3


def test_maildir_with_only_tmp_is_completed(tmp_path: Path) -> None:
    # A Maildir someone half made (tmp/ only): the delivery creates new/ and
    # cur/ instead of failing at the link into new/, and leaves tmp/ empty.
    fd = message_fd(tmp_path)
    md = tmp_path / "Maildir"
    (md / "tmp").mkdir(parents=True)
    assert mailbox.maildir(str(md), fd, b"").startswith("2.0.0")
    assert [p.read_bytes() for p in (md / "new").iterdir()] == [MSG]
    assert (md / "cur").is_dir() and list((md / "tmp").iterdir()) == []


def test_maildir_failure_leaves_no_file_in_tmp(tmp_path: Path) -> None:
    fd = message_fd(tmp_path)
    md = tmp_path / "Maildir"
    mailbox.maildir(str(md), fd, b"")
    for f in (md / "new").iterdir():
        f.unlink()
    (md / "new").rmdir()
    (md / "new").write_bytes(b"")  # new/ is a file: no directory can be made there
    with pytest.raises(TempFail):
        mailbox.maildir(str(md), fd, b"")
    assert list((md / "tmp").iterdir()) == []


def test_spool_header_is_not_delivered(tmp_path: Path) -> None:
    envelope = b"Fa@b.c\0Tx@y.z\0\0"
    fd = message_fd(tmp_path, MSG, envelope)
    md = tmp_path / "Maildir"
    mailbox.maildir(str(md), fd, b"Delivered-To: x@y.z\n")
    assert [p.read_bytes() for p in (md / "new").iterdir()] == [b"Delivered-To: x@y.z\n" + MSG]


def test_mbox_quoting_from_line_and_blank_line(tmp_path: Path) -> None:
    fd = message_fd(tmp_path)
    path = tmp_path / "mbox"
    mailbox.mbox(str(path), fd, "", b"Return-Path: <>\n")
    mailbox.mbox(str(path), fd, "s@example.net", b"")
    raw = path.read_bytes()
    first, _second = raw.split(b"\n\nFrom s@example.net ")
    assert re.match(rb"From MAILER-DAEMON \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\n", first)
    assert b"\n>From here\n>>From there\n>>>From far\nFromage\nlast" in first
    assert raw.endswith(b"last\n\n")  # final newline added, then the blank separator
    assert not (tmp_path / "mbox.lock").exists()
    box = pymailbox.mbox(str(path), create=False)
    try:
        assert [m["Subject"] for m in box] == ["s", "s"]
        assert [m.get_from().split()[0] for m in box] == ["MAILER-DAEMON", "s@example.net"]
    finally:
        box.close()


def test_mbox_failure_truncates_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mbox"
    path.write_bytes(b"From x Thu Jan  1 00:00:00 1970\nSubject: old\n\nold\n\n")
    before = path.read_bytes()
    big = b"Subject: big\n\n" + b"z" * 99 + b"\n" * 1 + (b"y" * 99 + b"\n") * 5000
    fd = message_fd(tmp_path, big)
    real_write = os.write
    calls = {"n": 0}

    def failing_write(out: int, data: bytes | memoryview) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(out, data)

    monkeypatch.setattr(mailbox.os, "write", failing_write)
    with pytest.raises(TempFail, match=r"^4\.3\.1"):
        mailbox.mbox(str(path), fd, "s@example.net", b"")
    assert path.read_bytes() == before
    assert not (tmp_path / "mbox.lock").exists()


def test_stale_dotlock_is_broken_and_fresh_one_waits(tmp_path: Path) -> None:
    fd = message_fd(tmp_path)
    path = tmp_path / "mbox"
    lock = tmp_path / "mbox.lock"
    lock.touch()
    old = os.stat(lock).st_mtime - mailbox.DOTLOCK_STALE - 10
    os.utime(lock, (old, old))
    mailbox.mbox(str(path), fd, "s@example.net", b"")
    assert path.read_bytes().startswith(b"From s@example.net ")
    assert not lock.exists()


def test_delivered_to_looks_at_the_header_only(tmp_path: Path) -> None:
    fd = message_fd(tmp_path, b"Subject: x\nDelivered-To: A@Example.org\n\nDelivered-To: b@x\n")
    assert mailbox.has_delivered_to(fd, "a@example.org")
    assert not mailbox.has_delivered_to(fd, "b@x")


def test_pipe_gets_prefix_and_body_exit_codes(tmp_path: Path) -> None:
    fd = message_fd(tmp_path)
    out = tmp_path / "out"
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    mailbox.pipe(f"cat > {out}", fd, b"Delivered-To: p@x\n", env)
    assert out.read_bytes() == b"Delivered-To: p@x\n" + MSG
    with pytest.raises(PermFail, match="status 100: nope"):
        mailbox.pipe("echo nope >&2; exit 100", fd, b"", env)
    with pytest.raises(TempFail, match="status 1"):
        mailbox.pipe("exit 1", fd, b"", env)


def test_pipe_command_cannot_reach_the_spool_file(tmp_path: Path) -> None:
    # The spool file's header holds every recipient (Bcc too): a command run for
    # one recipient gets the message on a pipe and no descriptor of that file.
    envelope = b"Fa@b.c\0Tme@x.y\0Tsecret-bcc@elsewhere.example\0\0"
    fd = message_fd(tmp_path, MSG, envelope)
    out = tmp_path / "out"
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    (tmp_path / "probe.py").write_text(
        "import os\n"
        "for n in range(1024):\n"
        "    try:\n"
        "        print(n, os.readlink(f'/proc/self/fd/{n}'))\n"
        "    except OSError:\n"
        "        pass\n"
    )
    mailbox.pipe(f"/usr/bin/python3 {tmp_path}/probe.py > {out}; cat >> {out}", fd, b"", env)
    seen = out.read_bytes()
    assert seen.startswith(b"0 pipe:")  # the probe ran; its standard input is the pipe
    assert b"spool.msg" not in seen and b"secret-bcc" not in seen
    assert seen.endswith(MSG)


def test_mbox_from_line_stays_one_word_per_field(tmp_path: Path) -> None:
    fd = message_fd(tmp_path)
    path = tmp_path / "mbox"
    mailbox.mbox(str(path), fd, '"john smith"@example.net', b"")
    first = path.read_bytes().split(b"\n", 1)[0]
    assert first.startswith(b'From "john_smith"@example.net ')
    assert len(first.split()) == 7  # From, sender, and the five parts of the date
