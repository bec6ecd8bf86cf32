"""The short form of `make stress`'s core fuzz (bench/stress.py): mutations of the
real dialogs, split at random points, through the protocol core; nothing escapes."""

from __future__ import annotations

import random

from tests import stressreport

stress = stressreport.bench_stress


def test_5000_mutated_dialogs_raise_nothing_and_hang_nowhere() -> None:
    assert stress().fuzz_slice(5000, 13) == (0, 0)


def test_a_defect_is_counted() -> None:
    """The fuzz would see a crash: a core that raises is counted, not hidden."""
    mod = stress()

    def broken(data: bytes, rng: random.Random) -> None:
        raise ValueError("boom")

    mod.feed = broken
    assert mod.fuzz_slice(3, 1) == (3, 0)
