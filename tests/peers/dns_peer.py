"""A DNS server for tests (python3-dnslib) on a loopback UDP/TCP port.

Zone from a JSON file: {"name.": [["MX", 10, "mx.example."], ["A", "127.0.0.1"]], ...}.
Names in "servfail" answer SERVFAIL; every other unknown name is NXDOMAIN.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from dnslib import AAAA, MX, QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSServer


class ZoneResolver(BaseResolver):
    def __init__(self, zone: dict[str, list[list[object]]], servfail: list[str]) -> None:
        self.zone = {k.lower().rstrip(".") + ".": v for k, v in zone.items()}
        self.servfail = {s.lower().rstrip(".") + "." for s in servfail}

    def resolve(self, request, handler):
        reply = request.reply()
        qname = str(request.q.qname).lower()
        qtype = QTYPE[request.q.qtype]
        if qname in self.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if qname not in self.zone:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for rec in self.zone[qname]:
            kind = rec[0]
            if kind != qtype:
                continue
            if kind == "MX":
                rdata = MX(str(rec[2]), int(rec[1]))  # type: ignore[arg-type]
            elif kind == "A":
                rdata = A(str(rec[1]))
            else:
                rdata = AAAA(str(rec[1]))
            reply.add_answer(RR(qname, getattr(QTYPE, kind), rdata=rdata, ttl=60))
        return reply


def main() -> None:
    port, zone_file, ready = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    data = json.loads(Path(zone_file).read_text())
    resolver = ZoneResolver(data["zone"], data.get("servfail", []))
    udp = DNSServer(resolver, port=port, address="127.0.0.1")
    tcp = DNSServer(resolver, port=port, address="127.0.0.1", tcp=True)
    udp.start_thread()
    tcp.start_thread()
    Path(ready).write_text(str(os.getpid()))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
