"""Sans-I/O SMTP server protocol: bytes in, events out; replies become bytes.

The program that owns the socket feeds whatever it reads to
:meth:`Server.receive_data` and acts on the returned events in order:
:class:`Output` bytes go to the peer, :class:`MessageStart` /
:class:`MessageData` / :class:`MessageComplete` / :class:`MessageAborted`
drive the hand-off to the queue, :class:`StartTLS` asks for a TLS handshake,
:class:`Close` ends the connection, :class:`Rejected` is for the log. Policy
(local domains, existing recipients, relaying, limits) comes from a
:class:`Policy` the program supplies, so every rule is testable without
sockets.
"""

from __future__ import annotations

from mailgrave import address
from mailgrave.envelope import MAX_ENVID, MAX_ORCPT, dsn_text_ok, valid_notify
from mailgrave.log import quote
from mailgrave.record import Record, record
from mailgrave.smtp import replies as R
from mailgrave.smtp.replies import Reply

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol
else:
    Protocol = object

MAX_LINE = 1000  # octets including CRLF (RFC 5321 §4.5.3.1.6)
HTTP_VERBS = frozenset({"GET", "POST", "PUT", "HEAD", "CONNECT", "OPTIONS", "DELETE", "PATCH"})
ATEXT_SPECIALS = frozenset("!#$%&'*+-/=?^_`{|}~")


class Policy(Protocol):
    """What the program decides for the protocol core."""

    hostname: str
    max_message_size: int
    max_recipients: int
    max_errors: int
    tls_available: bool
    # "normalize": an LF-terminated DATA line is a line end (stored as CRLF);
    # "reject": it refuses the message. Either way only CRLF "." CRLF ends DATA.
    bare_lf: str

    def is_local_domain(self, domain: str) -> bool: ...

    def recipient_exists(self, local: str, domain: str) -> bool: ...

    def may_relay(self) -> bool: ...

    # Optional: ``check_mail(helo, sender)`` -> a refusal Reply or None (sender
    # authentication, e.g. SPF); looked up with getattr, a policy may lack it.

    # --- submission and AUTH (RFC 6409, RFC 4954)

    #: MAIL needs AUTH first (ports 587 and 465).
    submission: bool
    #: AUTH may be offered once TLS is active (a users file is configured).
    auth_available: bool
    #: failed AUTH attempts after which the connection is closed (0: never).
    max_auth_failures: int

    def sender_allowed(self, login: str, sender: str) -> bool: ...

    def within_rate(self, login: str, recipients: int) -> bool: ...


# --- events


@record
class Output(Record):
    """Bytes to send to the client."""

    data: bytes


@record
class MessageStart(Record):
    """DATA was accepted: open a submission to the queue."""

    sender: str
    recipients: tuple[str, ...]
    helo: str
    proto: str
    # DSN (RFC 3461), as in mailgrave.envelope.Envelope
    ret: str = ""
    envid: str = ""
    notify: tuple[str, ...] = ()
    orcpt: tuple[str, ...] = ()
    utf8: bool = False  # SMTPUTF8 on MAIL FROM (RFC 6531)


@record
class MessageData(Record):
    """Message bytes, dot-unstuffed, CRLF line ends."""

    data: bytes


@record
class MessageComplete(Record):
    """The final dot arrived and the message is acceptable: commit it, then call
    :meth:`Server.message_queued` or :meth:`Server.message_failed`."""

    size: int


@record
class MessageAborted(Record):
    """The message was refused (reply already in the output): abort the submission."""

    reply: Reply


class Authenticate:
    """AUTH credentials arrived: verify them, then call :meth:`Server.auth_result`.

    Not a record: its repr must never show the password."""

    __slots__ = ("login", "mechanism", "password")

    def __init__(self, mechanism: str, login: str, password: str) -> None:
        self.mechanism = mechanism
        self.login = login
        self.password = password

    def __repr__(self) -> str:
        return f"Authenticate(mechanism={self.mechanism!r}, login={self.login!r}, password=...)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Authenticate):
            return NotImplemented
        return (self.mechanism, self.login, self.password) == (
            other.mechanism,
            other.login,
            other.password,
        )

    __hash__ = None  # type: ignore[assignment]


@record
class AuthFailed(Record):
    """An AUTH attempt failed (bad credentials, bad encoding, cancelled): one log line.

    ``login`` is the name the client gave ('' when none), unquoted."""

    mechanism: str
    login: str
    reason: str


@record
class StartTLS(Record):
    """Do the TLS handshake now, then call :meth:`Server.tls_started`."""


@record
class Rejected(Record):
    """A refusal worth a log line; ``reason`` is already safe for the log."""

    stage: str
    reason: str


@record
class Close(Record):
    """Close the connection (after sending any output before it)."""

    reason: str


Event = (
    Output
    | MessageStart
    | MessageData
    | MessageComplete
    | MessageAborted
    | StartTLS
    | Authenticate
    | AuthFailed
    | Rejected
    | Close
)


