"""mailgrave-inject: local submission with sendmail's command line (sendmail(8), mailq(1)).

Reads a message on standard input, completes its header (Date:, Message-ID:,
From:), works out the envelope, and hands it to mailgrave-queue over
queue.ctrl.  Exit 0 only once the message is on disk; otherwise a sysexits
code and one line on stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import BinaryIO

from mailgrave import config as configmod
from mailgrave import ctrl
from mailgrave.address import AddressError, parse_mailbox
from mailgrave.envelope import DSN_RET, MAX_ENVID, Envelope, dsn_text_ok, valid_notify
from mailgrave.errors import PermFail, TempFail
from mailgrave.headers import message_id, rfc5322_date
from mailgrave.record import Record, factory, record

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78

MAX_HEADER = 1024 * 1024
USAGE = f"""\
usage: sendmail [-t] [-i] [-f SENDER] [-F NAME] [-v] [--config FILE] [--out PATH] [--]
                [RECIPIENT ...]
       sendmail -bp | mailq          list the queue
       sendmail -q                   retry every deferred message now

Reads a message on standard input and queues it for RECIPIENT(s).
  -t          also take recipients from the To:, Cc: and Bcc: headers (Bcc: is removed)
  -f SENDER   envelope sender (also -r); "<>" for the null sender
  -F NAME     full name for a From: header that MailGrave adds
  -i, -oi     a line with a single "." does not end the message
  -v          print the queue id
  -C FILE, --config FILE
              configuration file (default: {configmod.DEFAULT_PATH})
  --out PATH  the queue.ctrl socket to submit to
              (default: run_dir/queue.ctrl, {configmod.Config().socket_path("queue.ctrl")})
  -N NOTIFY   DSN: never, or success,failure,delay (RFC 3461), for every recipient
  -R RET      DSN: return the full message or only its headers (full|hdrs)
  -V ENVID    DSN: an envelope id, echoed in delivery reports
  -SMTPUTF8   the message is internationalised (RFC 6531/6532, as Postfix's -SMTPUTF8):
              raw UTF-8 in its header then needs SMTPUTF8 at the next hop
Other sendmail options (-oem, -odb, -odi, -B, -L, -O, -X, -h, -U, -G,
-bm, -bi ...) are accepted and ignored.  Exit 0 once queued, else sysexits(3).
"""

# Options that take an argument (attached or as the next word); ignored values.
_IGNORED_WITH_ARG = set("BLOXhpq")
_IGNORED_FLAGS = set("UGnmsvdx")


class UsageError(Exception):
    pass


class BadAddress(PermFail):
    """An address that is not a mailbox: on the command line a usage error (64),
    in a -t header a data error (65). Nothing is queued."""

    def __init__(self, text: str, exit_code: int) -> None:
        super().__init__(text)
        self.exit_code = exit_code


@record(frozen=False)
class Options(Record):
    recipients: list[str] = factory(list)
    from_headers: bool = False
    sender: str | None = None
    full_name: str | None = None
    dot_ends: bool = True
    verbose: bool = False
    config: str | None = None
    out: str | None = None  # --out: queue.ctrl elsewhere than run_dir
    mode: str = "send"  # send | list | retry | noop
    notify: str = ""  # DSN (-N, -R, -V)
    ret: str = ""
    envid: str = ""
    utf8: bool = False  # -SMTPUTF8


def parse_args(argv: list[str]) -> Options:
    """sendmail's command line, as cron, mail(1), PHP and git send-email use it."""
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            opts.recipients.extend(argv[i:])
            break
        if arg == "--help":
            raise UsageError("help")
        if arg.startswith("--config"):
            if "=" in arg:
                opts.config = arg.split("=", 1)[1]
            elif i < len(argv):
                opts.config = argv[i]
                i += 1
            else:
                raise UsageError("--config needs a file")
            continue
        if arg == "--out" or arg.startswith("--out="):
            if "=" in arg:
                opts.out = arg.split("=", 1)[1]
            elif i < len(argv):
                opts.out = argv[i]
                i += 1
            if not opts.out:
                raise UsageError("--out needs the path of a queue.ctrl socket")
            continue
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
            continue
        if arg == "-SMTPUTF8":
            opts.utf8 = True
            continue
        letter, rest = arg[1:2], arg[2:]

        def value(rest: str = rest, letter: str = letter) -> str:
            nonlocal i
            if rest:
                return rest
            if i >= len(argv):
                raise UsageError(f"option -{letter} needs a value")
            i += 1
            return argv[i - 1]

        if letter == "t":
            opts.from_headers = True
        elif letter == "i":
            opts.dot_ends = False
        elif letter in ("f", "r"):
            opts.sender = value()
        elif letter == "F":
            opts.full_name = value()
        elif letter == "C":
            opts.config = value()
        elif letter == "v":
            opts.verbose = True
        elif letter == "o":
            if rest == "i":
                opts.dot_ends = False
            elif not rest:
                value()  # "-o X" style: skip the value
        elif letter == "b":
            mode = rest or value()
            if mode == "p":
                opts.mode = "list"
            elif mode in ("i", "m", "d", "v"):
                opts.mode = "noop" if mode == "i" else opts.mode
            elif mode == "s":
                raise UsageError(
                    "-bs (SMTP on standard input) is not supported; use mailgrave-smtpd"
                )
            else:
                raise UsageError(f"unknown mode -b{mode}")
        elif letter == "N":
            opts.notify = value().upper().replace(" ", "")
            if not valid_notify(opts.notify):
                raise UsageError("-N takes never, or any of success,failure,delay")
        elif letter == "R":
            opts.ret = value().upper()
            if opts.ret not in DSN_RET:
                raise UsageError("-R takes full or hdrs")
        elif letter == "V":
            opts.envid = value()
            if not dsn_text_ok(opts.envid, MAX_ENVID):
                raise UsageError(f"-V takes printable ASCII, at most {MAX_ENVID} characters")
        elif letter == "q":
            opts.mode = "retry"
        elif letter in _IGNORED_WITH_ARG:
            value()
        elif letter in _IGNORED_FLAGS or letter == "":
            pass
        else:
            raise UsageError(f"unknown option {arg}")
    return opts


# --- message header ---------------------------------------------------------


@record
class Header(Record):
    """The message's header block, field by field (raw, folded lines kept)."""

    fields: list[tuple[str, bytes]]
    rest: bytes  # bytes read past the header (the start of the body)
    ended: bool  # input ended inside the header


def _is_field_start(line: bytes) -> bool:
    name, colon, _ = line.partition(b":")
    return bool(colon) and bool(name) and all(33 <= c <= 126 for c in name)


def read_header(stream: BinaryIO, dot_ends: bool) -> Header:
    """Read header fields up to the empty line (kept in ``rest``) or the first non-field line."""
    fields: list[tuple[str, bytes]] = []
    size = 0
    first = True
    while True:
        line = stream.readline(MAX_HEADER)
        if not line:
            return Header(fields, b"", True)
        if dot_ends and line.rstrip(b"\r\n") == b".":
            return Header(fields, b"", True)
        size += len(line)
        if first and line.startswith(b"From "):
            first = False
            continue  # an mbox separator line; sendmail drops it too
        first = False
        if line[:1] in (b" ", b"\t") and fields and size < MAX_HEADER:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
            continue
        if _is_field_start(line) and size < MAX_HEADER:
            fields.append((line.split(b":", 1)[0].decode("ascii").lower(), line))
            continue
        return Header(fields, line, False)


def header_addresses(fields: list[tuple[str, bytes]], names: tuple[str, ...]) -> list[str]:
    """The addresses of the named fields; BadAddress when a field does not parse."""
    from email.header import decode_header, make_header
    from email.utils import getaddresses

    found = []
    for name, raw in fields:
        if name in names:
            text = raw.split(b":", 1)[1].decode("utf-8", "replace")
            text = " ".join(text.split())
            try:
                text = str(make_header(decode_header(text)))
            except Exception:  # a broken encoded-word: keep the raw text
                pass
            pairs = getaddresses([text])
            # getaddresses gives ("", "") for what it cannot parse, and for an
            # empty group ("undisclosed-recipients:;"), which is no error.
            empty_group = ":" in text and text.rstrip().endswith(";")
            if text.strip() and ("", "") in pairs and not empty_group:
                shown = text[:80].encode("unicode_escape").decode("ascii")
                raise BadAddress(f"bad address in the {name.title()}: header: {shown!r}", 65)
            found += [addr for _name, addr in pairs if addr]
    return found


# --- submission ---------------------------------------------------------------


def _login_name() -> tuple[str, str]:
    import pwd

    try:
        pw = pwd.getpwuid(os.getuid())
    except KeyError:
        return str(os.getuid()), ""
    return pw.pw_name, pw.pw_gecos.split(",", 1)[0]


def _header_text(text: str) -> str:
    """``text`` fit for one header line: control characters (CR, LF, NUL...) become
    spaces, so that ``sendmail -F`` (or a GECOS field) cannot add a header field."""
    return "".join(" " if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in text).strip()


def _added_fields(
    header: Header, config: configmod.Config, sender: str, full_name: str | None
) -> bytes:
    present = {name for name, _ in header.fields}
    lines = []
    if "from" not in present:
        name = _header_text(full_name if full_name is not None else _login_name()[1])
        addr = sender or f"MAILER-DAEMON@{config.hostname}"
        if name:
            quoted = name.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'From: "{quoted}" <{addr}>')
        else:
            lines.append(f"From: <{addr}>")
    if "date" not in present:
        lines.append(f"Date: {rfc5322_date()}")
    if "message-id" not in present:
        lines.append(f"Message-ID: {message_id(config.hostname)}")
    return "".join(line + "\n" for line in lines).encode("utf-8")


