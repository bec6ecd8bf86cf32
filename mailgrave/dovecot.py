"""A client of Dovecot's authentication service (its auth-client protocol, version 1),
over the unix socket of ``auth.dovecot_socket``: one connection per check.

    C: VERSION 1 2, CPID <pid>          S: VERSION 1 x, MECH ..., SPID, CUID, COOKIE, DONE
    C: AUTH 1 PLAIN service=smtp nologin rip=<client> secured resp=<base64>
    S: OK 1 user=<name>  |  FAIL 1 [temp] ...

(fields separated by tabs), as Postfix's xsasl_dovecot_server does. Credentials
given with LOGIN go to Dovecot as PLAIN, which it always offers. Imported only
by a session that authenticates with ``auth.dovecot_socket`` set, and by
``mailgrave check``.
"""

from __future__ import annotations

import _socket
import base64
import os
import time

TIMEOUT = 20.0  # seconds for the whole exchange (Dovecot delays a FAIL by 2 s, more under penalty)
MAX_LINE = 16 * 1024
MAX_HANDSHAKE = 64 * 1024


class DovecotError(Exception):
    """Dovecot gave no verdict (not running, timeout, protocol error, temporary failure)."""


def _unescape(value: str) -> str:
    """Dovecot's tab escaping: \\001 then 1, t, r, n or 0."""
    if "\x01" not in value:
        return value
    table = {"1": "\x01", "t": "\t", "r": "\r", "n": "\n", "0": "\0"}
    out, it = [], iter(value)
    for ch in it:
        out.append(table.get(next(it, ""), "") if ch == "\x01" else ch)
    return "".join(out)


class _Conn:
    def __init__(self, path: str, deadline: float) -> None:
        self.deadline = deadline
        self.buf = b""
        self.read_total = 0
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            self._timeout()
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise DovecotError(f"cannot connect to {path}: {_why(exc)}") from None

    def _timeout(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DovecotError("timed out")
        self.sock.settimeout(left)

    def send(self, data: bytes) -> None:
        try:
            self._timeout()
            self.sock.sendall(data)
        except OSError as exc:
            raise DovecotError(f"connection failed: {_why(exc)}") from None

    def line(self) -> list[str]:
        """The next line, split at tabs."""
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE or self.read_total > MAX_HANDSHAKE:
                raise DovecotError("protocol error: line too long")
            try:
                self._timeout()
                data = self.sock.recv(4096)
            except OSError as exc:
                raise DovecotError(f"connection failed: {_why(exc)}") from None
            if not data:
                raise DovecotError("connection closed")
            self.buf += data
            self.read_total += len(data)
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8", "replace").split("\t")

    def close(self) -> None:
        self.sock.close()


def _why(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or type(exc).__name__


def handshake(conn: _Conn) -> set[str]:
    """Send VERSION and CPID, read the server's handshake up to DONE: its mechanisms."""
    conn.send(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
    mechs: set[str] = set()
    version = False
    while True:
        words = conn.line()
        if words[0] == "VERSION":
            if len(words) < 2 or words[1] != "1":
                raise DovecotError(f"protocol version {words[1:2]} is not 1")
            version = True
        elif words[0] == "MECH" and len(words) > 1:
            mechs.add(words[1].upper())
        elif words[0] == "DONE":
            if not version:
                raise DovecotError("protocol error: no VERSION")
            return mechs


def mechanisms(path: str, timeout: float = 5.0) -> set[str]:
    """The mechanisms Dovecot offers on ``path`` (for ``mailgrave check``)."""
    conn = _Conn(path, time.monotonic() + timeout)
    try:
        return handshake(conn)
    finally:
        conn.close()


def authenticate(
    path: str, login: str, password: str, client_ip: str, secured: bool, timeout: float = TIMEOUT
) -> str | None:
    """Dovecot's verdict on the credentials: the user name it knows them by (its
    ``user=``, else ``login``) when good, None when refused; DovecotError when it
    gives none. Neither the password nor the response is ever in an exception."""
    if "\0" in login or "\0" in password:
        return None
    conn = _Conn(path, time.monotonic() + timeout)
    try:
        if "PLAIN" not in handshake(conn):
            raise DovecotError("Dovecot does not offer PLAIN")
        resp = base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode()).decode()
        fields = ["AUTH", "1", "PLAIN", "service=smtp", "nologin"]
        if client_ip and all(c in "0123456789abcdefABCDEF.:" for c in client_ip):
            fields.append(f"rip={client_ip}")
        if secured:
            fields.append("secured")
        fields.append(f"resp={resp}")
        conn.send(("\t".join(fields) + "\n").encode())
        while True:
            words = conn.line()
            if len(words) < 2 or words[1] != "1":
                continue  # not an answer to our request
            args = words[2:]
            if words[0] == "OK":
                user = next((_unescape(a[5:]) for a in args if a.startswith("user=")), "")
                if not user or not user.isprintable() or len(user.encode()) > 255:
                    user = login
                return user
            if words[0] == "FAIL":
                if "temp" in args or "code=temp_fail" in args:
                    raise DovecotError("temporary failure")
                return None
            raise DovecotError(f"protocol error: unexpected {words[0][:20]!r}")
    finally:
        conn.close()
