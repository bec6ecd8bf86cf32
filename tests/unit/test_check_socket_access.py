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


@pytest.mark.parametrize(
    ("sock_mode", "dir_mode", "said"),
    [
        # Dovecot's default listener mode: the reason and the fix
        (0o600, 0o711, "{user} may not connect to {sock} (root:root, mode 0600): "
         "give Dovecot's unix_listener user = {user}"),
        (0o666, 0o700, "{user} may not enter {dir} (mode 0700) to reach {sock}"),
    ],
)  # fmt: skip
def test_what_keeps_the_user_out_is_named(
    sock: Path, sock_mode: int, dir_mode: int, said: str
) -> None:
    if os.getuid() != 0:
        pytest.skip("the socket must belong to root, not to the user checked")
    make_traversable(sock.parent)
    sock.chmod(sock_mode)
    sock.parent.chmod(dir_mode)
    why = may_not_connect(str(sock), USER)
    assert why is not None and said.format(user=USER, sock=sock, dir=sock.parent) in why, why


def test_no_such_user_is_no_problem(sock: Path) -> None:
    sock.chmod(0o600)
    assert may_not_connect(str(sock), "no-such-user-here") is None
