"""`make stress` (issue 13): the fault and hostile-input parts, one table.

A script in bench/ rather than pytest: it runs for minutes, is not part of
`make test`, and prints one table. Its parts are the integration tests of
each item (run with pytest, each a case with its expected reply) and an
in-process fuzz of the protocol core (mutations of the real dialogs in
tests/integration/dialogs/), and kill -9 of each stage under load (one row per
stage; the harness is tests/integration/killstages.py, whose short form runs in
`make test`). Bounded: a fixed number of inputs and messages, pytest parts that
stop by themselves, and a bounded wait for each spool to drain.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mailgrave.smtp import server as S  # noqa: E402
from tests.integration import killstages  # noqa: E402
from tests.unit.test_smtp_server import FakePolicy  # noqa: E402

PARTS = [
    ("relay battery", "tests/integration/test_relay_battery.py"),
    ("hostile corpus (core)", "tests/unit/test_smtp_hostile.py"),
    ("hostile corpus (programs)", "tests/integration/test_hostile.py"),
    ("slowness and floods", "tests/integration/test_smtpd_slow.py"),
    ("full disk and reserve", "tests/integration/test_full_disk.py"),
    ("dead peers and DNS", "tests/integration/test_dead_peers.py"),
    ("full Maildir", "tests/integration/test_full_maildir.py"),
    ("socket fuzz (pytest)", "tests/integration/test_socket_fuzz.py"),
]
# The long form of the parts that run for a fixed time (tests/stressreport.py).
STRESS_ENV = {"MAILGRAVE_STRESS_SECONDS": "60"}
COLUMNS = ("part", "cases/msgs", "acked", "delivered", "lost", "dups", "wrong", "crashes", "hangs")


def seeds() -> list[bytes]:
    """What the client sends in each dialog file, as one byte string."""
    out = []
    for path in sorted((ROOT / "tests/integration/dialogs").glob("*.dialog")):
        data = b""
        for line in path.read_text().splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "c:":
                data += rest.encode() + b"\r\n"
            elif kind == "c!":
                data += rest.encode().decode("unicode_escape").encode("latin-1")
        out.append(data)
    return out


TOKENS = [b"\r\n", b"\n", b"\r", b"\x00", b".", b"\r\n.\r\n", b"<", b">", b"@", b'"', b"\xff"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 1:
            buf[pos:pos] = rng.choice(TOKENS)
        elif op == 2 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 3:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            start = rng.randrange(len(buf) + 1)
            buf[pos:pos] = buf[start : start + rng.randint(1, 64)]
    return bytes(buf)


def feed(data: bytes, rng: random.Random) -> None:
    """One session over the core, split at random points; raises on a defect."""
    server = S.Server(FakePolicy(max_message_size=5000, tls_available=True))  # type: ignore[arg-type]
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 300)
        events = server.receive_data(data[pos : pos + step])
        pos += step
        while events:
            ev = events.pop(0)
            if isinstance(ev, S.Output):
                assert ev.data.endswith(b"\r\n") and ev.data[:1] in b"2345", ev.data
            elif isinstance(ev, S.MessageComplete):
                events += server.message_queued("Q1")
            elif isinstance(ev, S.StartTLS):
                events += server.tls_started()
    server.receive_data(b"")


def fuzz_slice(count: int, seed: int) -> tuple[int, int]:
    """``count`` inputs from ``seed``: (crashes, hangs)."""
    rng = random.Random(seed)
    corpus = seeds()
    crashes = hangs = 0
    for _ in range(count):
        data = mutate(rng, rng.choice(corpus))
        start = time.monotonic()
        try:
            feed(data, rng)
        except Exception as exc:  # a defect: reported, and shown once
            if crashes == 0:
                print(f"fuzz crash on {data!r}: {exc!r}", file=sys.stderr)
            crashes += 1
        if time.monotonic() - start > 1.0:
            hangs += 1
    return crashes, hangs


def _slice(args: tuple[int, int]) -> tuple[int, int]:
    return fuzz_slice(*args)


def fuzz(count: int, seed: int, jobs: int = 0) -> list[object]:
    """The core fuzz over ``jobs`` processes (default: one per CPU), each with a
    seed of its own (``seed``, ``seed + 1``, ...), so the inputs differ."""
    jobs = jobs or os.cpu_count() or 1
    shares = [count // jobs + (i < count % jobs) for i in range(jobs)]
    start = time.monotonic()
    if jobs == 1:
        results = [fuzz_slice(count, seed)]
    else:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_slice, [(n, seed + i) for i, n in enumerate(shares)])
    took = time.monotonic() - start
    crashes, hangs = sum(r[0] for r in results), sum(r[1] for r in results)
    print(f"fuzz core: {count} inputs in {took:.0f} s over {jobs} processes", file=sys.stderr)
    name = f"fuzz core ({len(seeds())} seeds)"
    return [name, count, "-", "-", "-", "-", 0, crashes, hangs]


def pytest_part(name: str, path: str, extra: list[list[object]]) -> list[object]:
    """The part's tests as one row; rows and figures the tests report
    (tests/stressreport.py) are added to ``extra``."""
    with tempfile.NamedTemporaryFile(prefix="mailgrave-stress-", suffix=".jsonl") as report:
        env = {**os.environ, **STRESS_ENV, "MAILGRAVE_STRESS_REPORT": report.name}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        extra += [json.loads(line) for line in Path(report.name).read_text().splitlines()]
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|skipped)", tail)}
    cases = sum(counts.values())
    wrong = counts.get("failed", 0)
    crashes = counts.get("error", 0)
    if wrong or crashes:
        print(proc.stdout[-4000:], file=sys.stderr)
    return [name, cases, "-", "-", "-", "-", wrong, crashes, 0]


def table(columns: tuple[str, ...], rows: list[list[object]]) -> None:
    widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


RSS_COLUMNS = ("load", "stage", "RSS before (kB)", "RSS after (kB)", "growth (kB)")


def reported(extra: list[list[object]]) -> tuple[list[list[object]], list[list[object]]]:
    """The tests' own rows of the main table, and the RSS table."""
    rows = [r[1:] for r in extra if r[0] == "row"]
    rss = [[*r[1:], int(str(r[4])) - int(str(r[3]))] for r in extra if r[0] == "rss"]
    return rows, rss


