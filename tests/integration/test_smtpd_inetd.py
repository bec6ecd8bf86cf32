"""mailgrave-smtpd started per connection (inetd style, systemd Accept=yes): a cheap start
that still runs the whole session with the same configuration."""

from __future__ import annotations

import os
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

import mailgrave
from mailgrave.smtpd import IMPORT_BUDGET
from tests.conftest import Instance, Processes, free_port, program, wait_for

PACKAGE_ROOT = str(Path(mailgrave.__file__).resolve().parent.parent)

# What an installed launcher does: `python3 -I -S`, then the package's directory
# on sys.path (dist-packages for the .deb). The modules the session imported
# are written to a pipe at the end.
WRAPPER = """
import os, sys
sys.path[:0] = [{root!r}]
sys.path.append("/usr/lib/python3/dist-packages")
before = set(sys.modules)
from mailgrave.smtpd.program import main
try:
    code = main(sys.argv[1:])
finally:
    os.write({fd}, " ".join(sorted(set(sys.modules) - before)).encode())
sys.exit(code)
"""

# Heavy modules that the per-connection path does without.
NOT_IMPORTED = {
    "yaml": "the config cache",
    "argparse": "plain --config PATH is read by hand",
    "dataclasses": "mailgrave.record",
    "inspect": "mailgrave.record",
    "logging": "mailgrave.log",
    "typing": "TYPE_CHECKING = False",
    "enum": "no enum, socket, signal or re",
    "re": "no enum, socket, signal or re",
    "socket": "_socket",
    "signal": "only the listener needs it",
    "ipaddress": "inet_pton",
    "collections": "collections.abc only for type checking",
    # sender checks (checks.spf) load only for clients outside relay_networks
    "spf": "mailgrave.smtpd.checks, lazily",
    "dns": "mailgrave.smtpd.checks, lazily",
    "authres": "mailgrave.smtpd.checks, lazily",
}


def run_session(
    config: Path, dialogue: bytes, *args: str, journal: Path | None = None
) -> tuple[bytes, set[str]]:
    """One inetd-style session over a TCP connection from 127.0.0.1; the server's
    output and the modules the server imported. Logs go to stderr, or to the
    socket ``journal`` (journald's native protocol)."""
    rfd, wfd = os.pipe()
    wrapper = WRAPPER.format(root=PACKAGE_ROOT, fd=wfd)
    if journal is not None:
        wrapper = wrapper.replace(
            "before = set(sys.modules)",
            f"import mailgrave.log\nmailgrave.log.JOURNAL_SOCKET = {str(journal)!r}\n"
            "before = set(sys.modules)",
        )
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.pop("MAILGRAVE_LOG", None)
    if journal is None:
        env["MAILGRAVE_LOG"] = "stderr"
    with conn, client:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", wrapper, "--config", str(config), *args],
            stdin=conn.fileno(),
            stdout=conn.fileno(),
            stderr=subprocess.PIPE,
            pass_fds=(wfd,),
            env=env,
        )
        os.close(wfd)
        conn.close()
        client.settimeout(30)
        out = b""
        while not out.endswith(b"\r\n") and (data := client.recv(65536)):
            out += data  # the greeting (talking before it is refused)
        client.sendall(dialogue)
        client.shutdown(socket.SHUT_WR)
        while data := client.recv(65536):
            out += data
        _, err = proc.communicate(timeout=30)
    with os.fdopen(rfd, "rb") as f:
        modules = set(f.read().decode().split())
    assert proc.returncode == 0, err.decode()
    return out, modules


@pytest.fixture
def relaying(instance: Instance, processes: Processes) -> Instance:
    """The chain, relaying from 127.0.0.1 to a route nobody answers (mail stays queued)."""
    instance.settings["relay_networks"] = ["127.0.0.0/8"]
    instance.settings["remote"]["routes"] = {"relay.test": f"[127.0.0.1]:{free_port()}"}
    instance.write_config()
    instance.start(processes)
    return instance


DIALOGUE = (
    b"EHLO client.test\r\nMAIL FROM:<s@client.test>\r\nRCPT TO:<r@relay.test>\r\n"
    b"DATA\r\nSubject: per connection\r\n\r\nhello\r\n.\r\nQUIT\r\n"
)


def test_a_session_queues_mail_without_the_heavy_imports(relaying: Instance) -> None:
    run_session(relaying.config_path, b"QUIT\r\n")  # the first start writes the cache
    out, modules = run_session(relaying.config_path, DIALOGUE)
    assert b"250 2.0.0 Ok: queued as " in out, out
    assert out.endswith(b"221 2.0.0 Bye\r\n")
    assert any(m.startswith("mailgrave.") for m in modules)  # the report is real
    imported = {m: why for m, why in NOT_IMPORTED.items() if m in modules}
    assert not imported, f"imported on the per-connection path: {imported}"
    assert modules <= IMPORT_BUDGET, (
        f"not in mailgrave.smtpd.IMPORT_BUDGET: {modules - IMPORT_BUDGET}"
    )
    # Growing the budget is a decision about every connection's cost: make it here too.
    assert len(IMPORT_BUDGET) == 25


