"""mailgrave-local as a service: the local.ctrl protocol on stdin (Accept=yes) and LISTEN_FDS."""

from __future__ import annotations

import grp
import mailbox
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import (
    Instance,
    Processes,
    needs_root,
    program,
    wait_for,
    write_spool_file,
)

MSG = b"Received: by test\nFrom: s@example.net\nSubject: via ctrl\n\nFrom me\nbody\n"


def request(sock: socket.socket, msg_path: Path, qid: str, sender: str, *rcpts: str) -> list[str]:
    """One local.ctrl request with the message fd (SCM_RIGHTS); the K/Z/D lines back."""
    data = f"Q{qid}\0F{sender}\0".encode() + b"".join(f"T{r}\0".encode() for r in rcpts) + b"\0"
    fd = os.open(msg_path, os.O_RDONLY)
    try:
        socket.send_fds(sock, [data], [fd])
    finally:
        os.close(fd)
    lines: list[str] = []
    buf = b""
    while len(lines) < len(rcpts):
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {lines}"
        buf += chunk
        *done, buf = buf.split(b"\n")
        lines += [d.decode() for d in done]
    return lines


def spool_message(inst: Instance, data: bytes = MSG) -> Path:
    return write_spool_file(inst.base / "spool.msg", data)


def _proc_children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of each direct child of ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append((int(entry), fields[0]))
    return found


def children(pid: int) -> list[str]:
    """States of the direct children of ``pid`` (Z = a zombie nobody reaped)."""
    return [state for _pid, state in _proc_children(pid)]


def child_pids(pid: int) -> list[int]:
    return [child for child, _state in _proc_children(pid)]


def test_connection_on_stdin_serves_several_requests(
    instance: Instance, processes: Processes
) -> None:
    msg = spool_message(instance)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = processes.start(
        [program("mailgrave-local"), "--config", str(instance.config_path)],
        stdin=theirs,
    )
    theirs.close()
    with ours:
        lines = request(
            ours, msg, "Q1", "s@example.net", "alice@example.org", "nobody-x@example.org"
        )
        assert lines[0].startswith("K") and lines[1].startswith("D5.1.1")
        lines = request(ours, msg, "Q2", "", "bob+tag@example.org", "Alice@Example.org")
        assert [line[:1] for line in lines] == ["K", "K"]
    assert proc.wait(timeout=10) == 0
    alice = mailbox.Maildir(str(instance.maildir("alice")), create=False)
    got = sorted((m["Return-Path"], m["Delivered-To"]) for m in alice)
    assert got == [("<>", "Alice@Example.org"), ("<s@example.net>", "alice@example.org")]
    [bob] = instance.messages("bob")
    assert bob.startswith(
        b"Return-Path: <>\nDelivered-To: bob+tag@example.org\nReceived: by test\n"
    )
    if os.getuid() == 0:  # never written as root: as the configured virtual user
        want = pwd.getpwnam(instance.settings["local"]["virtual_user"]).pw_uid
        for p in (instance.maildir("alice") / "new").iterdir():
            assert p.stat().st_uid == want != 0
    # A real mail reader lists both messages of the Maildir.
    listing = subprocess.run(
        ["s-nail", "-N", "-R", "-H", "-f", str(instance.maildir("alice"))],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        env={"HOME": str(instance.base), "PATH": os.environ["PATH"], "TERM": "dumb"},
        timeout=30,
    ).stdout.decode(errors="replace")
    assert listing.count("via ctrl") == 2, listing


def start_listen_fds(inst: Instance, processes: Processes) -> tuple[subprocess.Popen[bytes], str]:
    """mailgrave-local with its local.ctrl socket in LISTEN_FDS, as systemd starts it."""
    path = str(inst.base / "local.ctrl")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    fd = listener.fileno()
    # fd 3 as systemd passes it; the wrapper execs mailgrave-local (same pid)
    move = f"import os, sys; os.dup2({fd}, 3); os.close({fd}); os.execv(sys.argv[1], sys.argv[1:])"
    proc = processes.start(
        [
            "/usr/bin/python3",
            "-c",
            move,
            program("mailgrave-local"),
            "--config",
            str(inst.config_path),
        ],
        env=dict(os.environ, LISTEN_FDS="1"),
        pass_fds=(fd,),
    )
    listener.close()
    return proc, path


def test_listen_fds_many_connections_reaped_idle_exit(tmp_path: Path, processes: Processes) -> None:
    inst = Instance(tmp_path, queue={"idle_exit": "1s"})
    msg = spool_message(inst)
    proc, path = start_listen_fds(inst, processes)
    conns = []
    for i in range(5):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(path)
        conns.append(c)
    for i, c in enumerate(conns):
        assert request(c, msg, f"Q{i}", "s@example.net", "alice@example.org")[0].startswith("K")
    for c in conns:
        c.close()
    assert len(inst.messages("alice")) == 5
    # every worker is reaped (no zombies) while the parent waits for more work
    wait_for(lambda: proc.poll() is not None or not children(proc.pid), timeout=5)
    assert "Z" not in children(proc.pid)
    # then, idle, it exits by itself
    started = time.monotonic()
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5


