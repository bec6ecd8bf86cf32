"""mailgrave-local by hand: system users (Maildir, mbox), aliases, .forward, loops, real readers."""

from __future__ import annotations

import mailbox
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from tests.conftest import Instance, Processes, needs_root, program
from tests.integration.test_queue import start_queue


def local(
    inst: Instance, *rcpts: str, data: bytes, sender: str = "sender@example.net"
) -> subprocess.CompletedProcess[bytes]:
    return inst.run("mailgrave-local", "--sender", sender, "--qid", "TEST", *rcpts, input=data)


MSG = b"Received: by test\nFrom: sender@example.net\nSubject: hello\n\nFrom the start\n>From quoted\nbody\n"


@needs_root
def test_system_user_maildir_as_the_user(instance: Instance, user: pwd.struct_passwd) -> None:
    res = local(instance, f"{user.pw_name}@example.org", data=MSG)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith(b"K")
    md = Path(user.pw_dir) / "Maildir"
    [path] = list((md / "new").iterdir())
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid)  # never root
    msg = mailbox.Maildir(str(md), create=False).get_message(path.name)
    assert msg["Delivered-To"] == f"{user.pw_name}@example.org"
    assert msg["Return-Path"] == "<sender@example.net>"
    assert msg.get_payload() == "From the start\n>From quoted\nbody\n"


@needs_root
def test_system_user_mbox_read_by_mailbox_and_a_real_mua(
    tmp_path: Path, user: pwd.struct_passwd
) -> None:
    inst = Instance(tmp_path, local={"mailbox": "mbox", "mbox_dir": "/var/mail"})
    for i in range(2):
        res = local(
            inst,
            f"{user.pw_name}+ext@example.org",
            data=MSG.replace(b"hello", f"hello {i}".encode()),
        )
        assert res.returncode == 0, res.stdout + res.stderr
    path = Path("/var/mail") / user.pw_name
    assert path.stat().st_uid == user.pw_uid
    raw = path.read_bytes()
    assert raw.count(b"\nFrom ") + raw.startswith(b"From ") == 2
    assert b"\n>From the start\n>>From quoted\n" in raw  # mboxrd quoting
    assert not Path(f"{path}.lock").exists()
    box = mailbox.mbox(str(path), create=False)
    msgs = list(box)
    box.close()
    assert [m["Subject"] for m in msgs] == ["hello 0", "hello 1"]
    # s-nail (Debian's mailx) lists both messages from the file.
    headers = subprocess.run(
        ["s-nail", "-N", "-R", "-H", "-f", str(path)],
        capture_output=True,
        env={"HOME": str(tmp_path), "PATH": os.environ["PATH"], "TERM": "dumb"},
        timeout=30,
    )
    listing = headers.stdout.decode(errors="replace")
    assert "hello 0" in listing and "hello 1" in listing, listing + headers.stderr.decode(
        errors="replace"
    )


@needs_root
def test_aliases_pipe_file_include_and_loop(tmp_path: Path, user: pwd.struct_passwd) -> None:
    inst = Instance(tmp_path)
    os.chmod(tmp_path, 0o755)
    out = tmp_path / "out"
    out.mkdir()
    shutil.chown(out, "nobody")
    (tmp_path / "team.inc").write_text(f"# the team\n{user.pw_name}, alice@example.org\n")
    (tmp_path / "aliases").write_text(
        "# test aliases\n"
        f"team: :include:{tmp_path}/team.inc\n"
        f'logger: "|cat > {out}/piped"\n'
        f"archive: {out}/archive.mbox\n"
        "ring1: ring2\nring2: ring1, alice@example.org\n"
        "multi: alice,\n  bob@example.org\n"
    )
    for rcpt in ("team", "logger", "archive", "ring1", "multi"):
        res = local(inst, f"{rcpt}@example.org", data=MSG)
        assert res.returncode == 0, (rcpt, res.stdout, res.stderr)
    assert (out / "piped").read_bytes().endswith(b"body\n")
    assert (out / "piped").stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert b"Delivered-To: logger@example.org" in (out / "piped").read_bytes()
    archive = mailbox.mbox(str(out / "archive.mbox"), create=False)
    assert archive[0]["Subject"] == "hello"
    archive.close()
    assert len(list((Path(user.pw_dir) / "Maildir" / "new").iterdir())) == 1
    # alice got it via team, ring1 and multi; bob via multi
    assert len(inst.messages("alice")) == 3 and len(inst.messages("bob")) == 1


