from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from mailgrave import spool as spoolmod
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


def _entry(sp: Spool, qid: str, env: bytes = b"Fa@b.c\0Tx@y.z\0\0") -> None:
    Path(sp.path("todo", f"{qid}.msg")).write_bytes(b"Subject: x\n\nbody\n")
    Path(sp.path("todo", qid)).write_bytes(env)


def test_todo_lists_committed_entries_only(tmp_path: Path) -> None:
    sp = Spool(str(tmp_path))
    sp.create()
    a, b, c = new_qid(), new_qid(), new_qid()
    _entry(sp, a)
    Path(sp.path("todo", f"{b}.msg")).write_bytes(b"half")  # S2: no envelope yet
    # S4: taken over half-way (message already in mess/)
    Path(sp.path("mess", c)).write_bytes(b"msg")
    Path(sp.path("todo", c)).write_bytes(b"Fa@b.c\0Tx@y.z\0\0")
    assert sp.todo() == sorted([a, c])
    assert sp.message_path(c) == sp.path("mess", c)


def test_take_over_and_remove(tmp_path: Path) -> None:
    sp = Spool(str(tmp_path))
    sp.create()
    qid = new_qid()
    _entry(sp, qid)
    st = State(qid, "a@b.c", [Recipient("x@y.z")], qid_time(qid))
    sp.take_over(qid, st)
    assert sp.todo() == [] and sp.deferred() == [qid]
    assert sp.read_state(qid) == st
    assert Path(sp.message_path(qid)).read_bytes().endswith(b"body\n")
    sp.remove(qid)
    assert sp.deferred() == [] and os.listdir(sp.path("mess")) == []


def test_stale_debris(tmp_path: Path) -> None:
    sp = Spool(str(tmp_path))
    sp.create()
    old = time.time() - 3 * 86400
    orphan_msg = Path(sp.path("todo", f"{new_qid()}.msg"))
    orphan_msg.write_bytes(b"x")
    os.utime(orphan_msg, (old, old))
    young_msg = Path(sp.path("todo", f"{new_qid()}.msg"))
    young_msg.write_bytes(b"x")
    lone_mess = Path(sp.path("mess", new_qid()))
    lone_mess.write_bytes(b"x")
    os.utime(lone_mess, (old, old))
    tmpfile = Path(sp.path("tmp", "X.msg"))
    tmpfile.write_bytes(b"x")
    found = set(sp.stale())
    assert str(orphan_msg) in found and str(lone_mess) in found
    assert str(young_msg) not in found and str(tmpfile) not in found