def _body(stream: BinaryIO, dot_ends: bool) -> Iterator[bytes]:
    if not dot_ends:
        while True:
            block = stream.read(1 << 16)
            if not block:
                return
            yield block
    while True:
        line = stream.readline(1 << 16)
        if not line or line.rstrip(b"\r\n") == b".":
            return
        yield line


def submit(opts: Options, config: configmod.Config, stream: BinaryIO) -> str:
    """Build the envelope and stream the message to the queue; return the queue id."""
    origin = config.origin or config.hostname
    login, _gecos = _login_name()
    if opts.sender is None:
        sender = f"{login}@{origin}"
    elif opts.sender in ("<>", ""):
        sender = ""
    else:
        sender = opts.sender.strip("<>")
    if sender:
        try:
            sender = str(parse_mailbox(sender, origin))
        except AddressError as exc:
            raise BadAddress(f"bad sender address {sender!r}: {exc}", 64) from None
    recipients: list[str] = []

    def add(texts: list[str], exit_code: int) -> None:
        for text in texts:
            for part in text.split(","):
                part = part.strip().strip("<>")
                if not part:
                    continue
                try:
                    addr = str(parse_mailbox(part, origin))
                except AddressError as exc:
                    raise BadAddress(f"bad recipient address {part!r}: {exc}", exit_code) from None
                if addr not in recipients:
                    recipients.append(addr)

    add(opts.recipients, 64)  # before reading the message: a usage error
    header = read_header(stream, opts.dot_ends)
    if opts.from_headers:
        add(header_addresses(header.fields, ("to", "cc", "bcc")), 65)
    if not recipients:
        raise PermFail("no recipients given (name them, or use -t with To:/Cc:/Bcc:)")
    kept = b"".join(raw for name, raw in header.fields if name not in ("bcc", "resent-bcc"))
    envelope = Envelope(
        sender,
        tuple(recipients),
        opts.ret,
        opts.envid,
        (opts.notify,) * len(recipients) if opts.notify else (),
        utf8=opts.utf8,
    )
    qc = ctrl.QueueClient(config.socket_path("queue.ctrl"), {}, envelope)
    try:
        qc.write(_added_fields(header, config, sender, opts.full_name) + kept)
        if header.rest or not header.ended:
            if header.rest and header.rest.strip(b"\r\n"):
                qc.write(b"\n")  # the input had no empty line after its header
            qc.write(header.rest)
            for block in _body(stream, opts.dot_ends):
                qc.write(block)
    except BaseException:
        qc.abort()
        raise
    return qc.commit()


