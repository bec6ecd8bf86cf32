"""mailgrave-remote: the SMTP client stage — routes, MX, smarthost with AUTH, STARTTLS.

By hand: ``mailgrave-remote --sender S [--host H[:PORT]] RCPT... < message``
(or the prototype's ``--relay H --port N --login L`` with SMTP_AUTH_PASSWORD).
As a service it serves remote.ctrl (docs/flow.md): requests carry the spool's
message as a file descriptor; every recipient of a request shares one domain.
Connections are kept open for a while and reused for the next message to the
same destination.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import threading
import time

from mailgrave import config as configmod
from mailgrave import ctrl, maillog, privs
from mailgrave import log as logmod
from mailgrave.config import Config
from mailgrave.envelope import Envelope
from mailgrave.errors import EXIT_OK, EXIT_TEMP, DeliveryError, Result, exit_for
from mailgrave.proc import bind_unix, serve_threads
from mailgrave.remote.client import Client, SMTPError, Timeouts, header_is_ascii, wire_format
from mailgrave.remote.mtasts import Policies, Policy
from mailgrave.remote.route import (
    Hop,
    Resolver,
    hops,
    route_for,
    smarthost_password,
    split_spec,
)
from mailgrave.sd import listen_fds, stdin_socket
from mailgrave.spool import blocks, message_size, scratch_entry
from mailgrave.stageargs import stage_parser

log = logmod.getLogger(__name__)

CACHE_IDLE = 10.0
CACHE_MAX = 20
# What delivery may import after --chroot (dnspython loads record types on first use).
CHROOT_PRELOAD = (
    "encodings.idna",
    "idna",
    "dns.rdtypes.IN.A",
    "dns.rdtypes.IN.AAAA",
    "dns.rdtypes.ANY.MX",
    "dns.rdtypes.ANY.TXT",
    "dns.rdtypes.ANY.CNAME",
    "dns.rdtypes.ANY.SOA",
    "dns.rdtypes.ANY.NS",
    "dns.rdtypes.ANY.TLSA",
    "dns.rdtypes.svcbbase",
    "dns.rdtypes.IN.SVCB",
    "dns.rdtypes.IN.HTTPS",
    "http.client",
    "email.parser",
    "email.feedparser",
)


class Sessions:
    """Open SMTP sessions by destination, for reuse (one user at a time each)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # (address, port, the MTA-STS mode it was opened under, or "") -> sessions
        self.idle: dict[tuple[str, int, str], list[tuple[float, Client]]] = {}

    def take(self, key: tuple[str, int, str]) -> Client | None:
        with self.lock:
            pool = self.idle.get(key, [])
            while pool:
                since, client = pool.pop()
                if time.monotonic() - since < CACHE_IDLE:
                    return client
                client.quit()
        return None

    def give(self, key: tuple[str, int, str], client: Client) -> None:
        with self.lock:
            total = sum(len(p) for p in self.idle.values())
            if total >= CACHE_MAX:
                client.quit()
                return
            self.idle.setdefault(key, []).append((time.monotonic(), client))

    def expire(self, everything: bool = False) -> None:
        with self.lock:
            for pool in self.idle.values():
                for since, client in list(pool):
                    if everything or time.monotonic() - since >= CACHE_IDLE:
                        pool.remove((since, client))
                        client.quit()


def needs_smtputf8(sender: str, rcpts: list[str], fd: int, envelope: Envelope | None) -> bool:
    """Whether the next hop must offer SMTPUTF8 (RFC 6531 §3.2, as Postfix decides
    it): a UTF-8 local part in the envelope, or, when the client declared
    SMTPUTF8, raw UTF-8 in the header section (RFC 6532: addresses or display
    names in From:, To:, Subject: ...). A message that declared it but is ASCII
    throughout (its body aside) goes to any server, without SMTPUTF8."""
    if any(not a.rpartition("@")[0].isascii() for a in [sender, *rcpts]):
        return True
    return envelope is not None and envelope.utf8 and not header_is_ascii(blocks(fd))


def sts_failure(policy: Policy, host: str, reason: str) -> None:
    """One log line for what an MTA-STS policy does not allow (RFC 8461 §5):
    its domain and mode, the MX host, why, and what is done about it."""
    outcome = "not used" if policy.mode == "enforce" else "delivering anyway"
    log.warning(
        "MTA-STS policy of %s, mode %s: MX %s: %s; %s",
        policy.domain,
        policy.mode,
        host,
        reason,
        outcome,
    )


