"""The development instance: `make run` needs no lint tools; its wrappers use the dev config."""

from __future__ import annotations

import subprocess
from pathlib import Path

from mailgrave.admin import devrun
from tests.conftest import ROOT


def test_make_run_does_not_install_the_lint_tools() -> None:
    # -n: print what would run; -B: as on a fresh clone (every target out of date).
    plan = subprocess.run(
        ["make", "-n", "-B", "run"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "mailgrave.admin.devrun" in plan
    for tool in ("ruff", "mypy", "import-linter"):
        assert tool not in plan, plan
    lint = subprocess.run(
        ["make", "-n", "-B", "lint"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "pip install" in lint and "ruff mypy import-linter" in lint


def test_run_bin_mailgrave_is_the_admin_command_with_the_dev_config(tmp_path: Path) -> None:
    config = devrun.prepare(tmp_path / "run")
    bindir = tmp_path / "run" / "bin"
    assert sorted(p.name for p in bindir.iterdir()) == ["mailgrave", "mailq", "sendmail"]
    res = subprocess.run([bindir / "mailgrave", "check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{config}: ok")
    res = subprocess.run([bindir / "mailgrave", "queue"], capture_output=True, text=True)
    assert f"no spool at {tmp_path}/run/spool" in res.stderr  # the dev spool, not /var/spool
