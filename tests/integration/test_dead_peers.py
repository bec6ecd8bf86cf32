"""Load and slowness (issue 13): a peer that never answers and a DNS server that
never answers. Every timeout fires within the configured bounds, the message
stays queued (deferred, the reason in `mailgrave queue show`), other mail is
delivered meanwhile, and nothing is left hanging; smtpd's SPF check and the
queue's DKIM/DMARC checks turn a dead DNS into temperror within bounds while a
new legitimate client is served at once."""

from __future__ import annotations

import select
import smtplib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SAME_USER, Instance, Processes, free_port, wait_for
from tests.integration.dnsserver import dead_dns_server, dns_server
from tests.integration.test_remote_delivery import start_peer
from tests.integration.test_smtpd import recv_reply

# Under load a timeout fires late, never early: the bounds allow this much more.
SLACK = 10.0


class DeadPeer:
    """A TCP server on loopback that stops answering at ``stage``: ``greeting``
    (accepts, never greets), ``ehlo`` (greets and answers EHLO, then nothing),
    ``data`` (answers up to 354 and reads the message, never the final dot);
    ``none`` answers everything (a plain SMTP peer without extensions).
    Each connection's life, from accept to the client's close, is recorded."""

    def __init__(self, stage: str, address: str = "127.0.0.1", port: int = 0) -> None:
        self.stage = stage
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((address, port))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self.lives: list[list[float | None]] = []  # [accepted, closed by the client]
        self.got = b""
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        life: list[float | None] = [time.monotonic(), None]
        self.lives.append(life)
        buf = b""
        answering = self.stage != "greeting"
        with conn:
            if answering:
                conn.sendall(b"220 dead.test ESMTP\r\n")
            while not self.stopping.is_set():
                ready, _, _ = select.select([conn], [], [], 0.2)
                if not ready:
                    continue
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    life[1] = time.monotonic()
                    return
                self.got += data
                buf += data
                while answering and b"\r\n" in buf:
                    line, _, buf = buf.partition(b"\r\n")
                    verb = line[:4].upper()
                    if verb in (b"EHLO", b"HELO"):
                        conn.sendall(b"250 dead.test\r\n")
                        answering = self.stage != "ehlo"
                    elif verb == b"DATA" and self.stage == "none":
                        conn.sendall(b"354 go on\r\n")
                        while not buf.endswith(b"\r\n.\r\n"):
                            more = conn.recv(65536)
                            if not more:
                                return
                            self.got += more
                            buf += more
                        buf = b""
                        conn.sendall(b"250 2.0.0 taken\r\n")
                    elif verb == b"DATA":
                        conn.sendall(b"354 go on\r\n")
                        answering = False  # reads the message, never answers the dot
                    else:
                        conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        for t in self.threads:
            t.join(timeout=5)


def queue_listing(inst: Instance) -> str:
    return str(inst.run("mailgrave", "queue").stdout.decode())


def queue_show(inst: Instance) -> dict[str, str]:
    """`mailgrave queue show` of every queued message, by its recipient."""
    out = {}
    for line in queue_listing(inst).splitlines()[1:]:
        if line[:1].strip() and not line.startswith("--"):
            shown = inst.run("mailgrave", "queue", "show", line.split()[0]).stdout.decode()
            rcpt = shown.split("Recipient: <", 1)[1].split(">", 1)[0]
            out[rcpt] = shown
    return out


REMOTE_TIMEOUT = 4.0  # remote.timeout: the greeting and each command; the dot gets twice


