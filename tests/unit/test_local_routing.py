"""Aliases parsing and address resolution (mailgrave.local.routing)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from mailgrave import config
from mailgrave.errors import PermFail, TempFail
from mailgrave.recipients import (
    Router,
    Target,
    parse_alias_items,
    read_aliases,
    recipient_exists,
)
from tests.conftest import Instance


def test_alias_items_split_at_commas_outside_quotes() -> None:
    assert parse_alias_items(' a, b@example.net ,"|cmd --x, y",/var/log/m ,') == [
        "a",
        "b@example.net",
        "|cmd --x, y",
        "/var/log/m",
    ]
    assert parse_alias_items("") == []


def test_aliases_file_comments_continuations_quotes(tmp_path: Path) -> None:
    path = tmp_path / "aliases"
    path.write_text(
        "# comment line\n"
        "\n"
        "Team: alice,\n"
        "  bob@example.net,\n"
        "\tcarol\n"
        '"quoted": "|/usr/bin/procmail -a x", /tmp/file\n'
        "inc: :include:/etc/list\n"
        "no colon here\n"
        "   # indented comment\n"
    )
    assert read_aliases(str(path)) == {
        "team": ["alice", "bob@example.net", "carol"],
        "quoted": ["|/usr/bin/procmail -a x", "/tmp/file"],
        "inc": [":include:/etc/list"],
    }
    assert read_aliases(str(tmp_path / "missing")) == {}


def router(tmp_path: Path, aliases: str = "", **local: object) -> Router:
    inst = Instance(tmp_path, local=local)
    if "virtual" in local:  # replace, not merge
        inst.settings["local"]["virtual"] = local["virtual"]
        inst.write_config()
    (tmp_path / "aliases").write_text(aliases)
    return Router(config.load(str(inst.config_path)))


def test_virtual_mailbox_case_insensitive_and_with_extension(tmp_path: Path) -> None:
    r = router(tmp_path)
    user = r.config.local.virtual_user
    want = Target("maildir", r.config.local.virtual["alice@example.org"], user)
    assert r.resolve("alice@example.org") == [want]
    assert r.resolve("Alice@Example.ORG") == [want]
    assert r.resolve("alice+lists@example.org") == [want]


def test_aliases_recursive_with_loop_and_remote_forward(tmp_path: Path) -> None:
    r = router(
        tmp_path,
        "staff: alice, ring\nring: staff, bob, ext@example.net\nsales: staff\n",
    )
    got = r.resolve("sales@example.org")
    kinds = sorted((t.kind, t.value) for t in got)
    assert kinds == sorted(
        [
            ("maildir", r.config.local.virtual["alice@example.org"]),
            ("maildir", r.config.local.virtual["bob@example.org"]),
            ("forward", "ext@example.net"),
        ]
    )
    # forwarding and commands never run as root
    assert all(t.user != "root" for t in got)


def test_pipe_file_and_include_run_as_default_user(tmp_path: Path) -> None:
    inc = tmp_path / "list.inc"
    inc.write_text("# members\nalice\nbob, other@example.net\n")
    r = router(tmp_path, f'x: "|exec cat", /srv/archive\nlist: :include:{inc}\n')
    assert r.resolve("x@example.org") == [
        Target("pipe", "exec cat", "nobody"),
        Target("file", "/srv/archive", "nobody"),
    ]
    assert [t.value for t in r.resolve("list@example.org")][-1] == "other@example.net"
    assert len(r.resolve("list@example.org")) == 3


def test_extension_kept_and_delimiter_configurable(tmp_path: Path) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    if os.getuid() == 0:
        me = "nobody"  # any non-root system user
    r = router(tmp_path, recipient_delimiter="-")
    [t] = r.resolve(f"{me}-box@example.org")
    assert (t.kind, t.user, t.extension) == ("user", me, "box")
    assert r.resolve(f"{me.upper()}@example.org")[0].user == me  # case-insensitive local part
    with pytest.raises(PermFail, match=r"^5\.1\.1"):
        r.resolve(f"{me}+box@example.org")  # "+" is not the delimiter here


def test_postmaster_chain_and_unknown(tmp_path: Path) -> None:
    r = router(tmp_path, virtual={})
    for name in ("MAILER-DAEMON", "postmaster", "root"):
        [t] = r.resolve(f"{name}@example.org")
        assert t == Target("mbox", r.config.local.root_mailbox, t.user)
        assert pwd.getpwnam(t.user).pw_uid != 0 or os.getuid() != 0  # never written as root
    (tmp_path / "aliases").write_text("root: ops@example.net\n")
    r = Router(r.config)
    assert [t.kind for t in r.resolve("postmaster@example.org")] == ["forward"]
    with pytest.raises(PermFail, match=r"^5\.1\.1"):
        r.resolve("no-such-person@example.org")


def test_recipient_exists_for_smtpd(tmp_path: Path) -> None:
    inst = Instance(tmp_path)
    (tmp_path / "aliases").write_text("info: alice\n")
    cfg = config.load(str(inst.config_path))
    assert recipient_exists(cfg, "info", "example.org")
    assert recipient_exists(cfg, "INFO+x", "example.org")
    assert recipient_exists(cfg, "postmaster", "example.org")
    assert recipient_exists(cfg, "bob", "example.org")
    assert not recipient_exists(cfg, "mallory", "example.org")


def test_unreadable_include_is_temporary_and_accepted_at_rcpt(tmp_path: Path) -> None:
    r = router(tmp_path, f"list: :include:{tmp_path}/missing.inc\n")
    with pytest.raises(TempFail, match=r"^4\.3\.0"):
        r.resolve("list@example.org")
    assert r.exists("list@example.org")  # smtpd accepts; delivery retries
