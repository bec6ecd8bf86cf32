"""An SMTP sink for the kill -9 stress (tests/integration/killstages.py): aiosmtpd on
loopback that appends ``ID RCPT`` to LOG for every recipient of every message
it accepts (ID: the message's X-Stress-Id field), fsyncs, and only then answers
250. Writes LOG.ready once it listens. Run with a Python that has aiosmtpd
(Debian's python3-aiosmtpd).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from typing import Any

from aiosmtpd.controller import Controller

ID = re.compile(rb"^X-Stress-Id: *(\S+)", re.MULTILINE | re.IGNORECASE)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    args = p.parse_args()
    fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            content = envelope.original_content or envelope.content
            head = content.split(b"\r\n\r\n", 1)[0]
            found = ID.search(head)
            msg_id = found.group(1).decode() if found else "-"
            complete = b"\r\nEND\r\n" in content[-64:] or content.endswith(b"END\r\n")
            tag = "" if complete else " partial"
            lines = "".join(f"{msg_id} {rcpt}{tag}\n" for rcpt in envelope.rcpt_tos)
            os.write(fd, lines.encode())
            os.fsync(fd)
            return "250 2.0.0 recorded"

    controller = Controller(Handler(), hostname="127.0.0.1", port=args.port)
    controller.start()
    open(args.log + ".ready", "w").close()
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
