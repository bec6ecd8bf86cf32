"""Summarise a py-spy raw (collapsed) profile recorded with --subprocesses.

Groups samples by MailGrave program (smtpd parent and per-connection
children apart), then lists each program's heaviest functions by self time
and by inclusive time. Usage: pyspy_summary.py PROFILE.txt [TOP]
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

PROC = re.compile(r'^process (\d+):"([^"]*)"')


def kind(cmd: str) -> str:
    words = cmd.split()
    for word in words[:3]:
        if word.startswith("mailgrave."):  # python -m mailgrave.STAGE (mailgrave run)
            return word.removeprefix("mailgrave.")
        base = word.rsplit("/", 1)[-1]
        if base == "mailgrave":
            return "run"
        if base.startswith("mailgrave-"):
            return base.removeprefix("mailgrave-")
    return words[0].rsplit("/", 1)[-1] if words else "?"


def frame_name(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py:123)"
    m = re.match(r"(.*) \((.*?):(\d+)\)$", frame)
    if not m:
        return frame
    path = m.group(2)
    short = path.split("/mailgrave/")[-1] if "/mailgrave/" in path else path.rsplit("/", 1)[-1]
    return f"{m.group(1)} ({short})"


def summarise(path: str, top: int = 12) -> str:
    self_t: dict[str, Counter[str]] = defaultdict(Counter)
    incl: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    pids: dict[str, set[str]] = defaultdict(set)
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        # With --subprocesses each ancestor is a "process PID:..." frame: the last one counts.
        procs = [i for i, f in enumerate(frames) if PROC.match(f)]
        k = "?"
        if procs:
            m = PROC.match(frames[procs[-1]])
            assert m
            k = kind(m.group(2))
            pid = m.group(1)
            frames = frames[procs[-1] + 1 :]
        frames = [f for f in frames if not f.startswith("thread ")]
        # In the smtpd, the children run serve_connection; the parent does not.
        if k == "smtpd":
            k = "smtpd child" if any("serve_connection" in f for f in frames) else "smtpd parent"
        if procs:
            pids[k].add(pid)
        totals[k] += n
        names = [frame_name(f) for f in frames]
        if names:
            self_t[k][names[-1]] += n
        for name in set(names):
            incl[k][name] += n
    grand = sum(totals.values()) or 1
    out = [f"{sum(totals.values())} samples"]
    for k, n in totals.most_common():
        out.append(f"\n## {k}: {n} samples ({100 * n / grand:.0f}%), {len(pids[k]) or '?'} pids")
        out.append("self:")
        for name, c in self_t[k].most_common(top):
            out.append(f"  {100 * c / n:5.1f}%  {name}")
        out.append("inclusive:")
        for name, c in incl[k].most_common(top + 8):
            if "<module> (runpy" in name or name.startswith("_run_"):
                continue
            out.append(f"  {100 * c / n:5.1f}%  {name}")
    return "\n".join(out)


if __name__ == "__main__":
    print(summarise(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 12))
