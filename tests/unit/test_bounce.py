from __future__ import annotations

import email
import email.policy
from pathlib import Path

from mailgrave.send.bounce import MAX_RETURNED, Failure, notification
from mailgrave.spool import entry_header


def _build(tmp_path: Path, body: bytes, delay: bool = False) -> email.message.EmailMessage:
    orig = tmp_path / "orig"
    head = entry_header(b"Fa@example.org\0Tx@example.net\0Ty@example.net\0\0")
    orig.write_bytes(head + b"Received: by x\nFrom: a@example.org\nSubject: original\n\n" + body)
    data = b"".join(
        notification(
            hostname="mx.example.org",
            sender="a@example.org",
            qid="1K16M56R1FTXJPY",
            arrival="Thu, 26 Nov 2026 22:00:00 +0000",
            failures=[
                Failure(
                    "x@example.net",
                    "mx.example.net[192.0.2.1]:25 said: 550 5.1.1 no such user",
                    "5.1.1",
                    "mx.example.net[192.0.2.1]:25",
                ),
                Failure(
                    "y@example.net", "4.4.1 connection timed out", "4.4.1" if delay else "5.4.7"
                ),
            ],
            message_path=str(orig),
            delay=delay,
            date="Thu, 26 Nov 2026 23:00:00 +0000",
        )
    )
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_bounce_is_a_valid_multipart_report(tmp_path: Path) -> None:
    msg = _build(tmp_path, b"hello\n")
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.org>"
    assert msg["Auto-Submitted"] == "auto-replied"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]
    assert "x@example.net" in parts[0].get_content() and "550 5.1.1" in parts[0].get_content()
    blocks = parts[1].get_payload()
    assert blocks[0]["Reporting-MTA"] == "dns; mx.example.org"
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; x@example.net",
        "rfc822; y@example.net",
    ]
    assert [b["Action"] for b in blocks[1:]] == ["failed", "failed"]
    assert blocks[1]["Status"] == "5.1.1"
    # RFC 3464: the reply itself; the peer in Remote-MTA (a local failure has none)
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert blocks[1]["Remote-MTA"] == "dns; mx.example.net"
    assert blocks[2]["Remote-MTA"] is None
    returned = parts[2].get_payload()[0]
    assert returned["Subject"] == "original"


def test_large_original_returns_headers_only(tmp_path: Path) -> None:
    msg = _build(tmp_path, b"z" * (MAX_RETURNED + 10) + b"\n")
    last = list(msg.iter_parts())[-1]
    assert last.get_content_type() == "text/rfc822-headers"
    assert b"zzzz" not in msg.as_bytes()


def test_delay_warning(tmp_path: Path) -> None:
    msg = _build(tmp_path, b"x\n", delay=True)
    assert "Delayed" in msg["Subject"]
    blocks = list(msg.iter_parts())[1].get_payload()
    assert blocks[2]["Action"] == "delayed"