class Delivery:
    """Delivers requests for one configuration (shared by the service's threads)."""

    def __init__(self, config: Config, override: str | None = None, login: str | None = None):
        self.config = config
        self.override = override
        # --host/--relay: that host itself, no MX lookup, whatever the routes say.
        self.route: str | None = None
        if override:
            host, port, _ = split_spec(override, config.remote.port)
            self.route = f"{host if host.startswith('[') else f'[{host}]'}:{port}"
        self.login = login if login is not None else config.remote.smarthost.login
        self.sessions = Sessions()
        # Set by before_chroot: what delivery would otherwise read from files each time.
        self.resolver: Resolver | None = None
        self.password: str | None = None
        t = config.remote.timeout
        self.timeouts = Timeouts(
            connect=config.remote.connect_timeout,
            greeting=t,
            command=t,
            data_init=min(t, 120.0),
            data_block=min(t, 180.0),
            data_end=2 * t,
        )
        self._contexts: dict[bool, ssl.SSLContext] = {}
        self.policies = (
            Policies(config, self._context(True)) if config.remote.mta_sts == "on" else None
        )

    def _context(self, verify: bool) -> ssl.SSLContext:
        if verify not in self._contexts:
            if verify:
                ctx = ssl.create_default_context(cafile=self.config.remote.ca_file or None)
            else:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._contexts[verify] = ctx
        return self._contexts[verify]

    def before_chroot(self) -> None:
        """Read now what delivery needs from files (mailgrave-remote --chroot): the
        resolver's configuration, the CA certificates, the smarthost password."""
        privs.preload(CHROOT_PRELOAD)
        self.resolver = Resolver(self.config)
        if self.policies is not None:
            self.policies._resolver = self.resolver
        self._context(True)
        self._context(False)
        self.password = smarthost_password(self.config)

    def _hops(self, domain: str) -> list[Hop]:
        return hops(self.config, domain, resolver=self.resolver, route=self.route)

    def _mta_sts(self, domain: str, destinations: list[Hop]) -> tuple[Policy | None, list[Hop]]:
        """The MTA-STS policy for an MX delivery to ``domain`` (none for routes and
        the smarthost), and the hosts it allows: in enforce mode only those its
        mx patterns match; in testing mode all, the others logged."""
        if self.policies is None or self.route or route_for(self.config, domain)[0]:
            return None, destinations
        policy = self.policies.lookup(domain)
        if policy is None:
            return None, destinations
        for hop in destinations:
            if not policy.allows(hop.host):
                sts_failure(policy, hop.host, "not in the policy")
        if policy.mode != "enforce":
            return policy, destinations
        return policy, [h for h in destinations if policy.allows(h.host)]

    def _open(
        self, hop: Hop, address: str, plain: bool = False, sts: Policy | None = None
    ) -> Client:
        """A greeted session (TLS and AUTH as configured); ``plain``: never STARTTLS.
        ``sts``: the MTA-STS policy of the domain (RFC 8461 §4.2, §5): in enforce
        mode STARTTLS with a certificate that verifies for the MX host name, or
        no delivery; in testing mode the same is tried, and what fails is logged
        (``sts_failure``) and the delivery goes on as remote.tls says."""
        helo = self.config.remote.helo or self.config.hostname
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.timeouts.connect)
        name = f"{hop.host}[{address}]:{hop.port}"
        # Commands are small writes; without this, Nagle's algorithm and the
        # peer's delayed ACK stall every exchange by ~40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.connect((address, hop.port))
        except OSError as exc:
            sock.close()
            raise SMTPError(
                f"connect to {name} failed: {exc.strerror or exc}", "connect", False, status="4.4.1"
            ) from None
        client = Client(sock, name, self.timeouts)
        configured = self.config.remote.tls
        smart = hop.smarthost or bool(self.override and self.login)
        if smart and configured != "none":
            configured = "verify"  # a smarthost's certificate is verified by default
        enforce = sts is not None and sts.mode == "enforce"
        # Testing mode tries what enforce requires, and only logs what fails; not
        # when remote.tls already requires as much, or wants no TLS at all.
        testing = sts is not None and not enforce and configured in ("opportunistic", "required")
        policy = "verify" if enforce or testing else configured
        why = "MTA-STS policy in enforce mode" if enforce else f"remote.tls: {configured}"
        try:
            client.greet(helo)
            offered = "STARTTLS" in client.extensions
            if testing and not offered:
                assert sts is not None
                sts_failure(sts, hop.host, f"{name} does not offer STARTTLS")
                policy = configured
            if policy in ("required", "verify") and not offered:
                if enforce:
                    assert sts is not None
                    sts_failure(sts, hop.host, f"{name} does not offer STARTTLS")
                raise SMTPError(
                    f"{name} does not offer STARTTLS ({why})",
                    "STARTTLS",
                    False,
                    status="4.7.5" if enforce else "4.7.4",
                )
            if offered and policy != "none" and not plain:
                verify = policy == "verify"
                try:
                    client.starttls(self._context(verify), hop.host if verify else None, helo)
                except SMTPError as exc:
                    if enforce and exc.reply is None:
                        assert sts is not None
                        sts_failure(sts, hop.host, exc.text)
                        exc.text, exc.status = f"{exc.text} ({why})", "4.7.5"
                    if testing:
                        assert sts is not None
                        sts_failure(sts, hop.host, exc.text)
                        if exc.reply is None:  # the handshake failed: the session is lost
                            client.quit()
                            return self._open(hop, address)  # as remote.tls says
                        if configured == "required":
                            raise
                    elif policy != "opportunistic":
                        raise
                    else:
                        # as Postfix's "may": better plaintext than no delivery at all
                        log.info("%s; trying again without TLS", exc.text)
                        if exc.reply is None:  # the handshake failed: the session is lost
                            client.quit()
                            return self._open(hop, address, plain=True)
            if smart and self.login:
                password = self.password
                if password is None:
                    password = smarthost_password(self.config)
                client.auth(self.login, password)
        except BaseException as exc:
            if isinstance(exc, SMTPError):
                exc.transcript = list(client.transcript)
            client.quit()
            raise
        return client

    def deliver(
        self, sender: str, rcpts: list[str], fd: int, envelope: Envelope | None = None
    ) -> tuple[list[Result], list[str]]:
        """One message to recipients of one domain: (result per recipient, transcript);
        ``envelope``: the same with the DSN parameters, passed on where offered."""
        domain = rcpts[0].rpartition("@")[2]
        try:
            destinations = self._hops(domain)
        except DeliveryError as exc:
            return [exc.result()] * len(rcpts), []
        sts_policy, allowed = self._mta_sts(domain, destinations)
        sts_mode = sts_policy.mode if sts_policy is not None else ""
        if not allowed:
            names = ", ".join(h.host for h in destinations)
            text = f"MTA-STS policy of {domain} (enforce) allows none of its MX hosts ({names})"
            return [Result("Z", "4.7.5", text)] * len(rcpts), []
        destinations = allowed
        size = message_size(fd)
        needs_utf8 = needs_smtputf8(sender, rcpts, fd, envelope)
        transcript: list[str] = []
        last = Result("Z", "4.4.1", "no host could be reached")
        for hop in destinations:
            for address in hop.addresses:
                key = (address, hop.port, sts_mode)
                for attempt in range(2):
                    client = self.sessions.take(key) if attempt == 0 else None
                    fresh = client is None
                    try:
                        if client is None:
                            client = self._open(hop, address, sts=sts_policy)
                        start = len(client.transcript)
                        results = client.deliver(
                            sender,
                            rcpts,
                            wire_format(blocks(fd)),
                            size,
                            needs_utf8,
                            envelope,
                            chunks=wire_format(blocks(fd), dot_stuff=False),
                        )
                    except SMTPError as exc:
                        if client is not None:
                            transcript += client.transcript[start if not fresh else 0 :]
                            client.quit()
                        else:
                            transcript += exc.transcript
                        if exc.reply is None and not fresh and exc.before_the_message:
                            continue  # a cached session had gone stale: open a new one
                        if exc.answer_lost:
                            # Later, not now at another host: it may have arrived here.
                            lost = exc.result()
                            lost = lost.replace(text=f"{lost.text}; it may have arrived")
                            return [lost] * len(rcpts), transcript
                        setup = exc.stage in ("the greeting", "HELO")
                        if exc.permanent or (exc.reply is not None and not setup):
                            return [exc.result()] * len(rcpts), transcript
                        # no answer, or "try later" at once: the next host
                        last = exc.result()
                        break
                    transcript += client.transcript[start:]
                    client.transcript.clear()
                    if client.broken:
                        client.quit()
                    else:
                        self.sessions.give(key, client)
                    return results, transcript
        return [last.replace(code="Z")] * len(rcpts), transcript


