"""Failures that every boundary sorts into temporary or permanent, with qmail's exit codes."""

from __future__ import annotations

EXIT_OK = 0
EXIT_PERM = 100
EXIT_TEMP = 111


class DeliveryError(Exception):
    """A failure with a reply text that is safe to show to a peer or a user."""

    exit_code = EXIT_TEMP
    code = "Z"

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class TempFail(DeliveryError):
    """Try again later (qmail's 111, SMTP 4xx)."""


class PermFail(DeliveryError):
    """Will never succeed (qmail's 100, SMTP 5xx)."""

    exit_code = EXIT_PERM
    code = "D"


def exit_for(codes: list[str]) -> int:
    """qmail's exit status for a run of K/Z/D results: 0 all done, 100 only
    permanent failures among the rest, else 111."""
    if all(c == "K" for c in codes):
        return EXIT_OK
    return EXIT_PERM if all(c in ("K", "D") for c in codes) else EXIT_TEMP
