"""mailgrave-smtpd with real clients (swaks, smtplib, raw sockets) in every mode."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SAME_USER, Instance, Processes, free_port, program, wait_for

DIALOGS = Path(__file__).parent / "dialogs"


class Chain:
    """`mailgrave run` with an SMTP listener, shared by a module's tests."""

    def __init__(self, inst: Instance, port: int) -> None:
        self.inst = inst
        self.port = port

    def connect(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return sock

    def wait_delivered(self, user: str, count: int, timeout: float = 30.0) -> list[bytes]:
        wait_for(lambda: len(self.inst.messages(user)) >= count, timeout=timeout)
        return self.inst.messages(user)


SETTINGS = {
    # 127.0.0.1 must not relay, so that refusals can be seen from the tests.
    "relay_networks": ["192.0.2.0/24"],
    "smtpd": {"max_message_size": "60M", "max_errors": 5, "timeout": "5s"},
}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    procs = Processes()
    inst = Instance(tmp_path_factory.mktemp("smtpd"), **SETTINGS)
    port = free_port()
    try:
        inst.start(procs, listen=f"127.0.0.1:{port}")
        yield Chain(inst, port)
    finally:
        procs.stop_all()


def recv_reply(sock: socket.socket) -> bytes:
    """Read one complete (possibly multi-line) reply."""
    buf = b""
    while True:
        data = sock.recv(4096)
        if not data:
            return buf
        buf += data
        lines = buf.split(b"\r\n")
        if buf.endswith(b"\r\n") and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return buf


def swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--timeout", "20", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- dialog files


def parse_dialog(path: Path) -> list[tuple[str, bytes]]:
    """``c: text`` sends text+CRLF; ``c! python-bytes`` sends raw bytes; ``s: prefix``
    expects the next reply line to start with prefix; ``closed`` expects EOF."""
    steps: list[tuple[str, bytes]] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        kind, _, rest = raw.partition(" ")
        if kind == "c:":
            steps.append(("send", rest.encode() + b"\r\n"))
        elif kind == "c!":
            steps.append(("send", rest.encode().decode("unicode_escape").encode("latin-1")))
        elif kind == "s:":
            steps.append(("expect", rest.encode()))
        elif kind == "closed":
            steps.append(("closed", b""))
        elif kind == "pause":
            steps.append(("pause", rest.encode()))
        else:
            raise ValueError(f"{path.name}: bad line {raw!r}")
    return steps


def run_dialog(port: int, steps: list[tuple[str, bytes]]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        f = sock.makefile("rb")
        for kind, data in steps:
            if kind == "send":
                sock.sendall(data)
            elif kind == "pause":
                time.sleep(float(data))
            elif kind == "expect":
                line = f.readline()
                assert line.startswith(data), f"expected {data!r}, got {line!r}"
                assert line.endswith(b"\r\n")
            elif kind == "closed":
                assert f.read() == b""


@pytest.mark.parametrize("path", sorted(DIALOGS.glob("*.dialog")), ids=lambda p: p.stem)
def test_dialog(chain: Chain, path: Path) -> None:
    run_dialog(chain.port, parse_dialog(path))


# --- through `mailgrave run` (LISTEN_FDS)


def test_swaks_delivers_to_maildir(chain: Chain) -> None:
    before = len(chain.inst.messages("alice"))
    res = swaks(chain.port, "--to", "alice@example.org", "--from", "s@client.test")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "250 2.0.0 Ok: queued as" in res.stdout
    msgs = chain.wait_delivered("alice", before + 1)
    received = [m for m in msgs if b"This is a test mailing" in m][-1]
    assert b"Received: from " in received and b"([127.0.0.1])" in received
    assert b"by mx.example.org (MailGrave) with ESMTP id " in received


def test_swaks_relay_refused(chain: Chain) -> None:
    res = swaks(chain.port, "--to", "someone@elsewhere.test", "--from", "s@client.test")
    assert res.returncode != 0
    assert "554 5.7.1" in res.stdout


def test_swaks_unknown_user(chain: Chain) -> None:
    res = swaks(chain.port, "--to", "nobody-here@example.org")
    assert "550 5.1.1" in res.stdout


def test_smtplib_pipelined_with_two_recipients(chain: Chain) -> None:
    before_a, before_b = len(chain.inst.messages("alice")), len(chain.inst.messages("bob"))
    with smtplib.SMTP("127.0.0.1", chain.port, timeout=20) as smtp:
        smtp.ehlo("client.test")
        assert smtp.has_extn("pipelining") and smtp.has_extn("smtputf8")
        refused = smtp.sendmail(
            "s@client.test",
            ["alice@example.org", "bob@example.org", "ghost@example.org"],
            b"Subject: smtplib\r\n\r\n.leading dot line\r\n",
        )
        assert refused == {"ghost@example.org": (550, b"5.1.1 No such user here")}
    a = chain.wait_delivered("alice", before_a + 1)[-1]
    b = chain.wait_delivered("bob", before_b + 1)[-1]
    for msg in (a, b):
        assert b"Subject: smtplib" in msg and b"\n.leading dot line\n" in msg


def test_raw_pipelining(chain: Chain) -> None:
    with chain.connect() as sock:
        assert recv_reply(sock).startswith(b"220 ")
        sock.sendall(b"EHLO c\r\n")
        recv_reply(sock)
        sock.sendall(
            b"MAIL FROM:<a@client.test>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<x@far.test>\r\n"
            b"DATA\r\n"
        )
        got = b""
        while got.count(b"\r\n") < 4:
            got += sock.recv(4096)
        assert got == (
            b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n554 5.7.1 Relaying denied\r\n"
            b"354 End data with <CR><LF>.<CR><LF>\r\n"
        )
        sock.sendall(b"Subject: raw\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        got = b""
        while got.count(b"\r\n") < 2:
            got += sock.recv(4096)
        assert got.startswith(b"250 2.0.0 Ok: queued as ") and got.endswith(b"221 2.0.0 Bye\r\n")


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n"])
def test_smuggling_is_not_accepted(chain: Chain, smuggle: bytes) -> None:
    with chain.connect() as sock:
        recv_reply(sock)
        for cmd in (b"EHLO c", b"MAIL FROM:<a@client.test>", b"RCPT TO:<alice@example.org>"):
            sock.sendall(cmd + b"\r\n")
            assert recv_reply(sock).startswith(b"250")
        sock.sendall(b"DATA\r\n")
        assert recv_reply(sock).startswith(b"354")
        sock.sendall(
            b"Subject: smuggle\r\n\r\nhi"
            + smuggle
            + b"MAIL FROM:<evil@client.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
        )
        reply = recv_reply(sock)
        if b"\r" in smuggle.replace(b"\r\n", b""):  # a bare CR: always refused
            assert reply.startswith(b"554 5.6.0"), reply
        else:  # bare LF normalized: one message, the "commands" are its text
            assert reply.startswith(b"250 2.0.0 Ok: queued as "), reply
            qid = reply.split()[-1].decode()
            [msg] = wait_for(lambda: [m for m in chain.inst.messages("alice") if qid.encode() in m])
            assert b"\nMAIL FROM:<evil@client.test>\n" in msg.replace(b"\r\n", b"\n")
        sock.sendall(b"QUIT\r\n")
        assert recv_reply(sock).startswith(b"221")
    time.sleep(0.5)
    assert not [m for m in chain.inst.messages("bob") if b"smuggled" in m]


def test_smtplib_with_lf_line_ends_is_delivered(chain: Chain) -> None:
    """Python's smtplib sends bytes as they are: LF line ends (email's default
    policy) are accepted as line ends and stored as lines."""
    before = len(chain.inst.messages("bob"))
    msg = b"Subject: lf ends\nFrom: a@client.test\n\nfirst line\n.dotted\nlast line\n"
    with smtplib.SMTP("127.0.0.1", chain.port, timeout=10) as client:
        client.sendmail("a@client.test", ["bob@example.org"], msg)
    got = chain.wait_delivered("bob", before + 1)[-1]
    assert b"\nfirst line\n.dotted\nlast line\n" in got.replace(b"\r\n", b"\n")


def test_talking_before_greeting_refused(chain: Chain) -> None:
    with chain.connect() as sock:
        sock.sendall(b"EHLO eager\r\n")
        assert recv_reply(sock).startswith(b"554 5.5.0")
        assert sock.recv(100) == b""


def test_http_request_closed(chain: Chain) -> None:
    with chain.connect() as sock:
        recv_reply(sock)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100) == b""


@pytest.mark.slow
def test_idle_timeout(chain: Chain) -> None:
    with chain.connect(timeout=15) as sock:
        recv_reply(sock)
        start = time.monotonic()
        assert recv_reply(sock).startswith(b"421 4.4.2")
        assert 4 <= time.monotonic() - start < 12


@pytest.mark.slow
def test_hundred_parallel_clients(chain: Chain) -> None:
    before = len(chain.inst.messages("postmaster"))
    errors: list[str] = []

    def client(i: int) -> None:
        for attempt in range(20):
            try:
                with smtplib.SMTP("127.0.0.1", chain.port, timeout=60) as smtp:
                    smtp.sendmail(
                        "s@client.test", ["postmaster@example.org"], f"Subject: p{i}\r\n\r\nx\r\n"
                    )
                return
            except smtplib.SMTPResponseException as exc:
                if exc.smtp_code != 421:  # over the connection limits: try again
                    errors.append(f"{i}: {exc}")
                    return
            except (OSError, smtplib.SMTPException) as exc:
                errors.append(f"{i}: {exc!r}")
                return
            time.sleep(0.2 + attempt * 0.1)
        errors.append(f"{i}: gave up")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    msgs = chain.wait_delivered("postmaster", before + 100, timeout=120)
    subjects = {m.split(b"Subject: ")[1].split(b"\n")[0] for m in msgs if b"Subject: p" in m}
    assert subjects == {f"p{i}".encode() for i in range(100)}


# --- by hand: --bind/--port, and inetd via systemd-socket-activate


@pytest.fixture
def queue_chain(instance: Instance, processes: Processes) -> Instance:
    """The chain without an SMTP listener (queue, send, local)."""
    instance.start(processes)
    return instance


def smtpd_pid_children(parent: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == parent:
                out.append(int(entry))
    return out


def start_bind(inst: Instance, processes: Processes) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = processes.start(
        [
            program("mailgrave-smtpd"),
            "--config",
            str(inst.config_path),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            *SAME_USER,
        ],
        env={**os.environ, "MAILGRAVE_LOG": "stderr"},
    )
    wait_for(lambda: _can_connect(port))
    return proc, port


def _can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_bind_port_mode(queue_chain: Instance, processes: Processes) -> None:
    _proc, port = start_bind(queue_chain, processes)
    res = swaks(port, "--to", "alice@example.org")
    assert res.returncode == 0, res.stdout
    assert len(wait_for(lambda: queue_chain.messages("alice"))) == 1


def test_inetd_mode_via_systemd_socket_activate(
    queue_chain: Instance, processes: Processes
) -> None:
    port = free_port()
    processes.start(
        [
            "systemd-socket-activate",
            "-l",
            f"127.0.0.1:{port}",
            "--inetd",
            "-a",
            program("mailgrave-smtpd"),
            "--config",
            str(queue_chain.config_path),
        ],
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: _can_connect(port))
    res = swaks(port, "--to", "bob@example.org")
    assert res.returncode == 0, res.stdout
    assert "250 2.0.0 Ok: queued as" in res.stdout
    msgs = wait_for(lambda: queue_chain.messages("bob"))
    assert b"([127.0.0.1])" in msgs[0]


def test_no_zombies_after_clients_vanish(queue_chain: Instance, processes: Processes) -> None:
    proc, port = start_bind(queue_chain, processes)
    socks = []
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", port))
        socks.append(s)
    s = socks[0]
    recv_reply(s)
    s.sendall(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\npartial")
    time.sleep(0.5)
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()

    def zombies() -> list[int]:
        return [
            pid
            for pid in smtpd_pid_children(proc.pid)
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        ]

    wait_for(lambda: smtpd_pid_children(proc.pid) == [], timeout=10)
    assert zombies() == []
    assert proc.poll() is None
    wait_for(lambda: queue_chain.spool_entries() == [], timeout=10)


@pytest.mark.slow
def test_50mb_message_memory_bounded(queue_chain: Instance, processes: Processes) -> None:
    queue_chain.settings["smtpd"] = {"max_message_size": "60M"}
    queue_chain.write_config()
    proc, port = start_bind(queue_chain, processes)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        recv_reply(sock)
        sock.sendall(b"EHLO c\r\n")
        recv_reply(sock)
        # the child serving this connection (not a spare forked ahead, nor a
        # finished port probe): the one holding the server end of the socket
        child = wait_for(lambda: _serving_child(proc.pid, sock))
        base = _status_kb(child, "VmRSS")
        sock.sendall(b"MAIL FROM:<a@b.test> SIZE=52500000\r\n")
        assert recv_reply(sock).startswith(b"250")
        sock.sendall(b"RCPT TO:<alice@example.org>\r\n")
        assert recv_reply(sock).startswith(b"250")
        sock.sendall(b"DATA\r\n")
        assert recv_reply(sock).startswith(b"354")
        line = b"0123456789" * 7 + b"abcd\r\n"
        block = b"Subject: big\r\n\r\n" + line * (1024 * 1024 // len(line))
        for _ in range(50):
            sock.sendall(block)
        sock.sendall(b".\r\n")
        assert recv_reply(sock).startswith(b"250 2.0.0 Ok: queued as")
        peak = _status_kb(child, "VmHWM")
        sock.sendall(b"QUIT\r\n")
        recv_reply(sock)
    assert peak - base < 10 * 1024, f"smtpd grew from {base} kB to a peak of {peak} kB"
    msgs = wait_for(lambda: queue_chain.messages("alice"), timeout=60)
    assert len(msgs[0]) > 50 * 1000 * 1000


def _serving_child(parent: int, client: socket.socket) -> int | None:
    """The smtpd child of ``parent`` whose file descriptors hold the server end of
    ``client``'s TCP connection (by socket inode, from /proc/net/tcp)."""
    server_port, client_port = client.getpeername()[1], client.getsockname()[1]
    inode = None
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        local, remote = fields[1], fields[2]
        if (
            int(local.split(":")[1], 16) == server_port
            and int(remote.split(":")[1], 16) == client_port
        ):
            inode = fields[9]
    if inode is None:
        return None
    for pid in smtpd_pid_children(parent):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]" for fd in fds):
                return pid
        except OSError:
            continue
    return None


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


# --- STARTTLS


@pytest.fixture
def tls_instance(instance: Instance) -> Instance:
    cert, key = instance.base / "cert.pem", instance.base / "key.pem"
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
    instance.settings["smtpd"] = {"tls": {"certificate": str(cert), "key": str(key)}}
    instance.write_config()
    return instance


def test_starttls(tls_instance: Instance, processes: Processes) -> None:
    tls_instance.start(processes)
    _proc, port = start_bind(tls_instance, processes)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.ehlo("client.test")
        assert smtp.has_extn("starttls")
        code, _ = smtp.starttls(context=ctx)
        assert code == 220
        smtp.ehlo("client.test")
        assert not smtp.has_extn("starttls")
        smtp.sendmail("s@client.test", ["alice@example.org"], b"Subject: tls\r\n\r\nsecret\r\n")
    msg = wait_for(lambda: tls_instance.messages("alice"))[0]
    assert b"with ESMTPS id" in msg


def test_starttls_discards_pipelined_commands(tls_instance: Instance, processes: Processes) -> None:
    _proc, port = start_bind(tls_instance, processes)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        recv_reply(raw)
        raw.sendall(b"EHLO c\r\n")
        assert b"250-STARTTLS" in recv_reply(raw)
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@b.test>\r\n")
        assert recv_reply(raw).startswith(b"220 2.0.0")
        with ctx.wrap_socket(raw, server_hostname="mx.example.org") as tls:
            tls.sendall(b"RCPT TO:<alice@example.org>\r\n")
            assert recv_reply(tls).startswith(b"503 5.5.1")  # injected MAIL was dropped
            tls.sendall(b"MAIL FROM:<a@b.test>\r\n")
            assert recv_reply(tls).startswith(b"503 5.5.1")  # EHLO needed again
            tls.sendall(b"EHLO c\r\n")
            assert b"STARTTLS" not in recv_reply(tls)
            tls.sendall(b"QUIT\r\n")
            assert recv_reply(tls).startswith(b"221")


def test_listener_exits_when_idle(instance: Instance, processes: Processes) -> None:
    instance.settings["smtpd"] = {"idle_exit": "1s"}
    instance.write_config()
    proc, _port = start_bind(instance, processes)
    assert proc.wait(timeout=10) == 0


def test_connection_limit_per_client(queue_chain: Instance, processes: Processes) -> None:
    queue_chain.settings["smtpd"] = {"max_connections_per_client": 2, "limit_relay_networks": True}
    queue_chain.write_config()
    proc, port = start_bind(queue_chain, processes)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        recv_reply(sock)  # accepted after start_bind's probe (the backlog is FIFO)
        sock.sendall(b"QUIT\r\n")
        recv_reply(sock)
    wait_for(lambda: smtpd_pid_children(proc.pid) == [])  # both sessions are over
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        for sock in held:
            assert recv_reply(sock).startswith(b"220 ")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as third:
            assert recv_reply(third).startswith(b"421 4.7.0")
        held.pop().close()

        # the slot is free again once the parent has reaped that child
        def admitted() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                return recv_reply(sock).startswith(b"220 ")

        wait_for(admitted, timeout=10)
    finally:
        for sock in held:
            sock.close()


def test_spares_serve_connections_then_leave(queue_chain: Instance, processes: Processes) -> None:
    """After a connection the listener keeps children forked ahead of time; the next
    client is served by one of them (no fork while it waits for the greeting); they
    leave when connections stop, and none outlives the listener."""
    proc, port = start_bind(queue_chain, processes)
    wait_for(lambda: len(smtpd_pid_children(proc.pid)) == 2)  # after start_bind's probe
    spares = smtpd_pid_children(proc.pid)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert recv_reply(sock).startswith(b"220 ")
        assert _serving_child(proc.pid, sock) in spares
        sock.sendall(b"QUIT\r\n")
        assert recv_reply(sock).startswith(b"221")
    # Idle: the spares leave and are reaped (no zombie), the listener stays.
    wait_for(lambda: smtpd_pid_children(proc.pid) == [], timeout=10)
    assert proc.poll() is None

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert recv_reply(sock).startswith(b"220 ")
    wait_for(lambda: len(smtpd_pid_children(proc.pid)) == 2)
    spares = smtpd_pid_children(proc.pid)
    proc.terminate()
    assert proc.wait(timeout=10) == 0
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in spares), timeout=10)


# --- the first day: parallel sessions from a trusted client (smtp-source)


def smtp_source(*args: str) -> subprocess.CompletedProcess[str]:
    """Postfix's smtp-source: the system's, or the one `make smtp-source` took out
    of Debian's postfix package (without installing Postfix)."""
    root = Path(__file__).resolve().parents[2] / ".venv" / "postfix"
    env = dict(os.environ)
    if Path("/usr/sbin/smtp-source").exists():
        path = "/usr/sbin/smtp-source"
    elif (root / "usr/sbin/smtp-source").exists():
        path = str(root / "usr/sbin/smtp-source")
        env["LD_LIBRARY_PATH"] = str(root / "usr/lib/postfix")
    else:
        pytest.fail("smtp-source is missing: run `make smtp-source`")
    return subprocess.run(
        [path, *args], capture_output=True, text=True, timeout=300, env=env, check=False
    )


def _smtp_source_burst(port: int, messages: int) -> None:
    res = smtp_source(
        "-s", "10", "-m", str(messages), "-f", "src@example.org", "-t", "alice@example.org",
        f"127.0.0.1:{port}",
    )  # fmt: skip
    assert res.returncode == 0 and not res.stderr and not res.stdout, res.stderr + res.stdout


@pytest.mark.slow
def test_smtp_source_ten_sessions_default_limits(
    queue_chain: Instance, processes: Processes
) -> None:
    """smtp-source -s 10 from loopback (in relay_networks) against the default smtpd
    settings: no 421, no error, every message delivered."""
    _proc, port = start_bind(queue_chain, processes)
    _smtp_source_burst(port, 300)
    wait_for(lambda: len(queue_chain.messages("alice")) >= 300, timeout=120)
    assert len(queue_chain.messages("alice")) == 300


@pytest.mark.slow
def test_only_live_sessions_count_against_the_per_client_limit(
    queue_chain: Instance, processes: Processes
) -> None:
    """With relay_networks limited too (10 per client), ten sessions that each end
    and reconnect at once are never refused: a child still exiting is not a session."""
    queue_chain.settings["smtpd"] = {"limit_relay_networks": True}
    queue_chain.write_config()
    _proc, port = start_bind(queue_chain, processes)
    _smtp_source_burst(port, 300)


def test_relay_networks_exempt_from_per_client_limit(
    queue_chain: Instance, processes: Processes
) -> None:
    queue_chain.settings["smtpd"] = {"max_connections_per_client": 1}
    queue_chain.write_config()
    _proc, port = start_bind(queue_chain, processes)
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    try:
        for sock in held:
            assert recv_reply(sock).startswith(b"220 ")
    finally:
        for sock in held:
            sock.close()


def test_relay_networks_greeted_without_pause(queue_chain: Instance, processes: Processes) -> None:
    """A client in relay_networks that talks at once is greeted, not refused."""
    queue_chain.settings["smtpd"] = {"greet_pause": "2s"}
    queue_chain.write_config()
    _proc, port = start_bind(queue_chain, processes)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"EHLO eager.example\r\n")
        got = b""
        while b"\r\n250 " not in got and len(got) < 4096:
            data = sock.recv(4096)
            assert data, got
            got += data
        assert got.startswith(b"220 "), got


def test_a_failed_handshake_logs_openssl_s_reason(
    tls_instance: Instance, processes: Processes
) -> None:
    port = free_port()
    errlog = tls_instance.base / "smtpd.log"
    bind = ["--bind", "127.0.0.1", "--port", str(port), *SAME_USER]
    with errlog.open("wb") as err:
        processes.start(
            [program("mailgrave-smtpd"), "--config", str(tls_instance.config_path), *bind],
            env={**os.environ, "MAILGRAVE_LOG": "stderr"},
            stderr=err,
        )
    wait_for(lambda: _can_connect(port))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        recv_reply(raw)
        raw.sendall(b"EHLO c\r\n")
        recv_reply(raw)
        raw.sendall(b"STARTTLS\r\n")
        assert recv_reply(raw).startswith(b"220")
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not a ClientHello
        try:
            raw.recv(4096)
        except ConnectionResetError:
            pass  # the server gave up on us: what this test wants
    line = wait_for(
        lambda: [t for t in errlog.read_text().splitlines() if "TLS handshake" in t], timeout=10
    )[0]
    assert "failed: http request" in line, line


def test_a_session_killed_by_a_signal_is_reported(
    queue_chain: Instance, processes: Processes, tmp_path: Path
) -> None:
    # The OOM killer or a crash ends a session without a word from it: the
    # listener says which process, which client and which signal.
    port = free_port()
    log_path = tmp_path / "smtpd.log"
    with log_path.open("wb") as log:
        proc = processes.start(
            [program("mailgrave-smtpd"), "--config", str(queue_chain.config_path),
             "--bind", "127.0.0.1", "--port", str(port), *SAME_USER],
            env={**os.environ, "MAILGRAVE_LOG": "stderr"},
            stderr=log,
        )  # fmt: skip
    wait_for(lambda: _can_connect(port))
    with socket.create_connection(("127.0.0.1", port)) as client:
        assert recv_reply(client).startswith(b"220")
        pid = wait_for(lambda: _serving_child(proc.pid, client))
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: "killed by" in log_path.read_text())
    line = next(x for x in log_path.read_text().splitlines() if "killed by" in x)
    assert f"session process {pid} (client [127.0.0.1]) killed by SIGKILL" in line, line
    proc.terminate()
    proc.wait(timeout=10)
    assert log_path.read_text().count("killed by") == 1  # not the sessions it stops itself
