from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from mailgrave import spool as spoolmod
from mailgrave.envelope import EnvelopeError
from mailgrave.fileio import blocks, header_lines, message_size, message_start
from mailgrave.spool import GroupSync, Recipient, Spool, State, is_qid, new_qid, qid_time


def test_qids_are_unique_safe_and_sort_by_time() -> None:
    ids = [new_qid(1_700_000_000 + i / 1000) for i in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(is_qid(q) for q in ids)
    assert abs(qid_time(ids[0]) - 1_700_000_000) < 1e-3


def test_group_sync_shares_fsyncs(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def slow_fsync(path: str) -> None:
        calls.append(path)
        time.sleep(0.05)

    monkeypatch.setattr(spoolmod, "fsync_dir", slow_fsync)
    gs = GroupSync(str(tmp_path))
    threads = [threading.Thread(target=gs.sync) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Every caller returned only after an fsync that started after its call,
    # and 20 callers shared far fewer fsyncs.
    assert 1 <= len(calls) <= 3


def test_state_round_trip() -> None:
    st = State(
        "1K16M56R1FTXJPY", "a@b.c", [Recipient("x@y.z", attempts=2, last_reply="451 later")], 5.0
    )
    back = State.from_json(st.to_json())
    assert back == st


ENV = b"Fa@b.c\0Tx@y.z\0\0"
MSG = b"Received: by h\n\tid X; now\nSubject: x\n\nbody\n"


def _size(sp: Spool, qid: str) -> int:
    """The size of the message where the spool has it now, as the agents see it."""
    fd = os.open(sp.message_path(qid), os.O_RDONLY)
    try:
        return message_size(fd)
    finally:
        os.close(fd)


def _entry(sp: Spool, qid: str, env: bytes = ENV) -> Path:
    """A new entry as mailgrave-queue writes it: one file, header then message."""
    path = Path(sp.path("todo", qid))
    path.write_bytes(b"MGQ1 %d\n" % len(env) + env + MSG)
    return path


def _old_entry(sp: Spool, qid: str, env: bytes = ENV) -> None:
    """A new entry written before the one-file format: envelope + message file."""
    Path(sp.path("todo", f"{qid}.msg")).write_bytes(MSG)
    Path(sp.path("todo", qid)).write_bytes(env)


@pytest.mark.parametrize("old", [False, True])
def test_new_entry_envelope_size_and_message(tmp_path: Path, old: bool) -> None:
    sp = Spool(str(tmp_path))
    sp.create()
    qid = new_qid()
    (_old_entry if old else _entry)(sp, qid)
    assert sp.todo() == [qid]
    assert sp.read_new(qid) == (ENV, len(MSG))
    assert _size(sp, qid) == len(MSG)
    fd = os.open(sp.message_path(qid), os.O_RDONLY)
    try:
        assert b"".join(blocks(fd)) == MSG  # what the agents read: the header skipped
        assert message_size(fd) == len(MSG)
        assert list(header_lines(fd)) == [b"Received: by h\n", b"\tid X; now\n", b"Subject: x\n"]
    finally:
        os.close(fd)


def test_message_start_ignores_what_is_not_a_header(tmp_path: Path) -> None:
    for data, start in [
        (b"MGQ1 3\nabcREST", 10),
        (b"MGQ1 0\nREST", 7),
        (b"MGQ1 x\nREST", 0),  # not a length
        (b"MGQ1 12345678901234567890123456789", 0),  # no end of line within the peek
        (b"MGQ2 3\nabc", 0),
        (b"Received: MGQ1 3\n", 0),
        (b"", 0),
    ]:
        path = tmp_path / "f"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert message_start(fd) == start, data
            assert message_size(fd) == max(0, len(data) - start)
        finally:
            os.close(fd)


@pytest.mark.parametrize(
    "data", [b"MGQ1 99\nFa@b.c\0Tx@y.z\0\0short", b"MGQ1 \nFa@b.c\0\0", b"MGQ1 "]
)
def test_damaged_header_is_an_envelope_error(tmp_path: Path, data: bytes) -> None:
    sp = Spool(str(tmp_path))
    sp.create()
    qid = new_qid()
    Path(sp.path("todo", qid)).write_bytes(data)
    with pytest.raises(EnvelopeError, match="damaged spool header"):
        sp.read_new(qid)
    assert list(sp.stale(max_age=0)) == []  # not debris: send moves it to bad/
    sp.quarantine(qid)
    assert os.listdir(sp.path("bad")) == [qid]


def test_todo_lists_committed_entries_only(tmp_path: Path) -> None:
    sp = Spool(str(tmp_path))
    sp.create()
    a, b, c, d = new_qid(), new_qid(), new_qid(), new_qid()
    _old_entry(sp, a)
    Path(sp.path("todo", f"{b}.msg")).write_bytes(b"half")  # old S2: no envelope yet
    # old S4: taken over half-way (message already in mess/)
    Path(sp.path("mess", c)).write_bytes(MSG)
    Path(sp.path("todo", c)).write_bytes(ENV)
    _entry(sp, d)
    Path(sp.path("tmp", new_qid())).write_bytes(b"MGQ1 ")  # being written: not listed
    assert sp.todo() == sorted([a, c, d])
    assert sp.message_path(c) == sp.path("mess", c)
    assert sp.read_new(c) == (ENV, len(MSG))
    assert sp.message_path(d) == sp.path("todo", d)


@pytest.mark.parametrize("old", [False, True])
def test_take_over_and_remove(tmp_path: Path, old: bool) -> None:
    sp = Spool(str(tmp_path))
    sp.create()
    qid = new_qid()
    (_old_entry if old else _entry)(sp, qid)
    st = State(qid, "a@b.c", [Recipient("x@y.z")], qid_time(qid))
    sp.take_over(qid, st)
    assert sp.todo() == [] and sp.deferred() == [qid] and os.listdir(sp.path("todo")) == []
    assert sp.read_state(qid) == st
    assert sp.message_path(qid) == sp.path("mess", qid)
    assert _size(sp, qid) == len(MSG)
    sp.remove(qid)
    assert sp.deferred() == [] and os.listdir(sp.path("mess")) == []


def test_take_over_interrupted_before_the_rename_is_resumed(tmp_path: Path) -> None:
    # A crash after info/QID was written but before todo/QID moved to mess/:
    # the entry is still listed as new, with its recorded state, and a second
    # take-over finishes the move without losing or duplicating anything.
    sp = Spool(str(tmp_path))
    sp.create()
    qid = new_qid()
    _entry(sp, qid)
    st = State(qid, "a@b.c", [Recipient("x@y.z", attempts=1)], qid_time(qid))
    sp.write_state(st)
    assert sp.todo() == [qid] and sp.read_state(qid) == st
    assert sp.message_path(qid) == sp.path("todo", qid)
    sp.take_over(qid, st)
    assert os.listdir(sp.path("todo")) == [] and os.listdir(sp.path("mess")) == [qid]
    assert _size(sp, qid) == len(MSG) and list(sp.stale(max_age=0)) == []


def test_stale_debris(tmp_path: Path) -> None:
    sp = Spool(str(tmp_path))
    sp.create()
    old = time.time() - 3 * 86400
    orphan_msg = Path(sp.path("todo", f"{new_qid()}.msg"))
    orphan_msg.write_bytes(b"x")
    os.utime(orphan_msg, (old, old))
    young_msg = Path(sp.path("todo", f"{new_qid()}.msg"))
    young_msg.write_bytes(b"x")
    lone_envelope = Path(sp.path("todo", new_qid()))  # old format, message never landed
    lone_envelope.write_bytes(ENV)
    entry = _entry(sp, new_qid())  # one file: a new entry, never debris
    os.utime(entry, (old, old))
    lone_mess = Path(sp.path("mess", new_qid()))
    lone_mess.write_bytes(b"x")
    os.utime(lone_mess, (old, old))
    tmpfile = Path(sp.path("tmp", new_qid()))
    tmpfile.write_bytes(b"x")
    found = set(sp.stale())
    assert found == {str(orphan_msg), str(lone_mess), str(lone_envelope)}
    assert sp.read_new(lone_envelope.name) is None
    assert str(tmpfile) in set(sp.stale(max_age=0))
