from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from mailgrave import spool as spoolmod
from mailgrave.envelope import EnvelopeError
from mailgrave.errors import PermFail
from mailgrave.spool import (
    Entry,
    GroupSync,
    Recipient,
    RecipientState,
    Spool,
    Submission,
    blocks,
    header_lines,
    is_qid,
    message_size,
    message_start,
    new_qid,
    qid_time,
)


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


def test_entry_round_trip() -> None:
    st = Entry(
        "1K16M56R1FTXJPY",
        "a@b.c",
        [Recipient("x@y.z", attempts=2, last_reply="451 later")],
        5.0,
        utf8=True,
    )
    st.recipients.append(Recipient("d@y.z", RecipientState.DELIVERED, status="2.0.0"))
    back = Entry.from_json(st.to_json())
    assert back == st
    assert back.recipients[1].state is RecipientState.DELIVERED
    assert back.envelope(back.recipients).utf8  # passed on to mailgrave-remote


def test_an_entry_written_before_status_and_remote_existed_still_reads() -> None:
    raw = (
        b'{"qid": "1K16M56R1FTXJPY", "sender": "", "created": 5.0, "recipients": '
        b'[{"addr": "x@y.z", "state": "failed", "attempts": 1, "next_attempt": 0.0, '
        b'"last_reply": "5.1.1 no", "first_failure": 0.0}]}'
    )
    back = Entry.from_json(raw)
    assert back.recipients[0].state is RecipientState.FAILED
    assert back.recipients[0].status == "" and back.bounced == [] and not back.utf8


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


def test_new_entry_envelope_size_and_message(tmp_path: Path) -> None:
    sp = Spool(str(tmp_path))
    sp.create()
    qid = new_qid()
    _entry(sp, qid)
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


def test_message_start_refuses_what_is_not_a_header(tmp_path: Path) -> None:
    for data, start in [
        (b"MGQ1 3\nabcREST", 10),
        (b"MGQ1 0\nREST", 7),
        (b"MGQ1 x\nREST", None),  # not a length
        (b"MGQ1 12345678901234567890123456789", None),  # no end of line within the peek
        (b"MGQ2 3\nabc", None),
        (b"Received: MGQ1 3\n", None),  # a bare message is no spool file
        (b"", None),
    ]:
        path = tmp_path / "f"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            if start is None:
                with pytest.raises(EnvelopeError, match="damaged spool header"):
                    message_start(fd)
            else:
                assert message_start(fd) == start, data
                assert message_size(fd) == len(data) - start
                assert b"".join(blocks(fd)) == b"REST"
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
    a, d = new_qid(), new_qid()
    _entry(sp, a)
    _entry(sp, d)
    Path(sp.path("todo", "notaqid")).write_bytes(b"x")  # not an entry: not listed
    Path(sp.path("tmp", new_qid())).write_bytes(b"MGQ1 ")  # being written: not listed
    assert sp.todo() == sorted([a, d])
    assert sp.message_path(d) == sp.path("todo", d)
    assert [e.qid for e in sp.entries()] == sorted([a, d])
    assert sp.new_entry(a) == Entry(a, "a@b.c", [Recipient("x@y.z")], qid_time(a), len(MSG))


def test_take_over_and_remove(tmp_path: Path) -> None:
    sp = Spool(str(tmp_path))
    sp.create()
    qid = new_qid()
    _entry(sp, qid)
    st = Entry(qid, "a@b.c", [Recipient("x@y.z")], qid_time(qid))
    sp.take_over(st)
    assert sp.todo() == [] and sp.deferred() == [qid] and os.listdir(sp.path("todo")) == []
    assert sp.read_entry(qid) == st
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
    st = Entry(qid, "a@b.c", [Recipient("x@y.z", attempts=1)], qid_time(qid))
    sp.write_entry(st)
    assert sp.todo() == [qid] and sp.read_entry(qid) == st
    assert sp.message_path(qid) == sp.path("todo", qid)
    sp.take_over(st)
    assert os.listdir(sp.path("todo")) == [] and os.listdir(sp.path("mess")) == [qid]
    assert _size(sp, qid) == len(MSG) and list(sp.stale(max_age=0)) == []


def test_stale_debris(tmp_path: Path) -> None:
    sp = Spool(str(tmp_path))
    sp.create()
    old = time.time() - 3 * 86400
    entry = _entry(sp, new_qid())  # one file: a new entry, never debris
    os.utime(entry, (old, old))
    lone_mess = Path(sp.path("mess", new_qid()))
    lone_mess.write_bytes(b"x")
    os.utime(lone_mess, (old, old))
    tmpfile = Path(sp.path("tmp", new_qid()))
    tmpfile.write_bytes(b"x")
    young_mess = Path(sp.path("mess", new_qid()))  # maybe being removed right now
    young_mess.write_bytes(b"x")
    found = set(sp.stale())
    assert found == {str(lone_mess)}
    assert str(tmpfile) in set(sp.stale(max_age=0))


def test_a_submission_is_stored_with_lf_and_committed_or_left_no_trace(tmp_path: Path) -> None:
    sp = Spool(str(tmp_path))
    sp.create()
    sync = GroupSync(sp.path("todo"))
    sub = Submission(sp, limit=1000)
    sub.begin(ENV, b"Received: by h\n")
    for piece in (b"Subject: x\r", b"\n\r\nbody\r\n", b"end\r"):
        sub.write(piece)
    sub.commit(sync)
    assert sp.todo() == [sub.qid] and os.listdir(sp.path("tmp")) == []
    fd = os.open(sp.message_path(sub.qid), os.O_RDONLY)
    try:
        assert b"".join(blocks(fd)) == b"Received: by h\nSubject: x\n\nbody\nend\r"
        assert message_size(fd) == sub.size
    finally:
        os.close(fd)
    big = Submission(sp, limit=10)
    with pytest.raises(PermFail, match=r"5\.3\.4"):
        big.write(b"x" * 11)
    big.discard()
    assert os.listdir(sp.path("tmp")) == [] and sp.todo() == [sub.qid]


def test_admin_actions_hold_release_retry_delete(tmp_path: Path) -> None:
    sp = Spool(str(tmp_path))
    sp.create()
    qid = new_qid()
    _entry(sp, qid)
    assert sp.apply(qid, "hold")  # a new message is taken over to be held
    held = sp.read_entry(qid)
    assert held is not None and held.held and sp.todo() == []
    held.recipients[0].next_attempt = time.time() + 3600
    sp.write_entry(held)
    assert sp.apply(qid, "retry")
    again = sp.read_entry(qid)
    assert again is not None and not again.held and again.recipients[0].next_attempt == 0.0
    assert sp.apply(qid, "delete") and sp.entries() == []
    assert not sp.apply(qid, "hold")  # gone
    assert sp.with_send_lock(True, lambda: 7) == 7
    assert sp.with_send_lock(False, lambda: sp.with_send_lock(False, lambda: 1) or 0) == 0
