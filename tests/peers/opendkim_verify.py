"""Verify a message with OpenDKIM's opendkim-testmsg against a DNS server on loopback.

opendkim-testmsg has no resolver option: libopendkim asks the C library's stub
resolver, which reads only /etc/resolv.conf and only port 53. So this runs in
a network and mount namespace of its own (``unshare --net --mount``, root):
its loopback is private, the DNS server (tests/integration/dnsserver.py) has
port 53 on it, and /etc/resolv.conf is a bind mount that names 127.0.0.1,
seen by nothing outside the namespace. Everything ends with this process.

    python3 -m tests.peers.opendkim_verify ZONE.json < MESSAGE

(from the top of the checkout; it runs itself again under ``unshare``).

ZONE.json: ``{"name": [["TXT", "v=DKIM1; ..."]]}``. Exits with
opendkim-testmsg's status (0: a signature verified; 70, EX_SOFTWARE, with
"dkim_eom(): Bad signature" and the like on stderr otherwise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from tests.integration.dnsserver import dns_server


def _ns(kind: str) -> int:
    """The inode of this process's ``kind`` namespace (net, mnt)."""
    return os.stat(f"/proc/self/ns/{kind}").st_ino


def main() -> int:
    if sys.argv[1] != "--inside":
        # Outside: the same program again in namespaces of its own, told which
        # namespaces it must not be in.
        outer = [str(_ns("net")), str(_ns("mnt"))]
        here = [sys.executable, "-m", "tests.peers.opendkim_verify", "--inside", *outer]
        os.execvp("unshare", ["unshare", "--net", "--mount", "--", *here, *sys.argv[1:]])
    net, mnt, zone_file = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if _ns("net") == net or _ns("mnt") == mnt:
        # Never bind-mount over the host's /etc/resolv.conf.
        print("not in namespaces of its own", file=sys.stderr)
        return 2
    with open(zone_file) as f:
        zone = {name: [tuple(r) for r in records] for name, records in json.load(f).items()}
    message = sys.stdin.buffer.read()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.NamedTemporaryFile("w", prefix="resolv.", suffix=".conf") as resolv:
        resolv.write("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
        resolv.flush()
        # Private propagation (unshare's default): the host's file is untouched.
        subprocess.run(["mount", "--bind", resolv.name, "/etc/resolv.conf"], check=True)
        with dns_server(zone, port=53):
            res = subprocess.run(
                ["opendkim-testmsg"], input=message, stderr=subprocess.PIPE, timeout=60
            )
    sys.stderr.buffer.write(res.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
