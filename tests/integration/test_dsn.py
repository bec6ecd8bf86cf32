"""DSN (RFC 3461/3464) through the whole chain: smtplib submits with NOTIFY,
ORCPT, RET and ENVID to mailgrave-smtpd; reports are read back from the
sender's Maildir with the email package; aiosmtpd peers with and without DSN."""

from __future__ import annotations

import email.message
import smtplib
import time
from pathlib import Path

from tests.conftest import Instance, Processes, free_port, wait_for
from tests.integration.test_chain import delivered
from tests.integration.test_remote_delivery import remote_instance, start_peer


def _submit(
    port: int,
    rcpts: list[tuple[str, list[str]]],
    mail_options: list[str] = (),  # type: ignore[assignment]
    body: str = "Subject: dsn test\r\n\r\nTHE BODY LINE\r\n",
) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("client.example.net")
        assert smtp.has_extn("dsn")
        code, _ = smtp.mail("alice@example.org", list(mail_options))
        assert code == 250
        for rcpt, options in rcpts:
            code, msg = smtp.rcpt(rcpt, options)
            assert code == 250, msg
        code, _ = smtp.data(body.encode())
        assert code == 250


def _start(inst: Instance, processes: Processes) -> int:
    port = free_port()
    inst.start(processes, listen=f"127.0.0.1:{port}")
    return port


def _parts(report: email.message.EmailMessage) -> tuple[list[email.message.Message], str, bytes]:
    """(per-message and per-recipient fields, the returned part's type, the whole report)."""
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["Return-Path"] == "<>"
    _text, status, returned = report.iter_parts()
    assert status.get_content_type() == "message/delivery-status"
    return list(status.get_payload()), returned.get_content_type(), report.as_bytes()  # type: ignore[arg-type]


def test_success_report_for_local_delivery_headers_only_with_envid_and_orcpt(
    tmp_path: Path, processes: Processes
) -> None:
    inst = Instance(tmp_path)
    port = _start(inst, processes)
    _submit(
        port,
        [("bob@example.org", ["NOTIFY=SUCCESS", "ORCPT=rfc822;Bob+2Bold@example.org"])],
        ["RET=HDRS", "ENVID=QQ+2B314"],
    )
    wait_for(lambda: inst.messages("bob"), timeout=20)
    wait_for(lambda: inst.messages("alice"), timeout=20)
    [report] = delivered(inst, "alice")
    fields, returned, raw = _parts(report)
    assert fields[0]["Original-Envelope-Id"] == "QQ+314"
    assert fields[1]["Final-Recipient"] == "rfc822; bob@example.org"
    assert fields[1]["Original-Recipient"] == "rfc822; Bob+old@example.org"
    assert fields[1]["Action"] == "delivered"
    assert fields[1]["Status"].startswith("2.")
    assert returned == "text/rfc822-headers"
    assert b"Subject: dsn test" in raw and b"THE BODY LINE" not in raw
    wait_for(lambda: inst.spool_entries() == [])


def test_never_gives_no_bounce_and_ret_full_returns_the_body(
    tmp_path: Path, processes: Processes
) -> None:
    peer = start_peer(processes, tmp_path)
    inst = remote_instance(
        tmp_path, free_port(), 9, remote={"routes": {"example.net": f"[127.0.0.1]:{peer.port}"}}
    )
    port = _start(inst, processes)
    # First NOTIFY=NEVER, refused by the peer: no bounce...
    _submit(port, [("reject-one@example.net", ["NOTIFY=NEVER"])])
    wait_for(lambda: inst.spool_entries() == [], timeout=20)
    # ... then the same without it: one bounce, and it is about the second.
    _submit(port, [("reject-two@example.net", ["NOTIFY=FAILURE"])], ["RET=FULL"])
    wait_for(lambda: inst.messages("alice"), timeout=20)
    wait_for(lambda: inst.spool_entries() == [], timeout=20)
    [bounce] = delivered(inst, "alice")
    fields, returned, raw = _parts(bounce)
    assert [f["Final-Recipient"] for f in fields[1:]] == ["rfc822; reject-two@example.net"]
    assert fields[1]["Action"] == "failed"
    assert returned == "message/rfc822" and b"THE BODY LINE" in raw


def test_relay_to_a_host_without_dsn_is_reported_as_relayed(
    tmp_path: Path, processes: Processes
) -> None:
    peer = start_peer(processes, tmp_path)  # aiosmtpd as shipped: no DSN
    inst = remote_instance(
        tmp_path, free_port(), 9, remote={"routes": {"example.net": f"[127.0.0.1]:{peer.port}"}}
    )
    port = _start(inst, processes)
    _submit(port, [("x@example.net", ["NOTIFY=SUCCESS,FAILURE"])], ["ENVID=E1"])
    wait_for(lambda: peer.messages(), timeout=20)
    [(meta, _body)] = peer.messages()
    assert meta["mail_options"] == [] or "ENVID=E1" not in meta["mail_options"]
    wait_for(lambda: inst.messages("alice"), timeout=20)
    [report] = delivered(inst, "alice")
    fields, _returned, _raw = _parts(report)
    assert fields[0]["Original-Envelope-Id"] == "E1"
    assert fields[1]["Final-Recipient"] == "rfc822; x@example.net"
    assert fields[1]["Action"] == "relayed"
    assert "Original-Recipient" not in fields[1]


def test_relay_to_a_dsn_host_passes_the_parameters_on_and_reports_nothing(
    tmp_path: Path, processes: Processes
) -> None:
    peer = start_peer(processes, tmp_path, "--dsn")
    inst = remote_instance(
        tmp_path, free_port(), 9, remote={"routes": {"example.net": f"[127.0.0.1]:{peer.port}"}}
    )
    port = _start(inst, processes)
    _submit(
        port,
        [
            ("x@example.net", ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;OLD+2BX@EXAMPLE.NET"]),
            ("y@example.net", []),
        ],
        ["RET=HDRS", "ENVID=ID+2B42"],
    )
    wait_for(lambda: peer.messages(), timeout=20)
    [(meta, _body)] = peer.messages()
    # aiosmtpd upper-cases what it records; the values are ours, xtext-encoded again.

    assert "RET=HDRS" in meta["mail_options"] and "ENVID=ID+2B42" in meta["mail_options"]
    assert meta["rcpt_tos"] == ["x@example.net", "y@example.net"]
    assert meta["rcpt_options"] == [
        ["NOTIFY=SUCCESS,DELAY", "ORCPT=RFC822;OLD+2BX@EXAMPLE.NET"],
        [],
    ]
    wait_for(lambda: inst.spool_entries() == [], timeout=20)
    time.sleep(0.5)
    assert inst.messages("alice") == []  # the DSN host reports from now on


def test_sendmail_dsn_options(tmp_path: Path, processes: Processes) -> None:
    inst = Instance(tmp_path)
    inst.start(processes)
    res = inst.sendmail(
        "-f",
        "alice@example.org",
        "-N",
        "success",
        "-V",
        "inj-7",
        "bob@example.org",
        data=b"Subject: injected\n\nTHE BODY LINE\n",
    )
    assert res.returncode == 0, res.stderr
    wait_for(lambda: inst.messages("alice"), timeout=20)
    [report] = delivered(inst, "alice")
    fields, returned, _raw = _parts(report)
    assert fields[0]["Original-Envelope-Id"] == "inj-7"
    assert fields[1]["Action"] == "delivered"
    assert returned == "text/rfc822-headers"
    bad = inst.sendmail("-N", "sometimes", "bob@example.org", data=b"x\n")
    assert bad.returncode != 0 and b"-N takes" in bad.stderr