def test_dead_peers_and_dns_defer_within_the_timeouts_and_others_are_delivered(
    tmp_path: Path, processes: Processes
) -> None:
    good = start_peer(processes, tmp_path)
    with ExitStack() as stack:
        dead = {stage: DeadPeer(stage) for stage in ("greeting", "ehlo", "data")}
        for peer in dead.values():
            stack.callback(peer.close)
        dns_port, queries = stack.enter_context(dead_dns_server())
        routes = {f"{stage}.test": f"[127.0.0.1]:{p.port}" for stage, p in dead.items()}
        routes["example.net"] = f"[127.0.0.1]:{good.port}"
        inst = Instance(
            tmp_path,
            remote={
                "routes": routes,
                "timeout": f"{REMOTE_TIMEOUT:g}s",
                "connect_timeout": "2s",
                "dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": "2s"},
            },
        )
        inst.start(processes)
        dead_rcpts = ["a@greeting.test", "b@ehlo.test", "c@data.test", "d@nowhere.test"]
        for rcpt in [*dead_rcpts, "e@example.net"]:
            res = inst.sendmail("-f", "alice@example.org", rcpt, data=b"Subject: t\n\nbody\n")
            assert res.returncode == 0, res.stderr
        wait_for(good.messages, timeout=30)
        delivered_at = time.monotonic()

        def deferred() -> dict[str, str] | None:
            shown = queue_show(inst)
            done = all(
                f"<{r}> pending attempts=1" in shown.get(r, "") and "Last reply" in shown[r]
                for r in dead_rcpts
            )
            return shown if done else None

        shown = wait_for(deferred, timeout=2 * REMOTE_TIMEOUT + 30)
        assert "timeout waiting for the reply to greeting" in shown["a@greeting.test"]
        assert "timeout waiting for the reply to" in shown["b@ehlo.test"]
        assert "timeout waiting for the reply to" in shown["c@data.test"]
        assert "4.4.3" in shown["d@nowhere.test"]  # a temporary failure, not 5.1.2
        assert queries, "the MX look-up never reached the dead DNS server"
        # Each dead connection was closed by mailgrave-remote once its timeout
        # fired (not before, not much later): nothing is left hanging.
        for stage, peer in dead.items():
            wait_for(lambda p=peer: p.lives and all(c is not None for _a, c in p.lives))
            bound = 2 * REMOTE_TIMEOUT if stage == "data" else REMOTE_TIMEOUT
            for accepted, closed in peer.lives:
                assert closed is not None and accepted is not None
                assert bound - 0.5 <= closed - accepted <= bound + SLACK, (stage, closed - accepted)
        assert b"MAIL FROM:<alice@example.org>" in dead["ehlo"].got
        assert b"Subject: t" in dead["data"].got
        # The good message went while the DATA peer still held its connection.
        assert delivered_at < (dead["data"].lives[0][1] or 0.0)
        assert inst.messages("alice") == []  # no bounce: deferred, not failed
        assert len(good.messages()) == 1


def test_mx_lookup_against_a_dead_dns_server_is_a_temporary_failure_in_time(
    tmp_path: Path,
) -> None:
    with dead_dns_server() as (port, queries):
        inst = Instance(
            tmp_path, remote={"dns": {"nameservers": ["127.0.0.1"], "port": port, "timeout": "2s"}}
        )
        start = time.monotonic()
        res = inst.run(
            "mailgrave-remote",
            *SAME_USER,
            "--sender",
            "a@example.org",
            "x@nowhere.test",
            input=b"x",
        )
        took = time.monotonic() - start
    lines = [ln for ln in res.stdout.decode().splitlines() if not ln.startswith("|")]
    assert res.returncode == 111, (res.returncode, lines, res.stderr)
    assert lines[0].startswith("Z4.4.3"), lines
    assert queries
    assert 1.5 <= took <= 2 + SLACK, took


# --- smtpd's SPF check and the queue's DKIM/DMARC under a dead DNS


@pytest.fixture
def dead_dns() -> Iterator[tuple[int, list[bytes]]]:
    with dead_dns_server() as found:
        yield found


def checked_instance(tmp_path: Path, processes: Processes, port: int, **checks: str) -> Any:
    inst = Instance(
        tmp_path,
        relay_networks=["127.0.0.1/32"],  # 127.0.0.2 and up are outside clients
        checks=checks,
        smtpd={"greet_pause": "0s"},
        remote={"dns": {"nameservers": ["127.0.0.1"], "port": port, "timeout": "2s"}},
    )
    smtp_port = free_port()
    inst.start(processes, listen=f"127.0.0.1:{smtp_port}")
    return inst, smtp_port


def outside(port: int, source: str = "127.0.0.2") -> smtplib.SMTP:
    smtp = smtplib.SMTP(timeout=60, source_address=(source, 0))
    smtp.connect("127.0.0.1", port)
    smtp.ehlo("client.test")
    return smtp


def timed_mail(port: int, source: str, out: list[tuple[int, bytes, float]]) -> None:
    with outside(port, source) as smtp:
        start = time.monotonic()
        code, text = smtp.mail("a@sender.test")
        out.append((code, text, time.monotonic() - start))


