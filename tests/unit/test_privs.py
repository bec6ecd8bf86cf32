"""mailgrave.privs.plan: who a stage becomes, decided before anything changes."""

from __future__ import annotations

import os
import pwd

import pytest

from mailgrave import privs


def _as_nobody(body: object) -> int:
    """Run ``body()`` in a child that is no longer root; its exit code (0: passed)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            nobody = pwd.getpwnam("nobody")
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            body()  # type: ignore[operator]
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _stays() -> None:
    # A unit's User= runs the stage as its own user with no --user: it stays so.
    assert privs.plan(None, None, handed_over=True) == privs.Plan()
    assert privs.plan(None, None, handed_over=False) == privs.Plan()


def _chroot_refused() -> None:
    with pytest.raises(privs.PrivsError):
        privs.plan("nobody", "/tmp")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_not_root_without_user_stays_who_it_is() -> None:
    assert _as_nobody(_stays) == 0
    assert _as_nobody(_chroot_refused) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule for root")
def test_root_without_user_is_refused_unless_handed_its_sockets() -> None:
    with pytest.raises(privs.PrivsError) as refused:
        privs.plan(None)
    assert refused.value.exit_code == 64
    assert privs.plan(None, handed_over=True) == privs.Plan()
    assert privs.plan(None, required=False) == privs.Plan()