def test_unknown_user_and_delivered_to_loop_are_permanent(instance: Instance) -> None:
    res = local(instance, "nosuchuser@example.org", data=MSG)
    assert res.returncode == 100 and res.stdout.startswith(b"D5.1.1")
    looped = b"Delivered-To: alice@example.org\n" + MSG
    res = local(instance, "alice@example.org", data=looped)
    assert res.returncode == 100 and b"loop" in res.stdout
    assert instance.messages("alice") == []


def test_postmaster_root_and_mailer_daemon_always_resolve(tmp_path: Path) -> None:
    from mailgrave import config
    from mailgrave.recipients import Router

    inst = Instance(tmp_path)
    inst.settings["local"]["virtual"] = {}
    inst.write_config()
    router = Router(config.load(str(inst.config_path)))
    for name in ("postmaster", "root", "MAILER-DAEMON", "Postmaster"):
        [target] = router.resolve(f"{name}@example.org")
        assert target.kind == "mbox" and target.user != "root"
    assert not router.exists("nobody-here@example.org")
    # user+ext finds the user
    assert router.exists("postmaster+reports@example.org")


@needs_root
def test_forward_file_read_as_the_user(
    instance: Instance, processes: Processes, user: pwd.struct_passwd
) -> None:
    start_queue(instance, processes)
    fwd = Path(user.pw_dir) / ".forward"
    fwd.write_text(f"\\{user.pw_name}, bob@example.org\n")
    shutil.chown(fwd, user.pw_name)
    fwd.chmod(0o600)
    res = local(instance, f"{user.pw_name}@example.org", data=MSG)
    assert res.returncode == 0, res.stdout + res.stderr
    assert b"forwarded to bob@example.org" in res.stdout
    assert len(list((Path(user.pw_dir) / "Maildir" / "new").iterdir())) == 1
    # The forwarded copy is queued with the original sender and a Delivered-To line.
    [(_, envelope, copy)] = instance.queued()
    assert envelope == b"Fsender@example.net\0Tbob@example.org\0\0"
    assert f"Delivered-To: {user.pw_name}@example.org".encode() in copy


def test_fifty_megabytes_in_bounded_memory(instance: Instance) -> None:
    big = instance.base / "big.eml"
    with big.open("wb") as f:
        f.write(b"Subject: big\n\n")
        for _ in range(50 * 1024 * 1024 // 100):
            f.write(b"y" * 99 + b"\n")
    probe = (
        "import resource, subprocess, sys\n"
        "with open(sys.argv[1], 'rb') as f:\n"
        "    rc = subprocess.run(sys.argv[2:], stdin=f, stdout=subprocess.DEVNULL).returncode\n"
        "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    res = subprocess.run(
        [
            "/usr/bin/python3",
            "-c",
            probe,
            str(big),
            program("mailgrave-local"),
            "--config",
            str(instance.config_path),
            "alice@example.org",
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    rc, rss_kb = map(int, res.stdout.split())
    assert rc == 0
    assert rss_kb < 40 * 1024, f"mailgrave-local peak RSS {rss_kb} kB"
    [msg] = instance.messages("alice")
    assert len(msg) > 50 * 1024 * 1024


def test_command_exit_status_decides(instance: Instance) -> None:
    (instance.base / "aliases").write_text('nouser: "|exit 67"\nlater: "|exit 75"\n')
    res = local(instance, "nouser@example.org", data=MSG)
    assert res.returncode == 100 and res.stdout.startswith(b"D5.3.0 command failed with status 67")
    res = local(instance, "later@example.org", data=MSG)
    assert res.returncode == 111 and res.stdout.startswith(b"Z4.3.0 command failed with status 75")
