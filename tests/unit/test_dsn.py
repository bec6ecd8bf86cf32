"""DSN (RFC 3461/3464): the parameters on MAIL and RCPT, their place in the
envelope, the scheduler's decisions on a made-up clock, and the reports."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest

from mailgrave import ctrl
from mailgrave.config import parse_text
from mailgrave.envelope import Envelope, EnvelopeError, decode
from mailgrave.errors import Result
from mailgrave.send import policy
from mailgrave.send.bounce import Failure, notification
from mailgrave.smtp import server as S
from mailgrave.spool import Entry, Recipient, RecipientState, entry_header
from tests.unit.test_smtp_server import Dialog

CONFIG = parse_text("hostname: mx.example.org\nqueue: {warn_after: 4h}\n")
T0 = 1_800_000_000.0
HOUR = 3600.0

# --- the server core


def _start(d: Dialog) -> S.MessageStart:
    assert d.code("DATA").startswith("354")
    return next(e for e in d.events if isinstance(e, S.MessageStart))


def test_ehlo_offers_dsn() -> None:
    d = Dialog()
    assert "250-DSN" in d.replies(b"EHLO client.example.net\r\n")


def test_parameters_are_accepted_decoded_and_given_with_the_message() -> None:
    d = Dialog(relay=True)
    d.code("EHLO client.example.net")
    assert d.code("MAIL FROM:<s@example.net> RET=hdrs ENVID=QQ+2B314+3D") == "250 2.0.0"
    assert d.code("RCPT TO:<alice@example.org> NOTIFY=success,failure ORCPT=rfc822;A+40B") == (
        "250 2.0.0"
    )
    assert d.code("RCPT TO:<x@remote.test>") == "250 2.0.0"
    assert d.code("RCPT TO:<bob@example.org> NOTIFY=NEVER") == "250 2.0.0"
    ev = _start(d)
    assert (ev.ret, ev.envid) == ("HDRS", "QQ+314=")
    assert ev.recipients == ("alice@example.org", "x@remote.test", "bob@example.org")
    assert ev.notify == ("SUCCESS,FAILURE", "", "NEVER")
    assert ev.orcpt == ("rfc822;A@B", "", "")


def test_without_parameters_the_message_carries_none() -> None:
    d = Dialog()
    d.code("EHLO client.example.net")
    d.code("MAIL FROM:<s@example.net>")
    d.code("RCPT TO:<alice@example.org>")
    ev = _start(d)
    assert (ev.ret, ev.envid, ev.notify, ev.orcpt) == ("", "", (), ())


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ("MAIL FROM:<s@example.net> RET=BODY", "501 5.5.4"),
        ("MAIL FROM:<s@example.net> RET=FULL RET=HDRS", "501 5.5.4"),
        ("MAIL FROM:<s@example.net> ENVID=", "501 5.5.4"),
        ("MAIL FROM:<s@example.net> ENVID=a+zz", "501 5.5.4"),
        ("MAIL FROM:<s@example.net> ENVID=a+0Ab", "501 5.5.4"),  # a control character
        ("MAIL FROM:<s@example.net> ENVID=" + "x" * 101, "501 5.5.4"),
        ("MAIL FROM:<s@example.net> FOO=1", "555 5.5.4"),
    ],
)
def test_bad_mail_parameters(command: str, code: str) -> None:
    d = Dialog()
    d.code("EHLO client.example.net")
    assert d.code(command) == code


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ("NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
        ("NOTIFY=SUCCESS,SUCCESS", "501 5.5.4"),
        ("NOTIFY=", "501 5.5.4"),
        ("NOTIFY=SOMETIMES", "501 5.5.4"),
        ("ORCPT=alice@example.org", "501 5.5.4"),
        ("ORCPT=rfc822;a+4", "501 5.5.4"),
        ("ORCPT=rfc822;a=b", "501 5.5.4"),
        ("NOTIFY=DELAY NOTIFY=DELAY", "501 5.5.4"),
        ("XYZ=1", "555 5.5.4"),
    ],
)
def test_bad_rcpt_parameters(params: str, code: str) -> None:
    d = Dialog()
    d.code("EHLO client.example.net")
    d.code("MAIL FROM:<s@example.net>")
    assert d.code(f"RCPT TO:<alice@example.org> {params}") == code


def test_xtext_round_trip() -> None:
    for text in ("plain", "a+b=c d", "~!+"):
        assert S.xtext_decode(S.xtext_encode(text)) == text
    assert S.xtext_encode("a+b=c") == "a+2Bb+3Dc"


# --- the envelope and remote.ctrl


def test_envelope_with_dsn_round_trips_and_plain_one_is_qmails() -> None:
    env = Envelope(
        "s@example.net",
        ("a@example.org", "b@example.org"),
        "FULL",
        "id 1",
        ("SUCCESS", ""),
        ("", "rfc822;b@old.example"),
    )
    raw = env.encode()
    assert raw == (
        b"Fs@example.net\0RFULL\0Eid 1\0Ta@example.org\0NSUCCESS\0"
        b"Tb@example.org\0Orfc822;b@old.example\0\0"
    )
    assert decode(raw) == env
    plain = Envelope("s@example.net", ("a@example.org",))
    assert plain.encode() == b"Fs@example.net\0Ta@example.org\0\0"
    assert decode(plain.encode()) == plain


@pytest.mark.parametrize(
    "raw",
    [
        b"Fs@example.net\0RHALF\0Ta@example.org\0\0",
        b"Fs@example.net\0NSUCCESS\0Ta@example.org\0\0",  # NOTIFY before any recipient
        b"Fs@example.net\0Ta@example.org\0NNEVER,DELAY\0\0",
        b"Fs@example.net\0Ta@example.org\0Ox\x01y\0\0",
        b"Fs@example.net\0Ta@example.org\0Xwhat\0\0",
    ],
)
def test_bad_dsn_fields_are_refused(raw: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode(raw)


def test_a_request_carries_the_parameters() -> None:
    env = Envelope("s@example.net", ("x@remote.test",), "HDRS", "E1", ("SUCCESS",), ("",))
    data = ctrl.encode_request("1K16M56R1FTXJPY", env.sender, list(env.recipients), env)
    assert data.startswith(b"Q1K16M56R1FTXJPY\0Fs@example.net\0RHDRS\0")
    line = Result("K", "2.0.0", "250 ok", "mx[192.0.2.1]:25", dsn=True).line()
    assert Result.from_line(line) == Result("K", "2.0.0", "250 ok", "mx[192.0.2.1]:25", True)
    assert not Result.from_line(Result("K", "2.0.0", "250 ok", "mx:25").line()).dsn


def test_entry_json_keeps_dsn_and_reads_old_entries() -> None:
    e = Entry(
        "1K16M56R1FTXJPY",
        "s@example.net",
        [Recipient("a@example.org", notify="SUCCESS", orcpt="rfc822;a@x")],
        T0,
        ret="HDRS",
        envid="E1",
    )
    assert Entry.from_json(e.to_json()) == e
    old = b'{"qid": "1K16M56R1FTXJPY", "sender": "", "created": 1, "recipients": [{"addr": "a@b"}]}'
    back = Entry.from_json(old)
    assert (back.ret, back.envid, back.reported, back.recipients[0].notify) == ("", "", [], "")


# --- the scheduler's decisions


def _entry(*recipients: Recipient, sender: str = "s@example.net") -> Entry:
    return Entry("1K16M56R1FTXJPY", sender, list(recipients), T0)


def test_success_is_reported_for_local_delivery_and_relay_to_a_non_dsn_host() -> None:
    local = Recipient("a@example.org", notify="SUCCESS")
    plain = Recipient("x@remote.test", notify="SUCCESS,FAILURE")
    dsnhost = Recipient("y@dsn.test", notify="SUCCESS")
    quiet = Recipient("b@example.org")
    e = _entry(local, plain, dsnhost, quiet)
    ok = Result("K", "2.0.0", "250 ok", "mx:25")
    policy.record_result(local, Result("K", "2.0.0", "delivered"), T0, (), policy.LOCAL)
    policy.record_result(plain, ok, T0, (), policy.REMOTE)
    policy.record_result(dsnhost, ok.replace(dsn=True), T0, (), policy.REMOTE)
    policy.record_result(quiet, Result("K", "2.0.0", "delivered"), T0, (), policy.LOCAL)
    owed = policy.unreported(e)
    assert [(r.addr, r.success) for r in owed] == [
        ("a@example.org", "delivered"),
        ("x@remote.test", "relayed"),
    ]
    e.reported += [r.addr for r in owed]
    assert policy.unreported(e) == []
    assert policy.unreported(_entry(local, sender="")) == []  # never to the null sender


def test_never_means_no_bounce_and_no_warning() -> None:
    never = Recipient("a@remote.test", notify="NEVER")
    e = _entry(never)
    policy.record_result(never, Result("Z", "4.4.1", "timeout"), T0, (300.0,), policy.REMOTE)
    assert not policy.needs_warning(e, T0 + 5 * HOUR, CONFIG.queue)
    policy.record_result(never, Result("D", "5.1.1", "no such user"), T0, (), policy.REMOTE)
    assert policy.unbounced(e) == [never]
    assert policy.to_bounce(policy.unbounced(e)) == []


def test_delay_controls_the_warning() -> None:
    no_delay = Recipient("a@remote.test", notify="FAILURE")
    delay = Recipient("b@remote.test", notify="DELAY")
    default = Recipient("c@remote.test")
    assert not policy.needs_warning(_entry(no_delay), T0 + 5 * HOUR, CONFIG.queue)
    assert policy.needs_warning(_entry(delay), T0 + 5 * HOUR, CONFIG.queue)
    assert not policy.needs_warning(_entry(delay), T0 + 3 * HOUR, CONFIG.queue)
    e = _entry(no_delay, delay, default)
    assert policy.delayed(e) == [delay, default]
    # failure reports: FAILURE or the default, not DELAY alone
    for r in e.recipients:
        r.state = RecipientState.FAILED
    assert policy.to_bounce(policy.unbounced(e)) == [no_delay, default]


def test_what_a_report_returns() -> None:
    e = _entry(Recipient("a@example.org"))
    assert policy.return_content(e, success=False) == "full"
    assert policy.return_content(e, success=True) == "headers"
    e.ret = "HDRS"
    assert policy.return_content(e, success=False) == "headers"
    e.ret = "FULL"
    assert policy.return_content(e, success=True) == "full"


# --- the reports


def _report(tmp_path: Path, **kwargs: object) -> email.message.EmailMessage:
    orig = tmp_path / "orig"
    orig.write_bytes(
        entry_header(b"Fa@example.org\0Tx@example.net\0\0")
        + b"Received: by x\nFrom: a@example.org\nSubject: original\n\nTHE BODY\n"
    )
    data = b"".join(
        notification(
            hostname="mx.example.org",
            sender="a@example.org",
            qid="1K16M56R1FTXJPY",
            arrival="Thu, 26 Nov 2026 22:00:00 +0000",
            message_path=str(orig),
            date="Thu, 26 Nov 2026 23:00:00 +0000",
            **kwargs,  # type: ignore[arg-type]
        )
    )
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_success_report_with_envid_orcpt_and_headers_only(tmp_path: Path) -> None:
    msg = _report(
        tmp_path,
        failures=[
            Failure(
                "x@example.net",
                "2.0.0 delivered",
                "2.0.0",
                orcpt="rfc822;X@old.example",
                action="relayed",
            )
        ],
        success=True,
        content="headers",
        envid="ENV-42",
    )
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    _text, status, original = msg.iter_parts()
    per_message, per_rcpt = status.get_payload()  # type: ignore[misc]
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert per_rcpt["Action"] == "relayed"
    assert per_rcpt["Original-Recipient"] == "rfc822; X@old.example"
    assert per_rcpt["Status"] == "2.0.0"
    assert original.get_content_type() == "text/rfc822-headers"
    assert b"THE BODY" not in msg.as_bytes()
