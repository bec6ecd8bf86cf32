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

    def is_local_domain(self, domain: str) -> bool: ...

    def recipient_exists(self, local: str, domain: str) -> bool: ...

    def may_relay(self) -> bool: ...


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
    COMMIT = "commit"  # final dot seen; waiting for the queue
    TLS = "tls"  # STARTTLS answered; waiting for the handshake
    CLOSED = "closed"


_ANY = frozenset({State.CONNECTED, State.READY, State.MAIL, State.RCPT})
_HELLOED = frozenset({State.READY, State.MAIL, State.RCPT})

# verb -> (states where it is allowed, the reply when it is not, next state on success)
# A next state of None keeps the current state.
TRANSITIONS: dict[str, tuple[frozenset[str], Reply, str | None]] = {
    "EHLO": (_ANY, R.BAD_SEQUENCE, State.READY),
    "HELO": (_ANY, R.BAD_SEQUENCE, State.READY),
    "MAIL": (frozenset({State.READY}), R.NEED_HELO, State.MAIL),
    "RCPT": (frozenset({State.MAIL, State.RCPT}), R.NEED_MAIL, State.RCPT),
    "DATA": (frozenset({State.RCPT}), R.NEED_RCPT, State.DATA),
    "RSET": (_ANY, R.BAD_SEQUENCE, None),
    "NOOP": (_ANY, R.BAD_SEQUENCE, None),
    "VRFY": (_ANY, R.BAD_SEQUENCE, None),
    "HELP": (_ANY, R.BAD_SEQUENCE, None),
    "QUIT": (_ANY, R.BAD_SEQUENCE, State.CLOSED),
    "STARTTLS": (frozenset({State.CONNECTED, State.READY}), R.BAD_SEQUENCE, State.TLS),
}


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
            "QUIT": lambda arg: R.BYE,
            "STARTTLS": self._starttls,
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
        self.helo, self.esmtp = "", False
        self._buf.clear()
        self.state = State.CONNECTED
        return []

    def timeout(self) -> list[Event]:
        """The client was idle too long."""
        return self._close_with(R.TIMEOUT, "idle timeout")

    @property
    def proto(self) -> str:
        if not self.esmtp:
            return "SMTP"
        return "ESMTPS" if self.tls else "ESMTP"

    # --- internals

    def _data_started(self) -> bool:
        return self.state in (State.DATA, State.COMMIT)

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
        while self.state not in (State.CLOSED, State.COMMIT, State.TLS):
            progressed = self._read_data() if self.state == State.DATA else self._read_command()
            if not progressed:
                return

    def _error(self, reply: Reply, stage: str, reason: str) -> None:
        """Send an error reply; count it; 421 and close after too many."""
        self._reply(reply)
        self._events.append(Rejected(stage, reason))
        self.errors += 1
        if self.policy.max_errors and self.errors >= self.policy.max_errors:
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
        from mailgrave.log import quote

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
        if self.state not in allowed:
            self._error(wrong_state, verb, f"{verb} out of sequence")
            return True
        reply = self._handlers[verb](arg.strip())
        if reply.is_error:
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
        ]
        if self.policy.tls_available and not self.tls:
            lines.append("STARTTLS")
        lines.append("HELP")
        return Reply(250, "", f"{self.policy.hostname} Hello", tuple(lines))

    def _helo(self, arg: str) -> Reply:
        if not arg or " " in arg:
            return R.SYNTAX
        self._reset_transaction()
        self.helo, self.esmtp = arg, False
        return Reply(250, "", self.policy.hostname)

    def _rset(self, arg: str) -> Reply:
        self._reset_transaction()
        if self.state in (State.MAIL, State.RCPT):
            self.state = State.READY
        return R.OK

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

    def _mail(self, arg: str) -> Reply:
        rest = self._keyword_arg(arg, "FROM:")
        if rest is None:
            return R.SYNTAX
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
            )
        )

    def _flaw(self, reply: Reply) -> None:
        if self._data_flaw is None:
            self._data_flaw = reply

    def _read_data(self) -> bool:
        """Consume whole lines; forward them unless the message is already refused.

        Only CRLF "." CRLF ends the data, and only after a line that itself
        ended with CRLF: a bare LF or CR anywhere refuses the message, which
        is still read to its real end (no SMTP smuggling).
        """
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
            if not crlf or b"\r" in content:
                self._flaw(R.BARE_LF_DATA)
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