class State:
    """The session's states (plain strings: no enum import on the per-connection path)."""

    CONNECTED = "connected"  # greeting sent, no EHLO/HELO yet
    READY = "ready"  # after EHLO/HELO or RSET
    MAIL = "mail"  # sender given
    RCPT = "rcpt"  # at least one recipient
    DATA = "data"  # reading the message
    BDAT = "bdat"  # between BDAT chunks of one message (RFC 3030)
    CHUNK = "chunk"  # reading the octets of one BDAT chunk
    COMMIT = "commit"  # final dot seen; waiting for the queue
    TLS = "tls"  # STARTTLS answered; waiting for the handshake
    AUTH = "auth"  # AUTH answered 334; waiting for the client's continuation line
    AUTH_CHECK = "auth-check"  # credentials complete; waiting for the program's verdict
    CLOSED = "closed"


_ANY = frozenset({State.CONNECTED, State.READY, State.MAIL, State.RCPT})
_ANY_OR_BDAT = _ANY | {State.BDAT}
# Between BDAT chunks only these may come (RFC 3030 §3: no DATA, MAIL, RCPT, EHLO, STARTTLS).
_IN_BDAT = frozenset({"BDAT", "RSET", "NOOP", "QUIT", "HELP"})
_HELLOED = frozenset({State.READY, State.MAIL, State.RCPT})

# verb -> (states where it is allowed, the reply when it is not, next state on success)
# A next state of None keeps the current state.
TRANSITIONS: dict[str, tuple[frozenset[str], Reply, str | None]] = {
    "EHLO": (_ANY, R.BAD_SEQUENCE, State.READY),
    "HELO": (_ANY, R.BAD_SEQUENCE, State.READY),
    "MAIL": (frozenset({State.READY}), R.NEED_HELO, State.MAIL),
    "RCPT": (frozenset({State.MAIL, State.RCPT}), R.NEED_MAIL, State.RCPT),
    "DATA": (frozenset({State.RCPT}), R.NEED_RCPT, State.DATA),
    # BDAT's chunk is read (and discarded) even when the command is refused: see _bdat.
    "BDAT": (frozenset({State.RCPT, State.BDAT}), R.NEED_RCPT, State.CHUNK),
    "RSET": (_ANY_OR_BDAT, R.BAD_SEQUENCE, None),
    "NOOP": (_ANY_OR_BDAT, R.BAD_SEQUENCE, None),
    "VRFY": (_ANY, R.BAD_SEQUENCE, None),
    "HELP": (_ANY_OR_BDAT, R.BAD_SEQUENCE, None),
    "QUIT": (_ANY_OR_BDAT, R.BAD_SEQUENCE, State.CLOSED),
    "STARTTLS": (frozenset({State.CONNECTED, State.READY}), R.BAD_SEQUENCE, State.TLS),
    # RFC 4954 §4: after EHLO, not during a mail transaction; the next state
    # (AUTH or AUTH_CHECK) is set by the handler.
    "AUTH": (frozenset({State.READY}), R.BAD_SEQUENCE, None),
}

# SASL mechanisms offered (over TLS only): both send the password as it is.
AUTH_MECHANISMS = ("PLAIN", "LOGIN")
_LOGIN_USERNAME = "VXNlcm5hbWU6"  # base64 "Username:"
_LOGIN_PASSWORD = "UGFzc3dvcmQ6"  # base64 "Password:"  # noqa: S105 (a prompt)
MAX_AUTH_FIELD = 255  # octets of a login or password
_HANDLED = Reply(0, "", "handled")  # a handler that has answered by itself


