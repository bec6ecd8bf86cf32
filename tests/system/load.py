"""A short mail load on a booted container while its units are killed (issue 13).

Messages come from two sides at once: sendmail inside the container (as a user, a
script run with the container's python3) and SMTP from the host through
mailgrave.socket.  Each message is numbered: ``Subject: load ID`` and a body that
ends with ``END ID``, so a delivered copy is complete only if that line closes it.
Every message whose submission was acknowledged (sendmail exit 0, 250 after DATA)
is recorded; :func:`scan` reads back what is where.
"""

from __future__ import annotations

import json
import smtplib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.system.container import Container

BODY_LINES = 200  # about 2.5 KB a message


def message(ident: str, sender: str, rcpt: str) -> str:
    lines = "".join(f"line {i} of {ident}\n" for i in range(BODY_LINES))
    return f"From: {sender}\nTo: {rcpt}\nSubject: load {ident}\n\n{lines}END {ident}\n"


def complete(text: str, ident: str) -> bool:
    return text.replace("\r\n", "\n").endswith(f"\nEND {ident}\n")


# Run inside the container as root: sendmail as USER, PARALLEL at a time, until
# STOP exists or MOST messages were tried (NLINES body lines each, as message()
# writes them); one JSON line per message.
SENDMAIL_LOAD = r"""
import json, os, subprocess, sys, threading
user, stop = sys.argv[1], sys.argv[2]
parallel, most, nlines = (int(a) for a in sys.argv[3:6])
rcpts = sys.argv[6:]
lock = threading.Lock()
count = [0]
def body(ident, rcpt):
    lines = "".join(f"line {i} of {ident}\n" for i in range(nlines))
    return f"From: {user}\nTo: {rcpt}\nSubject: load {ident}\n\n{lines}END {ident}\n"
def worker():
    while not os.path.exists(stop):
        with lock:
            n = count[0]
            if n >= most:
                return
            count[0] += 1
        ident, rcpt = f"c{n}", rcpts[n % len(rcpts)]
        try:
            rc = subprocess.run(["/usr/sbin/sendmail", "-i", rcpt], input=body(ident, rcpt),
                                text=True, user=user, group=user, extra_groups=[],
                                capture_output=True, timeout=60).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        with lock:
            print(json.dumps({"id": ident, "rcpt": rcpt, "rc": rc}), flush=True)
threads = [threading.Thread(target=worker) for _ in range(parallel)]
for t in threads: t.start()
for t in threads: t.join()
"""

# Run inside the container: for each directory given, every regular file's load id
# (None if it has none), whether it is complete, and its size.
SCAN = r"""
import json, os, re, sys
out = {}
for d in sys.argv[1:]:
    found = []
    for name in (sorted(os.listdir(d)) if os.path.isdir(d) else []):
        path = os.path.join(d, name)
        if not os.path.isfile(path):
            continue
        text = open(path, errors="replace").read()
        m = re.search(r"^Subject: load (\S+)$", text, re.M)
        ident = m.group(1) if m else None
        done = bool(ident) and text.endswith(f"\nEND {ident}\n")
        found.append([name, ident, done, len(text)])
    out[d] = found
print(json.dumps(out))
"""


def scan(box: Container, *dirs: str) -> dict[str, list[tuple[str, str | None, bool, int]]]:
    """What each directory in the container holds: (file, load id, complete, size)."""
    raw = json.loads(box.run("python3", "-c", SCAN, *dirs).stdout)
    return {d: [tuple(f) for f in files] for d, files in raw.items()}  # type: ignore[misc]


@dataclass
class Load:
    """The acknowledged and the refused submissions, by message id."""

    acked: dict[str, str] = field(default_factory=dict)  # id -> recipient
    refused: dict[str, str] = field(default_factory=dict)  # id -> why
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, ident: str, rcpt: str, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.acked[ident] = rcpt
            else:
                self.refused[ident] = error


def smtp_load(
    load: Load,
    server: str,
    rcpts: list[str],
    stop: threading.Event,
    prefix: str,
    most: int,
) -> None:
    """One host-side client: a connection per message through mailgrave.socket (so
    per-connection units come and go), until ``stop`` or ``most`` messages."""
    for n in range(most):
        if stop.is_set():
            return
        ident, rcpt = f"{prefix}{n}", rcpts[n % len(rcpts)]
        text = message(ident, "load@client.test", rcpt).replace("\n", "\r\n")
        try:
            with smtplib.SMTP(server, 25, local_hostname="client.test", timeout=30) as s:
                s.sendmail("load@client.test", [rcpt], text.encode())
                load.record(ident, rcpt, None)  # 250 after DATA: acknowledged
                try:
                    s.quit()
                except (smtplib.SMTPException, OSError):
                    pass  # acknowledged already
        except (smtplib.SMTPException, OSError) as exc:
            if ident not in load.acked:
                load.record(ident, rcpt, f"{type(exc).__name__}: {exc}"[:200])
            time.sleep(0.1)


def sendmail_load(
    load: Load, box: Container, user: str, rcpts: list[str], stop_file: str, most: int
) -> None:
    """sendmail inside the container, 3 at a time, until ``stop_file`` exists."""
    result = box.run(
        "python3",
        "-c",
        SENDMAIL_LOAD,
        user,
        stop_file,
        "3",
        str(most),
        str(BODY_LINES),
        *rcpts,
        timeout=600,
    )
    for line in result.stdout.splitlines():
        rec = json.loads(line)
        load.record(rec["id"], rec["rcpt"], None if rec["rc"] == 0 else f"exit {rec['rc']}")


def running(box: Container, unit: str) -> bool:
    """Has ``unit`` (or, for a pattern, any unit it matches) a live process?"""
    if "*" in unit:
        out = box.run(
            "systemctl", "list-units", "--plain", "--no-legend", "--state=running", unit
        ).stdout
        return bool(out.strip())
    pid = box.run("systemctl", "show", "-p", "MainPID", "--value", unit).stdout.strip()
    return pid not in ("", "0")


def kill_in_turn(
    box: Container, units: tuple[str, ...], rounds: int, pause: float, wait: float
) -> list[tuple[str, bool]]:
    """``systemctl kill -s KILL`` each unit in turn, ``rounds`` times: each as soon as it
    runs (waiting up to ``wait`` s for it), then ``pause`` s.  Returns (unit, hit):
    hit when it was running and the kill was accepted."""
    done: list[tuple[str, bool]] = []
    for _ in range(rounds):
        for unit in units:
            deadline = time.monotonic() + wait
            hit = False
            while time.monotonic() < deadline:
                if running(box, unit):
                    res = box.run("systemctl", "kill", "-s", "KILL", unit, check=False)
                    if res.returncode == 0:
                        hit = True
                        break
                time.sleep(0.05)
            done.append((unit, hit))
            time.sleep(pause)
    return done


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
