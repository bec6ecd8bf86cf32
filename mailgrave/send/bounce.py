"""RFC 3464 delivery status notifications: failures (bounces), delay warnings,
and the success reports a DSN request (RFC 3461 NOTIFY=SUCCESS) asks for."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

from mailgrave.record import Record, record
from mailgrave.spool import blocks, header_lines, message_size

# Return the whole original message up to this size, else only its header.
MAX_RETURNED = 256 * 1024


@record
class Failure(Record):
    """One recipient in a notification: address, the reply that decided it, final or delayed."""

    recipient: str
    reply: str
    status: str  # enhanced status code, e.g. 5.1.1 or 4.4.7
    remote: str = ""  # the peer that gave the reply, name[address]:port (remote deliveries)

    def diagnostic(self) -> str:
        """The reply itself (``550 5.1.1 ...``), without the peer's name before it."""
        prefix = f"{self.remote} said: "
        return (
            self.reply[len(prefix) :]
            if self.remote and self.reply.startswith(prefix)
            else self.reply
        )

    def remote_mta(self) -> str:
        """The peer's host name (or its address when it has none)."""
        name, _, rest = self.remote.partition("[")
        return name or rest.partition("]")[0]

    orcpt: str = ""  # DSN ORCPT as given ("rfc822;user@example.org"), echoed
    action: str = ""  # a success report's Action: delivered or relayed


def _header_value(text: str) -> str:
    """Text made safe for a header line or a DSN field: one line, printable."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:900]


def _original_parts(message_path: str, content: str) -> tuple[str, Iterator[bytes]]:
    with open(message_path, "rb") as f:
        whole = content == "full" and message_size(f.fileno()) <= MAX_RETURNED

    def chunks() -> Iterator[bytes]:
        with open(message_path, "rb") as f:
            yield from (blocks if whole else header_lines)(f.fileno())

    return ("message/rfc822" if whole else "text/rfc822-headers"), chunks()


def notification(
    *,
    hostname: str,
    sender: str,
    qid: str,
    arrival: str,
    failures: list[Failure],
    message_path: str,
    delay: bool = False,
    success: bool = False,
    content: str = "full",
    envid: str = "",
    date: str,
) -> Iterator[bytes]:
    """The notification to ``sender`` about ``failures`` of message ``qid``, as LF-ended bytes.

    Streams the original message (or its header, when large or ``content`` is
    ``headers``: DSN RET=HDRS) from the spool. ``success``: a success report,
    each recipient with its own action; ``envid``: the DSN ENVID, echoed.
    """
    boundary = f"{qid}.{secrets.token_hex(6)}/{hostname}"
    if success:
        subject = "Successful Mail Delivery Report"
        intro = (
            f"This is the mail system at {hostname}.\n\n"
            "Your message was successfully delivered to the recipients below,\n"
            "or relayed to a system that will not report on it further.\n"
        )
        action = "delivered"
    elif delay:
        subject = "Delayed Mail (still being retried)"
        intro = (
            f"This is the mail system at {hostname}.\n\n"
            "Your message could not be delivered yet to the recipients below.\n"
            "It is still being retried; you do not need to send it again.\n"
        )
        action = "delayed"
    else:
        subject = "Undelivered Mail Returned to Sender"
        intro = (
            f"This is the mail system at {hostname}.\n\n"
            "I'm sorry to have to inform you that your message could not\n"
            "be delivered to one or more recipients. It's attached below.\n"
        )
        action = "failed"
    text = [intro, ""]
    for f in failures:
        text.append(f"<{f.recipient}>: {_header_value(f.reply)}")
    content_type, original = _original_parts(message_path, content)
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {date}",
        f"Message-ID: <{qid}.{secrets.token_hex(6)}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\n\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "",
        *text,
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {hostname}",
        *([f"Original-Envelope-Id: {_header_value(envid)}"] if envid else []),
        f"X-MailGrave-Queue-ID: {qid}",
        f"Arrival-Date: {arrival}",
        "",
    ]
    for f in failures:
        kind = "utf-8" if not f.recipient.isascii() else "rfc822"
        if f.orcpt:
            orig_kind, _, orig = f.orcpt.partition(";")
            head.append(f"Original-Recipient: {orig_kind}; {_header_value(orig)}")
        head += [
            f"Final-Recipient: {kind}; {f.recipient}",
            f"Action: {f.action or action}",
            f"Status: {f.status}",
            *([f"Remote-MTA: dns; {_header_value(f.remote_mta())}"] if f.remote else []),
            f"Diagnostic-Code: smtp; {_header_value(f.diagnostic())}",
            f"Last-Attempt-Date: {date}",
            "",
        ]
    head += [
        f"--{boundary}",
        (
            "Content-Description: Delivered Message"
            if success
            else "Content-Description: Undelivered Message"
        )
        + ("" if content_type == "message/rfc822" else " Headers"),
        f"Content-Type: {content_type}",
        "",
        "",
    ]
    yield "\n".join(head).encode("utf-8")
    last = b"\n"
    for chunk in original:
        if chunk:
            last = chunk[-1:]
        yield chunk
    yield (b"" if last == b"\n" else b"\n") + f"\n--{boundary}--\n".encode()
