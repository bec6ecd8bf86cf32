"""mailgrave-inject / sendmail: the flags cron, mail(1), PHP and git send-email use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailgrave.inject.program import parse_args
from tests.conftest import Instance, Processes, program
from tests.integration.test_queue import start_queue


def queued(inst: Instance) -> list[tuple[bytes, bytes]]:
    """(envelope, message) of every entry in todo/, oldest first."""
    return [(envelope, message) for _, envelope, message in inst.queued()]


@pytest.fixture
def queue(instance: Instance, processes: Processes) -> Instance:
    start_queue(instance, processes)
    return instance


def test_recipients_as_arguments_and_added_headers(queue: Instance) -> None:
    res = queue.sendmail("alice@example.org", "bob", data=b"Subject: hi\n\nhello\n")
    assert res.returncode == 0, res.stderr
    [(env, msg)] = queued(queue)
    assert env.split(b"\0")[1:3] == [b"Talice@example.org", b"Tbob@mx.example.org"]
    assert env.startswith(b"F") and b"@mx.example.org\0" in env.split(b"T")[0]
    head = msg.split(b"\n\n", 1)[0]
    assert b"\nDate: " in head and b"\nMessage-ID: <" in head and b"\nFrom: " in head
    assert msg.endswith(b"Subject: hi\n\nhello\n")


def test_t_reads_to_cc_bcc_and_removes_bcc(queue: Instance) -> None:
    data = (
        b"From: Cron Daemon <root@example.org>\n"
        b"To: Alice <alice@example.org>, bob@example.org\n"
        b"Cc: =?utf-8?q?Carol?= <carol@example.org>\n"
        b"Bcc: secret@example.org\n"
        b"Subject: report\n\nbody\n"
    )
    res = queue.sendmail("-t", "-i", "-f", "bounces@example.org", data=data)
    assert res.returncode == 0, res.stderr
    [(env, msg)] = queued(queue)
    fields = env.split(b"\0")
    assert fields[0] == b"Fbounces@example.org"
    assert sorted(fields[1:-2]) == [
        b"Talice@example.org",
        b"Tbob@example.org",
        b"Tcarol@example.org",
        b"Tsecret@example.org",
    ]
    assert b"secret" not in msg and b"Bcc" not in msg
    assert b"From: Cron Daemon <root@example.org>" in msg  # an existing From is kept


def test_dot_line_ends_input_unless_i(queue: Instance) -> None:
    assert (
        queue.sendmail("alice@example.org", data=b"Subject: a\n\nfirst\n.\nnot this\n").returncode
        == 0
    )
    assert (
        queue.sendmail(
            "-oi", "alice@example.org", data=b"Subject: b\n\nfirst\n.\nand this\n"
        ).returncode
        == 0
    )
    (_, a), (_, b) = queued(queue)
    assert a.endswith(b"first\n") and b"not this" not in a
    assert b.endswith(b"first\n.\nand this\n")


def test_full_name_and_null_sender(queue: Instance) -> None:
    assert (
        queue.sendmail(
            "-F", "Backup Job", "-f", "<>", "alice@example.org", data=b"Subject: x\n\ny\n"
        ).returncode
        == 0
    )
    [(env, msg)] = queued(queue)
    assert env.startswith(b"F\0")
    assert b'From: "Backup Job" <MAILER-DAEMON@mx.example.org>' in msg


@pytest.mark.parametrize(
    "flags",
    [
        ["-oem", "-odb", "-oi", "-v"],  # cron and mail(1)
        ["-t", "-i"],  # PHP's default sendmail_path
        ["-i", "-fgit@example.org", "--"],  # git send-email
        [
            "-odi",
            "-oee",
            "-B",
            "8BITMIME",
            "-N",
            "never",
            "-R",
            "hdrs",
            "-V",
            "envid",
            "-Ooption=x",
            "-L",
            "tag",
            "-bm",
            "-U",
            "-G",
            "-h",
            "10",
            "-n",
            "-m",
        ],
    ],
)
def test_flags_are_accepted(queue: Instance, flags: list[str]) -> None:
    res = queue.sendmail(
        *flags, "alice@example.org", data=b"To: alice@example.org\nSubject: f\n\nok\n"
    )
    assert res.returncode == 0, res.stderr
    assert len(queued(queue)) == 1


def test_header_without_blank_line_and_no_header(queue: Instance) -> None:
    assert (
        queue.sendmail("alice@example.org", data=b"just a line of text\nand another\n").returncode
        == 0
    )
    [(_, msg)] = queued(queue)
    head, body = msg.split(b"\n\n", 1)
    assert b"\nDate: " in head
    assert body == b"just a line of text\nand another\n"


def test_errors_have_sysexits_codes(instance: Instance, queue: Instance) -> None:
    res = queue.sendmail(data=b"Subject: nobody\n\nx\n")
    assert res.returncode == 65 and b"no recipients" in res.stderr
    res = queue.sendmail("bad address@", data=b"x\n")
    assert res.returncode == 64
    res = queue.sendmail("-Z", "alice@example.org", data=b"x\n")
    assert res.returncode == 64 and b"unknown option" in res.stderr
    assert queued(queue) == []


@pytest.mark.parametrize(
    "address", ["alice@@example.org", "a..b@example.org", ".alice@example.org", 'al"ice@x.org']
)
def test_bad_command_line_address_is_a_usage_error(queue: Instance, address: str) -> None:
    res = queue.sendmail("bob@example.org", address, data=b"Subject: x\n\ny\n")
    assert res.returncode == 64, res.stderr
    [line] = res.stderr.decode().splitlines()
    assert "bad recipient address" in line and "not sent" in line
    assert queued(queue) == []
    res = queue.sendmail("-f", address, "bob@example.org", data=b"Subject: x\n\ny\n")
    assert res.returncode == 64 and len(res.stderr.splitlines()) == 1, res.stderr
    assert queued(queue) == []


@pytest.mark.parametrize(
    "field",
    [b"To: alice@@example.org", b"To: bob@example.org, <carol@@example.org>", b"Cc: a..b@x.org"],
)
def test_bad_header_address_with_t_is_a_data_error(queue: Instance, field: bytes) -> None:
    res = queue.sendmail("-t", data=field + b"\nSubject: x\n\ny\n")
    assert res.returncode == 65, res.stderr
    assert len(res.stderr.splitlines()) == 1 and b"bad " in res.stderr, res.stderr
    assert queued(queue) == []


def test_t_accepts_quoted_local_parts_and_empty_groups(queue: Instance) -> None:
    data = b'To: "john smith"@example.org\nCc: undisclosed-recipients:;\nSubject: x\n\ny\n'
    res = queue.sendmail("-t", data=data)
    assert res.returncode == 0, res.stderr
    [(env, _msg)] = queued(queue)
    assert b'T"john smith"@example.org\0' in env


def test_queue_down_is_temporary(instance: Instance) -> None:
    res = instance.sendmail("alice@example.org", data=b"Subject: x\n\ny\n")
    assert res.returncode == 75
    assert b"try again later" in res.stderr


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("smtpd:\n  max_recipients: lots\n")
    res = subprocess.run(
        [program("sendmail"), "--config", str(cfg), "a@b.c"], input=b"x", capture_output=True
    )
    assert res.returncode == 78
    assert f'{cfg}: smtpd.max_recipients: expected an integer, got "lots"'.encode() in res.stderr


def test_fifty_megabytes_streamed_in_bounded_memory(queue: Instance) -> None:
    """inject never holds the message: its peak RSS stays far below the message size."""
    gen = queue.base / "big.eml"
    with open(gen, "wb") as f:
        f.write(b"Subject: big\n\n")
        line = b"x" * 99 + b"\n"
        for _ in range(50 * 1024 * 1024 // 100):
            f.write(line)
    probe = (
        "import resource, subprocess, sys\n"
        "with open(sys.argv[1], 'rb') as f:\n"
        "    rc = subprocess.run(sys.argv[2:], stdin=f).returncode\n"
        "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            str(gen),
            program("sendmail"),
            "--config",
            str(queue.config_path),
            "-i",
            "alice@example.org",
        ],
        capture_output=True,
        check=True,
        timeout=120,
    )
    rc, maxrss_kb = map(int, res.stdout.split())
    assert rc == 0, res.stderr
    assert maxrss_kb < 40 * 1024, f"inject peak RSS {maxrss_kb} kB for a 50 MB message"
    [(_, msg)] = queued(queue)
    assert len(msg) > 50 * 1024 * 1024


def test_parse_args_edge_cases() -> None:
    o = parse_args(["-fme@x.org", "-Fname", "-oi", "-t", "--", "-notaflag@example.org"])
    assert (o.sender, o.full_name, o.dot_ends, o.from_headers) == ("me@x.org", "name", False, True)
    assert o.recipients == ["-notaflag@example.org"]
    assert parse_args(["-bp"]).mode == "list" and parse_args(["-q"]).mode == "retry"
    assert parse_args(["-q30m"]).mode == "retry"
    assert parse_args(["-C", "/x.yaml", "a@b.c"]).config == "/x.yaml"
