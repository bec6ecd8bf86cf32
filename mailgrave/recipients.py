"""Local routing: which mailboxes, files, commands or addresses a local address means.

Sources, in order: ``local.virtual`` (address → Maildir, delivered as
``local.virtual_user``), the aliases file (``/etc/aliases`` format: addresses,
``|command``, ``/file``, ``:include:``; loops detected), system users
(``user+ext`` too; their ``~/.forward`` is read later, as the user), and the
fallbacks that always exist: MAILER-DAEMON → postmaster → root → the root
mailbox.
"""

from __future__ import annotations

import os
import pwd

from mailgrave.config import Config
from mailgrave.errors import PermFail, TempFail
from mailgrave.record import Record, record

MAX_DEPTH = 20
ALWAYS = ("mailer-daemon", "postmaster", "root")


@record
class Target(Record):
    """One destination: kind is maildir, mbox, file, pipe, forward or user."""

    kind: str
    value: str  # path, command, address, or user name (kind "user": mailbox + .forward)
    user: str  # whose uid the delivery runs as
    extension: str = ""


def parse_alias_items(text: str) -> list[str]:
    """Split an alias right-hand side at commas outside double quotes."""
    items: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            items.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur).strip())
    return [i[1:-1] if len(i) >= 2 and i[0] == i[-1] == '"' else i for i in items if i]


def read_aliases(path: str) -> dict[str, list[str]]:
    """The aliases file as name → items; comments, blank and continuation lines handled."""
    entries: dict[str, list[str]] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            raw = f.read()
    except FileNotFoundError:
        return entries
    logical: list[str] = []
    for line in raw.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[:1] in (" ", "\t") and logical:
            logical[-1] += " " + line.strip()
        else:
            logical.append(line.strip())
    for line in logical:
        name, colon, rest = line.partition(":")
        if not colon or not name.strip():
            continue
        entries[name.strip().strip('"').lower()] = parse_alias_items(rest)
    return entries


class Router:
    """Resolves local addresses for one configuration (aliases read once)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.aliases = read_aliases(config.local.aliases) if config.local.aliases else {}

    def split(self, local: str) -> tuple[str, str]:
        delim = self.config.local.recipient_delimiter
        if delim and delim in local:
            base, _, ext = local.partition(delim)
            if base:
                return base, ext
        return local, ""

    def resolve(self, address: str) -> list[Target]:
        """Every target of ``address``; PermFail (5.1.1) when it means nothing."""
        targets: list[Target] = []
        self._resolve(address, targets, set(), 0)
        return targets

    def exists(self, address: str) -> bool:
        """False only for a permanent "no such user"; a temporary problem accepts
        (delivery will then retry or bounce, rather than refusing good mail)."""
        try:
            return bool(self.resolve(address))
        except PermFail:
            return False
        except TempFail:
            return True

    def _resolve(self, address: str, out: list[Target], seen: set[str], depth: int) -> None:
        if depth > MAX_DEPTH:
            raise PermFail("5.4.6 alias expansion too deep")
        local, _, domain = address.rpartition("@")
        key = address.lower()
        if key in seen:
            return  # a loop through aliases: each address counts once
        seen.add(key)
        virtual = self.config.local.virtual
        base, ext = self.split(local)
        for candidate in (key, f"{base}@{domain}".lower()):
            if candidate in virtual:
                out.append(Target("maildir", virtual[candidate], self.config.local.virtual_user))
                return
        for name in dict.fromkeys((local.lower(), base.lower())):
            if name in self.aliases:
                self._expand(name, self.aliases[name], domain, out, seen, depth)
                return
        user = _system_user(base)
        if user is not None and user.pw_uid != 0:
            out.append(Target("user", user.pw_name, user.pw_name, ext))
            return
        lower = base.lower()
        if lower == "mailer-daemon":
            self._resolve(f"postmaster@{domain}", out, seen, depth + 1)
        elif lower == "postmaster":
            self._resolve(f"root@{domain}", out, seen, depth + 1)
        elif lower == "root":
            out.append(Target("mbox", self.config.local.root_mailbox, root_mailbox_user()))
        else:
            raise PermFail("5.1.1 no such user here")

    def _expand(
        self,
        name: str,
        items: list[str],
        domain: str,
        out: list[Target],
        seen: set[str],
        depth: int,
    ) -> None:
        owner = self.config.local.default_user
        for item in items:
            if item.startswith(":include:"):
                path = item[len(":include:") :].strip()
                try:
                    with open(path, encoding="utf-8", errors="replace") as f:
                        included = [
                            i
                            for line in f
                            if line.strip() and not line.lstrip().startswith("#")
                            for i in parse_alias_items(line)
                        ]
                except OSError:
                    raise TempFail(f"4.3.0 cannot read include file for {name}") from None
                self._expand(name, included, domain, out, seen, depth + 1)
            elif item.startswith("|"):
                out.append(Target("pipe", item[1:].strip(), owner))
            elif item.startswith("/"):
                out.append(Target("file", item, owner))
            elif item.startswith("\\"):
                user = _system_user(item[1:])
                if user is None or user.pw_uid == 0:
                    raise PermFail(f"5.1.1 alias {name}: no such user {item[1:]}")
                out.append(Target("user", user.pw_name, user.pw_name))
            else:
                target = item if "@" in item else f"{item}@{domain}"
                tdomain = target.rpartition("@")[2]
                if self.config.is_local_domain(tdomain):
                    if item.lower() == name and "@" not in item:
                        # "alice: alice": the user's own mailbox, no further aliasing
                        user = _system_user(item)
                        if user is not None and user.pw_uid != 0:
                            out.append(Target("user", user.pw_name, user.pw_name))
                            continue
                    self._resolve(target, out, seen, depth + 1)
                else:
                    out.append(Target("forward", target, owner))


def _system_user(name: str) -> pwd.struct_passwd | None:
    for candidate in dict.fromkeys((name, name.lower())):
        try:
            return pwd.getpwnam(candidate)
        except KeyError:
            continue
    return None


def root_mailbox_user() -> str:
    """Root's mail is written as `mail` (Debian's mail spool group), never as uid 0."""
    if os.getuid() != 0:
        return pwd.getpwuid(os.getuid()).pw_name
    return "mail" if _system_user("mail") else "nobody"


def recipient_exists(config: Config, local_part: str, domain: str) -> bool:
    """Does ``local_part@domain`` (a local domain) lead anywhere? For smtpd's RCPT check."""
    return Router(config).exists(f"{local_part}@{domain}")