class PathError(ValueError):
    """A MAIL/RCPT argument that does not parse; carries the reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


@record
class Path(Record):
    """A parsed reverse- or forward-path: ``local`` unquoted, ``domain`` A-labels ('' for <>)."""

    local: str
    domain: str
    quoted: bool

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local


def _split_path(arg: str) -> tuple[str, str]:
    """``<path> params`` → (inside of the brackets, params); quotes may hold ``>``."""
    if not arg.startswith("<"):
        raise PathError(R.SYNTAX)
    i, quoted = 1, False
    while i < len(arg):
        ch = arg[i]
        if quoted and ch == "\\":
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            rest = arg[i + 1 :]
            if rest and not rest.startswith(" "):
                raise PathError(R.SYNTAX)
            return arg[1:i], rest.strip()
        i += 1
    raise PathError(R.SYNTAX)


def _dot_string_ok(local: str, utf8: bool) -> bool:
    if not local or local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    for ch in local:
        if ch.isascii():
            if not (ch.isalnum() or ch in ATEXT_SPECIALS or ch == "."):
                return False
        elif not utf8:
            return False
    return True


def parse_path(inner: str, utf8: bool) -> Path:
    """Parse the inside of ``<...>``: drop a source route, unquote, check limits."""
    if not inner.isascii() and not utf8:
        raise PathError(R.NEEDS_SMTPUTF8)
    if inner.startswith("@"):
        # Source route: "@a,@b:user@domain" — accepted and ignored (RFC 5321 §4.1.2, C).
        colon = inner.find(":")
        if colon < 0:
            raise PathError(R.SYNTAX)
        inner = inner[colon + 1 :]
    if len(inner.encode("utf-8", "surrogateescape")) > address.MAX_PATH:
        raise PathError(Reply(501, "5.1.3", "Address too long"))
    quoted = inner.startswith('"')
    if quoted:
        out, i = [], 1
        while i < len(inner):
            ch = inner[i]
            if ch == "\\" and i + 1 < len(inner):
                out.append(inner[i + 1])
                i += 2
                continue
            if ch == '"':
                break
            out.append(ch)
            i += 1
        else:
            raise PathError(R.SYNTAX)
        local, rest = "".join(out), inner[i + 1 :]
        if rest and not rest.startswith("@"):
            raise PathError(R.SYNTAX)
        domain = rest[1:] if rest else ""
        if rest and not domain:
            raise PathError(R.SYNTAX)
    else:
        local, sep, domain = inner.partition("@")
        if sep and not domain:
            raise PathError(R.SYNTAX)
        if not _dot_string_ok(local, utf8):
            raise PathError(Reply(501, "5.1.3", "Bad address syntax"))
    try:
        address.check_local(local)
        if domain:
            domain = address.to_ascii_domain(domain)
    except address.AddressError as exc:
        raise PathError(Reply(501, "5.1.3", f"Bad address: {exc}")) from None
    return Path(local, domain, quoted)


def _parse_params(text: str) -> dict[str, str]:
    """``KEY=value`` words; a keyword given twice is a syntax error (PathError)."""
    params: dict[str, str] = {}
    for word in text.split():
        key, _, value = word.partition("=")
        if key.upper() in params:
            raise PathError(R.SYNTAX)
        params[key.upper()] = value
    return params


_HEX = "0123456789ABCDEF"


def xtext_decode(text: str) -> str | None:
    """RFC 3461 §4 xtext (``+XX`` for a character outside ``!``..``~``, ``+``
    and ``=``); None when it is not xtext."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "+":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or any(c not in _HEX for c in pair):
                return None
            out.append(chr(int(pair, 16)))
            i += 3
            continue
        if not "!" <= ch <= "~" or ch == "=":
            return None
        out.append(ch)
        i += 1
    return "".join(out)


def xtext_encode(text: str) -> str:
    """The inverse of :func:`xtext_decode`."""
    return "".join(ch if "!" <= ch <= "~" and ch not in "+=" else f"+{ord(ch):02X}" for ch in text)


def orcpt_value(value: str) -> str | None:
    """An ORCPT parameter (``addr-type;xtext``) as stored: ``rfc822;user@domain``,
    decoded; None when it is malformed (RFC 3461 §4.2)."""
    kind, semi, xtext = value.partition(";")
    decoded = xtext_decode(xtext) if semi else None
    if not kind or decoded is None or not all(c.isalnum() or c == "-" for c in kind):
        return None
    stored = f"{kind.lower() if kind.lower() == 'rfc822' else kind};{decoded}"
    return stored if dsn_text_ok(stored, MAX_ORCPT) else None


