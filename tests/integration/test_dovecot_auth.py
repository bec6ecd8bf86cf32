"""auth.dovecot_socket: AUTH PLAIN and LOGIN checked by a real Dovecot (dovecot-core,
started by the test with a private configuration), through a MailGrave smtps instance:
delivered with good credentials, 535 with bad ones, 454 when Dovecot is gone."""

from __future__ import annotations

import base64
import grp
import os
import pwd
import signal
import smtplib
import subprocess
import time
from pathlib import Path

from tests.conftest import SAME_USER, Instance, Processes, free_port, program, wait_for
from tests.integration.test_submission import _connectable, insecure, make_cert, message

PASSWORD = "dovecot horse staple"


def dovecot_conf(base: Path) -> tuple[Path, Path]:
    """A private Dovecot: no protocols (no IMAP/POP3 listeners), a passwd-file passdb
    with a SHA512-CRYPT password, the auth-client listener at a path of ours."""
    me = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    digest = subprocess.run(
        ["doveadm", "pw", "-s", "SHA512-CRYPT", "-p", PASSWORD],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    assert digest.startswith("{SHA512-CRYPT}$6$")
    (base / "passwd").write_text(f"alice@example.org:{digest}\n")
    sock = base / "auth-client"
    conf = base / "dovecot.conf"
    conf.write_text(
        "protocols =\n"
        f"base_dir = {base}/run\nstate_dir = {base}/state\n"
        f"log_path = {base}/dovecot.log\nssl = no\n"
        f"default_internal_user = {me}\ndefault_internal_group = {group}\n"
        f"default_login_user = {me}\n"
        f"passdb {{\n  driver = passwd-file\n  args = {base}/passwd\n}}\n"
        "userdb {\n  driver = static\n  args = uid=65534 gid=65534 home=/nonexistent\n}\n"
        f"service auth {{\n  unix_listener auth-client {{\n    path = {sock}\n"
        "    mode = 0666\n  }\n}\n"
        "service anvil {\n  chroot =\n}\n"
    )
    return conf, sock


def _plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def test_dovecot_checks_plain_and_login_and_down_is_454(
    tmp_path: Path, processes: Processes
) -> None:
    dc = tmp_path / "dc"
    dc.mkdir()
    conf, sock = dovecot_conf(dc)
    dovecot = processes.start(["dovecot", "-F", "-c", str(conf)], stderr=subprocess.DEVNULL)
    wait_for(lambda: sock.exists() or dovecot.poll() is not None)
    assert dovecot.poll() is None, (dc / "dovecot.log").read_text()
    cert, key = make_cert(tmp_path)
    inst = Instance(
        tmp_path,
        smtpd={"tls": {"certificate": str(cert), "key": str(key)}},
        auth={
            "dovecot_socket": str(sock),
            "users_file": str(tmp_path / "no-such-users"),
            "rate_limit": {"messages": 0, "recipients": 0},
        },
        remote={"dns": {"nameservers": ["127.0.0.1"], "port": 9, "timeout": "2s"}},
    )
    res = inst.run("mailgrave", "check")
    assert res.returncode == 0 and b"auth.dovecot_socket" not in res.stderr, res.stderr
    inst.start(processes)
    port = free_port()
    log = tmp_path / "smtpd.log"
    with log.open("wb") as err:
        processes.start(
            [program("mailgrave-smtpd"), "--config", str(inst.config_path), "--mode", "smtps",
             *SAME_USER, "--bind", "127.0.0.1", "--port", str(port)],
            env={**os.environ, "MAILGRAVE_LOG": "stderr"}, stderr=err,
        )  # fmt: skip
    wait_for(lambda: _connectable(port))

    def smtps() -> smtplib.SMTP_SSL:
        s = smtplib.SMTP_SSL("127.0.0.1", port, context=insecure(), timeout=40)
        s.ehlo("client.test")
        return s

    with smtps() as s:
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        code, text = s.docmd("AUTH", "PLAIN " + _plain("alice@example.org", "wrong"))
        assert (code, text[:5]) == (535, b"5.7.8")
        s.user, s.password = "alice@example.org", PASSWORD
        assert s.auth("PLAIN", s.auth_plain)[0] == 235
        # auth.senders still applies: the login owns only its own address.
        assert s.docmd("MAIL", "FROM:<bob@example.org>")[0] == 553
        s.rset()
        s.sendmail(
            "alice@example.org",
            ["bob@example.org"],
            message("alice@example.org", "bob@example.org", "dovecot plain"),
        )
    with smtps() as s:
        s.user, s.password = "alice@example.org", PASSWORD
        assert s.auth("LOGIN", s.auth_login, initial_response_ok=False)[0] == 235
        s.sendmail(
            "alice@example.org",
            ["bob@example.org"],
            message("alice@example.org", "bob@example.org", "dovecot login"),
        )
    subjects = [b"Subject: dovecot plain", b"Subject: dovecot login"]
    wait_for(lambda: all(any(x in m for m in inst.messages("bob")) for x in subjects), timeout=30)

    # Dovecot gone (killed by its PID, with its children): a temporary failure.
    os.killpg(dovecot.pid, signal.SIGTERM)
    dovecot.wait(10)
    wait_for(lambda: subprocess.run(["pgrep", "-g", str(dovecot.pid)]).returncode != 0)
    with smtps() as s:
        start = time.monotonic()
        code, text = s.docmd("AUTH", "PLAIN " + _plain("alice@example.org", PASSWORD))
        assert (code, text[:5]) == (454, b"4.7.0"), (code, text)
        assert time.monotonic() - start < 25
        assert s.docmd("MAIL", "FROM:<alice@example.org>")[0] == 530
    text = log.read_text()
    assert "AUTH unavailable: Dovecot: cannot connect" in text
    assert 'authenticated as "alice@example.org"' in text
    assert PASSWORD not in text and _plain("alice@example.org", PASSWORD) not in text

    # mailgrave check: Dovecot not running is a warning; a file that is no socket, a problem.
    res = inst.run("mailgrave", "check")
    assert res.returncode == 0, res.stderr
    assert b"auth.dovecot_socket: warning: " in res.stderr
    plain = tmp_path / "plain-file"
    plain.write_text("")
    inst.settings["auth"]["dovecot_socket"] = str(plain)
    inst.write_config()
    res = inst.run("mailgrave", "check")
    assert res.returncode == 1
    assert f"auth.dovecot_socket: {plain} is not a socket".encode() in res.stderr
