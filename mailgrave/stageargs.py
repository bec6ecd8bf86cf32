"""The command-line flags every stage program shares, in one place.

Each stage's ``main()`` adds its own flags (--in, --out, --user, ...) to the
parser made here; the ones that mean the same everywhere are defined once.
mailgrave-smtpd, whose per-connection start avoids argparse's import cost,
and the sendmail interface, whose flags are sendmail's, do not use it.
"""

from __future__ import annotations

import argparse

from mailgrave import config as configmod


def stage_parser(prog: str, description: str, *, sender: bool = False) -> argparse.ArgumentParser:
    """A parser with --config and --debug, and --sender for the stages that also
    deliver a message given on standard input by hand."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help=f"configuration file (default: {configmod.DEFAULT_PATH})")
    if sender:
        parser.add_argument("--sender", default="", help="envelope sender (by hand; default: <>)")
    parser.add_argument("--debug", action="store_true", help="log debugging detail")
    return parser