def main(argv: list[str] | None = None, prog: str = "mailgrave-inject") -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        opts = parse_args(args)
    except UsageError as exc:
        if str(exc) == "help":
            sys.stdout.write(USAGE)
            return EX_OK
        print(f"{prog}: {exc}", file=sys.stderr)
        sys.stderr.write(USAGE)
        return EX_USAGE
    if opts.mode in ("list", "retry"):
        # As Postfix's sendmail runs postqueue: the queue belongs to the admin command.
        sub = ["queue"] if opts.mode == "list" else ["queue", "retry", "--all"]
        cfg = ["--config", opts.config] if opts.config else []
        argv0 = [sys.executable, "-m", "mailgrave.admin"]
        try:
            os.execv(sys.executable, [*argv0, *cfg, *sub])
        except OSError as exc:
            print(f"{prog}: cannot run mailgrave: {exc.strerror}", file=sys.stderr)
            return EX_UNAVAILABLE
    if opts.mode == "noop":
        return EX_OK  # newaliases: /etc/aliases is read directly, nothing to rebuild
    config = configmod.load_or_exit(opts.config, prog, EX_CONFIG)
    if opts.out:
        config = config.with_socket("queue.ctrl", opts.out)
    try:
        qid = submit(opts, config, sys.stdin.buffer)
    except BadAddress as exc:
        print(f"{prog}: {exc.text}; message not sent", file=sys.stderr)
        return exc.exit_code
    except PermFail as exc:
        print(f"{prog}: {exc.text}", file=sys.stderr)
        return EX_DATAERR
    except TempFail as exc:
        print(f"{prog}: {exc.text}; message not sent, try again later", file=sys.stderr)
        return EX_TEMPFAIL
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; message not sent", file=sys.stderr)
        return EX_TEMPFAIL
    except OSError as exc:
        # Reading standard input or talking to the queue failed: nothing was queued.
        print(f"{prog}: {exc.strerror or exc}; message not sent, try again later", file=sys.stderr)
        return EX_TEMPFAIL
    if opts.verbose:
        print(f"{prog}: queued as {qid}", file=sys.stderr)
    return EX_OK


def sendmail_main() -> int:
    """The ``sendmail`` / ``mailq`` / ``newaliases`` entry point."""
    name = os.path.basename(sys.argv[0])
    if name == "mailq":
        return main(["-bp", *sys.argv[1:]], prog=name)
    if name == "newaliases":
        return main(["-bi", *sys.argv[1:]], prog=name)
    return main(prog=name)


if __name__ == "__main__":
    sys.exit(main())
