"""Authenticated submission on 587 (STARTTLS) and 465 (implicit TLS) with real clients:
msmtp, swaks, smtplib; AUTH PLAIN and LOGIN; what an authenticated user may do."""

from __future__ import annotations

import os
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SAME_USER, Instance, Processes, free_port, program, wait_for

PEERS = Path(__file__).resolve().parent.parent / "peers"
PASSWORD = "correct horse battery staple"


class Submission:
    """`mailgrave run` with SMTP, submission and SMTPS listeners, and a user alice."""

    def __init__(self, inst: Instance, ports: dict[str, int], sink: Path) -> None:
        self.inst = inst
        self.ports = ports
        self.sink = sink

    def sunk(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.sink.glob("*.eml"), key=_num)]

    def log(self) -> str:
        return self.inst.log.read_text(errors="replace")


def _num(p: Path) -> int:
    return int(p.stem) if p.stem.isdigit() else -1


def make_cert(base: Path) -> tuple[Path, Path]:
    cert, key = base / "cert.pem", base / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=mx.example.org",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def add_user(inst: Instance, name: str, password: str) -> None:
    res = inst.run("mailgrave", "user", "add", name, "--stdin", input=password.encode() + b"\n")
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def sub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Submission]:
    base = tmp_path_factory.mktemp("submission")
    procs = Processes()
    sink_port = free_port()
    sink = base / "sink"
    procs.start(
        [
            "/usr/bin/python3",
            str(PEERS / "smtp_peer.py"),
            "--port",
            str(sink_port),
            "--outdir",
            str(sink),
        ]
    )
    wait_for(lambda: (sink / "ready").exists())
    cert, key = make_cert(base)
    (base / "rate").mkdir()
    inst = Instance(
        base,
        relay_networks=["192.0.2.0/24"],  # 127.0.0.1 relays only when authenticated
        smtpd={"tls": {"certificate": str(cert), "key": str(key)}, "timeout": "10s"},
        auth={
            "users_file": str(base / "users"),
            "senders": {"carol": ["carol@example.org", "@carol.test"]},
            "rate_limit": {"messages": 100, "recipients": 100, "directory": str(base / "rate")},
        },
        remote={
            "routes": {"elsewhere.test": f"[127.0.0.1]:{sink_port}"},
            "tls": "none",
            "dns": {"nameservers": ["127.0.0.1"], "port": 9, "timeout": "2s"},
        },
    )
    add_user(inst, "alice", PASSWORD)
    add_user(inst, "carol", PASSWORD)
    ports = {"smtp": free_port(), "submission": free_port(), "smtps": free_port()}
    args = [program("mailgrave"), "--config", str(inst.config_path), "run"]
    args += ["--retry-interval", "1", "--listen", f"127.0.0.1:{ports['smtp']}"]
    args += ["--submission", f"127.0.0.1:{ports['submission']}"]
    args += ["--smtps", f"127.0.0.1:{ports['smtps']}"]
    inst.log = base / "run.log"
    try:
        with inst.log.open("wb") as log:
            proc = procs.start(args, stdout=subprocess.DEVNULL, stderr=log)
        for port in ports.values():
            wait_for(lambda port=port: _connectable(port) or proc.poll() is not None)
        assert proc.poll() is None, inst.log.read_text()
        yield Submission(inst, ports, sink)
    finally:
        procs.stop_all()


def _connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def message(sender: str, to: str, subject: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{time.time_ns()}@client.test>\r\n\r\nhello\r\n"
    ).encode()