def kill_parts(total: int, stages: list[str], seed: int) -> tuple[list[list[object]], bool]:
    """One row per stage killed, ``total`` messages split evenly among them; the
    details (kills, duplicates per kill, half-visible, debris) go to stderr."""
    base = Path(tempfile.mkdtemp(prefix="mailgrave-stress-"))
    os.chmod(base, 0o711)
    rows, bad = [], False
    try:
        for stage in stages:
            out = killstages.run_stage(base / stage, stage, total // len(stages), seed=seed)
            print(out.detail(), file=sys.stderr, flush=True)
            rows.append(out.row())
            bad |= bool(out.lost or out.half_visible)
    finally:
        if not os.environ.get("MAILGRAVE_KEEP_TEST_DIRS"):
            shutil.rmtree(base, ignore_errors=True)
    return rows, bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fuzz", type=int, default=1_000_000, help="inputs for the core fuzz")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--jobs", type=int, default=0, help="fuzz processes (default: CPUs)")
    ap.add_argument("--skip-tests", action="store_true", help="no pytest parts")
    ap.add_argument(
        "--kill-messages",
        type=int,
        default=10_000,
        help="messages for the kill -9 rows, split among the stages (0: none)",
    )
    ap.add_argument(
        "--kill-stages",
        default=",".join(killstages.STAGES),
        help="the stages to kill, comma-separated (default: every one)",
    )
    args = ap.parse_args()
    rows: list[list[object]] = []
    extra: list[list[object]] = []
    if not args.skip_tests:
        rows += [pytest_part(name, path, extra) for name, path in PARTS]
    if args.fuzz:
        rows.append(fuzz(args.fuzz, args.seed, args.jobs))
    kill_bad = False
    if args.kill_messages:
        stages = [s for s in args.kill_stages.split(",") if s]
        kill_rows, kill_bad = kill_parts(args.kill_messages, stages, args.seed)
        rows += kill_rows
    own, rss = reported(extra)
    rows += own
    table(COLUMNS, rows)
    if rss:
        print()
        table(RSS_COLUMNS, rss)
    bad = kill_bad or any(r[6] or r[7] or r[8] or (r[4] not in ("-", 0)) for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
