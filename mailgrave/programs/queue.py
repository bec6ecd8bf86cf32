"""mailgrave-queue: the only writer of new messages into the spool.

By hand it reads the message on fd 0 and the envelope on fd 1, like
qmail-queue(8).  As a service it serves queue.ctrl (docs/flow.md): one
process, one thread per submission, directory fsyncs shared between
concurrent submissions (group commit), exit after an idle period.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

from mailgrave import config as configmod
from mailgrave import log as logmod
from mailgrave import maillog
from mailgrave.envelope import Envelope, EnvelopeError, decode, read_envelope, read_fields
from mailgrave.errors import EXIT_OK, EXIT_PERM, EXIT_TEMP, PermFail, TempFail
from mailgrave.fileio import write_all
from mailgrave.spool import GroupSync, Spool, entry_header, new_qid

log = logging.getLogger(__name__)

MAX_ATTRS = 16 * 1024
READ_TIMEOUT = 300.0
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def rfc5322_date(now: float | None = None) -> str:
    """``Thu, 26 Nov 2026 22:00:00 +0100`` in local time, independent of the locale."""
    t = time.localtime(now)
    offset = t.tm_gmtoff // 60
    sign = "+" if offset >= 0 else "-"
    hh, mm = divmod(abs(offset), 60)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{hh:02d}{mm:02d}"
    )


def _clean(text: str, limit: int = 100) -> str:
    """Client text fit for a header comment: printable ASCII, no parentheses, bounded."""
    out = "".join(c if 0x21 <= ord(c) < 0x7F and c not in "()\\" else "?" for c in text)
    return out[:limit] or "unknown"


def received_line(
    hostname: str, qid: str, envelope: Envelope, attrs: dict[str, str] | None, uid: int | None
) -> bytes:
    """The queue's ``Received:`` header (RFC 5321 §4.4), folded, LF line ends."""
    date = rfc5322_date()
    if attrs and attrs.get("addr"):
        helo = _clean(attrs.get("helo", ""))
        addr = _clean(attrs["addr"], 60)
        host = attrs.get("host")
        peer = f"{_clean(host)} [{addr}]" if host else f"[{addr}]"
        proto = _clean(attrs.get("proto", "SMTP"), 20)
        line = f"Received: from {helo} ({peer})\n\tby {hostname} (MailGrave) with {proto} id {qid}"
    else:
        who = f"from userid {uid}" if uid is not None else "local"
        line = f"Received: by {hostname} (MailGrave, {who})\n\tid {qid}"
    if len(envelope.recipients) == 1:
        line += f"\n\tfor <{envelope.recipients[0]}>"
    return f"{line}; {date}\n".encode("utf-8", "surrogateescape")


class Writer:
    """Writes one message into tmp/ with LF line ends, counting its size."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit
        self.size = 0
        self._cr = False

    def write(self, data: bytes) -> None:
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        data = data.replace(b"\r\n", b"\n")
        self.size += len(data)
        if self.size > self.limit:
            raise PermFail("5.3.4 message too big")
        write_all(self.fd, data)

    def finish(self) -> None:
        if self._cr:
            self._cr = False
            self.write(b"\r")
            return
        os.fsync(self.fd)


class Queue:
    """Commits submissions to the spool (shared by every thread of a service)."""

    def __init__(self, config: configmod.Config) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self.spool.create()
        self.todo_sync = GroupSync(self.spool.path("todo"))
        self.trusted = _trusted_uids(config.queue.trusted_users)

    def submit(
        self,
        chunks: Iterator[bytes],
        envelope_source: bytes | Callable[[], bytes],
        attrs: dict[str, str] | None,
        uid: int | None,
    ) -> tuple[str, Envelope, int]:
        """Write the envelope and the message into one file, durably; return
        (qid, envelope, size of the message).

        ``envelope_source`` is the raw envelope when it arrives before the
        message (queue.ctrl), or a function that reads it after the message
        (by hand, like qmail-queue).  Raises PermFail/TempFail/EnvelopeError;
        on any failure nothing stays in the spool.
        """
        if attrs and uid not in self.trusted:
            attrs = None
        spool = self.spool
        qid = new_qid()
        fd = -1
        committed = False
        try:
            try:
                fd = spool.create_tmp(qid)
            except FileExistsError:
                qid = new_qid()
                fd = spool.create_tmp(qid)
            writer = Writer(fd, self.config.queue.max_message_size)
            envelope = None
            if isinstance(envelope_source, bytes):
                envelope = decode(envelope_source)
                header = entry_header(envelope.encode())
                received = received_line(self.config.hostname, qid, envelope, attrs, uid)
                write_all(fd, header + received)
                start = len(header)
            for chunk in chunks:
                writer.write(chunk)
            writer.finish()
            if envelope is None:
                assert callable(envelope_source)
                envelope = decode(envelope_source())
                header = entry_header(envelope.encode())
                received = received_line(self.config.hostname, qid, envelope, attrs, uid)
                new_fd = _prepend(spool, qid, fd, header + received)
                os.close(fd)
                fd = new_fd
                start = len(header)
            size = os.fstat(fd).st_size - start
            os.rename(spool.path("tmp", qid), spool.path("todo", qid))
            self.todo_sync.sync()
            committed = True
            return qid, envelope, size
        except OSError as exc:
            log.error("%s: cannot write to the spool: %s", qid, exc.strerror or exc)
            raise TempFail("4.3.0 cannot write to the spool") from None
        finally:
            if fd >= 0:
                os.close(fd)
            if not committed:
                spool.discard_tmp(qid)
                spool.unlink_quiet(spool.path("todo", qid))


def _prepend(spool: Spool, qid: str, fd: int, header: bytes) -> int:
    """Return a new fsynced tmp/QID that is ``header`` + the old one's content."""
    old = spool.path("tmp", qid)
    staging = spool.path("tmp", f"{qid}.old")
    os.rename(old, staging)
    new_fd = spool.create_tmp(qid)
    try:
        write_all(new_fd, header)
        os.lseek(fd, 0, os.SEEK_SET)
        while True:
            block = os.read(fd, 1 << 20)
            if not block:
                break
            write_all(new_fd, block)
        os.fsync(new_fd)
    except BaseException:
        os.close(new_fd)
        raise
    finally:
        os.unlink(staging)
    return new_fd