def msmtp(
    sub: Submission,
    tmp_path: Path,
    port: int,
    starttls: bool,
    to: str,
    subject: str,
    password: str = PASSWORD,
) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / f"msmtprc-{port}"
    conf.write_text(
        "account default\n"
        f"host 127.0.0.1\nport {port}\nauth on\nuser alice\npassword {password}\n"
        "tls on\ntls_certcheck off\n"
        f"tls_starttls {'on' if starttls else 'off'}\n"
        "from alice@example.org\ndomain client.test\n"
    )
    conf.chmod(0o600)
    return subprocess.run(
        ["msmtp", "-C", str(conf), to],
        input=message("alice@example.org", to, subject).decode(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def delivered_with(sub: Submission, subject: str) -> bytes:
    def find() -> bytes | None:
        for msg in sub.sunk() + sub.inst.messages("bob"):
            if f"Subject: {subject}".encode() in msg:
                return msg
        return None

    return bytes(wait_for(find, timeout=30))


@pytest.mark.parametrize("kind", ["submission", "smtps"])
def test_msmtp_authenticates_and_relays(sub: Submission, tmp_path: Path, kind: str) -> None:
    subject = f"msmtp over {kind}"
    res = msmtp(sub, tmp_path, sub.ports[kind], kind == "submission", "x@elsewhere.test", subject)
    assert res.returncode == 0, res.stderr
    msg = delivered_with(sub, subject)
    assert b"with ESMTPSA id" in msg
    assert b"authenticated as" not in msg  # auth.record_login is false by default


def test_msmtp_wrong_password_fails(sub: Submission, tmp_path: Path) -> None:
    res = msmtp(sub, tmp_path, sub.ports["submission"], True, "x@elsewhere.test", "no", "wrong")
    assert res.returncode != 0
    assert "535" in res.stderr or "authentication failed" in res.stderr.lower()


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_swaks_auth(sub: Submission, mech: str) -> None:
    subject = f"swaks {mech}"
    res = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{sub.ports['submission']}",
            "--tls",
            "--auth",
            mech,
            "--auth-user",
            "alice",
            "--auth-password",
            PASSWORD,
            "--from",
            "alice@example.org",
            "--to",
            "bob@example.org",
            "--header",
            f"Subject: {subject}",
            "--header",
            "From: alice@example.org",
            "--timeout",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout
    assert "235 2.7.0" in res.stdout
    assert PASSWORD not in sub.log()
    msg = delivered_with(sub, subject)
    assert b"with ESMTPSA id" in msg


def test_smtplib_smtp_ssl_and_starttls_login(sub: Submission) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", sub.ports["smtps"], context=insecure(), timeout=20) as s:
        s.login("alice", PASSWORD)
        s.sendmail(
            "alice@example.org",
            ["bob@example.org"],
            message("alice@example.org", "bob@example.org", "smtplib ssl"),
        )
    with smtplib.SMTP("127.0.0.1", sub.ports["submission"], timeout=20) as s:
        s.ehlo("client.test")
        assert not s.has_extn("auth")  # never offered over plaintext
        s.starttls(context=insecure())
        s.ehlo("client.test")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        s.login("alice", PASSWORD)
        s.sendmail(
            "alice@example.org",
            ["x@elsewhere.test"],
            message("Alice <alice@example.org>", "x@elsewhere.test", "smtplib starttls"),
        )
    delivered_with(sub, "smtplib ssl")
    delivered_with(sub, "smtplib starttls")


def test_wrong_password_535_logged_and_closed_after_three(sub: Submission) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", sub.ports["smtps"], context=insecure(), timeout=20) as s:
        s.ehlo("client.test")
        for attempt in range(3):
            code, text = s.docmd("AUTH", "PLAIN " + _plain("alice", f"wrong{attempt}"))
            assert code == 535 and text.startswith(b"5.7.8")
        assert s.getreply()[0] == 421  # closed after auth.max_failures
    wait_for(lambda: sub.log().count("auth failed from [127.0.0.1]") >= 3)
    assert "wrong0" not in sub.log()


def test_unknown_user_takes_as_long_as_a_wrong_password(sub: Submission) -> None:
    def timed(login: str) -> float:
        with smtplib.SMTP_SSL("127.0.0.1", sub.ports["smtps"], context=insecure(), timeout=20) as s:
            s.ehlo("client.test")
            start = time.monotonic()
            code, _ = s.docmd("AUTH", "PLAIN " + _plain(login, "nope"))
            took = time.monotonic() - start
            assert code == 535
            return took

    known = min(timed("alice") for _ in range(3))
    unknown = min(timed("nosuchuser") for _ in range(3))
    # Both pay one Argon2 verification (about 0.2 s); without the dummy hash an
    # unknown name would answer in well under a millisecond.
    assert unknown > 0.5 * known and known > 0.02


def _plain(login: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def test_auth_on_plaintext_refused_and_mail_before_auth_refused(sub: Submission) -> None:
    with smtplib.SMTP("127.0.0.1", sub.ports["submission"], timeout=20) as s:
        s.ehlo("client.test")
        code, text = s.docmd("AUTH", "PLAIN " + _plain("alice", PASSWORD))
        assert (code, text[:6]) == (538, b"5.7.11")
        code, text = s.docmd("MAIL", "FROM:<alice@example.org>")
        assert (code, text[:5]) == (530, b"5.7.0")
    # Port 25 also offers AUTH only over TLS.
    with smtplib.SMTP("127.0.0.1", sub.ports["smtp"], timeout=20) as s:
        s.ehlo("client.test")
        assert not s.has_extn("auth")
        assert s.docmd("AUTH", "PLAIN " + _plain("alice", PASSWORD))[0] == 538


def test_no_greeting_pause_on_submission(sub: Submission) -> None:
    with socket.create_connection(("127.0.0.1", sub.ports["submission"]), timeout=10) as s:
        s.sendall(b"EHLO early.test\r\n")  # talking at once is fine on 587
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        assert f.readline().startswith(b"250-")


def test_forbidden_sender_553(sub: Submission) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", sub.ports["smtps"], context=insecure(), timeout=20) as s:
        s.login("alice", PASSWORD)
        code, text = s.docmd("MAIL", "FROM:<bob@example.org>")
        assert (code, text[:5]) == (553, b"5.7.1")
        s.rset()
        # The envelope is hers, the From: is not.
        with pytest.raises(smtplib.SMTPDataError) as err:
            s.sendmail(
                "alice@example.org",
                ["x@elsewhere.test"],
                message("ceo@bank.test", "x@elsewhere.test", "forged from"),
            )
        assert err.value.smtp_code == 553
    with smtplib.SMTP_SSL("127.0.0.1", sub.ports["smtps"], context=insecure(), timeout=20) as s:
        s.login("carol", PASSWORD)  # auth.senders: carol@example.org and @carol.test
        s.sendmail(
            "any@carol.test",
            ["bob@example.org"],
            message("Carol <c@carol.test>", "bob@example.org", "carol domain"),
        )
        code, _ = s.docmd("MAIL", "FROM:<carol2@example.org>")
        assert code == 553
    delivered_with(sub, "carol domain")


def test_rate_limit_hit_and_kept_across_restart(tmp_path: Path, processes: Processes) -> None:
    cert, key = make_cert(tmp_path)
    (tmp_path / "rate").mkdir()
    inst = Instance(
        tmp_path,
        smtpd={"tls": {"certificate": str(cert), "key": str(key)}},
        auth={
            "users_file": str(tmp_path / "users"),
            "rate_limit": {"messages": 2, "recipients": 10, "directory": str(tmp_path / "rate")},
        },
    )
    add_user(inst, "alice", PASSWORD)
    inst.start(processes)

    def session(port: int) -> list[tuple[int, bytes]]:
        out = []
        with smtplib.SMTP_SSL("127.0.0.1", port, context=insecure(), timeout=20) as s:
            s.login("alice", PASSWORD)
            for n in range(2):
                s.mail("alice@example.org")
                out.append(s.rcpt("bob@example.org"))
                if out[-1][0] == 250:
                    s.data(message("alice@example.org", "bob@example.org", f"rate {n}"))
                else:
                    s.rset()
        return out

    def smtpd(port: int) -> subprocess.Popen[bytes]:
        proc = processes.start(
            [
                program("mailgrave-smtpd"),
                "--config",
                str(inst.config_path),
                "--mode",
                "smtps",
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                *SAME_USER,
            ],
            env={**os.environ, "MAILGRAVE_LOG": "stderr"},
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _connectable(port))
        return proc

    port = free_port()
    first = smtpd(port)
    assert [c for c, _ in session(port)] == [250, 250]
    first.terminate()
    first.wait(10)
    port = free_port()
    smtpd(port)  # a new stage process: the counters are in auth.rate_limit.directory
    codes = session(port)
    assert codes[0][0] == 451 and codes[0][1].startswith(b"4.7.1"), codes
    assert len(wait_for(lambda: inst.messages("bob"))) == 2
    assert list((tmp_path / "rate").iterdir())


def test_record_login_names_the_user(tmp_path: Path, processes: Processes) -> None:
    cert, key = make_cert(tmp_path)
    inst = Instance(
        tmp_path,
        smtpd={"tls": {"certificate": str(cert), "key": str(key)}},
        auth={
            "users_file": str(tmp_path / "users"),
            "record_login": True,
            "rate_limit": {"messages": 0, "recipients": 0},
        },
    )
    add_user(inst, "alice", PASSWORD)
    port = free_port()
    inst.start(processes)
    processes.start(
        [
            program("mailgrave-smtpd"),
            "--config",
            str(inst.config_path),
            "--mode",
            "submission",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            *SAME_USER,
        ],
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: _connectable(port))
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.starttls(context=insecure())
        s.login("alice", PASSWORD)
        s.sendmail(
            "alice@example.org",
            ["bob@example.org"],
            message("alice@example.org", "bob@example.org", "recorded"),
        )
    msg = wait_for(lambda: inst.messages("bob"))[0]
    assert b"(authenticated as alice)" in msg and b"with ESMTPSA id" in msg


def test_user_command(instance: Instance) -> None:
    users = instance.base / "users"
    instance.settings["auth"] = {"users_file": str(users)}
    instance.write_config()
    add_user(instance, "dave", "pw1")
    assert oct(users.stat().st_mode & 0o777) == "0o640"
    assert instance.run("mailgrave", "user", "list").stdout == b"dave\n"
    assert "pw1" not in users.read_text() and users.read_text().startswith("dave:$argon2id$")
    before = users.read_text()
    res = instance.run("mailgrave", "user", "passwd", "dave", "--stdin", input=b"pw2\n")
    assert res.returncode == 0 and users.read_text() != before
    res = instance.run("mailgrave", "user", "add", "dave", "--stdin", input=b"x\n")
    assert res.returncode == 1 and b"exists" in res.stderr
    res = instance.run("mailgrave", "user", "add", "bad:name", "--stdin", input=b"x\n")
    assert res.returncode == 1 and b"not an acceptable login name" in res.stderr
    res = instance.run("mailgrave", "user", "add", "eve", stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and b"--stdin" in res.stderr
    assert instance.run("mailgrave", "user", "del", "dave").returncode == 0
    assert instance.run("mailgrave", "user", "list").stdout == b""


def test_check_reports_auth_problems(instance: Instance) -> None:
    users = instance.base / "users"
    users.write_text("alice:$argon2id$x\n")
    users.chmod(0o644)
    instance.settings["auth"] = {
        "users_file": str(users),
        "rate_limit": {"directory": str(instance.base / "nope")},
    }
    instance.write_config()
    res = instance.run("mailgrave", "check")
    err = res.stderr.decode()
    assert res.returncode == 1
    assert "auth.users_file: " in err and "must not be readable by others" in err
    assert "AUTH is offered over TLS only" in err
    assert "auth.rate_limit.directory: no directory" in err
    instance.settings["auth"] = {"senders": {"alice": ["not an address"]}}
    instance.write_config()
    res = instance.run("mailgrave", "check")
    assert res.returncode == 1 and b"auth.senders: alice: " in res.stderr


# --- the systemd units and the fail2ban filter

ROOT = Path(__file__).resolve().parent.parent.parent


def exec_start(unit: str) -> list[str]:
    """The unit's ExecStart=, with this checkout's mailgrave-smtpd."""
    for line in (ROOT / "systemd" / unit).read_text().splitlines():
        if line.startswith("ExecStart="):
            argv = line[len("ExecStart=") :].split()
            assert argv[0] == "/usr/bin/mailgrave-smtpd"
            return [program("mailgrave-smtpd"), *argv[1:]]
    raise AssertionError(f"no ExecStart= in {unit}")


def unit_port(unit: str) -> int:
    for line in (ROOT / "systemd" / unit).read_text().splitlines():
        if line.startswith("ListenStream="):
            return int(line.split("=", 1)[1])
    raise AssertionError(f"no ListenStream= in {unit}")


@pytest.mark.parametrize(
    ("socket_unit", "service", "inetd"),
    [
        ("mailgrave-smtps.socket", "mailgrave-smtps@.service", True),
        ("mailgrave-submission.socket", "mailgrave-submission@.service", True),
        ("mailgrave-smtpd-smtps.socket", "mailgrave-smtpd-smtps.service", False),
        ("mailgrave-smtpd-submission.socket", "mailgrave-smtpd-submission.service", False),
    ],
)
def test_units_serve_their_mode_and_fail2ban_matches_the_log(
    sub: Submission,
    processes: Processes,
    tmp_path: Path,
    socket_unit: str,
    service: str,
    inetd: bool,
) -> None:
    """Each unit's ExecStart= under systemd-socket-activate (Accept=yes: --inetd;
    Accept=no: LISTEN_FDS), as systemd would start it; the failures it logs are
    what the shipped fail2ban filter bans."""
    text = (ROOT / "systemd" / socket_unit).read_text()
    assert f"Accept={'yes' if inetd else 'no'}" in text
    assert unit_port(socket_unit) == (465 if "smtps" in socket_unit else 587)
    port = free_port()
    log = tmp_path / "smtpd.log"
    cmd = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}"]
    with log.open("wb") as err:
        processes.start(
            [
                *cmd,
                *(["--inetd", "-a"] if inetd else []),
                *exec_start(service),
                "--config",
                str(sub.inst.config_path),
            ],
            stderr=err,
            env={**os.environ, "MAILGRAVE_LOG": "stderr"},
        )
    wait_for(lambda: _connectable(port))
    implicit = "smtps" in socket_unit
    if implicit:
        s: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", port, context=insecure(), timeout=20)
    else:
        s = smtplib.SMTP("127.0.0.1", port, timeout=20)
    with s:
        s.ehlo("client.test")
        if not implicit:
            assert s.docmd("MAIL", "FROM:<alice@example.org>")[0] == 530
            s.starttls(context=insecure())
            s.ehlo("client.test")
        assert s.docmd("AUTH", "PLAIN " + _plain("alice", "guess"))[0] == 535
        assert s.docmd("AUTH", "PLAIN " + _plain("mallory", "guess"))[0] == 535
        s.login("alice", PASSWORD)
        subject = f"via {socket_unit}"
        s.sendmail(
            "alice@example.org",
            ["bob@example.org"],
            message("alice@example.org", "bob@example.org", subject),
        )
    delivered_with(sub, subject)
    wait_for(lambda: log.read_text().count("auth failed from [127.0.0.1]") == 2)
    filter_dir = tmp_path / "filter.d"
    filter_dir.mkdir()
    (filter_dir / "common.conf").symlink_to("/etc/fail2ban/filter.d/common.conf")
    (filter_dir / "mailgrave.conf").write_text(
        (ROOT / "etc" / "fail2ban" / "filter.d" / "mailgrave.conf").read_text()
    )
    res = subprocess.run(
        [
            "fail2ban-regex",
            "-d",
            "{NONE}",
            "-o",
            "ip",
            str(log),
            str(filter_dir / "mailgrave.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.split() == ["127.0.0.1", "127.0.0.1"], res.stdout
    assert PASSWORD not in log.read_text() and "guess" not in log.read_text()


def test_fail2ban_jail_example_uses_the_journal() -> None:
    jail = (ROOT / "etc" / "fail2ban" / "jail.d" / "mailgrave.conf").read_text()
    assert "backend  = systemd" in jail and "filter   = mailgrave" in jail
    install = (ROOT / "debian" / "mailgrave.install").read_text()
    assert "etc/fail2ban/filter.d/mailgrave.conf" in install