# --- remote.ctrl --------------------------------------------------------------------


def serve_connection(delivery: Delivery, sock: socket.socket) -> None:
    while True:
        req = ctrl.recv_request(sock)
        if req is None:
            return
        rcpts = list(req.recipients)
        try:
            if req.fd < 0:
                results = [Result("Z", "4.3.0", "no message file in the request")] * len(rcpts)
                transcript: list[str] = []
            else:
                results, transcript = delivery.deliver(req.sender, rcpts, req.fd, req.envelope)
        finally:
            if req.fd >= 0:
                os.close(req.fd)
        if any(not r.ok for r in results) and transcript:
            log.info("%s: transcript: %s", req.qid, " | ".join(transcript)[:2000])
        for rcpt, result in zip(rcpts, results, strict=True):
            maillog.attempt(req.qid, rcpt, "remote", result)
        sock.sendall(ctrl.results_text(results, transcript))


def serve(delivery: Delivery, listeners: list[socket.socket], idle_exit: float) -> int:
    try:
        serve_threads(
            listeners,
            lambda conn: serve_connection(delivery, conn),
            idle_exit,
            delivery.sessions.expire,
        )
    finally:
        delivery.sessions.expire(everything=True)
    return EXIT_OK


def by_hand(delivery: Delivery, sender: str, rcpts: list[str], fd: int, utf8: bool = False) -> int:
    """The message (``fd``: a scratch spool file) to each domain's recipients."""
    by_domain: dict[str, list[str]] = {}
    for r in rcpts:
        by_domain.setdefault(r.rpartition("@")[2].lower(), []).append(r)
    every = []
    for group in by_domain.values():
        flag = Envelope(sender, tuple(group), utf8=True) if utf8 else None
        results, transcript = delivery.deliver(sender, group, fd, flag)
        for line in transcript:
            print(f"|{line}")
        for rcpt, result in zip(group, results, strict=True):
            print(f"{result.describe()}  <{rcpt}>", flush=True)
        every += results
    delivery.sessions.expire(everything=True)
    return exit_for(every)


