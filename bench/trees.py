"""smtpd's cost per connection in several source trees, runs alternated.

For a change that moves code without meaning to change its cost (issue 11's
restructure), one run of each tree is not enough: the machine's own drift
between runs is larger than the difference sought. This runs the forking
listener of each tree in turn, ROUNDS times, each time with the same load
(sequential connections from smtplib, one 2 KB message each, to a stub queue
that keeps nothing), and prints per tree the median over the rounds of:

- the listener's own CPU and minor page faults per connection (accept, fork,
  reap, limits);
- its children's CPU and minor faults per connection (one session each:
  copy-on-write faults are most of a child's cost).

Minor faults are counted by the kernel and do not depend on what else the
machine is doing; CPU does, so compare CPU only on a quiet machine.

    .venv/bin/python -S bench/trees.py [--rounds 3] [--count 300] TREE...

A TREE is a checkout (``git worktree add /tmp/before COMMIT``); its own
``mailgrave`` package and ``bench/forkfloor.py`` (the stub queue) are used.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = b"Subject: trees\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26


def _stat(pid: int) -> list[int]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    # minflt cminflt majflt cmajflt utime stime cutime cstime (proc(5) fields 10-17)
    return [int(x) for x in fields[7:15]]


def _rss_kib(pid: int) -> int:
    """The listener's resident set: each fork copies its page tables, each child's
    exit unmaps it, so a bigger listener costs every connection more."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _send(port: int, count: int) -> None:
    for _ in range(count):
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail("s@client.example", ["bench@sink.test"], BODY)


def child(tree: str, count: int) -> dict[str, float]:
    """One run in this process: the tree's listener, ``count`` connections."""
    sys.path[:0] = [tree, os.path.join(tree, "bench")]
    sys.path.append("/usr/lib/python3/dist-packages")  # yaml, under -S
    import forkfloor  # the tree's own stub queue

    try:
        from mailgrave.smtpd import program
    except ImportError:  # before the restructure
        from mailgrave.programs import smtpd as program  # type: ignore[no-redef]
    work = f"/tmp/mailgrave-trees-{os.getpid()}"
    os.mkdir(work, 0o700)
    queue = forkfloor.stub_queue(os.path.join(work, "queue.ctrl"))
    config = os.path.join(work, "mailgrave.yaml")
    Path(config).write_text(
        f"hostname: mx.example.org\nspool: {work}/spool\nrun_dir: {work}\n"
        "local_domains: [example.org]\n"
        "smtpd: {greet_pause: 0, max_connections_per_client: 0}\n"
        "remote: {dns: {nameservers: [127.0.0.1]}}\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listener = os.fork()
    if listener == 0:
        with open(os.devnull, "wb") as null:  # the listener's log lines
            os.dup2(null.fileno(), 2)
        argv = ["--config", config, "--bind", "127.0.0.1", "--port", str(port)]
        if os.getuid() == 0 and "--user" in Path(program.__file__).read_text():
            argv += ["--user", "root"]  # since issue 12 root must say so
        os._exit(program.main(argv))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{tree}: the listener did not start") from None
                time.sleep(0.1)
        _send(port, 20)  # warm: spares, caches
        time.sleep(1)
        before = _stat(listener)
        _send(port, count)
        time.sleep(1)  # the last children reaped
        after = _stat(listener)
        rss_kib = _rss_kib(listener)
    finally:
        for pid in (listener, queue):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for name in ("queue.ctrl", "mailgrave.yaml"):
            os.unlink(os.path.join(work, name))
        for root, dirs, files in os.walk(work, topdown=False):
            for name in files:
                os.unlink(os.path.join(root, name))
            for name in dirs:
                os.rmdir(os.path.join(root, name))
        os.rmdir(work)
    d = [b - a for a, b in zip(before, after, strict=True)]
    return {
        "own_ms": (d[4] + d[5]) / CLK_TCK / count * 1000,
        "child_ms": (d[6] + d[7]) / CLK_TCK / count * 1000,
        "own_faults": d[0] / count,
        "child_faults": d[1] / count,
        "rss_mb": rss_kib / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree, alternated")
    parser.add_argument("--count", type=int, default=300, help="connections per run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("trees", nargs="*", help="source trees (checkouts) to compare")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.count)))
        return 0
    if not args.trees:
        parser.error("name at least one tree")
    runs: dict[str, list[dict[str, float]]] = {tree: [] for tree in args.trees}
    for _ in range(args.rounds):
        for tree in args.trees:
            out = subprocess.run(
                [sys.executable, "-S", __file__, "--count", str(args.count), "--child", tree],
                capture_output=True,
                text=True,
                check=False,
                env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
            )
            if out.returncode != 0:
                print(f"trees: {tree}: {out.stderr.strip()[-500:]}", file=sys.stderr)
                return 1
            runs[tree].append(json.loads(out.stdout.splitlines()[-1]))
    cols = ("own_ms", "child_ms", "own_faults", "child_faults", "rss_mb")
    print(f"{args.rounds} alternated runs of {args.count} connections each; medians\n")
    print(
        "| tree | listener CPU ms | child CPU ms | listener faults | child faults "
        "| listener RSS MB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for tree, results in runs.items():
        med = [statistics.median(r[c] for r in results) for c in cols]
        cells = f"{med[0]:.2f} | {med[1]:.2f} | {med[2]:.0f} | {med[3]:.0f} | {med[4]:.1f}"
        print(f"| {tree} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
