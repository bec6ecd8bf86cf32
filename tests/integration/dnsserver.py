"""A real DNS server for tests (python3-dnslib), UDP and TCP on a free loopback port.

``zone`` maps a name to records: ``("MX", 10, "mx.example.")``, ``("A", "127.0.0.1")``,
``("AAAA", "::1")``, ``("TXT", "v=spf1 -all")`` (a text longer than 255 octets is
split into several strings, as DNS stores it). Names in ``servfail`` answer SERVFAIL, names in ``silent`` never
answer (a timeout); every other unknown name is NXDOMAIN.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from dnslib import AAAA, MX, QTYPE, RCODE, RR, TXT, A
from dnslib.server import BaseResolver, DNSError, DNSLogger, DNSServer

Record = tuple[Any, ...]


def _fqdn(name: str) -> str:
    return name.lower().rstrip(".") + "."


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(
        self, zone: dict[str, list[Record]], servfail: Iterable[str], silent: Iterable[str]
    ) -> None:
        self.zone = {_fqdn(k): v for k, v in zone.items()}
        self.servfail = {_fqdn(n) for n in servfail}
        self.silent = {_fqdn(n) for n in silent}
        self.queries: list[tuple[str, str]] = []

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        qname = str(request.q.qname).lower()
        qtype = QTYPE[request.q.qtype]
        self.queries.append((qname, qtype))
        if qname in self.silent:
            raise DNSError("silent")  # dnslib sends nothing: the client times out
        if qname in self.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if qname not in self.zone:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for rec in self.zone[qname]:
            if rec[0] != qtype:
                continue
            if rec[0] == "MX":
                rdata = MX(str(rec[2]), int(rec[1]))
            elif rec[0] == "A":
                rdata = A(str(rec[1]))
            elif rec[0] == "TXT":
                text = str(rec[1]).encode()
                rdata = TXT([text[i : i + 255] for i in range(0, len(text), 255)] or [b""])
            else:
                rdata = AAAA(str(rec[1]))
            reply.add_answer(RR(qname, getattr(QTYPE, rec[0]), rdata=rdata, ttl=60))
        return reply


def _free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


@contextmanager
def dns_server(
    zone: dict[str, list[Record]],
    servfail: Iterable[str] = (),
    silent: Iterable[str] = (),
    port: int = 0,
) -> Iterator[tuple[int, ZoneResolver]]:
    """Serve ``zone`` on 127.0.0.1 (on ``port``, or a free one); yields (port, resolver
    with the queries it saw)."""
    resolver = ZoneResolver(zone, servfail, silent)
    port = port or _free_udp_tcp_port()
    quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    udp = DNSServer(resolver, port=port, address="127.0.0.1", logger=quiet)
    tcp = DNSServer(resolver, port=port, address="127.0.0.1", tcp=True, logger=quiet)
    udp.start_thread()
    tcp.start_thread()
    try:
        yield port, resolver
    finally:
        udp.stop()
        tcp.stop()
        udp.server.server_close()
        tcp.server.server_close()


@contextmanager
def dead_dns_server() -> Iterator[tuple[int, list[bytes]]]:
    """A UDP socket on 127.0.0.1 that reads queries and never answers (nor does
    anything listen on its TCP port); yields (port, the queries it read)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    queries: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                queries.append(sock.recv(4096))
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    try:
        yield int(sock.getsockname()[1]), queries
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()
