"""A blocking SMTP client for mailgrave-remote: EHLO, STARTTLS, AUTH, pipelined envelope,
streamed DATA from the spool, per-recipient results, and a transcript of replies."""

from __future__ import annotations

import base64
import socket
import ssl
import time
from collections.abc import Iterator

from mailgrave.envelope import Envelope
from mailgrave.errors import PERMANENT, TEMPORARY, Result
from mailgrave.record import Record, record
from mailgrave.smtp.replies import Reply
from mailgrave.smtp.server import xtext_encode

MAX_REPLY_LINES = 100
MAX_LINE = 2048
# BDAT chunk size: big enough that the per-chunk command and reply cost nothing,
# small enough to keep memory bounded (one chunk is held at a time) and to keep
# the peer busy while the next one is read (256 KiB measured faster than 1 MiB
# for 1 MB messages: docs/performance.md, issue 15).
BDAT_CHUNK = 256 * 1024
# a peer's reply goes into result lines, the queue and logs: no control characters
_PRINTABLE = {c: "?" for c in [*range(32), 127]} | {9: " "}


@record
class Timeouts(Record):
    """RFC 5321 §4.5.3.2, in seconds."""

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0


# The stages of a message's final answer (after DATA's dot, after BDAT ... LAST).
END_OF_DATA = "end of data"
END_OF_BDAT = "BDAT LAST"


class SMTPError(Exception):
    """A failed exchange: ``reply`` (None for a network failure) from ``host``,
    ``stage``, ``permanent``; ``status`` the enhanced code when there is no reply."""

    def __init__(
        self,
        text: str,
        stage: str,
        permanent: bool,
        reply: Reply | None = None,
        *,
        host: str = "",
        status: str = "",
    ) -> None:
        super().__init__(text)
        self.text = text
        self.stage = stage
        self.permanent = permanent
        self.reply = reply
        self.host = host
        self.status = status or ("5.5.0" if permanent else "4.4.2")
        self.transcript: list[str] = []  # of a session that failed before it was handed out

    @property
    def before_the_message(self) -> bool:
        """Failed at MAIL or RCPT: no octet of the message had been sent, so the
        same transaction may be tried at once on a new connection."""
        return self.stage in ("MAIL", "MAIL FROM", "RCPT", "RCPT TO")

    @property
    def answer_lost(self) -> bool:
        """The whole message went and its final answer did not come: the peer may
        have taken it (RFC 1047), so trying it now elsewhere could deliver it twice."""
        return self.reply is None and self.stage in (END_OF_DATA, END_OF_BDAT)

    def result(self) -> Result:
        """The result for every recipient this failure applies to."""
        code = PERMANENT if self.permanent else TEMPORARY
        if self.reply is not None:
            status = self.reply.enhanced or ("5.0.0" if self.permanent else "4.0.0")
            return Result(code, status, f"{self.reply} (in reply to {self.stage})", self.host)
        return Result(code, self.status, self.text)


