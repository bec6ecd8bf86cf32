"""The hostile corpus (issue 13) against the real programs: what only a socket or
the sendmail command line can show (the protocol core's cases are in
tests/unit/test_smtp_hostile.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.conftest import Instance, Processes, free_port, wait_for
from tests.integration.test_smtpd import recv_reply


class Hostile:
    def __init__(self, inst: Instance, port: int) -> None:
        self.inst, self.port = inst, port

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        assert recv_reply(sock).startswith(b"220")
        return sock


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    procs = Processes()
    inst = Instance(
        tmp_path_factory.mktemp("hostile"),
        relay_networks=["192.0.2.0/24"],
        smtpd={"max_message_size": "64K", "greet_pause": "0s"},
    )
    port = free_port()
    try:
        inst.start(procs, listen=f"127.0.0.1:{port}")
        yield Hostile(inst, port)
    finally:
        procs.stop_all()


def test_one_megabyte_command_line(hostile: Hostile) -> None:
    with hostile.connect() as sock:
        sock.sendall(b"EHLO " + b"x" * 1_000_000 + b"\r\n")
        assert recv_reply(sock).startswith(b"500 5.5.2")
        sock.sendall(b"NOOP\r\n")
        assert recv_reply(sock).startswith(b"250")


def test_oversize_message_552_after_the_dot_and_nothing_queued(hostile: Hostile) -> None:
    with hostile.connect() as sock:
        for cmd in (b"EHLO c", b"MAIL FROM:<a@client.test>", b"RCPT TO:<alice@example.org>"):
            sock.sendall(cmd + b"\r\n")
            assert recv_reply(sock).startswith(b"250")
        sock.sendall(b"DATA\r\n")
        assert recv_reply(sock).startswith(b"354")
        sock.sendall((b"z" * 998 + b"\r\n") * 100 + b".\r\n")
        assert recv_reply(sock).startswith(b"552 5.3.4")
        sock.sendall(b"QUIT\r\n")
        assert recv_reply(sock).startswith(b"221")
    assert not [m for m in hostile.inst.messages("alice") if b"zzzz" in m]
    assert [e for e in hostile.inst.spool_entries() if not e.startswith("tmp/")] == []


@pytest.mark.parametrize(
    "name",
    ["Eve\nBcc: victim@far.test", "Eve\r\nX-Injected: yes", "Eve\rX-Injected: yes"],
    ids=repr,
)
def test_full_name_cannot_inject_a_header(hostile: Hostile, name: str) -> None:
    before = len(hostile.inst.messages("bob"))
    res = hostile.inst.sendmail("-F", name, "bob@example.org", data=b"Subject: f\n\nbody\n")
    assert res.returncode == 0, res.stderr
    msgs = wait_for(lambda: hostile.inst.messages("bob")[before:] or None)
    header = msgs[0].split(b"\n\n", 1)[0]
    lines = header.split(b"\n")
    assert not [ln for ln in lines if ln.startswith((b"Bcc:", b"X-Injected:"))], header
    assert b"\r" not in header
    from_line = next(ln for ln in lines if ln.startswith(b"From:"))
    assert b"Eve" in from_line


@pytest.mark.parametrize(
    "sender", ["a@client.test\nBcc: victim@far.test", "a@client.test\r\nX-Injected: yes"], ids=repr
)
def test_envelope_sender_cannot_inject_a_header(hostile: Hostile, sender: str) -> None:
    before = len(hostile.inst.messages("bob"))
    res = hostile.inst.sendmail("-f", sender, "bob@example.org", data=b"Subject: f\n\nbody\n")
    # EX_USAGE: the bad address is on the command line (a bad -t header is 65)
    assert res.returncode == 64, (res.returncode, res.stderr)
    assert len(hostile.inst.messages("bob")) == before