def test_an_edited_config_is_seen_by_the_next_connection(instance: Instance) -> None:
    instance.settings["smtpd"] = {"max_message_size": "1M"}
    instance.write_config()
    out, modules = run_session(instance.config_path, b"EHLO a.test\r\nQUIT\r\n")
    assert b"250-SIZE 1048576\r\n" in out
    out, modules = run_session(instance.config_path, b"EHLO a.test\r\nQUIT\r\n")
    assert b"250-SIZE 1048576\r\n" in out and "yaml" not in modules  # from the cache
    instance.settings["smtpd"] = {"max_message_size": "2M"}
    instance.write_config()
    out, modules = run_session(instance.config_path, b"EHLO a.test\r\nQUIT\r\n")
    assert b"250-SIZE 2097152\r\n" in out and "yaml" in modules


def test_other_command_lines_still_get_argparse(instance: Instance) -> None:
    res = subprocess.run(
        [program("mailgrave-smtpd"), "--config", str(instance.config_path), "--bogus"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 2 and "unrecognized arguments: --bogus" in res.stderr
    res = subprocess.run(
        [program("mailgrave-smtpd"), "--help"], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0 and "--bind" in res.stdout


def test_starttls_on_a_per_connection_start(instance: Instance, processes: Processes) -> None:
    cert, key = instance.base / "cert.pem", instance.base / "key.pem"
    subj = ["-subj", "/CN=mx.example.org", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *subj],
        check=True,
        capture_output=True,
    )
    instance.settings["smtpd"] = {"tls": {"certificate": str(cert), "key": str(key)}}
    instance.write_config()
    instance.start(processes)
    port = free_port()
    smtpd = [program("mailgrave-smtpd"), "--config", str(instance.config_path)]
    processes.start(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--inetd", "-a", *smtpd],
        stderr=subprocess.DEVNULL,
    )

    def can_connect() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    wait_for(can_connect)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.ehlo("client.test")
        assert smtp.starttls(context=ctx)[0] == 220
        smtp.ehlo("client.test")
        smtp.sendmail("s@client.test", ["alice@example.org"], b"Subject: tls\r\n\r\nsecret\r\n")
    msg = wait_for(lambda: instance.messages("alice"))[0]
    assert b"with ESMTPS id" in msg


def test_the_journal_fields_of_a_per_connection_session(relaying: Instance, tmp_path: Path) -> None:
    """With a journal, the accepted line carries MAILGRAVE_QID (journalctl MAILGRAVE_QID=...)."""
    path = tmp_path / "journal.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
        journal.bind(str(path))
        journal.settimeout(10)
        out, _ = run_session(relaying.config_path, DIALOGUE, journal=path)
        assert b"250 2.0.0 Ok: queued as " in out
        qid = out.split(b"queued as ")[1].split(b"\r\n")[0].decode()
        records: list[bytes] = []
        while not any(f"MAILGRAVE_QID={qid}\n".encode() in r for r in records):
            records.append(journal.recv(65536))
    hit = next(r for r in records if f"MAILGRAVE_QID={qid}\n".encode() in r)
    assert b"SYSLOG_IDENTIFIER=mailgrave-smtpd\n" in hit
    assert f"MESSAGE={qid}: accepted from [127.0.0.1]".encode() in hit


def test_the_installed_launcher_serves_a_session(instance: Instance, tmp_path: Path) -> None:
    """packaging/bin/mailgrave-smtpd.in rendered as debian/rules renders it (-IS), with
    this checkout as the package directory: started by its #! line, it serves a
    connection, even with a PYTHONPATH that would shadow the package (-I ignores it)."""
    template = Path(PACKAGE_ROOT, "packaging", "bin", "mailgrave-smtpd.in").read_text()
    launcher = tmp_path / "mailgrave-smtpd"
    launcher.write_text(
        template.replace("@PYTHON@", sys.executable)
        .replace("@FLAGS@", "-IS")
        .replace("@PKGDIR@", PACKAGE_ROOT)
    )
    launcher.chmod(0o755)
    decoy = tmp_path / "decoy" / "mailgrave"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise SystemExit('the decoy was imported')\n")
    env = {**os.environ, "PYTHONPATH": str(decoy.parent), "MAILGRAVE_LOG": "stderr"}
    ours, theirs = socket.socketpair()
    with ours:
        with theirs:
            proc = subprocess.Popen(
                [str(launcher), "--config", str(instance.config_path)],
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=subprocess.PIPE,
                env=env,
            )
        ours.settimeout(30)
        out = ours.recv(4096)  # the greeting, then QUIT
        ours.sendall(b"QUIT\r\n")
        while data := ours.recv(4096):
            out += data
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert out.startswith(b"220 mx.example.org ESMTP") and out.endswith(b"221 2.0.0 Bye\r\n")