class Client:
    """One SMTP connection to ``name`` (``host[addr]:port`` for messages and logs)."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket, name: str, timeouts: Timeouts) -> None:
        self.sock = sock
        self.name = name
        self.timeouts = timeouts
        self.transcript: list[str] = []
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.authenticated = False
        self.broken = False  # timed out or failed: QUIT would only wait in vain
        self._buf = b""

    # --- low level ---------------------------------------------------------------

    def _readline(self, stage: str, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                self.broken = True
                raise SMTPError(f"reply line to {stage} too long", stage, False)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            data = self.sock.recv(4096)
            if not data:
                self.broken = True
                raise SMTPError(f"connection closed by the server during {stage}", stage, False)
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line.rstrip(b"\r")

    def read_reply(self, timeout: float, stage: str) -> Reply:
        """The whole reply within ``timeout`` seconds, however it trickles in (a peer
        sending a byte now and then cannot hold the delivery longer than that)."""
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        try:
            while True:
                raw = self._readline(stage, deadline)
                text = raw.decode("utf-8", "replace").translate(_PRINTABLE)
                if len(text) < 3 or not text[:3].isdigit():
                    self.broken = True
                    raise SMTPError(f"malformed reply to {stage}", stage, False)
                lines.append(text[4:])
                if len(lines) > MAX_REPLY_LINES:
                    self.broken = True
                    raise SMTPError(f"reply to {stage} too long", stage, False)
                if text[3:4] != "-":
                    reply = Reply.parse(int(text[:3]), lines)
                    self.transcript.append(f"<<< {reply}"[:500])
                    return reply
        except TimeoutError:
            self.broken = True
            raise SMTPError(f"timeout waiting for the reply to {stage}", stage, False) from None
        except OSError as exc:
            self.broken = True
            raise SMTPError(
                f"connection failed during {stage}: {exc.strerror or exc}", stage, False
            ) from None
        finally:
            if not self.broken:
                self.sock.settimeout(timeout)  # what the next command's writes wait

    def send(self, line: str, shown: str | None = None) -> None:
        self.transcript.append(f">>> {shown if shown is not None else line}"[:500])
        try:
            self.sock.sendall(line.encode("utf-8", "surrogateescape") + b"\r\n")
        except OSError as exc:
            self.broken = True
            raise SMTPError(
                f"connection failed: {exc.strerror or exc}", line.split(" ")[0], False
            ) from None

    def command(self, line: str, stage: str, shown: str | None = None) -> Reply:
        self.send(line, shown)
        return self.read_reply(self.timeouts.command, stage)

    def _fail(self, reply: Reply, stage: str) -> SMTPError:
        return SMTPError(
            f"{self.name} said: {reply} (in reply to {stage})",
            stage,
            reply.permanent,
            reply,
            host=self.name,
        )

    # --- session -------------------------------------------------------------------

    def greet(self, helo: str) -> None:
        reply = self.read_reply(self.timeouts.greeting, "greeting")
        if not reply.ok:
            raise self._fail(reply, "the greeting")
        self.hello(helo)

    def hello(self, helo: str) -> None:
        reply = self.command(f"EHLO {helo}", "EHLO")
        if reply.code == 250:
            self.extensions = {}
            for line in reply.lines:
                key, _, value = line.partition(" ")
                self.extensions[key.upper()] = value
            return
        reply = self.command(f"HELO {helo}", "HELO")
        if not reply.ok:
            raise self._fail(reply, "HELO")
        self.extensions = {}

    def starttls(self, context: ssl.SSLContext, server_hostname: str | None, helo: str) -> None:
        reply = self.command("STARTTLS", "STARTTLS")
        if reply.code != 220:
            raise self._fail(reply, "STARTTLS")
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        except (OSError, ValueError) as exc:
            self.broken = True
            # verify_message says which check failed ("IP address mismatch, ...").
            reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
            raise SMTPError(f"TLS with {self.name} failed: {reason}", "STARTTLS", False) from None
        self._buf = b""
        self.tls = True
        self.hello(helo)

    def auth(self, login: str, password: str) -> None:
        """AUTH PLAIN or LOGIN (only what the server offers; only over TLS)."""
        if not self.tls:
            raise SMTPError("refusing to send credentials without TLS", "AUTH", False)
        mechs = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechs:
            token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
            reply = self.command(f"AUTH PLAIN {token}", "AUTH", shown="AUTH PLAIN ****")
        elif "LOGIN" in mechs:
            reply = self.command("AUTH LOGIN", "AUTH")
            if reply.code == 334:
                reply = self.command(base64.b64encode(login.encode()).decode(), "AUTH", "****")
            if reply.code == 334:
                reply = self.command(base64.b64encode(password.encode()).decode(), "AUTH", "****")
        else:
            raise SMTPError(f"{self.name} offers no AUTH PLAIN or LOGIN", "AUTH", False)
        if reply.code != 235:
            # never permanent (Postfix's smtp_sasl_auth_soft_bounce): a wrong password in
            # our own configuration must not bounce the mail
            err = self._fail(reply, "AUTH")
            err.permanent = False
            raise err
        self.authenticated = True

    def deliver(
        self,
        sender: str,
        rcpts: list[str],
        message: Iterator[bytes],
        size: int,
        needs_smtputf8: bool,
        dsn: Envelope | None = None,
        chunks: Iterator[bytes] | None = None,
    ) -> list[Result]:
        """One transaction. Returns the result for each recipient; raises SMTPError
        when the whole transaction failed (then it applies to every recipient).

        ``message`` is the DATA form (CRLF, dot-stuffed); ``chunks``, when given,
        the same message in BDAT form (CRLF, not dot-stuffed: ``wire_format(...,
        dot_stuff=False)``), sent with BDAT when the peer offers CHUNKING: measured not
        slower than DATA, in wall time or the client's CPU, from 2 KB to 10 MB to
        MailGrave's smtpd on loopback (issue 15: bench/bdat.py, docs/performance.md).
        ``dsn``: the envelope of ``sender`` and ``rcpts`` with their DSN
        parameters, passed on when the server offers DSN (RFC 3461 §5.2.2)."""
        if needs_smtputf8 and "SMTPUTF8" not in self.extensions:
            raise SMTPError(
                f"{self.name} does not support SMTPUTF8, which this message needs",
                "MAIL FROM",
                True,
                status="5.6.7",
            )
        limit = self.extensions.get("SIZE", "")
        if limit.isdigit() and 0 < int(limit) < size:
            raise SMTPError(
                f"{self.name} accepts at most {limit} bytes, the message has {size}",
                "MAIL FROM",
                True,
                status="5.3.4",
            )
        params = ""
        if "SIZE" in self.extensions:
            params += f" SIZE={size}"
        if "8BITMIME" in self.extensions:
            params += " BODY=8BITMIME"
        if needs_smtputf8:
            params += " SMTPUTF8"
        rcpt_params = [""] * len(rcpts)
        passed = dsn is not None and "DSN" in self.extensions
        if dsn is not None and passed:
            if dsn.ret:
                params += f" RET={dsn.ret}"
            if dsn.envid:
                params += f" ENVID={xtext_encode(dsn.envid)}"
            for i in range(len(rcpts)):
                if dsn.notify_of(i):
                    rcpt_params[i] += f" NOTIFY={dsn.notify_of(i)}"
                if dsn.orcpt_of(i):
                    kind, _, orig = dsn.orcpt_of(i).partition(";")
                    rcpt_params[i] += f" ORCPT={kind};{xtext_encode(orig)}"
        commands = [
            f"MAIL FROM:<{sender}>{params}",
            *(f"RCPT TO:<{r}>{p}" for r, p in zip(rcpts, rcpt_params, strict=True)),
        ]
        if "PIPELINING" in self.extensions:
            for line in commands:
                self.send(line)
            replies = [self.read_reply(self.timeouts.command, c.split(":")[0]) for c in commands]
        else:
            replies = []
            for line in commands:
                replies.append(self.command(line, line.split(":")[0]))
                if not replies[0].ok:
                    break
        mail = replies[0]
        if not mail.ok:
            self.reset()
            raise self._fail(mail, "MAIL FROM")
        results: list[Result | None] = []
        for rcpt_reply in replies[1:]:
            if rcpt_reply.ok:
                results.append(None)
            else:
                results.append(self._fail(rcpt_reply, "RCPT TO").result())
        if all(r is not None for r in results):
            self.reset()
            return [r for r in results if r is not None]
        try:
            # BDAT whenever offered: measured not slower than DATA at any size (issue 15)
            if chunks is not None and "CHUNKING" in self.extensions:
                done = self._bdat(chunks, results)
            else:
                done = self._data(message, results)
        except SMTPError as exc:
            if all(r is None for r in results):
                raise
            # recipients refused at RCPT keep their own answer
            failed = exc.result()
            return [r if r is not None else failed for r in results]
        return [r.replace(dsn=True) if passed and r.ok else r for r in done]

    def _data(self, message: Iterator[bytes], results: list[Result | None]) -> list[Result]:
        self.send("DATA")
        reply = self.read_reply(self.timeouts.data_init, "DATA")
        if reply.code != 354:
            raise self._fail(reply, "DATA")
        self.sock.settimeout(self.timeouts.data_block)
        for chunk in message:
            self._send_octets(chunk, "DATA")
        self._send_octets(b".\r\n", "DATA")
        self.transcript.append(">>> (message)")
        final = self.read_reply(self.timeouts.data_end, END_OF_DATA)
        if not final.ok:
            raise self._fail(final, "end of DATA")
        done = Result("K", final.enhanced or "2.0.0", str(final), self.name)
        return [r if r is not None else done for r in results]

    def _send_octets(self, data: bytes | bytearray, stage: str) -> None:
        """Message octets (DATA or BDAT); a timeout or a broken connection is an
        SMTPError for the whole transaction, and the session is not reused."""
        try:
            self.sock.sendall(data)
        except TimeoutError:
            self.broken = True
            raise SMTPError("timeout while sending the message", stage, False) from None
        except OSError as exc:
            self.broken = True
            raise SMTPError(
                f"connection failed while sending the message: {exc.strerror or exc}", stage, False
            ) from None

    def _bdat(self, message: Iterator[bytes], results: list[Result | None]) -> list[Result]:
        """RFC 3030: the message in chunks of about BDAT_CHUNK octets, the last one
        with LAST (``BDAT 0 LAST`` for an empty rest). With PIPELINING the chunks
        go out without waiting; every chunk's reply is read, in order."""
        pipelined = "PIPELINING" in self.extensions
        sent = 0  # chunks whose reply is still to be read
        failure: Reply | None = None
        buf = bytearray()
        pieces = iter(message)
        self.sock.settimeout(self.timeouts.data_block)
        while True:
            piece = next(pieces, None)
            if piece is not None:
                buf += piece
                if len(buf) < BDAT_CHUNK:
                    continue
            last = piece is None
            head = f"BDAT {len(buf)}{' LAST' if last else ''}"
            self.transcript.append(f">>> {head}")
            self._send_octets(head.encode() + b"\r\n", "BDAT")
            self._send_octets(buf, "BDAT")  # as it is: no copy of the chunk
            buf.clear()
            sent += 1
            if not pipelined or last:
                timeout = self.timeouts.data_end if last else self.timeouts.data_block
                while sent:
                    stage = END_OF_BDAT if last and sent == 1 else "BDAT"
                    reply = self.read_reply(timeout, stage)
                    sent -= 1
                    if not reply.ok and failure is None:
                        failure = reply
                if failure is not None:
                    raise self._fail(failure, "BDAT")
                if last:
                    done = Result("K", reply.enhanced or "2.0.0", str(reply), self.name)
                    return [r if r is not None else done for r in results]

    def reset(self) -> None:
        try:
            self.command("RSET", "RSET")
        except SMTPError:
            pass

    def quit(self) -> None:
        try:
            if not self.broken:
                self.send("QUIT")
                self.read_reply(5.0, "QUIT")
        except SMTPError:
            pass
        finally:
            self.sock.close()


