"""Outcomes: failures that every boundary sorts into temporary or permanent, and the
one result type of a delivery attempt, with qmail's exit codes and K/Z/D letters."""

from __future__ import annotations

from mailgrave.record import Record, record

EXIT_OK = 0
EXIT_PERM = 100
EXIT_TEMP = 111
EXIT_USAGE = 64  # a command-line mistake (sysexits EX_USAGE)

OK = "K"  # delivered
TEMPORARY = "Z"  # try again later
PERMANENT = "D"  # will never succeed: bounce
_GENERIC = {OK: "2.0.0", TEMPORARY: "4.0.0", PERMANENT: "5.0.0"}


def leading_status(text: str) -> tuple[str, str]:
    """Split MailGrave's own ``"5.1.1 no such user"`` convention into the enhanced
    status code (RFC 3463) and the rest; ``("", text)`` when it has none."""
    word, _, rest = text.partition(" ")
    parts = word.split(".")
    if len(parts) == 3 and word[:1] in "245" and all(p.isdigit() and len(p) <= 3 for p in parts):
        return word, rest
    return "", text


class DeliveryError(Exception):
    """A failure whose text is safe to show to a peer or a user; by convention the
    text starts with its enhanced status code (``"4.3.0 cannot write ..."``)."""

    exit_code = EXIT_TEMP
    code = TEMPORARY

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def result(self) -> Result:
        status, rest = leading_status(self.text)
        return Result(self.code, status or _GENERIC[self.code], rest)


class TempFail(DeliveryError):
    """Try again later (qmail's 111, SMTP 4xx)."""


class PermFail(DeliveryError):
    """Will never succeed (qmail's 100, SMTP 5xx)."""

    exit_code = EXIT_PERM
    code = PERMANENT


@record
class Result(Record):
    """What one delivery attempt did for one recipient.

    ``code`` is K, Z or D; ``status`` the enhanced status code; ``text`` what
    the mailbox, command or peer said (for a peer: its reply, ``550 5.1.1 ...``);
    ``host`` the peer that said it (``name[address]:port``), empty otherwise;
    ``dsn``: the peer offered DSN and took the request's DSN parameters on
    (RFC 3461 §5.2.2: it reports from now on, so no "relayed" report).
    """

    code: str
    status: str
    text: str
    host: str = ""
    dsn: bool = False

    @classmethod
    def of(cls, code: str, text: str) -> Result:
        """A result whose status leads ``text`` (or a generic one for ``code``)."""
        status, rest = leading_status(text)
        return cls(code, status or _GENERIC[code], rest)

    @property
    def ok(self) -> bool:
        return self.code == OK

    @property
    def permanent(self) -> bool:
        return self.code == PERMANENT

    def describe(self) -> str:
        """One line for people: ``D5.1.1 no such user here``, ``Dmx[...]:25 said: 550 ...``."""
        return self.code + self.reply_text()

    def reply_text(self) -> str:
        """The text without the code letter, as it goes into logs and bounces."""
        if self.host:
            return f"{self.host} said: {self.text}"
        return f"{self.status} {self.text}" if self.text else self.status

    def line(self) -> str:
        """The wire form of local.ctrl and remote.ctrl (docs/flow.md): one line,
        ``<code><status> [@<host> [+dsn ]]<text>``."""
        text = " ".join(self.text.split())
        host = f"@{self.host} " if self.host else ""
        if self.host and self.dsn:
            host += "+dsn "
        return f"{self.code}{self.status} {host}{text}"

    @classmethod
    def from_line(cls, line: str) -> Result:
        """The inverse of :meth:`line`; anything unreadable is a temporary failure."""
        code = line[:1]
        if code not in _GENERIC:
            return cls(TEMPORARY, "4.3.0", "unreadable answer from the delivery agent")
        status, _, rest = line[1:].partition(" ")
        if not leading_status(status + " ")[0]:
            return cls.of(code, line[1:])
        host = ""
        dsn = False
        if rest.startswith("@"):
            host, _, rest = rest[1:].partition(" ")
            if rest.startswith("+dsn "):
                dsn, rest = True, rest[5:]
        return cls(code, status, rest, host, dsn)


def exit_for(results: list[Result]) -> int:
    """qmail's exit status for a run of results: 0 all delivered, 100 only
    permanent failures among the rest, else 111."""
    if all(r.code == OK for r in results):
        return EXIT_OK
    return EXIT_PERM if all(r.code in (OK, PERMANENT) for r in results) else EXIT_TEMP
