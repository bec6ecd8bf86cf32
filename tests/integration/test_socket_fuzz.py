"""Socket-level fuzzing (issue 13): mutations of the real dialogs
(tests/integration/dialogs/, the mutator of bench/stress.py) sent over TCP to a
running `mailgrave run`, several connections at once, for a fixed time (5 s in
`make test`, 60 s in `make stress`). Every connection ends within the session
timeouts, every byte the server sends is a well-formed reply, no stage logs a
traceback, the listener still serves a legitimate client at the end, nothing is
left half-written in the spool, and nothing from this (non-relay) client is
queued for, or reaches, a non-local recipient."""

from __future__ import annotations

import os
import random
import re
import select
import smtplib
import socket
import threading
import time
from pathlib import Path

from tests import stressreport
from tests.conftest import Instance, Processes, free_port, read_spool_file, wait_for
from tests.integration.test_remote_delivery import start_peer

WORKERS = 4
TIMEOUT = 3.0  # smtpd.timeout and command_deadline: a silent client is dropped after this
HANG = TIMEOUT + 15.0  # a connection the server has not ended by then hangs
REPLY_LINE = re.compile(rb"\A[2-5]\d\d[ -][^\r\n]*\Z")
LOCAL_DOMAINS = {b"example.org", b"mx.example.org", b"localhost"}


def well_formed(output: bytes) -> bool:
    """Only complete reply lines, CRLF-terminated (an abrupt end may cut the last)."""
    lines = output.split(b"\r\n")
    return all(REPLY_LINE.match(line) for line in lines[:-1]) and b"\n" not in lines[-1]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cases = self.wrong = self.silent = self.hangs = 0
        self.examples: list[bytes] = []

    def add(self, data: bytes, output: bytes, hung: bool) -> None:
        with self.lock:
            self.cases += 1
            bad = not well_formed(output)
            self.wrong += bad
            self.silent += not output  # not even a greeting: the session died at once
            self.hangs += hung
            if (bad or hung or not output) and len(self.examples) < 5:
                self.examples.append(data[:300])


def one_case(port: int, data: bytes, rng: random.Random, half_close: bool) -> tuple[bytes, bool]:
    """Send ``data`` in a few pieces; (what the server sent, whether it hung)."""
    got = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 3)))
        try:
            for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
                sock.sendall(data[a:b])
                time.sleep(rng.random() * 0.01)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server ended the session first
        deadline = time.monotonic() + HANG
        while time.monotonic() < deadline:
            ready, _, _ = select.select([sock], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                return bytes(got), False
            got += chunk
        return bytes(got), True


def worker(port: int, seed: int, until: float, tally: Tally) -> None:
    fuzz = stressreport.bench_stress()
    corpus = fuzz.seeds()
    rng = random.Random(seed)
    while time.monotonic() < until:
        data = fuzz.mutate(rng, rng.choice(corpus))
        output, hung = one_case(port, data, rng, half_close=rng.random() < 0.95)
        tally.add(data, output, hung)


def envelopes(inst: Instance) -> list[bytes]:
    """The envelopes of every message still in the spool (todo/ and mess/)."""
    out = []
    for entry in inst.spool_entries():
        if entry.startswith(("todo/", "mess/")):
            try:
                out.append(read_spool_file(inst.spool / entry)[0])
            except FileNotFoundError:
                pass  # delivered and removed meanwhile
    return out


def relayed(envelope: bytes) -> bool:
    """A message from a client (not a bounce) for a recipient outside the local domains."""
    fields = envelope.split(b"\0")
    if fields[0] == b"F":
        return False
    return any(
        f.startswith(b"T") and f.rpartition(b"@")[2].lower() not in LOCAL_DOMAINS for f in fields
    )


def test_mutated_dialogs_over_tcp_crash_hang_and_relay_nothing(
    tmp_path: Path, processes: Processes
) -> None:
    canary = start_peer(processes, tmp_path)  # where any remote delivery would go
    inst = Instance(
        tmp_path,
        relay_networks=["192.0.2.0/24"],  # the fuzzing client (127.0.0.1) may not relay
        smtpd={
            "greet_pause": "0s",
            "timeout": f"{TIMEOUT:g}s",
            "command_deadline": f"{TIMEOUT:g}s",
            "max_message_size": "64K",
        },
        queue={"idle_exit": "10m"},
        remote={"routes": {"*": f"[127.0.0.1]:{canary.port}"}},
    )
    port = free_port()
    inst.start(processes, listen=f"127.0.0.1:{port}")
    seconds = stressreport.seconds(5)
    tally = Tally()
    until = time.monotonic() + seconds
    seed = int(os.environ.get("MAILGRAVE_FUZZ_SEED", "13"))
    threads = [
        threading.Thread(target=worker, args=(port, seed + i, until, tally), daemon=True)
        for i in range(WORKERS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + HANG + 30)
    assert not [t for t in threads if t.is_alive()], "a fuzzing connection never ended"
    # The listener still serves a legitimate client at once.
    start = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.sendmail("a@client.test", ["alice@example.org"], b"Subject: after fuzz\r\n\r\nx\r\n")
    assert time.monotonic() - start < 10
    wait_for(lambda: any(b"after fuzz" in m for m in inst.messages("alice")), timeout=30)
    # Nothing half-written: what the queue did not commit it removed.
    wait_for(lambda: not [e for e in inst.spool_entries() if e.startswith("tmp/")], timeout=20)
    log = inst.log.read_text(errors="replace")
    crashes = log.count("Traceback") + tally.silent
    stressreport.row(
        f"socket fuzz ({seconds:g} s, {WORKERS} at once)",
        tally.cases,
        wrong=tally.wrong,
        crashes=crashes,
        hangs=tally.hangs,
    )
    assert tally.cases >= WORKERS
    assert (tally.wrong, tally.silent, tally.hangs) == (0, 0, 0), tally.examples
    assert "Traceback" not in log, log[-4000:]
    assert not [e for e in envelopes(inst) if relayed(e)]
    leaked = [meta for meta, _body in canary.messages() if meta["mail_from"] != ""]
    assert leaked == [], leaked  # only bounces (null sender) ever left