def test_loop_and_unknown_are_permanent_over_ctrl(instance: Instance, processes: Processes) -> None:
    msg = spool_message(
        instance, b"Received: x\nDelivered-To: bob@example.org\n\nDelivered-To: alice@example.org\n"
    )
    ours, theirs = socket.socketpair()
    processes.start(
        [program("mailgrave-local"), "--config", str(instance.config_path)], stdin=theirs
    )
    theirs.close()
    with ours:
        a, b = request(ours, msg, "Q", "s@example.net", "bob@example.org", "alice@example.org")
    assert a.startswith("D5.4.6") and "loop" in a
    assert b.startswith("K")  # only the header counts, not the body
    assert instance.messages("bob") == []


def test_request_without_fd_is_temporary(instance: Instance, processes: Processes) -> None:
    ours, theirs = socket.socketpair()
    processes.start(
        [program("mailgrave-local"), "--config", str(instance.config_path)], stdin=theirs
    )
    theirs.close()
    with ours:
        ours.sendall(b"QX\0Fs@example.net\0Talice@example.org\0\0")
        assert ours.recv(4096).startswith(b"Z4.3.0")
    assert instance.messages("alice") == []


def by_hand(inst: Instance, rcpt: str, data: bytes = MSG) -> subprocess.CompletedProcess[bytes]:
    return inst.run("mailgrave-local", "--sender", "s@example.net", "--qid", "T", rcpt, input=data)


@needs_root
def test_spool_mbox_is_user_mail_0660_and_forward_commands_lack_group_mail(
    tmp_path: Path, user: pwd.struct_passwd
) -> None:
    mail_gid = grp.getgrnam("mail").gr_gid
    spool = tmp_path / "varmail"  # like Debian's /var/mail: 2775 root:mail
    spool.mkdir()
    os.chown(spool, 0, mail_gid)
    os.chmod(spool, 0o2775)
    inst = Instance(tmp_path, local={"mailbox": "mbox", "mbox_dir": str(spool)})
    res = by_hand(inst, f"{user.pw_name}@example.org")
    assert res.returncode == 0, res.stdout + res.stderr
    st = (spool / user.pw_name).stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (user.pw_uid, mail_gid, 0o660)
    # A .forward command runs as the user with the user's own groups only:
    # group mail would open every mailbox in the spool to it.
    out = tmp_path / "groups"
    out.touch()
    shutil.chown(out, user.pw_name)
    fwd = Path(user.pw_dir) / ".forward"
    fwd.write_text(f'"|id -u > {out}; id -G >> {out}", {user.pw_name}@example.org\n')
    shutil.chown(fwd, user.pw_name)
    res = by_hand(inst, f"{user.pw_name}@example.org")
    assert res.returncode == 0, res.stdout + res.stderr
    uid, groups = out.read_text().splitlines()
    assert int(uid) == user.pw_uid
    assert str(mail_gid) not in groups.split()
    # ... and the item naming the user's own address went to the mailbox, not round a loop
    box = mailbox.mbox(str(spool / user.pw_name), create=False)
    try:
        assert len(box) == 2
    finally:
        box.close()


@needs_root
def test_forward_writable_by_others_is_ignored(instance: Instance, user: pwd.struct_passwd) -> None:
    fwd = Path(user.pw_dir) / ".forward"
    fwd.write_text("bob@example.org\n")
    shutil.chown(fwd, user.pw_name)
    fwd.chmod(0o666)
    res = by_hand(instance, f"{user.pw_name}@example.org")
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(list((Path(user.pw_dir) / "Maildir" / "new").iterdir())) == 1
    assert instance.messages("bob") == []


@needs_root
def test_run_as_an_ordinary_user_delivers_as_that_user(tmp_path: Path) -> None:
    """A developer's `mailgrave run` as themselves: no uid switching, their own files."""
    nobody = pwd.getpwnam("nobody")
    inst = Instance(tmp_path, local={"virtual_user": "nobody"})
    for p in (inst.base, inst.mail):
        os.chown(p, nobody.pw_uid, nobody.pw_gid)
    res = subprocess.run(
        [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            program("mailgrave-local"),
            "--config",
            str(inst.config_path),
            "--sender",
            "s@example.net",
            "alice@example.org",
            "root@example.org",
        ],
        input=MSG,
        capture_output=True,
        timeout=60,
    )
    lines = res.stdout.decode().splitlines()
    assert lines[0].startswith("K"), res.stdout + res.stderr
    # root's mailbox (/var/mail/root) is not writable by nobody: a temporary failure
    assert lines[1].startswith("Z"), lines
    [path] = list((inst.maildir("alice") / "new").iterdir())
    assert path.stat().st_uid == nobody.pw_uid


def _delivering_pids(maildir: Path) -> set[str]:
    """The pids in a Maildir's file names (``TIME.MmicroPpidQn.host``): who wrote each."""
    return {p.name.split("P", 1)[1].split("Q", 1)[0] for p in (maildir / "new").iterdir()}


