"""mailgrave check: can mailgrave-smtpd reach Dovecot's auth socket? Judged by
the file modes for that user's own uid and gid (PrivateUsers=yes under systemd)."""

from __future__ import annotations

import os
import pwd
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgrave.admin.cli import may_not_connect
from tests.conftest import make_traversable

USER = "nobody"  # not the socket's owner, not in its group


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    run = tmp_path / "run"
    run.mkdir()
    path = run / "auth-mailgrave"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        yield path
    finally:
        server.close()


def test_a_socket_others_may_write_is_reachable(sock: Path) -> None:
    make_traversable(sock.parent)
    sock.chmod(0o666)
    assert may_not_connect(str(sock), USER) is None


def test_dovecots_default_0600_is_named_with_the_fix(sock: Path) -> None:
    if os.getuid() == pwd.getpwnam(USER).pw_uid:
        pytest.skip("runs as the user the check is about")
    make_traversable(sock.parent)
    sock.chmod(0o600)
    why = may_not_connect(str(sock), USER)
    assert why is not None and f"{USER} may not connect to {sock}" in why
    assert "mode 0600" in why and f"unix_listener user = {USER}" in why


def test_the_owner_and_the_group_of_the_user_may(sock: Path) -> None:
    make_traversable(sock.parent)
    pw = pwd.getpwnam(USER)
    if os.getuid() != 0:
        pytest.skip("chown needs root")
    os.chown(sock, pw.pw_uid, 0)
    sock.chmod(0o600)
    assert may_not_connect(str(sock), USER) is None
    os.chown(sock, 0, pw.pw_gid)
    sock.chmod(0o660)
    assert may_not_connect(str(sock), USER) is None


def test_a_directory_it_cannot_enter_is_named(sock: Path) -> None:
    if os.getuid() == pwd.getpwnam(USER).pw_uid:
        pytest.skip("runs as the user the check is about")
    make_traversable(sock.parent)
    sock.chmod(0o666)
    sock.parent.chmod(0o700)
    why = may_not_connect(str(sock), USER)
    assert why is not None and f"may not enter {sock.parent} (mode 0700)" in why


def test_no_such_user_is_no_problem(sock: Path) -> None:
    sock.chmod(0o600)
    assert may_not_connect(str(sock), "no-such-user-here") is None
