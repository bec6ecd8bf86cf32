"""mailgrave.log: records to journald (native protocol, structured fields) or to stderr."""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgrave import log, maillog


def parse_native(data: bytes) -> dict[str, str]:
    """journald's native datagram: KEY=value lines, or KEY\\n<u64 le length>value\\n."""
    out: dict[str, str] = {}
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            out[key.decode()] = value.decode()
            data = rest
        else:
            size = int.from_bytes(rest[:8], "little")
            out[line.decode()] = rest[8 : 8 + size].decode()
            assert rest[8 + size : 9 + size] == b"\n"
            data = rest[9 + size :]
    return out


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "journal.socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setattr(log, "JOURNAL_SOCKET", str(path))
    monkeypatch.delenv("MAILGRAVE_LOG", raising=False)
    yield sock
    sock.close()
    if log._out.journal is not None:
        log._out.journal.close()  # type: ignore[attr-defined]
    log._out.journal = None


def test_records_go_to_the_journal_with_their_fields(
    journal: socket.socket, capsys: pytest.CaptureFixture[str]
) -> None:
    log.setup("smtpd", stdlib=False)
    log.getLogger("x").info("%s: accepted", "Q1", extra={"fields": {"MAILGRAVE_QID": "Q1"}})
    rec = parse_native(journal.recv(65536))
    assert rec["MESSAGE"] == "Q1: accepted"
    assert rec["MAILGRAVE_QID"] == "Q1"
    assert rec["PRIORITY"] == "6"
    assert rec["SYSLOG_IDENTIFIER"] == "mailgrave-smtpd"
    assert rec["SYSLOG_PID"] == str(os.getpid())
    maillog.rejected("RCPT", "[192.0.2.1]", 'relay "x\\ny"', rcpt="a@b.c")
    rec = parse_native(journal.recv(65536))
    assert rec["MAILGRAVE_STATUS"] == "rejected" and rec["MAILGRAVE_RCPT"] == "a@b.c"
    assert "reject RCPT from [192.0.2.1]" in rec["MESSAGE"]
    assert capsys.readouterr().err == ""  # stderr is not a terminal here


def test_debug_only_with_debug_and_tracebacks_as_one_record(journal: socket.socket) -> None:
    log.setup("smtpd", stdlib=False)
    logger = log.getLogger("x")
    logger.debug("not shown")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("session failed")
    rec = parse_native(journal.recv(65536))
    assert rec["PRIORITY"] == "3"
    assert rec["MESSAGE"].startswith("session failed\nTraceback")
    assert "ValueError: boom" in rec["MESSAGE"]
    log.setup("smtpd", debug=True, stdlib=False)
    logger.debug("shown")
    assert parse_native(journal.recv(65536))["MESSAGE"] == "shown"


def test_a_record_too_big_for_a_datagram_goes_in_a_memfd(journal: socket.socket) -> None:
    journal.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    log.setup("queue", stdlib=False)
    big = "x" * 300_000
    log.getLogger("x").warning("%s", big, extra={"fields": {"MAILGRAVE_QID": "Q2"}})
    fds = array.array("i")
    data, ancdata, _flags, _addr = journal.recvmsg(65536, socket.CMSG_SPACE(fds.itemsize))
    assert data == b""
    fds.frombytes(ancdata[0][2][: fds.itemsize])
    with os.fdopen(fds[0], "rb") as f:
        f.seek(0)  # journald reads the sealed memfd from its start
        rec = parse_native(f.read())
    assert rec["MESSAGE"] == big and rec["MAILGRAVE_QID"] == "Q2" and rec["PRIORITY"] == "4"


def test_stdlib_logging_is_routed_the_same_way(journal: socket.socket) -> None:
    log.setup("send", stdlib=True)
    try:
        logging.getLogger("mailgrave.something").warning(
            "deferred %s", "Q3", extra={"fields": {"MAILGRAVE_QID": "Q3"}}
        )
        rec = parse_native(journal.recv(65536))
        assert rec["MESSAGE"] == "deferred Q3" and rec["MAILGRAVE_QID"] == "Q3"
        assert rec["SYSLOG_IDENTIFIER"] == "mailgrave-send" and rec["PRIORITY"] == "4"
    finally:
        logging.getLogger().handlers.clear()


def test_without_a_journal_one_line_per_record_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(log, "JOURNAL_SOCKET", str(tmp_path / "absent"))
    log.setup("smtpd", stdlib=False)
    log.getLogger("x").info("connect from [%s]", "192.0.2.1")
    assert capsys.readouterr().err == f"mailgrave-smtpd[{os.getpid()}]: connect from [192.0.2.1]\n"


def test_a_journal_that_went_away_falls_back_to_stderr(
    journal: socket.socket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log.setup("smtpd", stdlib=False)
    os.unlink(tmp_path / "journal.socket")
    log.getLogger("x").warning("still logged")
    assert "still logged" in capsys.readouterr().err