def test_one_delivery_child_per_user_for_a_connection(
    instance: Instance, processes: Processes, user: pwd.struct_passwd
) -> None:
    """Deliveries on one local.ctrl connection reuse the child that became their
    user, never another user's; a child that died is replaced."""
    msg = spool_message(instance)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = processes.start(
        [program("mailgrave-local"), "--config", str(instance.config_path)], stdin=theirs
    )
    theirs.close()
    home = Path(user.pw_dir)
    with ours:
        for i in range(10):
            lines = request(ours, msg, f"Q{i}", "", "alice@example.org", "bob@example.org")
            assert [line[:1] for line in lines] == ["K", "K"], lines
        first = _delivering_pids(instance.maildir("alice")) | _delivering_pids(
            instance.maildir("bob")
        )
        assert len(first) == 1  # one child wrote all twenty
        if os.getuid() == 0:
            lines = request(ours, msg, "QU", "", f"{user.pw_name}@example.org")
            assert lines[0].startswith("K"), lines
            [own] = list((home / "Maildir" / "new").iterdir())
            assert own.stat().st_uid == user.pw_uid  # written by the user's own child
            assert _delivering_pids(home / "Maildir").isdisjoint(first)
        [pid] = first
        os.kill(int(pid), 9)
        wait_for(lambda: "Z" in children(proc.pid))  # dead, not yet reaped
        lines = request(ours, msg, "QK", "", "alice@example.org")
        assert lines[0].startswith("K"), lines
        after = _delivering_pids(instance.maildir("alice"))
        assert len(after - first) == 1  # a new child took over
    assert proc.wait(timeout=10) == 0


def test_send_keeps_its_local_connection_and_replaces_a_closed_one(
    tmp_path: Path, processes: Processes
) -> None:
    """mailgrave-send's deliver() reuses its local.ctrl connection (one worker for
    many messages) and, when that worker has gone, opens a new one instead of failing."""
    import signal

    from mailgrave import ctrl

    inst = Instance(tmp_path)
    msg = spool_message(inst)
    proc, path = start_listen_fds(inst, processes)
    agents = ctrl.Agents()

    def one(qid: str) -> list[str]:
        results, _ = ctrl.request(
            path, qid, "s@example.net", ["alice@example.org"], str(msg), agents
        )
        return [r.code for r in results]

    try:
        for i in range(6):
            assert one(f"Q{i}") == ["K"]
        workers = child_pids(proc.pid)
        assert len(workers) == 1, workers  # one worker served all six requests
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: child_pids(proc.pid) == [], timeout=5)  # reaped
        assert one("Q9") == ["K"]  # on a new connection, not a failure
    finally:
        agents.close()
    assert len(inst.messages("alice")) == 7


# Debian 13's failure (issue 16): root without CAP_SETUID. `setpriv` drops it from
# the bounding set, so the exec'd mailgrave-local is root whose setuid() fails.
NO_SETUID = ["setpriv", "--bounding-set", "-setuid", "--"]


@needs_root
def test_without_setuid_one_critical_line_and_every_answer_deferred_at_once(
    tmp_path: Path, processes: Processes
) -> None:
    inst = Instance(tmp_path)
    msg = spool_message(inst)
    path = str(inst.base / "local.ctrl")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    fd = listener.fileno()
    move = f"import os, sys; os.dup2({fd}, 3); os.close({fd}); os.execvp(sys.argv[1], sys.argv[1:])"
    errlog = inst.base / "local.log"
    with errlog.open("wb") as err:
        proc = processes.start(
            [
                "/usr/bin/python3",
                "-c",
                move,
                *NO_SETUID,
                program("mailgrave-local"),
                "--config",
                str(inst.config_path),
            ],
            env=dict(os.environ, LISTEN_FDS="1", MAILGRAVE_LOG="stderr"),
            pass_fds=(fd,),
            stderr=err,
        )
    listener.close()
    wait_for(lambda: os.path.exists(path))
    started = time.monotonic()
    for i in range(3):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(path)
            lines = request(c, msg, f"Q{i}", "s@example.net", "alice@example.org", "x@example.org")
            want = "Z4.3.0 local delivery misconfigured: cannot switch users"
            assert lines == [want, want]
    assert time.monotonic() - started < 5
    assert inst.messages("alice") == []
    assert proc.poll() is None
    text = errlog.read_text()
    assert "Traceback" not in text
    [line] = [t for t in text.splitlines() if t]
    assert "cannot switch to user nobody" in line and "docs/security.md" in line


@needs_root
def test_without_setuid_by_hand_says_configuration_problem(instance: Instance) -> None:
    res = subprocess.run(
        [
            *NO_SETUID,
            program("mailgrave-local"),
            "--config",
            str(instance.config_path),
            "--qid",
            "T",
            "alice@example.org",
        ],
        input=MSG,
        capture_output=True,
        env=dict(os.environ, MAILGRAVE_LOG="stderr"),
        timeout=60,
    )
    assert res.returncode == 111, res
    assert res.stdout.decode().startswith(
        "Z4.3.0 mailgrave-local cannot switch to user nobody: configuration problem,"
        " see docs/security.md"
    )
    assert b"Traceback" not in res.stderr
