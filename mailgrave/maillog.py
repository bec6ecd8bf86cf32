"""One function per mail event, each writing one greppable line with journal fields."""

from __future__ import annotations

from mailgrave.log import INFO, WARNING, emit, quote

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from mailgrave.errors import Result


def _emit(level: int, text: str, **fields: object) -> None:
    emit(level, text, {f"MAILGRAVE_{k.upper()}": v for k, v in fields.items()})


def queued(qid: str, sender: str, recipients: Iterable[str], size: int, origin: str) -> None:
    rcpts = list(recipients)
    _emit(
        INFO,
        f"{qid}: queued from=<{sender}> to=<{'>,<'.join(rcpts)}> size={size} origin={origin}",
        qid=qid,
        status="queued",
        **{"from": sender, "rcpt": ",".join(rcpts)},
    )


def delivered(qid: str, rcpt: str, via: str, reply: str) -> None:
    _emit(
        INFO,
        f"{qid}: delivered to=<{rcpt}> via={via} reply={quote(reply, 200)}",
        qid=qid,
        rcpt=rcpt,
        status="delivered",
    )


def deferred(qid: str, rcpt: str, via: str, reply: str, next_attempt: str) -> None:
    _emit(
        WARNING,
        f"{qid}: deferred to=<{rcpt}> via={via} reply={quote(reply, 200)} next={next_attempt}",
        qid=qid,
        rcpt=rcpt,
        status="deferred",
    )


def failed(qid: str, rcpt: str, via: str, reply: str) -> None:
    _emit(
        WARNING,
        f"{qid}: failed to=<{rcpt}> via={via} reply={quote(reply, 200)}",
        qid=qid,
        rcpt=rcpt,
        status="failed",
    )


def bounced(qid: str, bounce_qid: str, sender: str, recipients: Iterable[str]) -> None:
    _emit(
        INFO,
        f"{qid}: bounce {bounce_qid} to=<{sender}> for <{'>,<'.join(recipients)}>",
        qid=qid,
        status="bounced",
    )


def removed(qid: str, reason: str) -> None:
    _emit(INFO, f"{qid}: removed ({reason})", qid=qid, status="removed")


def rejected(stage: str, client: str, reason: str, **fields: object) -> None:
    """A refusal by smtpd or inject; ``reason`` must already be quoted where it is client text."""
    _emit(INFO, f"reject {stage} from {client}: {reason}", status="rejected", **fields)


def attempt(qid: str, rcpt: str, agent: str, result: Result) -> None:
    """What a delivery agent (local, remote) did for one recipient.

    mailgrave-send logs the decision (delivered / deferred / failed) with
    MAILGRAVE_STATUS; this line is the agent's own account of the attempt.
    """
    outcome = {"K": "ok", "Z": "temporary failure", "D": "permanent failure"}[result.code]
    _emit(
        INFO if result.ok else WARNING,
        f"{qid}: {agent} to=<{rcpt}> {outcome}: {quote(result.reply_text(), 300)}",
        qid=qid,
        rcpt=rcpt,
    )


def auth_failed(client_ip: str, mechanism: str, login: str, reason: str) -> None:
    """A failed SMTP AUTH: the client's address first (what fail2ban's filter reads)."""
    _emit(
        WARNING,
        f"auth failed from [{client_ip}]: mechanism={mechanism or '-'} login={quote(login)}"
        f" ({reason})",
        event="auth-failed",
        client=client_ip,
        status="rejected",
    )
