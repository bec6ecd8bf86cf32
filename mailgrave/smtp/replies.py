"""SMTP replies: code, enhanced status code (RFC 3463) and text; RFC 5321 §4.2.1 format."""

from __future__ import annotations

from mailgrave.errors import leading_status
from mailgrave.record import Record, record


@record
class Reply(Record):
    """One reply, sent (mailgrave-smtpd) or received (mailgrave-remote); ``lines``
    holds the further text lines of a multi-line reply."""

    code: int
    enhanced: str
    text: str
    lines: tuple[str, ...] = ()

    @classmethod
    def parse(cls, code: int, texts: list[str]) -> Reply:
        """A reply as a client reads it (the text of each line after the code):
        the enhanced status code (RFC 2034) is taken from the first line when it
        is of the reply's class, and from every line that repeats it."""
        status, first = leading_status(texts[0])
        if not status or status[0] != str(code)[0]:
            return cls(code, "", texts[0], tuple(texts[1:]))
        rest = []
        for text in texts[1:]:
            again, after = leading_status(text)
            rest.append(after if again == status else text)
        return cls(code, status, first, tuple(rest))

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def encode(self) -> bytes:
        """``250-first`` ... ``250 last``, each ending CRLF; the enhanced code on every line."""
        texts = (self.text, *self.lines)
        out = []
        for i, text in enumerate(texts):
            sep = " " if i == len(texts) - 1 else "-"
            body = f"{self.enhanced} {text}" if self.enhanced else text
            out.append(f"{self.code}{sep}{body}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        """The whole reply on one line: ``550 5.1.1 No such user here``."""
        words = [str(self.code), self.enhanced, self.text, *self.lines]
        return " ".join(w for w in words if w)


OK = Reply(250, "2.0.0", "Ok")
BYE = Reply(221, "2.0.0", "Bye")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
START_TLS = Reply(220, "2.0.0", "Ready to start TLS")
VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(
    214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH"
)

UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command not recognized")
EMPTY_COMMAND = Reply(500, "5.5.2", "Empty command")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BARE_LF_COMMAND = Reply(500, "5.5.2", "Command lines must end with CRLF")
NOT_UTF8 = Reply(500, "5.5.2", "Invalid UTF-8 in command")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL before RCPT")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT before DATA")
SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_PARAM = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
TLS_UNAVAILABLE = Reply(502, "5.5.1", "STARTTLS not available")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
BDAT_SEQUENCE = Reply(503, "5.5.1", "Only BDAT, RSET, NOOP or QUIT during a BDAT transfer")
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT size [LAST]; closing connection")

NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
RELAY_DENIED = Reply(554, "5.7.1", "Relaying denied")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Address needs SMTPUTF8")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
BARE_LF_DATA = Reply(554, "5.6.0", "Message refused: bare LF or CR (only CRLF line ends)")
NUL_DATA = Reply(554, "5.6.0", "Message refused: NUL character")
DATA_LINE_TOO_LONG = Reply(500, "5.5.2", "Message refused: line longer than 1000 octets")
QUEUE_TEMPFAIL = Reply(451, "4.3.0", "Temporary failure, try again later")

AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by the authenticated user")
FROM_NOT_OWNED = Reply(553, "5.7.1", "From: domain not owned by the authenticated user")
RATE_LIMITED = Reply(451, "4.7.1", "Hourly sending limit reached, try again later")

TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many failed authentications, closing connection")
EARLY_TALKER = Reply(554, "5.5.0", "Protocol error: talking before the greeting")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