def main(argv: list[str] | None = None) -> int:
    defaults = configmod.Config()
    parser = stage_parser(
        "mailgrave-remote",
        "Deliver mail to remote SMTP servers. By hand: message on standard input, "
        "one K/Z/D line per recipient. As a service: remote.ctrl sockets from LISTEN_FDS, "
        "--in PATH, or the connection on standard input.",
        sender=True,
    )
    parser.add_argument(
        "--host", metavar="HOST[:PORT]", help="send to this host, no routing (default: routes, MX)"
    )
    parser.add_argument(
        "--relay",
        metavar="HOST",
        help="smarthost (with --port, --login; default: remote.smarthost, "
        f"{defaults.remote.smarthost.host or 'none'})",
    )
    parser.add_argument(
        "--port",
        type=int,
        help=f"port for --relay (default: remote.smarthost.port, {defaults.remote.smarthost.port})",
    )
    parser.add_argument(
        "--login",
        help="AUTH login; the password comes from SMTP_AUTH_PASSWORD (default: "
        f"remote.smarthost.login, {defaults.remote.smarthost.login or 'none'})",
    )
    parser.add_argument(
        "--in",
        dest="listen",
        metavar="PATH",
        help="serve remote.ctrl at PATH, bound before --user and --chroot take effect "
        "(default: the sockets in LISTEN_FDS; the units' is "
        f"{defaults.socket_path('remote.ctrl')})",
    )
    parser.add_argument(
        "--user",
        metavar="NAME",
        help="started as root: become NAME (and its groups) once --in is bound; required "
        "as root unless the sockets are handed over (default: stay who we are)",
    )
    parser.add_argument(
        "--chroot",
        metavar="DIR",
        help="with --user: deliver inside DIR; DNS, CA certificates and the smarthost "
        "password are read first (default: none)",
    )
    parser.add_argument(
        "--smtputf8",
        action="store_true",
        help="the sender used SMTPUTF8 (by hand): UTF-8 in the header then needs it",
    )
    parser.add_argument("recipients", nargs="*", metavar="RCPT")
    args = parser.parse_args(argv)
    logmod.setup("remote", args.debug)
    config = configmod.load_or_exit(args.config, "mailgrave-remote")
    override = args.host
    if args.relay:
        override = f"{args.relay}:{args.port or config.remote.smarthost.port}"
    listeners = [] if args.recipients else listen_fds()
    serving = bool(listeners) or bool(args.listen)
    conn = None if args.recipients or serving else stdin_socket()
    if not args.recipients and not serving and conn is None:
        parser.error("name recipients, give --in PATH, or run under systemd with remote.ctrl")
    plan = privs.plan_or_exit(
        "mailgrave-remote", args.user, args.chroot, bool(listeners) or conn is not None
    )
    if args.listen:
        try:
            listeners.append(bind_unix(args.listen, 0o600, dir_owner=True))
        except OSError as exc:
            print(f"mailgrave-remote: cannot serve {args.listen}: {exc.strerror}", file=sys.stderr)
            return EXIT_TEMP
    delivery = Delivery(config, override, args.login)
    if args.recipients:  # read before --user/--chroot: the temporary file is in /tmp
        envelope = Envelope(args.sender, tuple(args.recipients), utf8=args.smtputf8)
        fd = scratch_entry(sys.stdin.buffer, envelope.encode())
    if plan.chroot is not None:
        delivery.before_chroot()
        logmod.keep_journal()
    privs.drop_or_exit("mailgrave-remote", plan)
    if args.recipients:
        return by_hand(delivery, args.sender, args.recipients, fd, args.smtputf8)
    if listeners:
        return serve(delivery, listeners, config.queue.idle_exit)
    assert conn is not None
    serve_connection(delivery, conn)
    delivery.sessions.expire(everything=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
