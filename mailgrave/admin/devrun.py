"""``make run``: a development MailGrave from the checkout, everything under ./run/."""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import sys
from pathlib import Path

from mailgrave.admin import cli

DEV_CONFIG = """\
# Development configuration written by `make run`; edit freely.
hostname: mx.example.org
spool: {run}/spool
run_dir: {run}/sockets
local_domains: [example.org]
relay_networks: ["127.0.0.0/8", "::1/128"]
local:
  mailbox: maildir
  aliases: {run}/aliases
  virtual_user: {user}
  virtual:
    alice@example.org: {run}/mail/alice/Maildir/
    bob@example.org: {run}/mail/bob/Maildir/
    postmaster@example.org: {run}/mail/postmaster/Maildir/
queue:
  lifetime: 5d
remote:
  # Never ask the machine's resolver from a development instance.
  dns:
    nameservers: ["127.0.0.1"]
"""

ALIASES = """\
# Development aliases (the /etc/aliases format).
root: postmaster@example.org
abuse: postmaster@example.org
"""

WRAPPER = """\
#!/bin/sh
# sendmail for the development instance started by `make run`.
exec {bin}/mailgrave-inject --config {config} "$@"
"""


ADMIN_WRAPPER = """\
#!/bin/sh
# mailgrave (queue, check, user) for the development instance started by `make run`.
exec {bin}/mailgrave --config {config} "$@"
"""


def _write_admin_wrapper(bindir: Path, config: Path) -> None:
    wrapper = bindir / "mailgrave"
    wrapper.write_text(ADMIN_WRAPPER.format(bin=Path(sys.executable).parent, config=config))
    wrapper.chmod(0o755)


def _reachable_by(user: str, path: Path) -> bool:
    pw = pwd.getpwnam(user)
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_uid == pw.pw_uid:
            continue
        if not st.st_mode & 0o001:
            return False
    return True


def prepare(run: Path) -> Path:
    """Create ./run/ with a config, aliases, a sendmail wrapper and mailboxes."""
    run.mkdir(exist_ok=True)
    user = "nobody" if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
    config = run / "mailgrave.yaml"
    if not config.exists():
        config.write_text(DEV_CONFIG.format(run=run, user=user))
    aliases = run / "aliases"
    if not aliases.exists():
        aliases.write_text(ALIASES)
    bindir = run / "bin"
    bindir.mkdir(exist_ok=True)
    for name in ("sendmail", "mailq"):
        wrapper = bindir / name
        text = WRAPPER.format(bin=Path(sys.executable).parent, config=config)
        if name == "mailq":
            text = text.replace('"$@"', '-bp "$@"')
        wrapper.write_text(text)
        wrapper.chmod(0o755)
    _write_admin_wrapper(bindir, config)
    mail = run / "mail"
    if os.getuid() == 0 and not mail.is_symlink() and not mail.exists():
        # Delivery never runs as root: mailboxes belong to `nobody`, and must be
        # reachable by it even when the checkout lives under /root.
        if not _reachable_by(user, run):
            outside = Path("/var/tmp") / f"mailgrave-run-{abs(hash(str(run))) % 10**8}"
            outside.mkdir(mode=0o755, exist_ok=True)
            mail.symlink_to(outside)
        else:
            mail.mkdir()
    mail.mkdir(exist_ok=True)
    if os.getuid() == 0:
        pw = pwd.getpwnam(user)
        shutil.chown(mail.resolve(), pw.pw_uid, pw.pw_gid)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a development MailGrave under ./run/")
    parser.add_argument("--port", type=int, default=2525, help="SMTP port on 127.0.0.1")
    parser.add_argument("--dir", default="run", help="directory for config, spool, mail")
    args = parser.parse_args(argv)
    run = Path(args.dir).resolve()
    config = prepare(run)
    print(f"make run: config {config}")
    print(
        "          send a message:  printf 'Subject: hi\\n\\nhello\\n' | "
        f"{run}/bin/sendmail alice@example.org"
    )
    print(f"          over SMTP:       swaks --server 127.0.0.1:{args.port} --to alice@example.org")
    print(f"          mail lands in:   {run}/mail/alice/Maildir/new/")
    print(f"          the queue:       {run}/bin/mailq, or {run}/bin/mailgrave queue")
    sys.stdout.flush()
    return cli.main(["--config", str(config), "run", "--listen", f"127.0.0.1:{args.port}"])


if __name__ == "__main__":
    sys.exit(main())