def test_spf_enforce_under_a_dead_dns_is_451_in_time_and_others_are_served(
    tmp_path: Path, processes: Processes, dead_dns: tuple[int, list[bytes]]
) -> None:
    port, queries = dead_dns
    _inst, smtp_port = checked_instance(tmp_path, processes, port, spf="enforce")
    replies: list[tuple[int, bytes, float]] = []
    waiting = [
        threading.Thread(target=timed_mail, args=(smtp_port, f"127.0.0.{2 + i}", replies))
        for i in range(10)
    ]
    for t in waiting:
        t.start()
    # While ten sessions wait for their SPF look-ups, a new client is served at once.
    time.sleep(0.5)
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", smtp_port), timeout=20) as sock:
        assert recv_reply(sock).startswith(b"220")
        sock.sendall(b"EHLO legit.test\r\n")
        assert recv_reply(sock).startswith(b"250")
    assert time.monotonic() - start < 5
    for t in waiting:
        t.join(timeout=60)
    assert len(replies) == 10
    for code, text, took in replies:
        assert (code, text[:6]) == (451, b"4.7.24"), (code, text)
        assert took <= 2 + SLACK, took
    assert queries


def fake_signature(n: int) -> bytes:
    """A DKIM-Signature: whose key look-up is all it takes to get a result."""
    return (
        b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=signer%d.test; s=sel;\r\n"
        b" h=from:subject; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=AAAA\r\n" % n
    )


def test_record_under_a_dead_dns_accepts_with_temperror_in_bounded_time(
    tmp_path: Path, processes: Processes, dead_dns: tuple[int, list[bytes]]
) -> None:
    """SPF (smtpd), DKIM and DMARC (the queue) all temperror; the 250 after the
    dot waits for one DNS timeout at most, however many signatures."""
    port, _queries = dead_dns
    inst, smtp_port = checked_instance(
        tmp_path, processes, port, spf="record", dkim="record", dmarc="record"
    )
    body = b"".join(fake_signature(i) for i in range(8))
    body += b"From: <a@sender.test>\r\nSubject: dead dns\r\n\r\nhello\r\n"
    with outside(smtp_port) as smtp:
        start = time.monotonic()
        assert smtp.mail("a@sender.test")[0] == 250  # record: temperror, accepted
        assert time.monotonic() - start <= 2 + SLACK
        assert smtp.rcpt("alice@example.org")[0] == 250
        code, _ = smtp.docmd("DATA")
        assert code == 354
        smtp.send(body.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        start = time.monotonic()
        code, text = smtp.getreply()
        took = time.monotonic() - start
    assert code == 250, (code, text)
    assert took <= 2 + 4, took  # one look-up's timeout (2 s), not nine of them
    [raw] = wait_for(lambda: inst.messages("alice"), timeout=30)
    head = raw.partition(b"\n\n")[0].replace(b"\n\t", b" ").replace(b"\n ", b" ")
    [field] = [ln for ln in head.split(b"\n") if ln.startswith(b"Authentication-Results:")]
    assert b"spf=temperror" in field
    assert field.count(b"dkim=temperror") == 8, field
    assert b"dmarc=temperror" in field


@pytest.mark.parametrize("stage", ["data", "ehlo"])
def test_no_answer_to_the_final_dot_is_deferred_not_sent_to_the_next_mx(
    tmp_path: Path, stage: str
) -> None:
    # RFC 1047: once the whole message has gone, a lost answer means the first MX
    # may have it; sending it to the second now would deliver it twice. A failure
    # before the message (here: no answer after EHLO) still moves on to the next MX.
    with ExitStack() as stack:
        first = DeadPeer(stage, "127.0.0.1")
        stack.callback(first.close)
        second = DeadPeer("none", "127.0.0.2", first.port)
        stack.callback(second.close)
        zone: dict[str, list[tuple[Any, ...]]] = {
            "dup.test": [("MX", 10, "mx1.dup.test."), ("MX", 20, "mx2.dup.test.")],
            "mx1.dup.test": [("A", "127.0.0.1")],
            "mx2.dup.test": [("A", "127.0.0.2")],
        }
        dns_port, _ = stack.enter_context(dns_server(zone))
        inst = Instance(
            tmp_path,
            remote={
                "port": first.port,
                "timeout": "2s",
                "connect_timeout": "2s",
                "dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": "2s"},
            },
        )
        res = inst.run(
            "mailgrave-remote", *SAME_USER, "--sender", "alice@example.org", "x@dup.test",
            input=b"Subject: once\n\nbody\n",
        )  # fmt: skip
        [line] = [x for x in res.stdout.decode().splitlines() if not x.startswith("|")]
        if stage == "data":
            assert b"Subject: once" in first.got
            assert line.startswith("Z") and "it may have arrived" in line, line
            assert second.got == b"", "the message went to the second MX as well"
        else:
            assert line.startswith("K") and "mx2.dup.test" in line, line
            assert b"Subject: once" in second.got
