"""A receiving SMTP server for tests: aiosmtpd (a real implementation) with switches.

Writes every accepted message to OUTDIR as N.json (envelope, session facts)
and N.eml, and every event (connections, AUTH attempts) to OUTDIR/events.jsonl.
Run with /usr/bin/python3 (Debian's python3-aiosmtpd).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import threading
import time
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--outdir", required=True)
    p.add_argument("--mode", default="normal", choices=["normal", "drop-data-first", "hang"])
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--auth", help="user:password; AUTH required")
    p.add_argument("--auth-mechs", default="PLAIN,LOGIN")
    p.add_argument("--reject-prefix", default="reject")
    p.add_argument("--tempfail-first", type=int, default=0)
    p.add_argument("--always-tempfail", action="store_true")
    p.add_argument("--smtputf8", action="store_true")
    p.add_argument("--dsn", action="store_true", help="offer DSN (RFC 3461), record its parameters")
    args = p.parse_args()
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    events = out / "events.jsonl"
    lock = threading.Lock()

    def event(**kw: object) -> None:
        with lock, events.open("a") as f:
            f.write(json.dumps(kw) + "\n")

    if args.mode != "normal":
        raw_server(args, event)
        return

    state = {"data": 0, "n": 0}

    class Handler:
        async def handle_EHLO(self, server, session, envelope, hostname, responses):
            session.host_name = hostname
            event(kind="ehlo", tls=session.ssl is not None)
            if args.dsn:
                responses.insert(1, "250-DSN")
            return responses

        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            if address.split("@")[0].startswith(args.reject_prefix):
                return "550 5.1.1 no such user here"
            envelope.rcpt_tos.append(address)
            if not hasattr(envelope, "dsn_rcpt"):
                envelope.dsn_rcpt = []
            envelope.dsn_rcpt.append(rcpt_options)
            return "250 2.1.5 ok"

        async def handle_DATA(self, server, session, envelope):
            state["data"] += 1
            if args.always_tempfail or state["data"] <= args.tempfail_first:
                return "451 4.3.0 please try again later"
            state["n"] += 1
            n = state["n"]
            (out / f"{n}.eml").write_bytes(envelope.original_content or envelope.content)
            (out / f"{n}.json").write_text(
                json.dumps(
                    {
                        "mail_from": envelope.mail_from,
                        "rcpt_tos": envelope.rcpt_tos,
                        "mail_options": envelope.mail_options,
                        "rcpt_options": getattr(envelope, "dsn_rcpt", []),
                        "tls": session.ssl is not None,
                        "auth": session.authenticated,
                    }
                )
            )
            return "250 2.0.0 queued as TEST" + str(n)

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = False
        if isinstance(auth_data, LoginPassword) and args.auth:
            user, _, pw = args.auth.partition(":")
            ok = auth_data.login.decode() == user and auth_data.password.decode() == pw
        event(kind="auth", mechanism=mechanism, ok=ok, tls=session.ssl is not None)
        return AuthResult(success=ok)

    tls_context = None
    if args.cert:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(args.cert, args.key)
    mechs = {m.upper() for m in args.auth_mechs.split(",")}
    excluded = [m for m in ("PLAIN", "LOGIN") if m not in mechs]

    class Counting(SMTP):
        def _getparams(self, params):
            # aiosmtpd refuses every parameter it does not know with 555: with
            # --dsn it knows those of RFC 3461 (kept in mail/rcpt_options; upper-cased).
            found = super()._getparams(params)
            if args.dsn and found is not None:
                for key in ("RET", "ENVID", "NOTIFY", "ORCPT"):
                    found.pop(key, None)
            return found

        def connection_made(self, transport):
            event(kind="connect")
            super().connection_made(transport)

    class Ctl(Controller):
        def factory(self):
            return Counting(
                self.handler,
                hostname="sink.test",
                tls_context=tls_context,
                enable_SMTPUTF8=args.smtputf8,
                authenticator=authenticator if args.auth else None,
                auth_required=bool(args.auth),
                auth_require_tls=True,
                auth_exclude_mechanism=excluded,
            )

    ctl = Ctl(Handler(), hostname="127.0.0.1", port=args.port)
    ctl.start()
    (out / "ready").write_text(str(os.getpid()))
    try:
        while True:
            time.sleep(3600)
    finally:
        ctl.stop()


def raw_server(args: argparse.Namespace, event) -> None:
    """Misbehaving peers: drop the connection in the middle of the first DATA, or never greet."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", args.port))
    srv.listen(16)
    out = Path(args.outdir)
    (out / "ready").write_text(str(os.getpid()))
    sessions = 0
    held = []
    while True:
        conn, _ = srv.accept()
        sessions += 1
        event(kind="connect")
        if args.mode == "hang":
            held.append(conn)  # accept, then say nothing at all
            continue
        f = conn.makefile("rwb")

        def say(line: str) -> None:
            f.write(line.encode() + b"\r\n")
            f.flush()

        say("220 raw.test ESMTP")
        count = 0
        try:
            while True:
                line = f.readline()
                if not line:
                    break
                cmd = line.decode(errors="replace").strip().upper()
                if cmd.startswith("EHLO"):
                    say("250-raw.test")
                    say("250 8BITMIME")
                elif cmd.startswith("DATA"):
                    say("354 go ahead")
                    if sessions == 1:
                        f.readline()  # one line of the message, then vanish
                        conn.close()
                        break
                    body = b""
                    while (chunk := f.readline()) not in (b".\r\n", b""):
                        body += chunk
                    count += 1
                    (out / f"{sessions}-{count}.eml").write_bytes(body)
                    say("250 2.0.0 accepted")
                elif cmd.startswith("QUIT"):
                    say("221 bye")
                    break
                else:
                    say("250 ok")
        except OSError:
            pass
        finally:
            conn.close()


if __name__ == "__main__":
    asyncio.set_event_loop(asyncio.new_event_loop())
    main()
