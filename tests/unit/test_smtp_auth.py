"""AUTH PLAIN and LOGIN and the submission rules in the sans-I/O core (RFC 4954, RFC 6409)."""

from __future__ import annotations

import base64

from mailgrave.smtp import server as S
from tests.unit.test_smtp_server import Dialog


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def tls_dialog(**policy: object) -> Dialog:
    policy.setdefault("tls_available", True)
    policy.setdefault("auth_available", True)
    d = Dialog(**policy)
    d.server.tls_started()
    return d


def verdicts(d: Dialog) -> list[S.Authenticate]:
    return [e for e in d.events if isinstance(e, S.Authenticate)]


def test_auth_not_advertised_nor_accepted_before_tls() -> None:
    d = Dialog(tls_available=True, auth_available=True)
    assert not any("AUTH" in line for line in d.replies(b"EHLO c.test\r\n"))
    assert d.code("AUTH PLAIN " + b64("\0alice\0pw")) == "538 5.7.11"
    assert verdicts(d) == []
    d.server.tls_started()
    assert "250-AUTH PLAIN LOGIN" in d.replies(b"EHLO c.test\r\n")


def test_plain_with_initial_response_asks_the_program_then_235() -> None:
    d = tls_dialog()
    d.code("EHLO c.test")
    assert d.replies(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode()) == []
    (ev,) = verdicts(d)
    assert (ev.mechanism, ev.login, ev.password) == ("PLAIN", "alice", "s3cret")
    assert "s3cret" not in repr(ev)
    out = b"".join(e.data for e in d.server.auth_result(True) if isinstance(e, S.Output))
    assert out == b"235 2.7.0 Authentication successful\r\n"
    assert d.server.login == "alice" and d.server.proto == "ESMTPSA"


def test_login_mechanism_two_continuations_and_pipelined_rest_waits() -> None:
    d = tls_dialog()
    d.code("EHLO c.test")
    assert d.replies(b"AUTH LOGIN\r\n") == ["334 VXNlcm5hbWU6"]
    assert d.replies(f"{b64('alice')}\r\n".encode()) == ["334 UGFzc3dvcmQ6"]
    # The password and a pipelined MAIL: MAIL waits for the verdict.
    assert d.replies(f"{b64('pw')}\r\nMAIL FROM:<alice@example.org>\r\n".encode()) == []
    assert verdicts(d)[0].login == "alice"
    out = b"".join(e.data for e in d.server.auth_result(True) if isinstance(e, S.Output))
    assert out == b"235 2.7.0 Authentication successful\r\n250 2.0.0 Ok\r\n"


def test_wrong_password_535_and_close_after_max_failures() -> None:
    d = tls_dialog(max_auth_failures=2)
    d.code("EHLO c.test")
    d.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'bad')}\r\n".encode())
    events = d.server.auth_result(False)
    assert S.Output(b"535 5.7.8 Authentication credentials invalid\r\n") in events
    assert S.AuthFailed("PLAIN", "alice", "invalid credentials") in events
    d.send(b"AUTH LOGIN\r\n")
    d.send(b"*\r\n")  # cancelled: a failure too
    assert d.server.state == S.State.CLOSED
    assert any(isinstance(e, S.Close) for e in d.events)


def test_bad_base64_and_unknown_mechanism() -> None:
    d = tls_dialog()
    d.code("EHLO c.test")
    assert d.code("AUTH CRAM-MD5") == "504 5.5.4"
    assert d.code("AUTH PLAIN !!!notbase64") == "501 5.5.2"
    assert verdicts(d) == []


def test_auth_secret_never_in_rejection_logs() -> None:
    d = Dialog(tls_available=True, auth_available=True)
    d.code("EHLO c.test")
    d.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'topsecret')}\r\n".encode())
    reasons = " ".join(e.reason for e in d.events if isinstance(e, S.Rejected))
    assert "538" in reasons and b64(chr(0) + "alice" + chr(0) + "topsecret") not in reasons


def test_submission_mail_needs_auth_then_sender_must_be_owned() -> None:
    d = tls_dialog(submission=True)
    d.code("EHLO c.test")
    assert d.code("MAIL FROM:<alice@example.org>") == "530 5.7.0"
    d.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'pw')}\r\n".encode())
    d.server.auth_result(True)
    assert d.code("MAIL FROM:<mallory@example.org>") == "553 5.7.1"
    assert d.code("MAIL FROM:<alice@example.org>") == "250 2.0.0"
    # Relays anywhere once authenticated.
    assert d.code("RCPT TO:<someone@elsewhere.test>") == "250 2.0.0"


def test_rate_limit_refuses_recipients_with_451() -> None:
    d = tls_dialog(submission=True, rate_left=1)
    d.code("EHLO c.test")
    d.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'pw')}\r\n".encode())
    d.server.auth_result(True)
    d.code("MAIL FROM:<alice@example.org>")
    assert d.code("RCPT TO:<a@elsewhere.test>") == "250 2.0.0"
    assert d.code("RCPT TO:<b@elsewhere.test>") == "451 4.7.1"
