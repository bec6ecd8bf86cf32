"""The relay battery (issue 13): a client outside relay_networks tries every address
form that has made some MTA an open relay; none is accepted for a non-local
destination, and nothing reaches the sink every far domain is routed to."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Instance, Processes, free_port
from tests.integration.test_remote_delivery import Peer, start_peer
from tests.integration.test_smtpd import recv_reply

# Every form names a destination that is not a mailbox here: local domain
# example.org (alice, bob, postmaster), hostname mx.example.org, and
# far.test / example.net routed to a real SMTP sink.
RELAY_FORMS = [
    "alice@far.test",
    "ALICE@FAR.TEST",
    "Alice@Far.Test",
    "alice@far.test.",
    "alice@far.test..",
    "alice%far.test@example.org",
    "alice%far.test@mx.example.org",
    "alice%far.test@localhost",
    "alice%far.test@[127.0.0.1]",
    "alice%far.test%example.org@example.org",
    "far.test!alice@example.org",
    "far.test!alice@localhost",
    "far.test!alice",
    "example.org!far.test!alice@example.org",
    "@example.org:alice@far.test",
    "@mx.example.org,@example.org:alice@far.test",
    "@localhost:alice@example.net",
    '"alice@far.test"@example.org',
    '"alice@far.test"',
    '"alice%far.test"@example.org',
    '"far.test!alice"@example.org',
    '"@far.test:alice"@example.org',
    "alice@far.test@example.org",
    "alice@example.org@far.test",
    "alice@@example.org",
    "alice@far.test%example.org",
    "alice@example.org%far.test",
    "alice@example.org.far.test",
    "alice@far.example.org",
    "alice@[192.0.2.1]",
    "alice@[127.0.0.1]",
    "alice@[127.0.0.2]",
    "alice@[IPv6:::1]",
    "alice@[IPv6:2001:db8::1]",
    "alice@127.0.0.1",
    "alice@0x7f000001",
    "alice@localhost.far.test",
    "alice@localhost.localdomain",
    "postmaster@far.test",
    "alice\\@far.test@example.org",
    "far.test:alice@example.org",
    "alice@xn--exmple-cua.org",  # exämple.org
    "alice@examp1e.org",
    "alice@example.org.",
]
# The trailing dot of a local domain may be taken as the local domain itself:
# then it is not a relay, but alice@example.org. (a local mailbox), and is
# checked apart below.
LOCAL_TRAILING_DOT = "alice@example.org."
RELAY_FORMS.remove(LOCAL_TRAILING_DOT)
# Internationalized look-alikes, sent with SMTPUTF8.
UTF8_FORMS = [
    "alice@ex\u0430mple.org",  # Cyrillic a
    "alice@\u0435xample.org",  # Cyrillic e
    "alice@\uff45xample.org",  # full-width e: NFKC makes it example.org — local, checked apart
    "alice@far.tést",
]
UTF8_LOCAL = "alice@\uff45xample.org"
UTF8_FORMS.remove(UTF8_LOCAL)


class Relay:
    def __init__(self, inst: Instance, port: int, sink: Peer) -> None:
        self.inst, self.port, self.sink = inst, port, sink

    def rcpt(self, rcpt: str, utf8: bool = False) -> bytes:
        """The reply to RCPT TO:<rcpt> in a fresh transaction."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            assert recv_reply(sock).startswith(b"220")
            sock.sendall(b"EHLO client.test\r\n")
            assert recv_reply(sock).startswith(b"250")
            smtputf8 = b" SMTPUTF8" if utf8 else b""
            sock.sendall(b"MAIL FROM:<probe@client.test>" + smtputf8 + b"\r\n")
            assert recv_reply(sock).startswith(b"250")
            sock.sendall(b"RCPT TO:<" + rcpt.encode() + b">\r\n")
            reply = recv_reply(sock)
            # Whatever RCPT said, try to send: an accepted relay would go to the sink.
            sock.sendall(b"DATA\r\n")
            if recv_reply(sock).startswith(b"354"):
                sock.sendall(b"Subject: relay test\r\n\r\nrelayed?\r\n.\r\n")
                recv_reply(sock)
            sock.sendall(b"QUIT\r\n")
            recv_reply(sock)
        return reply


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    procs = Processes()
    base = tmp_path_factory.mktemp("relay")
    try:
        sink = start_peer(procs, base)
        route = f"[127.0.0.1]:{sink.port}"
        (base / "mg").mkdir()
        inst = Instance(
            base / "mg",
            relay_networks=["192.0.2.0/24"],  # 127.0.0.1 is outside
            smtpd={"max_errors": 0, "greet_pause": "0s"},
            remote={"routes": {"far.test": route, "example.net": route}},
        )
        port = free_port()
        inst.start(procs, listen=f"127.0.0.1:{port}")
        yield Relay(inst, port, sink)
    finally:
        procs.stop_all()


def _refused(reply: bytes) -> bool:
    return reply[:1] == b"5"


@pytest.mark.parametrize("rcpt", RELAY_FORMS)
def test_relay_form_refused(relay: Relay, rcpt: str) -> None:
    reply = relay.rcpt(rcpt)
    assert _refused(reply), (rcpt, reply)


@pytest.mark.parametrize("rcpt", UTF8_FORMS)
def test_idn_look_alike_refused(relay: Relay, rcpt: str) -> None:
    reply = relay.rcpt(rcpt, utf8=True)
    assert _refused(reply), (rcpt, reply)


@pytest.mark.parametrize("rcpt,utf8", [(LOCAL_TRAILING_DOT, False), (UTF8_LOCAL, True)])
def test_forms_of_a_local_mailbox_stay_local(relay: Relay, rcpt: str, utf8: bool) -> None:
    """Refused, or accepted as alice@example.org herself: never relayed (checked below)."""
    reply = relay.rcpt(rcpt, utf8=utf8)
    assert _refused(reply) or reply.startswith(b"250 2.0.0"), reply


def test_control_a_local_recipient_is_accepted(relay: Relay) -> None:
    """The battery can fail: the same harness sees an acceptance."""
    assert relay.rcpt("alice@example.org").startswith(b"250 2.0.0")


def test_zz_nothing_was_relayed(relay: Relay) -> None:
    """After the battery (run last): the sink got nothing, the spool holds nothing."""
    assert len(RELAY_FORMS) + len(UTF8_FORMS) >= 30
    deadline = time.monotonic() + 10
    while relay.inst.spool_entries() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert relay.inst.spool_entries() == []
    assert relay.sink.messages() == []
    assert not list(Path(relay.sink.outdir).glob("*.eml"))
