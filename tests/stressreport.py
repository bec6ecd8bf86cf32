"""What a test tells `make stress` (bench/stress.py) beyond passing: its own table
rows (cases it counted) and RSS figures, and how long its fixed-time parts run.

Under `make test` nothing is written and the short durations apply; bench/stress.py
sets ``MAILGRAVE_STRESS_REPORT`` (a JSON-lines file it reads back) and
``MAILGRAVE_STRESS_SECONDS`` (the long form).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType


def bench_stress() -> ModuleType:
    """bench/stress.py as a module (its fuzz mutator and helpers; bench/ is no package)."""
    path = Path(__file__).resolve().parent.parent / "bench" / "stress.py"
    spec = importlib.util.spec_from_file_location("stress", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds(short: float) -> float:
    """How long a fixed-time part runs: ``short`` in `make test`, the stress figure in
    `make stress`."""
    return float(os.environ.get("MAILGRAVE_STRESS_SECONDS", short))


def _write(item: list[object]) -> None:
    path = os.environ.get("MAILGRAVE_STRESS_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(item) + "\n")


def row(part: str, cases: int, wrong: int = 0, crashes: int = 0, hangs: int = 0) -> None:
    """A row of the main table (part, cases, acked..dups not measured, wrong, crashes, hangs)."""
    _write(["row", part, cases, "-", "-", "-", "-", wrong, crashes, hangs])


def rss(load: str, stage: str, before_kb: int, after_kb: int) -> None:
    """A stage's VmRSS before and after a load."""
    _write(["rss", load, stage, before_kb, after_kb])