def header_is_ascii(blocks: Iterator[bytes]) -> bool:
    """Whether a message's header section (up to its first empty line) is all
    ASCII: raw UTF-8 in it (RFC 6532) needs SMTPUTF8 at the next hop. Reads no
    further than the header's end."""
    prev = b"\n"  # a message that begins with an empty line has no header
    for block in blocks:
        data = prev + block
        end = data.find(b"\n\n")
        if end < 0:
            end = data.find(b"\n\r\n")
        head = data if end < 0 else data[:end]
        if not head.isascii():
            return False
        if end >= 0:
            return True
        prev = data[-2:]
    return True


def wire_format(blocks: Iterator[bytes], dot_stuff: bool = True) -> Iterator[bytes]:
    """Spool form (LF) → SMTP DATA (CRLF, dot-stuffed), streamed in bounded memory:
    a long line is passed on in pieces, never collected whole. ``dot_stuff=False``
    gives BDAT's form: CRLF, the octets otherwise as they are."""
    start = True  # the next byte begins a line
    held = b""  # a CR at the end of a block, which may be the CR of a CRLF
    for block in blocks:
        data = held + block
        held = b""
        out = bytearray()
        lines = data.split(b"\n")
        last = lines.pop()
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if dot_stuff and start and line.startswith(b"."):
                out += b"."
            out += line + b"\r\n"
            start = True
        if last.endswith(b"\r"):
            held, last = b"\r", last[:-1]
        if last:
            if dot_stuff and start and last.startswith(b"."):
                out += b"."
            out += last
            start = False
        if out:
            yield bytes(out)
    if held or not start:
        yield b"\r\n"