class Server:
    """One SMTP session on the server side; feed it bytes, act on its events."""

    def __init__(self, policy: Policy, tls_active: bool = False) -> None:
        self.policy = policy
        self.state = State.CONNECTED
        self.tls = tls_active
        self.helo = ""
        self.esmtp = False
        self.errors = 0
        self.messages = 0
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.utf8 = False
        self.login = ""  # the authenticated login ('' until AUTH succeeds)
        self.auth_failures = 0
        self._auth_mech = ""
        self._auth_user: str | None = None  # LOGIN: the user name, once given
        self.ret = ""  # DSN RET and ENVID of the transaction
        self.envid = ""
        self._dsn: dict[str, tuple[str, str]] = {}  # recipient -> (NOTIFY, ORCPT)
        self._pending_dsn = ("", "")  # of the RCPT being handled
        self._buf = bytearray()
        self._events: list[Event] = []
        # DATA reading state
        self._data_size = 0
        self._data_flaw: Reply | None = None
        self._prev_crlf = True
        self._midline = False
        # BDAT reading state: octets of the current chunk still to come, whether
        # it is the LAST one, the reply for a refused chunk that is only
        # discarded, a CR held back from the previous piece, the current line's
        # length, and the message's last two octets.
        self._chunk_left = 0
        self._chunk_last = False
        self._chunk_refused: Reply | None = None
        self._chunk_cr = False
        self._line_len = 0
        self._tail = b"\r\n"
        self._chunk_text = ""
        self._chunk_return = State.READY
        self._handlers: dict[str, Callable[[str], Reply]] = {
            "EHLO": self._ehlo,
            "HELO": self._helo,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "RSET": self._rset,
            "NOOP": lambda arg: R.OK,
            "VRFY": lambda arg: R.VRFY if arg else R.SYNTAX,
            "HELP": lambda arg: R.HELP,
            "QUIT": self._quit,
            "STARTTLS": self._starttls,
            "AUTH": self._auth,
        }

    # --- the program's side

    def greeting(self) -> bytes:
        """The 220 banner (no enhanced code on the greeting, RFC 2034)."""
        return Reply(220, "", f"{self.policy.hostname} ESMTP MailGrave").encode()

    def receive_data(self, data: bytes) -> list[Event]:
        """Process bytes from the client; ``b""`` means the client closed."""
        if self.state in (State.CLOSED, State.TLS):
            return []  # anything pipelined after STARTTLS is discarded
        if not data:
            closed: list[Event] = []
            if self._data_started():
                closed.append(MessageAborted(Reply(451, "4.3.0", "Connection lost during DATA")))
            self.state = State.CLOSED
            closed.append(Close("client closed the connection"))
            return closed
        self._buf += data
        self._run()
        return self._take()

    def message_queued(self, qid: str) -> list[Event]:
        """The queue has the message on disk."""
        return self._finish_message(Reply(250, "2.0.0", f"Ok: queued as {qid}"))

    def message_failed(self, reply: Reply = R.QUEUE_TEMPFAIL) -> list[Event]:
        """The queue refused or failed; ``reply`` goes to the client."""
        return self._finish_message(reply)

    def tls_started(self) -> list[Event]:
        """The handshake succeeded: a fresh session, EHLO required again."""
        self.tls = True
        self._reset_transaction()
        self.helo, self.esmtp, self.login = "", False, ""
        self._buf.clear()
        self.state = State.CONNECTED
        return []

    def auth_result(self, ok: bool, name: str = "") -> list[Event]:
        """The program's verdict on :class:`Authenticate`'s credentials; ``name``: the
        login as the verifier knows it (Dovecot's user=), if it says."""
        if self.state != State.AUTH_CHECK:
            return []
        self.state = State.READY
        login, self._auth_user = self._auth_user or "", None
        if ok:
            self.login = name or login
            self._reply(R.AUTH_OK)
        else:
            self._auth_failed(login, "invalid credentials", R.AUTH_INVALID)
        self._run()
        return self._take()

    def auth_unavailable(self) -> list[Event]:
        """The credentials could not be checked (users file unreadable): try later."""
        if self.state != State.AUTH_CHECK:
            return []
        self.state, self._auth_user = State.READY, None
        self._reply(R.AUTH_TEMPFAIL)
        self._run()
        return self._take()

    def timeout(self) -> list[Event]:
        """The client was idle too long."""
        return self._close_with(R.TIMEOUT, "idle timeout")

    @property
    def proto(self) -> str:
        """The Received: ``with`` protocol: RFC 3848's ESMTP, ESMTPS, ESMTPA, ESMTPSA,
        and RFC 6531 §3.7.3's UTF8SMTP(S)(A) when SMTPUTF8 was used."""
        if not self.esmtp:
            return "SMTP"
        base = "UTF8SMTP" if self.utf8 else "ESMTP"
        return base + ("S" if self.tls else "") + ("A" if self.login else "")

    # --- internals

    def _data_started(self) -> bool:
        if self.state == State.CHUNK:
            return self._chunk_refused is None
        return self.state in (State.DATA, State.COMMIT, State.BDAT)

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _reply(self, reply: Reply) -> None:
        self._events.append(Output(reply.encode()))

    def _close_with(self, reply: Reply, reason: str) -> list[Event]:
        if self.state != State.CLOSED:
            if self._data_started():
                self._events.append(MessageAborted(reply))
            self._reply(reply)
            self._events.append(Close(reason))
            self.state = State.CLOSED
        return self._take()

    def _finish_message(self, reply: Reply) -> list[Event]:
        if self.state != State.COMMIT:
            return []
        if reply.code < 300:
            self.messages += 1
        self._reply(reply)
        self._reset_transaction()
        self.state = State.READY
        self._run()
        return self._take()

    def _reset_transaction(self) -> None:
        self.sender = None
        self.recipients = []
        self.utf8 = False
        self.ret = self.envid = ""
        self._dsn = {}

    def _run(self) -> None:
        while self.state not in (State.CLOSED, State.COMMIT, State.TLS, State.AUTH_CHECK):
            if self.state == State.DATA:
                progressed = self._read_data()
            elif self.state == State.CHUNK:
                progressed = self._read_chunk()
            elif self.state == State.AUTH:
                progressed = self._read_auth_line()
            else:
                progressed = self._read_command()
            if not progressed:
                return

    def _error(self, reply: Reply, stage: str, reason: str) -> None:
        """Send an error reply; count it; 421 and close after too many."""
        self._reply(reply)
        self._events.append(Rejected(stage, reason))
        self.errors += 1
        if self.policy.max_errors and self.errors >= self.policy.max_errors:
            if self._data_started():
                self._events.append(MessageAborted(R.TOO_MANY_ERRORS))
            self._reply(R.TOO_MANY_ERRORS)
            self._events.append(Close("too many errors"))
            self.state = State.CLOSED

    # --- command mode

    def _read_command(self) -> bool:
        buf = self._buf
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > MAX_LINE:
                # Throw the long line away, answer when its end arrives.
                keep = b"\r" if buf.endswith(b"\r") else b""
                buf.clear()
                buf += b"\x00TOOLONG" + keep
            return False
        raw = bytes(buf[: end + 1])
        del buf[: end + 1]
        if raw.startswith(b"\x00TOOLONG") or len(raw) > MAX_LINE:
            self._error(R.LINE_TOO_LONG, "command", "line too long")
            return True
        if not raw.endswith(b"\r\n") or b"\r" in raw[:-2]:
            self._error(R.BARE_LF_COMMAND, "command", f"bare LF/CR in {quote(raw)}")
            return True
        line = raw[:-2]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error(R.NOT_UTF8, "command", f"not UTF-8: {quote(line)}")
            return True
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if verb in HTTP_VERBS:
            self._events.append(Rejected("command", f"HTTP request {quote(text)}"))
            self._events.append(Close("HTTP request"))
            self.state = State.CLOSED
            return True
        if not verb:
            self._error(R.EMPTY_COMMAND, "command", "empty command")
            return True
        entry = TRANSITIONS.get(verb)
        if entry is None:
            self._error(R.UNKNOWN_COMMAND, "command", f"unknown command {quote(text)}")
            return True
        allowed, wrong_state, next_state = entry
        if verb == "BDAT":
            return self._bdat(arg.strip(), text, allowed, wrong_state)
        if self.state == State.BDAT and verb not in _IN_BDAT:
            self._error(R.BDAT_SEQUENCE, verb, f"{verb} during BDAT")
            return True
        if self.state not in allowed:
            self._error(wrong_state, verb, f"{verb} out of sequence")
            return True
        reply = self._handlers[verb](arg.strip())
        if reply is _HANDLED:
            return True
        if reply.is_error:
            if verb == "AUTH":  # its argument may hold credentials: never logged
                self._error(reply, verb, f"{reply} for AUTH {quote(arg.split(' ')[0])}")
            else:
                self._error(reply, verb, f"{reply} for {quote(text)}")
            return True
        self._reply(reply)
        if next_state is not None:
            self.state = next_state
        if verb == "QUIT":
            self._events.append(Close("QUIT"))
        elif verb == "STARTTLS":
            self._buf.clear()
            self._events.append(StartTLS())
        elif verb == "DATA":
            self._begin_data()
        return True

    def _ehlo(self, arg: str) -> Reply:
        if not arg or " " in arg:
            return R.SYNTAX
        self._reset_transaction()
        self.helo, self.esmtp = arg, True
        lines = [
            "PIPELINING",
            f"SIZE {self.policy.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
            "CHUNKING",
        ]
        if self.policy.tls_available and not self.tls:
            lines.append("STARTTLS")
        if self.policy.auth_available and self.tls:
            # RFC 4954 §4 and RFC 8314: never offered over plaintext.
            lines.append("AUTH " + " ".join(AUTH_MECHANISMS))
        lines.append("HELP")
        return Reply(250, "", f"{self.policy.hostname} Hello", tuple(lines))

    def _helo(self, arg: str) -> Reply:
        if not arg or " " in arg:
            return R.SYNTAX
        self._reset_transaction()
        self.helo, self.esmtp = arg, False
        return Reply(250, "", self.policy.hostname)

    def _rset(self, arg: str) -> Reply:
        if self.state == State.BDAT:
            self._events.append(MessageAborted(R.OK))
        self._reset_transaction()
        if self.state in (State.MAIL, State.RCPT, State.BDAT):
            self.state = State.READY
        return R.OK

    def _quit(self, arg: str) -> Reply:
        if self.state == State.BDAT:
            self._events.append(MessageAborted(R.BYE))
        return R.BYE

    def _starttls(self, arg: str) -> Reply:
        if arg:
            return R.SYNTAX
        if self.tls:
            return R.TLS_ALREADY
        if not self.policy.tls_available:
            return R.TLS_UNAVAILABLE
        return R.START_TLS

    @staticmethod
    def _keyword_arg(arg: str, keyword: str) -> str | None:
        if arg[: len(keyword)].upper() != keyword:
            return None
        return arg[len(keyword) :].lstrip(" ")

    def _auth(self, arg: str) -> Reply:
        """AUTH mechanism [initial-response]: PLAIN and LOGIN, over TLS only."""
        if not self.esmtp:
            return R.BAD_SEQUENCE
        if self.login:
            return R.AUTH_ALREADY
        mech, _, initial = arg.partition(" ")
        mech, initial = mech.upper(), initial.strip()
        if not mech:
            return R.SYNTAX
        if not self.policy.auth_available:
            return R.NOT_IMPLEMENTED
        if not self.tls:
            return R.AUTH_NEEDS_TLS
        if mech not in AUTH_MECHANISMS:
            return R.AUTH_MECHANISM
        self._auth_mech, self._auth_user = mech, None
        if initial:
            self._auth_respond("" if initial == "=" else initial)  # RFC 4954 §4: "=" is empty
            return _HANDLED
        self.state = State.AUTH
        return Reply(334, "", "" if mech == "PLAIN" else _LOGIN_USERNAME)

    def _read_auth_line(self) -> bool:
        """A continuation line of AUTH (RFC 4954 §4): base64, or ``*`` to cancel."""
        buf = self._buf
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > MAX_LINE:
                buf.clear()
                self.state = State.READY
                self._auth_failed("", "response too long", R.LINE_TOO_LONG)
                return True
            return False
        raw = bytes(buf[: end + 1])
        del buf[: end + 1]
        self.state = State.READY
        if len(raw) > MAX_LINE or not raw.endswith(b"\r\n") or b"\r" in raw[:-2]:
            self._auth_failed(self._auth_user or "", "malformed response", R.AUTH_BAD_BASE64)
            return True
        line = raw[:-2].decode("ascii", "replace").strip()
        if line == "*":
            self._auth_failed(self._auth_user or "", "cancelled", R.AUTH_CANCELLED)
            return True
        self._auth_respond(line)
        return True

    def _auth_respond(self, response: str) -> None:
        """One client response: the next 334, a failure, or the credentials for the program."""
        import binascii  # built into the interpreter: nothing to pay

        self.state = State.READY
        try:
            text = binascii.a2b_base64(response.encode("ascii"), strict_mode=True).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeError):
            self._auth_failed(self._auth_user or "", "bad base64", R.AUTH_BAD_BASE64)
            return
        if self._auth_mech == "PLAIN":
            parts = text.split("\0")
            if len(parts) != 3 or not parts[1]:
                self._auth_failed("", "malformed PLAIN response", R.AUTH_BAD_BASE64)
                return
            authzid, login, password = parts
            if authzid and authzid != login:
                self._auth_failed(login, "authorization identity differs", R.AUTH_INVALID)
                return
            self._credentials(login, password)
        elif self._auth_user is None:
            if not text or "\0" in text:
                self._auth_failed("", "bad user name", R.AUTH_BAD_BASE64)
                return
            self._auth_user = text
            self.state = State.AUTH
            self._reply(Reply(334, "", _LOGIN_PASSWORD))
        else:
            self._credentials(self._auth_user, text)

    def _credentials(self, login: str, password: str) -> None:
        if max(len(login.encode()), len(password.encode())) > MAX_AUTH_FIELD or "\0" in password:
            self._auth_failed(login[:MAX_AUTH_FIELD], "credentials too long", R.AUTH_INVALID)
            return
        self._auth_user = login
        self.state = State.AUTH_CHECK
        self._events.append(Authenticate(self._auth_mech, login, password))

    def _auth_failed(self, login: str, reason: str, reply: Reply) -> None:
        """A failed attempt: the reply, one AuthFailed event, the close after too many."""
        self._auth_user = None
        self._reply(reply)
        self._events.append(AuthFailed(self._auth_mech, login, reason))
        self.auth_failures += 1
        limit = self.policy.max_auth_failures
        if limit and self.auth_failures >= limit:
            self._reply(R.TOO_MANY_AUTH_FAILURES)
            self._events.append(Close("too many failed AUTH attempts"))
            self.state = State.CLOSED

    def _mail(self, arg: str) -> Reply:
        rest = self._keyword_arg(arg, "FROM:")
        if rest is None:
            return R.SYNTAX
        if self.policy.submission and not self.login:
            return R.AUTH_REQUIRED
        ret = envid = ""
        try:
            inner, params_text = _split_path(rest)
            params = _parse_params(params_text)
            utf8 = "SMTPUTF8" in params
            for key, value in params.items():
                if key == "SIZE":
                    if not value.isdigit():
                        return R.SYNTAX
                    if int(value) > self.policy.max_message_size:
                        return R.TOO_BIG
                elif key == "BODY":
                    if value.upper() not in ("7BIT", "8BITMIME"):
                        return R.SYNTAX
                elif key == "SMTPUTF8":
                    if value:
                        return R.SYNTAX
                elif key == "RET":
                    ret = value.upper()
                    if ret not in ("FULL", "HDRS"):
                        return R.SYNTAX
                elif key == "ENVID":
                    envid = xtext_decode(value) or ""
                    if not dsn_text_ok(envid, MAX_ENVID):
                        return R.SYNTAX
                else:
                    return R.BAD_PARAM
            if inner == "":
                sender = ""
            else:
                path = parse_path(inner, utf8)
                if not path.domain:
                    return Reply(501, "5.1.7", "Sender address needs a domain")
                sender = str(path)
        except PathError as exc:
            return exc.reply
        if self.login and not self.policy.sender_allowed(self.login, sender):
            return R.SENDER_NOT_OWNED
        check_mail = getattr(self.policy, "check_mail", None)
        if check_mail is not None and not self.login:
            # Sender authentication (SPF) is for mail arriving from outside, not
            # for a user who has authenticated (RFC 6409 submission).
            refusal = check_mail(self.helo, sender)
            if refusal is not None:
                return refusal  # type: ignore[no-any-return]
        self.sender, self.utf8, self.recipients = sender, utf8, []
        self.ret, self.envid, self._dsn = ret, envid, {}
        return R.OK

    def _rcpt(self, arg: str) -> Reply:
        rest = self._keyword_arg(arg, "TO:")
        if rest is None:
            return R.SYNTAX
        try:
            inner, params_text = _split_path(rest)
            notify = orcpt = ""
            for key, value in _parse_params(params_text).items():
                if key == "NOTIFY":
                    notify = value.upper()
                    if not valid_notify(notify):
                        return R.SYNTAX
                elif key == "ORCPT":
                    orcpt = orcpt_value(value) or ""
                    if not orcpt:
                        return R.SYNTAX
                else:
                    return R.BAD_PARAM
            self._pending_dsn = (notify, orcpt)
            if inner.lower() == "postmaster":
                # RFC 5321 §4.5.1: always accepted, whatever the policy says.
                domain = address.to_ascii_domain(self.policy.hostname)
                if len(self.recipients) >= self.policy.max_recipients:
                    return R.TOO_MANY_RCPTS
                return self._add_rcpt(Path("postmaster", domain, False))
            else:
                path = parse_path(inner, self.utf8)
        except (PathError, address.AddressError) as exc:
            return exc.reply if isinstance(exc, PathError) else R.SYNTAX
        if not path.domain:
            return Reply(501, "5.1.3", "Recipient address needs a domain")
        if len(self.recipients) >= self.policy.max_recipients:
            return R.TOO_MANY_RCPTS
        if self.login:
            # An authenticated user relays anywhere, within the login's hourly limit.
            if str(path) not in self.recipients and not self.policy.within_rate(
                self.login, len(self.recipients) + 1
            ):
                return R.RATE_LIMITED
            if any(c in path.local for c in "%!@"):
                return R.RELAY_DENIED
            if self.policy.is_local_domain(path.domain) and not self.policy.recipient_exists(
                path.local, path.domain
            ):
                return R.NO_SUCH_USER
            return self._add_rcpt(path)
        if self.policy.is_local_domain(path.domain):
            if not self.policy.recipient_exists(path.local, path.domain):
                return R.NO_SUCH_USER
        else:
            if any(c in path.local for c in "%!@"):
                return R.RELAY_DENIED  # percent hack, bang path, quoted @: never relayed
            if path.domain.startswith("["):
                return R.RELAY_DENIED if not self.policy.may_relay() else self._add_rcpt(path)
            if not self.policy.may_relay():
                return R.RELAY_DENIED
        return self._add_rcpt(path)

    def _add_rcpt(self, path: Path) -> Reply:
        rcpt = str(path)
        if rcpt not in self.recipients:
            self.recipients.append(rcpt)
            if any(self._pending_dsn):
                self._dsn[rcpt] = self._pending_dsn
        return R.OK

    def _data(self, arg: str) -> Reply:
        if arg:
            return R.SYNTAX
        return R.START_DATA

    # --- data mode

    def _begin_data(self) -> None:
        self._data_size = 0
        self._data_flaw = None
        self._prev_crlf = True
        self._midline = False
        assert self.sender is not None
        dsn = [self._dsn.get(r, ("", "")) for r in self.recipients] if self._dsn else []
        self._events.append(
            MessageStart(
                self.sender,
                tuple(self.recipients),
                self.helo,
                self.proto,
                self.ret,
                self.envid,
                tuple(d[0] for d in dsn),
                tuple(d[1] for d in dsn),
                self.utf8,
            )
        )

    def _flaw(self, reply: Reply) -> None:
        if self._data_flaw is None:
            self._data_flaw = reply

    def _read_data(self) -> bool:
        """Consume whole lines; forward them unless the message is already refused.

        Only CRLF "." CRLF ends the data, and only after a line that itself
        ended with CRLF (no SMTP smuggling). A line that ends in a bare LF is
        taken as a line end and passed on with CRLF when the policy's
        ``bare_lf`` is "normalize" (Postfix 3.9's default), and refuses the
        message when it is "reject"; a bare CR always refuses it. A refused
        message is still read to its real end.
        """
        normalize = self.policy.bare_lf == "normalize"
        buf = self._buf
        out = bytearray()
        pos = 0
        finished = False
        limit = self.policy.max_message_size
        while True:
            end = buf.find(b"\n", pos)
            if end < 0:
                partial = len(buf) - pos
                if partial > MAX_LINE:
                    self._flaw(R.DATA_LINE_TOO_LONG)
                    self._midline = True
                    keep = 1 if buf.endswith(b"\r") else 0
                    pos = len(buf) - keep
                break
            line = buf[pos : end + 1]
            pos = end + 1
            crlf = line.endswith(b"\r\n")
            content = line[:-2] if crlf else line[:-1]
            at_start = not self._midline
            self._midline = False
            if crlf and at_start and self._prev_crlf and content == b".":
                finished = True
                break
            if b"\r" in content or not (crlf or normalize):
                self._flaw(R.BARE_LF_DATA)
            elif not crlf:
                line = content + b"\r\n"
            if b"\x00" in content:
                self._flaw(R.NUL_DATA)
            if len(line) > MAX_LINE:
                self._flaw(R.DATA_LINE_TOO_LONG)
            self._prev_crlf = crlf
            if at_start and content.startswith(b"."):
                line = line[1:]
            self._data_size += len(line)
            if self._data_size > limit:
                self._flaw(R.TOO_BIG)
            if self._data_flaw is None:
                out += line
        del buf[:pos]
        if out:
            self._events.append(MessageData(bytes(out)))
        if not finished:
            return False
        if self._data_flaw is not None:
            reply = self._data_flaw
            self._events.append(MessageAborted(reply))
            self._reset_transaction()
            self.state = State.READY
            self._error(reply, "DATA", f"{reply}")
            return True
        self._events.append(MessageComplete(self._data_size))
        self.state = State.COMMIT
        return False

    # --- BDAT mode (RFC 3030)

    def _bdat(self, arg: str, text: str, allowed: frozenset[str], wrong_state: Reply) -> bool:
        """``BDAT size [LAST]``: the next ``size`` octets are the chunk, whatever the
        reply will be. A refused chunk is still read and thrown away, so that its
        octets are never taken for commands; a size that does not parse leaves no
        way to find the next command, so the connection is closed."""
        from mailgrave.log import quote

        words = arg.split(" ")
        size_text = words[0]
        last = len(words) == 2 and words[1].upper() == "LAST"
        if not size_text.isdigit() or len(size_text) > 20 or len(words) > 1 + last:
            self._events.append(Rejected("BDAT", f"bad BDAT arguments {quote(text)}"))
            if self._data_started():
                self._events.append(MessageAborted(R.BDAT_SYNTAX))
            self._reply(R.BDAT_SYNTAX)
            self._events.append(Close("bad BDAT arguments"))
            self.state = State.CLOSED
            return True
        size = int(size_text)
        refused: Reply | None = None
        so_far = self._data_size if self.state == State.BDAT else 0
        if self.state not in allowed:
            refused = {State.CONNECTED: R.NEED_HELO, State.READY: R.NEED_MAIL}.get(
                self.state, wrong_state
            )
        elif so_far + size > self.policy.max_message_size:
            refused = R.TOO_BIG
        if refused is None and self.state == State.RCPT:
            self._begin_data()
            self._chunk_cr = False
            self._line_len = 0
            self._tail = b"\r\n"
        if refused is not None:
            # RFC 3030 §2: a failed chunk fails the whole transaction; never let a
            # later chunk start a message that lacks this one.
            if self.state == State.BDAT:
                self._events.append(MessageAborted(refused))
            if self.state != State.CONNECTED:
                self._reset_transaction()
                self.state = State.READY
        self._chunk_left, self._chunk_last, self._chunk_refused = size, last, refused
        self._chunk_text = text
        self._chunk_return = self.state
        self.state = State.CHUNK
        return True

    def _read_chunk(self) -> bool:
        """Take the chunk's octets from the buffer; at its end, answer it."""
        buf = self._buf
        take = min(self._chunk_left, len(buf))
        if take:
            piece = bytes(buf[:take])
            del buf[:take]
            self._chunk_left -= take
            if self._chunk_refused is None:
                self._scan_chunk(piece)
        if self._chunk_left:
            return False
        refused = self._chunk_refused
        if refused is not None:
            from mailgrave.log import quote

            self._chunk_refused = None
            self.state = self._chunk_return
            self._error(refused, "BDAT", f"{refused} for {quote(self._chunk_text)}")
            return True
        if not self._chunk_last:
            self.state = State.BDAT
            self._reply(Reply(250, "2.0.0", f"{self._data_size} octets received"))
            return True
        if self._chunk_cr:  # the message ends in a bare CR
            self._flaw(R.BARE_LF_DATA)
        if self._data_flaw is None and self._tail != b"\r\n" and self._data_size:
            # a message ends with a line end (RFC 5322 §2.1); BDAT does not promise one
            self._events.append(MessageData(b"\r\n"))
        if self._data_flaw is not None:
            reply = self._data_flaw
            self._events.append(MessageAborted(reply))
            self._reset_transaction()
            self.state = State.READY
            self._error(reply, "BDAT", f"{reply}")
            return True
        self._events.append(MessageComplete(self._data_size))
        self.state = State.COMMIT
        return False

    def _scan_chunk(self, piece: bytes) -> None:
        """DATA's rules for the stored message, applied to chunk octets: CRLF line
        ends (a bare LF is one too with ``bare_lf: normalize``, stored as CRLF; a
        bare CR always refuses the message), no NUL, lines of at most 1000
        octets. No dot-stuffing: BDAT octets are taken as they are."""
        self._data_size += len(piece)
        data = (b"\r" if self._chunk_cr else b"") + piece
        self._chunk_cr = data.endswith(b"\r")
        if self._chunk_cr:
            data = data[:-1]  # it may be the CR of a CRLF split between pieces
        if self._data_flaw is not None:
            return
        if self.policy.bare_lf == "normalize" and b"\n" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        crlf = data.count(b"\r\n")
        if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
            self._flaw(R.BARE_LF_DATA)
        if b"\x00" in data:
            self._flaw(R.NUL_DATA)
        lines = data.split(b"\r\n")
        first = self._line_len + len(lines[0])
        longest = max(first, max((len(line) for line in lines[1:]), default=0))
        self._line_len = first if len(lines) == 1 else len(lines[-1])
        if longest + 2 > MAX_LINE:
            self._flaw(R.DATA_LINE_TOO_LONG)
        if self._data_flaw is None and data:
            self._tail = (self._tail + data)[-2:]
            self._events.append(MessageData(data))
