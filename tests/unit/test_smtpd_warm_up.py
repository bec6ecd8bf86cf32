"""The listener's warm-up session: silent, writes nothing, never stops a start."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgrave import config as configmod
from mailgrave import log as mglog
from mailgrave.smtpd import listener as smtpd


def _config(tmp_path: Path) -> configmod.Config:
    return configmod.parse_text(
        f"hostname: mx.example.org\nspool: {tmp_path}/spool\nrun_dir: {tmp_path}/run\n"
        "relay_networks: [192.0.2.0/24]\nremote: {dns: {nameservers: [127.0.0.1]}}\n"
    )


def test_warm_up_is_silent_and_queues_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Records at INFO to stderr, as the listener logs when journald is absent.
    monkeypatch.setattr(mglog._out, "level", mglog.INFO)
    monkeypatch.setattr(mglog._out, "journal", None)
    monkeypatch.setattr(mglog._out, "stderr", True)
    smtpd._warm_up(_config(tmp_path))
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no "connect from" line for a session no client made
    assert not (tmp_path / "spool").exists() and not (tmp_path / "run").exists()


def test_a_failing_warm_up_does_not_stop_the_listener(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("policy lookup failed")

    monkeypatch.setattr(smtpd, "Session", broken)
    smtpd._warm_up(_config(tmp_path))  # logged at debug level, not raised
