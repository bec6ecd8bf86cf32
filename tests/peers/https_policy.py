"""An HTTPS server for tests: serves an MTA-STS policy file (RFC 8461) at
/.well-known/mta-sts.txt with stdlib http.server + ssl, and logs each request
to OUTDIR/requests.jsonl. Run with /usr/bin/python3."""

from __future__ import annotations

import argparse
import json
import os
import ssl
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--outdir", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--policy", required=True, help="file with the policy text")
    args = p.parse_args()
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    policy = Path(args.policy).read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with (out / "requests.jsonl").open("a") as f:
                f.write(json.dumps({"path": self.path, "host": self.headers["Host"]}) + "\n")
            if self.path != "/.well-known/mta-sts.txt":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(policy)))
            self.end_headers()
            self.wfile.write(policy)

        def log_message(self, format: str, *a: object) -> None:
            pass

    httpd = HTTPServer(("127.0.0.1", args.port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    (out / "ready").write_text(str(os.getpid()))
    httpd.serve_forever()


if __name__ == "__main__":
    main()
