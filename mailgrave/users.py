"""The SMTP AUTH users file (``auth.users_file``): ``name:hash`` lines, Argon2id hashes.

mailgrave-smtpd verifies against it; ``mailgrave user`` edits it. The hashes
come from Debian's python3-argon2 (argon2-cffi): Argon2id is the password
hash RFC 9106 recommends, and argon2-cffi does one thing (hash, verify, tell
whether a hash needs renewing) over the reference C implementation, where
passlib would bring dozens of schemes we do not want to accept, and has had
no release since 2020 (docs/security.md).

argon2 is imported only when a password is hashed or verified: mailgrave-smtpd
starts once per connection, and only a session that authenticates pays for it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# RFC 9106 §4's second recommended option (64 MiB, 3 passes, 4 lanes): about
# 0.2 s per verification on a 2-core machine, in the session's own process.
TIME_COST = 3
MEMORY_COST = 64 * 1024  # KiB
PARALLELISM = 4

# A hash of a random password nobody knows, with the parameters above: an
# unknown user name is verified against it, so that it takes as long as a
# known one with a wrong password (no timing oracle for user names).
DUMMY_HASH = "$argon2id$v=19$m=65536,t=3,p=4$vZzYYhRIn3FMAmaqzAh/qw$6aXcEe8826zZ8evQ7Y43cw"

MAX_NAME = 255


class UsersError(Exception):
    """The users file cannot be read or written, or a name is not acceptable."""


def check_name(name: str) -> str:
    """A login name: printable, no ``:``, no white space, at most 255 octets."""
    if (
        not name
        or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME
        or any(c in name for c in ":\0\r\n")
        or not name.isprintable()
        or any(c.isspace() for c in name)
    ):
        raise UsersError(f"not an acceptable login name: {name!r}")
    return name


def _hasher() -> Any:
    import argon2  # only when a password is hashed or checked (see the module's docstring)

    return argon2.PasswordHasher(
        time_cost=TIME_COST, memory_cost=MEMORY_COST, parallelism=PARALLELISM
    )


def hash_password(password: str) -> str:
    return str(_hasher().hash(password))


def parse(text: str) -> dict[str, str]:
    """``name:hash`` lines (``#`` comments and blank lines allowed) → {name: hash}."""
    users: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, digest = line.partition(":")
        if sep and name and digest:
            users[name] = digest.strip()
    return users


def read(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f.read())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8"
        raise UsersError(f"{path}: cannot read: {reason}") from None


def verify(path: str, login: str, password: str) -> bool:
    """Is ``password`` the password of ``login``? Always one Argon2 verification,
    whether the login exists or not. Raises :class:`UsersError` when the file
    cannot be read (a temporary failure for the client)."""
    digest = read(path).get(login)
    import argon2.exceptions

    try:
        ok = bool(_hasher().verify(digest or DUMMY_HASH, password))
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHash):
        return False
    return ok and digest is not None


def write(path: str, users: dict[str, str], group: str | None = None) -> None:
    """Replace the users file atomically, mode 0640 (root, ``group``): durable."""
    import grp

    from mailgrave.fileio import replace_file

    gid = -1
    if group and os.geteuid() == 0:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            gid = -1
    data = "".join(f"{name}:{digest}\n" for name, digest in sorted(users.items()))
    directory = os.path.dirname(os.path.abspath(path))
    owner = (os.geteuid(), gid) if gid >= 0 else None
    replace_file(path, data.encode("utf-8"), directory, True, mode=0o640, owner=owner)