def _trusted_uids(names: tuple[str, ...]) -> frozenset[int]:
    import pwd

    uids = {os.getuid(), 0}
    for name in names:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            pass
    return frozenset(uids)


# --- queue.ctrl service ---------------------------------------------------------


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise ConnectionError("submission truncated")
    return data


def _read_attrs(stream: BinaryIO) -> dict[str, str]:
    try:
        block = read_fields(stream, MAX_ATTRS)
    except EOFError:
        raise ConnectionError("submission truncated") from None
    except OverflowError:
        raise PermFail("5.5.4 attributes too long") from None
    attrs: dict[str, str] = {}
    for item in block.split(b"\0")[:-2]:
        key, _, value = item.decode("utf-8", "replace").partition("=")
        attrs[key] = value
    return attrs


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    while True:
        (n,) = struct.unpack(">I", _read_exact(stream, 4))
        if n == 0:
            return
        if n > 16 * 1024 * 1024:
            raise PermFail("5.5.4 chunk too large")
        yield _read_exact(stream, n)


def serve_connection(queue: Queue, sock: socket.socket) -> None:
    """Handle one submission on a connected queue.ctrl socket."""
    from mailgrave.sd import peer_uid

    uid = peer_uid(sock)
    sock.settimeout(READ_TIMEOUT)
    stream = sock.makefile("rb")
    reply: bytes
    try:
        attrs = _read_attrs(stream)
        raw_env = read_envelope(stream)
        qid, envelope, size = queue.submit(_chunks(stream), raw_env, attrs, uid)
    except (ConnectionError, TimeoutError, OSError):
        log.info("submission from uid %s aborted before its end", uid)
        return
    except EnvelopeError as exc:
        reply = f"D5.1.3 {exc}\n".encode()
    except (PermFail, TempFail) as exc:
        reply = f"{exc.code}{exc.text}\n".encode()
    else:
        origin = _origin(attrs if uid in queue.trusted else {}, uid)
        maillog.queued(qid, envelope.sender, envelope.recipients, size, origin)
        reply = f"K{qid} queued\n".encode()
    finally:
        stream.close()
    try:
        sock.sendall(reply)
    except OSError:
        pass


def _origin(attrs: dict[str, str], uid: int | None) -> str:
    if attrs.get("addr"):
        return f"smtp [{attrs['addr']}]"
    return f"uid {uid}"


def serve(queue: Queue, listeners: list[socket.socket], idle_exit: float) -> int:
    """Accept on every listener, one thread per submission; exit when idle."""
    from mailgrave.service import serve_threads

    serve_threads(listeners, lambda conn: serve_connection(queue, conn), idle_exit)
    return EXIT_OK


def by_hand(queue: Queue) -> int:
    """qmail-queue's interface: message on fd 0, envelope on fd 1."""
    message = os.fdopen(0, "rb", buffering=0)
    envelope_in = os.fdopen(1, "rb", buffering=1 << 16, closefd=False)

    def chunks() -> Iterator[bytes]:
        while True:
            block = message.read(1 << 16)
            if not block:
                return
            yield block

    try:
        qid, env, size = queue.submit(
            chunks(), lambda: read_envelope(envelope_in), None, os.getuid()
        )
    except EnvelopeError as exc:
        print(f"mailgrave-queue: bad envelope: {exc}", file=sys.stderr)
        return EXIT_PERM
    except (PermFail, TempFail) as exc:
        print(f"mailgrave-queue: {exc.text}", file=sys.stderr)
        return exc.exit_code
    maillog.queued(qid, env.sender, env.recipients, size, f"uid {os.getuid()}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mailgrave-queue",
        description="Put a message into the MailGrave spool, durably. By hand: message "
        "on fd 0, envelope on fd 1 (like qmail-queue). As a service: queue.ctrl "
        "sockets from LISTEN_FDS, or --in PATH.",
    )
    parser.add_argument("--config", help="configuration file (default %(default)s)")
    parser.add_argument("--in", dest="listen", metavar="PATH", help="serve queue.ctrl at PATH")
    parser.add_argument("--debug", action="store_true", help="log debugging detail")
    args = parser.parse_args(argv)
    logmod.setup("queue", args.debug)
    config = configmod.load_or_exit(args.config, "mailgrave-queue")
    try:
        queue = Queue(config)
    except OSError as exc:
        print(f"mailgrave-queue: cannot use spool {config.spool}: {exc.strerror}", file=sys.stderr)
        return EXIT_TEMP
    from mailgrave.sd import listen_fds, stdin_socket
    from mailgrave.service import bind_unix

    listeners = listen_fds()
    if args.listen:
        listeners.append(bind_unix(args.listen, 0o666))
    if listeners:
        return serve(queue, listeners, config.queue.idle_exit)
    conn = stdin_socket()
    if conn is not None:
        serve_connection(queue, conn)
        return EXIT_OK
    return by_hand(queue)


if __name__ == "__main__":
    sys.exit(main())
