"""The prototype's by-hand flags, used as the 2006 run scripts used them: a stage
started from a root shell with --in/--out for its sockets and --user/--chroot
to drop root (issue 12, item 13)."""

from __future__ import annotations

import os
import pwd
import smtplib
import subprocess
from pathlib import Path

import pytest

from mailgrave import config as configmod
from tests.conftest import Instance, Processes, free_port, program, wait_for
from tests.integration.test_submission import _connectable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="--user and --chroot need root")


def status(pid: int, field: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split()[1:]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_smtpd_chrooted_as_nobody_submits_to_a_queue_started_by_hand(
    tmp_path: Path, processes: Processes
) -> None:
    inst = Instance(tmp_path)
    jail = tmp_path / "smtpd"
    jail.mkdir(mode=0o755)
    queue = processes.start(
        [
            *(program("mailgrave-queue"), "--config", str(inst.config_path)),
            *("--in", str(jail / "queue.ctrl"), "--user", "root"),
        ]
    )
    wait_for(lambda: (jail / "queue.ctrl").exists() or queue.poll() is not None)
    assert queue.poll() is None
    port = free_port()
    smtpd = processes.start(
        [
            *(program("mailgrave-smtpd"), "--config", str(inst.config_path)),
            *("--bind", "127.0.0.1", "--port", str(port), "--out", "/queue.ctrl"),
            *("--chroot", str(jail), "--user", "nobody"),
        ]
    )
    nobody = pwd.getpwnam("nobody")

    def dropped() -> bool:
        try:
            return status(smtpd.pid, "Uid")[0] == str(nobody.pw_uid)
        except (OSError, AssertionError):
            return False

    wait_for(lambda: dropped() or smtpd.poll() is not None)
    assert smtpd.poll() is None
    assert status(smtpd.pid, "Uid") == [str(nobody.pw_uid)] * 4
    assert status(smtpd.pid, "Gid") == [str(nobody.pw_gid)] * 4
    assert os.readlink(f"/proc/{smtpd.pid}/root") == str(jail)
    wait_for(lambda: _connectable(port))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail("a@client.example", ["alice@example.org"], b"Subject: by hand\r\n\r\nhi\r\n")
    assert len(inst.spool_entries()) == 1  # queued through /queue.ctrl inside the chroot
    assert status(queue.pid, "Uid")[0] == "0"  # --user root: kept on purpose


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        ([], 64, "refusing to run as root: name the user to become with --user NAME"),
        (["--user", "no-such-user-here"], 64, "no-such-user-here"),
        (["--chroot", "/nonexistent/jail", "--user", "nobody"], 111, "/nonexistent/jail"),
        (["--chroot", "/tmp"], 64, "--chroot needs --user"),
    ],
)
def test_bad_privilege_flags_are_one_line_errors(
    tmp_path: Path, args: list[str], code: int, says: str
) -> None:
    inst = Instance(tmp_path)
    port = str(free_port())
    for name, extra in (
        ("mailgrave-smtpd", ["--bind", "127.0.0.1", "--port", port]),
        ("mailgrave-remote", ["--in", str(tmp_path / "remote.ctrl")]),
    ):
        res = subprocess.run(
            [program(name), "--config", str(inst.config_path), *extra, *args],
            capture_output=True,
            timeout=30,
        )
        err = res.stderr.decode()
        assert res.returncode == code, (name, err)
        assert says in err and len(err.strip().splitlines()) == 1, (name, err)
        assert "Traceback" not in err


def test_queue_and_send_as_root_need_user(tmp_path: Path) -> None:
    inst = Instance(tmp_path)
    for name, extra in (
        ("mailgrave-queue", ["--in", str(tmp_path / "q.ctrl")]),
        ("mailgrave-send", []),
    ):
        res = subprocess.run(
            [program(name), "--config", str(inst.config_path), *extra],
            capture_output=True,
            timeout=30,
        )
        assert res.returncode == 64, (name, res.stderr)
        assert b"--user" in res.stderr and b"Traceback" not in res.stderr


def test_help_shows_the_real_defaults() -> None:
    defaults = configmod.Config()
    for name in ("mailgrave-smtpd", "mailgrave-queue", "mailgrave-send", "mailgrave-remote"):
        out = subprocess.run([program(name), "--help"], capture_output=True, text=True).stdout
        flat = " ".join(out.split())
        assert f"(default: {configmod.DEFAULT_PATH})" in flat, (name, out)
    out = " ".join(
        subprocess.run(
            [program("mailgrave-smtpd"), "--help"], capture_output=True, text=True
        ).stdout.split()
    )
    assert defaults.socket_path("queue.ctrl") in out


def test_remote_by_hand_chrooted_as_nobody_delivers(tmp_path: Path, processes: Processes) -> None:
    from tests.integration.test_remote_delivery import start_peer

    peer = start_peer(processes, tmp_path)
    inst = Instance(tmp_path)
    jail = tmp_path / "remote"
    jail.mkdir(mode=0o755)
    res = subprocess.run(
        [
            *(program("mailgrave-remote"), "--config", str(inst.config_path)),
            *("--host", f"127.0.0.1:{peer.port}", "--chroot", str(jail), "--user", "nobody"),
            *("--sender", "a@example.org", "bob@elsewhere.test"),
        ],
        input=b"Subject: chrooted\r\n\r\nhi\r\n",
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert b"\nK" in b"\n" + res.stdout, res.stdout
    assert [b"Subject: chrooted" in raw for _meta, raw in peer.messages()] == [True]
