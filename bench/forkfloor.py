"""What one SMTP connection costs mailgrave-smtpd, split into its parts.

The warm smtpd parent forks a child per connection (a guarantee of the
design). This measures, in one process with smtpd's modules imported:

- a fork whose child exits at once (the price of the process alone);
- one SMTP session (EHLO, MAIL, RCPT, DATA of 2 KB, QUIT) run in-process,
  with nothing forked (the price of the Python work alone);
- the same session in a forked child, as the listener runs it;
- two sessions in one forked child (what the second one costs once the
  child's pages are its own).

The queue is a stub process that reads each submission and answers K, so
nothing is written to disk: the figures are smtpd's CPU only. CPU is
utime+stime from getrusage (the kernel's split between the two is by
samples, their sum is exact); page faults are minor faults (copy-on-write).

    .venv/bin/python -S bench/forkfloor.py [--count N]   # -S: as the launcher starts
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import signal
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.append("/usr/lib/python3/dist-packages")  # yaml, when started with -S as the launcher is

from mailgrave import config as configmod
from mailgrave import log as mglog
from mailgrave.smtpd.session import serve_connection

BODY = b"Subject: forkfloor\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26
SCRIPT = (
    b"EHLO client.example\r\nMAIL FROM:<s@client.example>\r\n"
    b"RCPT TO:<bench@sink.test>\r\nDATA\r\n" + BODY + b".\r\nQUIT\r\n"
)


def stub_queue(path: str) -> int:
    """A process answering queue.ctrl submissions with K, keeping nothing."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    pid = os.fork()
    if pid:
        listener.close()
        return pid
    while True:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as f:
            for _ in range(2):  # attributes, then the envelope: each ends with NUL NUL
                prev = b""
                while True:
                    c = f.read(1)
                    if not c or (c == b"\0" and prev == b"\0"):
                        break
                    prev = c
            while True:
                head = f.read(4)
                if len(head) < 4 or not struct.unpack(">I", head)[0]:
                    break
                f.read(struct.unpack(">I", head)[0])
            conn.sendall(b"K0000000000STUB\n")


def session(config: configmod.Config) -> None:
    client, server = socket.socketpair()
    with client:
        client.sendall(SCRIPT)
        client.shutdown(socket.SHUT_WR)
        serve_connection(config, server, "127.0.0.1")
        replies = b"".join(iter(lambda: client.recv(65536), b""))
    if b"queued as" not in replies:
        raise SystemExit(f"the session did not queue: {replies!r}")


def measure(count: int, body: Callable[[], None], fork: bool) -> tuple[float, float]:
    """(CPU ms, minor faults) per iteration."""
    who = resource.RUSAGE_CHILDREN if fork else resource.RUSAGE_SELF
    before = resource.getrusage(who)
    for _ in range(count):
        if not fork:
            body()
            continue
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            try:
                body()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    after = resource.getrusage(who)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu / count * 1000, (after.ru_minflt - before.ru_minflt) / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="iterations per row")
    args = parser.parse_args()
    work = f"/tmp/mailgrave-forkfloor-{os.getpid()}"  # not tempfile: random's fork hook
    os.mkdir(work, 0o700)
    queue_pid = stub_queue(os.path.join(work, "queue.ctrl"))
    try:
        config = configmod.parse_text(
            f"hostname: mx.example.org\nspool: {work}/spool\nrun_dir: {work}\n"
            "smtpd: {greet_pause: 0}\nremote: {dns: {nameservers: [127.0.0.1]}}\n"
        )
        mglog.setup("smtpd", stdlib=False)  # as the listener does
        with mglog.muted():
            session(config)  # first use: imports, caches
            rows = [
                ("fork + exit, nothing else", measure(args.count, lambda: None, True)),
                ("one session, in-process", measure(args.count, lambda: session(config), False)),
                ("one session, forked child", measure(args.count, lambda: session(config), True)),
                (
                    "two sessions, one forked child",
                    measure(args.count, lambda: (session(config), session(config)), True),
                ),
            ]
    finally:
        os.kill(queue_pid, signal.SIGKILL)
        os.waitpid(queue_pid, 0)
        for name in ("queue.ctrl",):
            os.unlink(os.path.join(work, name))
        os.rmdir(work)
    print(f"| {'smtpd, per iteration':<32} | {'CPU ms':>7} | {'faults':>6} |")
    print(f"|{'-' * 34}|{'-' * 8}:|{'-' * 7}:|")
    for label, (cpu, faults) in rows:
        print(f"| {label:<32} | {cpu:7.3f} | {faults:6.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
