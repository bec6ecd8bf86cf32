"""mailgrave-remote as a program: by hand (--host, --relay), and as the remote.ctrl service
(connection on stdin, or listening sockets in LISTEN_FDS) with requests carrying the message
file descriptor (SCM_RIGHTS), answered with |transcript lines and K/Z/D per recipient."""

from __future__ import annotations

import array
import os
import socket
import socketserver
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mailgrave.errors import Result
from tests.conftest import SAME_USER, Instance, Processes, program, wait_for, write_spool_file
from tests.integration.dnsserver import dns_server


class SinkHandler(socketserver.StreamRequestHandler):
    server: Sink

    def say(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        sink = self.server
        with sink.lock:
            sink.connections += 1
        if sink.mode == "hang":
            sink.release.wait(20)
            return
        self.say(sink.greeting)
        if not sink.greeting.startswith("220"):
            self.rfile.readline()  # QUIT, probably
            return
        rcpts: list[str] = []
        sender = ""
        while line := self.rfile.readline():
            cmd = line.decode("utf-8", "replace").rstrip("\r\n")
            verb = cmd[:4].upper()
            with sink.lock:
                sink.commands.append(cmd)
            if verb == "EHLO":
                self.say("250-sink.test")
                if sink.mode == "badtls":
                    self.say("250-STARTTLS")
                self.say("250-PIPELINING")
                self.say("250 8BITMIME")
            elif verb == "MAIL":
                sender, rcpts = cmd[10:].split(">")[0].lstrip("<"), []
                self.say("250 2.1.0 ok")
            elif verb == "RCPT":
                rcpt = cmd[8:].strip("<>")
                if rcpt.startswith("bad"):
                    self.say("550 5.1.1 no such user")
                elif rcpt.startswith("later"):
                    self.say("450 4.2.1 mailbox busy")
                else:
                    rcpts.append(rcpt)
                    self.say("250 2.1.5 ok")
            elif verb == "DATA":
                self.say("354 go ahead")
                body = b""
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    body += chunk
                with sink.lock:
                    sink.messages.append((sender, rcpts, body))
                    n = len(sink.messages)
                self.say(f"250 2.0.0 queued as S{n}")
            elif verb == "STAR" and sink.mode == "badtls":
                self.say("220 2.0.0 go ahead")
                self.say("this is not a TLS server hello")
                return
            elif verb == "QUIT":
                self.say("221 bye")
                return
            else:
                self.say("250 ok")


class Sink(socketserver.ThreadingTCPServer):
    """A receiving SMTP server on loopback that counts connections and keeps messages."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, mode: str = "normal", greeting: str = "220 sink.test ESMTP", address: Any = None
    ) -> None:
        address = address or ("127.0.0.1", 0)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, SinkHandler)
        self.mode = mode
        self.greeting = greeting
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.connections = 0
        self.commands: list[str] = []
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def sink() -> Any:
    s = Sink()
    yield s
    s.close()


def instance(tmp_path: Path, sink: Sink, **remote: Any) -> Instance:
    routes = {"example.net": f"[127.0.0.1]:{sink.port}", "example.com": f"[127.0.0.1]:{sink.port}"}
    return Instance(
        tmp_path,
        remote={"routes": routes, "connect_timeout": "2s", **remote},
        queue={"idle_exit": "1s"},
    )


def request(sock: socket.socket, qid: str, sender: str, rcpts: list[str], path: Path) -> None:
    fields = [f"Q{qid}", f"F{sender}", *(f"T{r}" for r in rcpts)]
    data = b"".join(f.encode() + b"\0" for f in fields) + b"\0"
    fd = os.open(path, os.O_RDONLY)
    try:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    finally:
        os.close(fd)


def answer(reader: Any, count: int) -> tuple[list[str], list[str]]:
    """(transcript lines, result lines) of one request with ``count`` recipients."""
    transcript, results = [], []
    while len(results) < count:
        line = reader.readline().decode()
        assert line, "mailgrave-remote closed the connection early"
        (transcript if line.startswith("|") else results).append(line.rstrip("\n"))
    return transcript, results


def spool_message(tmp_path: Path, name: str, text: bytes) -> Path:
    return write_spool_file(tmp_path / name, text)


def test_service_on_stdin_reuses_one_smtp_connection_for_two_requests(
    tmp_path: Path, sink: Sink
) -> None:
    inst = instance(tmp_path, sink)
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [program("mailgrave-remote"), "--config", str(inst.config_path)],
        stdin=theirs,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    theirs.close()
    reader = ours.makefile("rb")
    m1 = spool_message(tmp_path, "m1", b"Subject: one\n\n.leading dot\n")
    m2 = spool_message(tmp_path, "m2", b"Subject: two\n\nhello\n")
    request(ours, "Q1", "alice@example.org", ["a@example.net", "bad@example.net"], m1)
    transcript, results = answer(reader, 2)
    assert results[0].startswith("K") and "250 2.0.0 queued as S1" in results[0]
    host = f"127.0.0.1[127.0.0.1]:{sink.port}"
    assert results[1] == f"D5.1.1 @{host} 550 5.1.1 no such user (in reply to RCPT TO)"
    assert Result.from_line(results[1]).describe() == (
        f"D{host} said: 550 5.1.1 no such user (in reply to RCPT TO)"
    )
    assert any("550 5.1.1" in t for t in transcript)
    assert not any("leading dot" in t for t in transcript)  # never the body
    request(ours, "Q2", "alice@example.org", ["c@example.com", "later@example.com"], m2)
    _, results = answer(reader, 2)
    assert results[0].startswith("K") and "queued as S2" in results[0]
    assert results[1].startswith("Z") and "450 4.2.1" in results[1]
    ours.shutdown(socket.SHUT_WR)
    assert reader.read() == b""
    reader.close()
    ours.close()
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and b"Traceback" not in err
    assert sink.connections == 1  # the second message went over the first connection
    assert [(s, r) for s, r, _ in sink.messages] == [
        ("alice@example.org", ["a@example.net"]),
        ("alice@example.org", ["c@example.com"]),
    ]
    assert sink.messages[0][2] == b"Subject: one\r\n\r\n..leading dot\r\n"


def test_service_on_listen_fds_serves_several_clients_and_exits_when_idle(
    tmp_path: Path, sink: Sink, processes: Processes
) -> None:
    inst = instance(tmp_path, sink)
    path = str(tmp_path / "remote.ctrl")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    env = {**os.environ, "LISTEN_FDS": "1"}
    env.pop("LISTEN_PID", None)
    fd = listener.fileno()
    proc = processes.start(
        [
            *("/bin/bash", "-c", f'exec 3<&{fd} {fd}<&- "$@"', "sh"),
            *(program("mailgrave-remote"), "--config", str(inst.config_path)),
        ],
        pass_fds=[fd],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    listener.close()
    msg = spool_message(tmp_path, "m", b"Subject: x\n\nbody\n")
    clients = []
    for i in range(3):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(path)
        clients.append(c)
        request(c, f"Q{i}", "", [f"user{i}@example.net"], msg)  # the null sender too
    for c in clients:
        with c.makefile("rb") as reader:
            _, results = answer(reader, 1)
        assert results[0].startswith("K")
        c.close()
    assert sorted(r[0] for _, r, _ in sink.messages) == [
        "user0@example.net",
        "user1@example.net",
        "user2@example.net",
    ]
    assert all(s == "" for s, _, _ in sink.messages)
    wait_for(lambda: proc.poll() is not None, timeout=15)  # idle exit after queue.idle_exit
    assert proc.returncode == 0


def test_by_hand_a_hanging_peer_times_out_as_a_temporary_failure(tmp_path: Path) -> None:
    hang = Sink("hang")
    try:
        inst = instance(tmp_path, hang, timeout="1s")
        start = time.monotonic()
        res = inst.run(
            "mailgrave-remote",
            *SAME_USER,
            "--sender",
            "a@example.org",
            "x@example.net",
            input=b"x\n",
        )
        assert time.monotonic() - start < 10
    finally:
        hang.close()
    assert res.returncode == 111
    [line] = [x for x in res.stdout.decode().splitlines() if not x.startswith("|")]
    assert line.startswith("Z") and "timeout" in line and "greeting" in line


def test_by_hand_host_override_several_domains_and_exit_codes(tmp_path: Path, sink: Sink) -> None:
    inst = Instance(tmp_path, remote={"connect_timeout": "2s"})  # no routes: --host decides
    res = inst.run(
        "mailgrave-remote",
        *SAME_USER,
        "--sender",
        "a@example.org",
        "--host",
        f"127.0.0.1:{sink.port}",
        "x@one.test",
        "bad@one.test",
        "y@two.test",
        input=b"Subject: hi\r\n\r\nbody\r\n",
    )
    lines = [x for x in res.stdout.decode().splitlines() if not x.startswith("|")]
    assert [x[0] for x in lines] == ["K", "D", "K"]
    assert res.returncode == 111 - 11  # 100: the only failure is permanent
    assert [r for _, r, _ in sink.messages] == [["x@one.test"], ["y@two.test"]]
    assert sink.messages[0][2] == b"Subject: hi\r\n\r\nbody\r\n"
    res = inst.run(
        "mailgrave-remote",
        *SAME_USER,
        "--sender",
        "a@example.org",
        "--host",
        f"127.0.0.1:{sink.port}",
        "later@one.test",
        input=b"x\n",
    )
    assert res.returncode == 111


def test_relay_login_without_tls_never_sends_the_password(tmp_path: Path, sink: Sink) -> None:
    inst = Instance(tmp_path, remote={"connect_timeout": "2s"})
    res = inst.run(
        "mailgrave-remote",
        *SAME_USER,
        "--sender",
        "a@example.org",
        "--relay",
        "127.0.0.1",
        "--port",
        str(sink.port),
        "--login",
        "relayuser",
        "x@example.net",
        input=b"x\n",
        env={**os.environ, "SMTP_AUTH_PASSWORD": "s3cret"},
    )
    assert res.returncode == 111
    assert sink.messages == [] and not any(c.upper().startswith("AUTH") for c in sink.commands)
    assert b"s3cret" not in res.stdout + res.stderr


def test_a_busy_host_is_skipped_for_the_next_one_and_a_refusal_is_kept_in_the_transcript(
    tmp_path: Path, sink: Sink
) -> None:
    busy = Sink(greeting="421 4.3.2 too busy", address=("127.0.0.2", sink.port))
    refusing = Sink(greeting="554 5.7.1 no mail from you")
    zone = {
        "example.net": [("MX", 10, "busy.test."), ("MX", 20, "good.test.")],
        "busy.test": [("A", "127.0.0.2")],
        "good.test": [("A", "127.0.0.1")],
        "refusing.test": [("A", "127.0.0.1")],
    }
    try:
        with dns_server(zone) as (dns_port, _):
            dns = {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": "2s"}
            inst = Instance(tmp_path, remote={"port": sink.port, "dns": dns})
            res = inst.run(
                "mailgrave-remote",
                *SAME_USER,
                "--sender",
                "a@example.org",
                "x@example.net",
                input=b"x\n",
            )
            assert res.returncode == 0, res.stdout
            assert busy.connections == 1 and sink.connections == 1
            assert [r for _, r, _ in sink.messages] == [["x@example.net"]]
            assert b"|<<< 421 4.3.2 too busy" in res.stdout
            (tmp_path / "r").mkdir()
            inst = Instance(tmp_path / "r", remote={"port": refusing.port, "dns": dns})
            res = inst.run(
                "mailgrave-remote",
                *SAME_USER,
                "--sender",
                "a@example.org",
                "x@refusing.test",
                input=b"x\n",
            )
    finally:
        busy.close()
        refusing.close()
    assert res.returncode == 100
    out = res.stdout.decode()
    assert "|<<< 554 5.7.1 no mail from you" in out
    assert f"Drefusing.test[127.0.0.1]:{refusing.port} said: 554 5.7.1 no mail from you" in out


@pytest.mark.parametrize("policy", ["opportunistic", "required"])
def test_a_failed_tls_handshake_falls_back_to_plaintext_only_when_opportunistic(
    tmp_path: Path, policy: str
) -> None:
    bad = Sink("badtls")
    try:
        inst = instance(tmp_path, bad, tls=policy)
        res = inst.run(
            "mailgrave-remote",
            *SAME_USER,
            "--sender",
            "a@example.org",
            "x@example.net",
            input=b"x\n",
        )
    finally:
        bad.close()
    lines = [x for x in res.stdout.decode().splitlines() if not x.startswith("|")]
    if policy == "opportunistic":
        assert res.returncode == 0, lines
        assert bad.connections == 2 and len(bad.messages) == 1
        assert bad.commands.count("STARTTLS") == 1  # not again on the plaintext retry
    else:
        assert res.returncode == 111 and "TLS" in lines[0]
        assert bad.messages == []


def test_ipv6_by_aaaa_and_ip_version_switch(tmp_path: Path, sink: Sink) -> None:
    six = Sink(address=("::1", sink.port))
    zone = {
        "both.test": [("A", "127.0.0.1"), ("AAAA", "::1")],
        "v4only.test": [("A", "127.0.0.1")],
    }
    got = {}
    try:
        with dns_server(zone) as (dns_port, _):
            for version in ("any", "4", "6"):
                (tmp_path / version).mkdir()
                dns = {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": "2s"}
                inst = Instance(
                    tmp_path / version,
                    remote={"port": sink.port, "dns": dns, "ip_version": version},
                )
                for rcpt in (f"{version}@both.test", f"{version}@v4only.test"):
                    res = inst.run(
                        "mailgrave-remote", *SAME_USER, "--sender", "", rcpt, input=b"x\n"
                    )
                    got[rcpt] = (res.returncode, len(six.messages), len(sink.messages))
    finally:
        six.close()
    assert got == {
        "any@both.test": (0, 1, 0),  # IPv6 first
        "any@v4only.test": (0, 1, 1),
        "4@both.test": (0, 1, 2),
        "4@v4only.test": (0, 1, 3),
        "6@both.test": (0, 2, 3),
        "6@v4only.test": (111, 2, 3),  # no IPv6 address: try later
    }


def test_config_error_and_help(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("remote:\n  tls: sometimes\n")
    res = subprocess.run(
        [program("mailgrave-remote"), "--config", str(bad), "--sender", "", "x@y.test"],
        input=b"x\n",
        capture_output=True,
    )
    assert res.returncode == 111 and b"remote.tls" in res.stderr
    res = subprocess.run([program("mailgrave-remote"), "--help"], capture_output=True)
    assert res.returncode == 0 and b"--relay" in res.stdout
