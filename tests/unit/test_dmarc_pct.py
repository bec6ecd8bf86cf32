"""DMARC pct= (RFC 7489 §6.6.4): what a failure comes to, the sample given."""

from __future__ import annotations

import pytest

from mailgrave.queue.authcheck import disposition, percent


@pytest.mark.parametrize(
    ("tag", "value"),
    [(None, 100), ("100", 100), ("0", 0), ("37", 37), ("101", 100), ("-1", 100), ("x", 100)],
)
def test_percent_is_0_to_100_and_100_when_absent_or_bad(tag: str | None, value: int) -> None:
    assert percent(tag) == value


def test_the_sample_applies_the_policy_the_rest_get_the_next_lower_one() -> None:
    assert [disposition("reject", 30, roll) for roll in (0, 29, 30, 99)] == [
        "reject",
        "reject",
        "quarantine",
        "quarantine",
    ]
    assert [disposition("quarantine", 30, roll) for roll in (29, 30)] == ["quarantine", "none"]
    assert disposition("none", 100, 0) == "none"


def test_pct_0_never_and_pct_100_always() -> None:
    assert {disposition("reject", 0, roll) for roll in range(100)} == {"quarantine"}
    assert {disposition("reject", 100, roll) for roll in range(100)} == {"reject"}


def test_the_default_roll_is_uniform_over_0_to_99() -> None:
    from mailgrave import config
    from mailgrave.queue.authcheck import Checker

    checker = Checker(config.parse_text(""))
    seen = {checker.roll() for _ in range(5000)}
    assert seen <= set(range(100)) and len(seen) > 90
