"""BDAT or DATA: what each costs mailgrave-remote's client (issue 15).

Issue 15 asks for BDAT (RFC 3030) when the peer offers CHUNKING "if it is not
slower"; this measures it. Messages of several sizes go through
mailgrave-remote's own delivery code (``Delivery.deliver``: the spool file
read with ``blocks``, ``wire_format``, the cached session) to one peer on
127.0.0.1 that offers CHUNKING, once with BDAT and once with DATA: for DATA
the session forgets CHUNKING after EHLO, nothing else differs. Runs of the
two alternate, ROUNDS times; the table has the medians over the rounds, per
message, of the wall time and of the client's own CPU (``process_time``: the
peer runs in other processes).

The peer is a second MailGrave's smtpd (this tree's) with a stub queue that
keeps nothing (bench/forkfloor.py): Postfix's smtp-sink (3.7) and aiosmtpd do
not offer CHUNKING. Wall time includes the peer's work, which differs too
(DATA is scanned for the end dot, BDAT is counted); client CPU is the
client's alone. The message is a base64 attachment (76-octet lines), as most
big mail is.

    .venv/bin/python bench/bdat.py [--rounds 5] [--scale 1]   # about 20 s
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from forkfloor import stub_queue

from mailgrave import config as configmod
from mailgrave.envelope import Envelope
from mailgrave.remote.client import Client
from mailgrave.remote.mtasts import Policy
from mailgrave.remote.program import Delivery
from mailgrave.remote.route import Hop
from mailgrave.spool import scratch_entry

TREE = Path(__file__).resolve().parent.parent
SENDER = "bench@client.example"
RCPTS = ["bench@sink.test"]
# (message size, messages per run at --scale 1): about the same time per row
SIZES = [(2 * 1024, 500), (100 * 1024, 150), (1024 * 1024, 25), (10 * 1024 * 1024, 3)]


class DataOnly(Delivery):
    """The same delivery, but every session forgets CHUNKING after EHLO."""

    def _open(
        self, hop: Hop, address: str, plain: bool = False, sts: Policy | None = None
    ) -> Client:
        client = super()._open(hop, address, plain, sts)
        client.extensions.pop("CHUNKING", None)
        return client


def message(size: int) -> bytes:
    """A message of about ``size`` octets: a short header, then base64 lines."""
    head = b"From: <bench@client.example>\nTo: <bench@sink.test>\nSubject: bdat\n\n"
    raw = random.Random(size).randbytes((size - len(head)) * 57 // 77)  # 57 octets a line
    return head + base64.encodebytes(raw)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_peer(work: str) -> tuple[int, subprocess.Popen[bytes], int]:
    """(port, this tree's smtpd listener, the stub queue's pid)."""
    queue = stub_queue(os.path.join(work, "queue.ctrl"))
    config = os.path.join(work, "mailgrave.yaml")
    Path(config).write_text(
        f"hostname: mx.example.org\nspool: {work}/spool\nrun_dir: {work}\n"
        "smtpd: {greet_pause: 0, max_connections_per_client: 0}\n"
        "remote: {dns: {nameservers: [127.0.0.1]}}\n"
    )
    port = free_port()
    argv = [sys.executable, "-P", "-m", "mailgrave.smtpd", "--config", config]  # -P: not the cwd
    argv += ["--bind", "127.0.0.1", "--port", str(port)]
    if os.getuid() == 0:
        argv += ["--user", "root"]
    env = dict(os.environ, PYTHONPATH=str(TREE))
    listener = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return port, listener, queue
        except OSError:
            if time.monotonic() > deadline or listener.poll() is not None:
                stop(listener, queue)
                raise SystemExit("bdat: the peer did not start") from None
            time.sleep(0.1)


def stop(listener: subprocess.Popen[bytes], queue: int) -> None:
    """The listener asked to stop (it sends its spares away), else killed; the queue killed."""
    listener.terminate()
    try:
        listener.wait(10)
    except subprocess.TimeoutExpired:
        listener.kill()
        listener.wait()
    os.kill(queue, signal.SIGKILL)
    os.waitpid(queue, 0)


def run(delivery: Delivery, fd: int, count: int, chunking: bool) -> tuple[float, float]:
    """(wall ms, client CPU ms) per message over ``count`` messages on one
    session, opened (and checked) by a first message that is not counted."""
    envelope = Envelope(SENDER, tuple(RCPTS))

    def one() -> list[str]:
        results, transcript = delivery.deliver(SENDER, RCPTS, fd, envelope)
        if any(not r.ok for r in results):
            raise SystemExit(f"bdat: not delivered: {results[0].describe()}")
        return transcript

    used = any(line.startswith(">>> BDAT") for line in one())
    if used != chunking:
        raise SystemExit(f"bdat: BDAT {'not ' if chunking else ''}used where it should be")
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        one()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    delivery.sessions.expire(everything=True)
    return wall / count * 1000, cpu / count * 1000


def human(size: int) -> str:
    return f"{size // (1024 * 1024)} MB" if size >= 1024 * 1024 else f"{size // 1024} KB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternated BDAT/DATA runs per size")
    parser.add_argument("--scale", type=float, default=1.0, help="messages per run, multiplied")
    args = parser.parse_args()
    config = configmod.parse_text(
        "hostname: client.example\nremote: {tls: none, mta_sts: off, helo: client.example}\n"
    )
    work = tempfile.mkdtemp(prefix="mailgrave-bdat-")
    port, listener, queue = start_peer(work)
    target = f"127.0.0.1:{port}"
    rows = []
    try:
        for size, base in SIZES:
            count = max(1, round(base * args.scale))
            text = message(size)
            fd = scratch_entry(io.BytesIO(text), Envelope(SENDER, tuple(RCPTS)).encode())
            runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            try:
                for _ in range(args.rounds):
                    for chunking in (True, False):
                        kind = Delivery if chunking else DataOnly
                        runs[chunking].append(run(kind(config, target), fd, count, chunking))
            finally:
                os.close(fd)
            rows.append((size, count, runs[True], runs[False]))
    finally:
        stop(listener, queue)
        shutil.rmtree(work, ignore_errors=True)
    print(
        "\nBDAT or DATA: mailgrave-remote's client to MailGrave's smtpd (stub queue) on "
        f"127.0.0.1; {args.rounds} alternated rounds, medians per message; a ratio's range "
        "is over the rounds\n"
    )
    print(
        "| size | messages | wall ms BDAT | wall ms DATA | wall BDAT/DATA "
        "| CPU ms BDAT | CPU ms DATA | CPU BDAT/DATA |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size, count, bdat, data in rows:
        cells = []
        for i in (0, 1):  # wall, CPU
            b, d = statistics.median(r[i] for r in bdat), statistics.median(r[i] for r in data)
            ratios = [x[i] / y[i] for x, y in zip(bdat, data, strict=True)]
            cells.append(f"{b:.2f} | {d:.2f} | {b / d:.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        print(f"| {human(size)} | {count} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
