"""CHUNKING/BDAT (RFC 3030) and SMTPUTF8 (RFC 6531) through the whole chain: real
clients (raw sockets, smtplib, swaks) to mailgrave-smtpd, delivery to Maildirs and
to an aiosmtpd peer."""

from __future__ import annotations

import email
import email.policy
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Instance, Processes, free_port, wait_for
from tests.integration.test_remote_delivery import Peer, start_peer
from tests.integration.test_smtpd import recv_reply, swaks

UTF8_USER = "jörg@bücher.example"
LIE = 5 * 1024 * 1024 + 1000  # a chunk over the 5M limit


class Chain:
    def __init__(self, inst: Instance, port: int, peer: Peer, utf8_peer: Peer) -> None:
        self.inst = inst
        self.port = port
        self.peer = peer  # nosmtputf8.test: no SMTPUTF8 offered
        self.utf8_peer = utf8_peer  # smtputf8.test: SMTPUTF8 offered

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        assert recv_reply(sock).startswith(b"220 ")
        return sock


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    procs = Processes()
    base = tmp_path_factory.mktemp("standards")
    try:
        peer = start_peer(procs, base)  # no SMTPUTF8 offered
        utf8_peer = start_peer(procs, base, "--smtputf8")
        inst = Instance(
            base,
            smtpd={"max_message_size": "5M", "timeout": "5s"},
            local={
                "virtual": {
                    # a UTF-8 local part and an IDN domain, written as people write them
                    "Jörg@Bücher.example": str(base / "mail" / "joerg" / "Maildir") + "/",
                }
            },
            remote={
                "routes": {
                    "nosmtputf8.test": f"[127.0.0.1]:{peer.port}",
                    "smtputf8.test": f"[127.0.0.1]:{utf8_peer.port}",
                }
            },
        )
        port = free_port()
        inst.start(procs, listen=f"127.0.0.1:{port}")
        yield Chain(inst, port, peer, utf8_peer)
    finally:
        procs.stop_all()


def dialog(sock: socket.socket, data: bytes, replies: int) -> list[bytes]:
    """Send ``data`` (pipelined), then read ``replies`` reply lines' final lines."""
    sock.sendall(data)
    got: list[bytes] = []
    buf = b""
    while len(got) < replies:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\r\n")
        got += [line for line in lines if line[3:4] == b" "]
    return got


def test_ehlo_offers_chunking_and_smtputf8(chain: Chain) -> None:
    with smtplib.SMTP("127.0.0.1", chain.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert smtp.has_extn("chunking") and smtp.has_extn("smtputf8")


def test_bdat_chunks_from_a_raw_socket_are_delivered(chain: Chain) -> None:
    before = len(chain.inst.messages("alice"))
    body = b"Subject: chunked\r\n\r\n" + b"line of text\r\n" * 2000
    half = len(body) // 2
    sock = chain.connect()
    try:
        sock.sendall(b"EHLO client.test\r\n")
        recv_reply(sock)
        out = dialog(
            sock,
            b"MAIL FROM:<sender@client.test>\r\nRCPT TO:<alice@example.org>\r\n"
            + b"BDAT %d\r\n" % half
            + body[:half]
            + b"BDAT %d\r\n" % (len(body) - half)
            + body[half:]
            + b"BDAT 0 LAST\r\n",
            5,
        )
        assert out[:3] == [b"250 2.0.0 Ok", b"250 2.0.0 Ok", b"250 2.0.0 %d octets received" % half]
        assert out[4].startswith(b"250 2.0.0 Ok: queued as "), out
        assert dialog(sock, b"QUIT\r\n", 1) == [b"221 2.0.0 Bye"]
    finally:
        sock.close()
    wait_for(lambda: len(chain.inst.messages("alice")) > before)
    raw = chain.inst.messages("alice")[-1]
    assert raw.endswith(b"line of text\n" * 2000)
    assert b"Subject: chunked\n" in raw


def test_bdat_driven_by_smtplib_one_chunk_at_a_time(chain: Chain) -> None:
    # smtplib has no BDAT of its own (nor has swaks 20201014): its session, EHLO,
    # MAIL and RCPT, then each chunk sent with send() and its reply read with
    # getreply(), without pipelining, as a client that waits for each reply does.
    before = len(chain.inst.messages("alice"))
    chunks = [b"Subject: smtplib chunks\r\n\r\n", b"first part\r\n" * 300, b"last line\r\n"]
    with smtplib.SMTP("127.0.0.1", chain.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert smtp.has_extn("chunking")
        assert smtp.mail("sender@client.test")[0] == 250
        assert smtp.rcpt("alice@example.org")[0] == 250
        for i, chunk in enumerate(chunks):
            last = " LAST" if i == len(chunks) - 1 else ""
            smtp.send(b"BDAT %d%s\r\n" % (len(chunk), last.encode()) + chunk)
            code, text = smtp.getreply()
            assert code == 250, text
        assert text.startswith(b"2.0.0 Ok: queued as ")
    wait_for(lambda: len(chain.inst.messages("alice")) > before)
    raw = chain.inst.messages("alice")[-1]
    assert b"Subject: smtplib chunks\n" in raw and raw.endswith(
        b"first part\n" * 300 + b"last line\n"
    )


def test_bdat_hostile_cases(chain: Chain) -> None:
    """Size lies are read and discarded (then 552), BDAT mixed with DATA and BDAT
    outside a transaction are refused, and no chunk's octets become commands."""
    sock = chain.connect()
    try:
        sock.sendall(b"EHLO client.test\r\n")
        recv_reply(sock)
        smuggled = b"MAIL FROM:<evil@client.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
        out = dialog(
            sock,
            # BDAT before RCPT: refused, its chunk (commands!) discarded
            b"MAIL FROM:<s@client.test>\r\n"
            + b"BDAT %d\r\n" % len(smuggled)
            + smuggled
            # over the 5M limit: 552 after reading all of it
            + b"MAIL FROM:<s@client.test>\r\nRCPT TO:<alice@example.org>\r\n"
            + b"BDAT 4\r\nab\r\n"
            + b"BDAT %d\r\n" % LIE
            + (smuggled * (LIE // len(smuggled) + 1))[:LIE]
            + b"NOOP\r\n",
            7,
        )
        assert out == [
            b"250 2.0.0 Ok",
            b"503 5.5.1 Need RCPT before DATA",
            b"250 2.0.0 Ok",
            b"250 2.0.0 Ok",
            b"250 2.0.0 4 octets received",
            b"552 5.3.4 Message size exceeds fixed limit",
            b"250 2.0.0 Ok",
        ]
        out = dialog(
            sock,
            b"MAIL FROM:<s@client.test>\r\nRCPT TO:<alice@example.org>\r\n"
            b"BDAT 4\r\nab\r\nDATA\r\nRSET\r\nBDAT 3 LAST\r\nxyz",
            6,
        )
        assert out == [
            b"250 2.0.0 Ok",
            b"250 2.0.0 Ok",
            b"250 2.0.0 4 octets received",
            b"503 5.5.1 Only BDAT, RSET, NOOP or QUIT during a BDAT transfer",
            b"250 2.0.0 Ok",
            b"503 5.5.1 Need MAIL before RCPT",
        ]
        assert dialog(sock, b"BDAT 12 LASTING\r\n", 1) == [
            b"501 5.5.4 Syntax: BDAT size [LAST]; closing connection"
        ]
        assert sock.recv(100) == b""
    finally:
        sock.close()
    assert not any(b"evil@" in m for m in chain.inst.messages("bob"))


def received_lines(raw: bytes) -> list[str]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    return [str(v) for v in msg.get_all("Received", [])]


def test_smtputf8_to_a_utf8_local_part_is_delivered(chain: Chain) -> None:
    message = (
        "From: Jörg <jörg@bücher.example>\r\nTo: jörg@bücher.example\r\n"
        "Subject: Grüße\r\n\r\nHallo Jörg\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", chain.port, timeout=10) as smtp:
        refused = smtp.sendmail(
            "wilhelm@bücher.example", [UTF8_USER], message, mail_options=["SMTPUTF8"]
        )
        assert refused == {}
    wait_for(lambda: chain.inst.messages("joerg"))
    [raw] = chain.inst.messages("joerg")
    assert "Delivered-To: jörg@xn--bcher-kva.example".encode() in raw
    assert "Hallo Jörg".encode() in raw
    [received] = received_lines(raw)
    assert " with UTF8SMTP id " in received


def test_utf8_address_without_smtputf8_is_refused(chain: Chain) -> None:
    res = swaks(chain.port, "--to", UTF8_USER, "--from", "a@client.test", "--quit-after", "RCPT")
    assert "553 5.6.7 Address needs SMTPUTF8" in res.stdout


def test_relay_to_a_peer_without_smtputf8_bounces_5_6_7(chain: Chain) -> None:
    before = len(chain.inst.messages("alice"))
    with smtplib.SMTP("127.0.0.1", chain.port, timeout=10) as smtp:
        smtp.sendmail(
            "alice@example.org",
            ["müller@nosmtputf8.test"],
            b"Subject: to a UTF-8 mailbox\r\n\r\nhi\r\n",
            mail_options=["SMTPUTF8"],
        )
    wait_for(lambda: len(chain.inst.messages("alice")) > before, timeout=30)
    bounce = email.message_from_bytes(chain.inst.messages("alice")[-1], policy=email.policy.default)
    assert bounce.get_content_type() == "multipart/report"
    status = next(p for p in bounce.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "Status: 5.6.7" in text
    assert "SMTPUTF8" in bounce.as_string()


# An ASCII envelope, raw UTF-8 in the header section (RFC 6532).
UTF8_HEADER = (
    "From: Jörg Müller <alice@example.org>\r\nTo: Bücher <x@{domain}>\r\n"
    "Subject: {subject} Grüße\r\n\r\nHallo\r\n"
)


def _send(chain: Chain, rcpt: str, message: bytes, utf8: bool) -> None:
    with smtplib.SMTP("127.0.0.1", chain.port, timeout=10) as smtp:
        refused = smtp.sendmail(
            "alice@example.org", [rcpt], message, mail_options=["SMTPUTF8"] if utf8 else []
        )
        assert refused == {}


def _received(peer: Peer, subject: bytes) -> tuple[dict[str, object], bytes]:
    wait_for(lambda: any(subject in body for _, body in peer.messages()), timeout=30)
    [found] = [(meta, body) for meta, body in peer.messages() if subject in body]
    return found


def test_utf8_header_with_smtputf8_to_a_peer_without_it_bounces_5_6_7(chain: Chain) -> None:
    # RFC 6531 §3.2 / Postfix's "The message requires SMTPUTF8 support, but the
    # remote server doesn't offer it": the envelope is ASCII, the header is not.
    before = len(chain.inst.messages("alice"))
    message = UTF8_HEADER.format(domain="nosmtputf8.test", subject="hdr-bounce").encode()
    _send(chain, "x@nosmtputf8.test", message, utf8=True)
    wait_for(lambda: len(chain.inst.messages("alice")) > before, timeout=30)
    bounce = email.message_from_bytes(chain.inst.messages("alice")[-1], policy=email.policy.default)
    status = next(p for p in bounce.walk() if p.get_content_type() == "message/delivery-status")
    assert "Status: 5.6.7" in status.as_string()
    assert "does not support SMTPUTF8, which this message needs" in bounce.as_string()
    assert not any(b"hdr-bounce" in body for _, body in chain.peer.messages())


def test_utf8_header_with_smtputf8_goes_with_smtputf8_to_a_peer_that_offers_it(
    chain: Chain,
) -> None:
    message = UTF8_HEADER.format(domain="smtputf8.test", subject="hdr-utf8").encode()
    _send(chain, "x@smtputf8.test", message, utf8=True)
    meta, body = _received(chain.utf8_peer, b"hdr-utf8")
    assert "SMTPUTF8" in meta["mail_options"]  # type: ignore[operator]
    assert "Subject: hdr-utf8 Grüße".encode() in body


def test_ascii_message_with_smtputf8_declared_goes_without_it(chain: Chain) -> None:
    # Declared, but ASCII in the envelope and the header (the body may be 8-bit):
    # any server will do, and it is not asked for SMTPUTF8.
    message = b"From: alice@example.org\r\nSubject: all-ascii\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    _send(chain, "x@nosmtputf8.test", message, utf8=True)
    meta, body = _received(chain.peer, b"all-ascii")
    assert "SMTPUTF8" not in meta["mail_options"]  # type: ignore[operator]
    assert "Grüße".encode() in body


def test_utf8_header_without_smtputf8_declared_is_passed_on_as_it_came(chain: Chain) -> None:
    # A legacy client's 8-bit header, SMTPUTF8 not declared: passed on as it came
    # (as Postfix does), not bounced.
    message = UTF8_HEADER.format(domain="nosmtputf8.test", subject="legacy-8bit").encode()
    _send(chain, "x@nosmtputf8.test", message, utf8=False)
    meta, body = _received(chain.peer, b"legacy-8bit")
    assert "SMTPUTF8" not in meta["mail_options"]  # type: ignore[operator]
    assert "Grüße".encode() in body


def test_virtual_keys_are_normalised(tmp_path: Path) -> None:
    from mailgrave import config

    c = config.parse_text("local:\n  virtual: {Jörg@Bücher.Example: /x/}\n")
    assert dict(c.local.virtual) == {"jörg@xn--bcher-kva.example": "/x/"}
    assert c.is_local_domain("xn--bcher-kva.example")


def test_remote_client_sends_bdat_to_mailgrave_smtpd(chain: Chain) -> None:
    """mailgrave-remote's client against a real mailgrave-smtpd: BDAT (CHUNKING offered)
    and DATA give the same message in the Maildir; the time each took is printed
    (``pytest -s``) for docs/performance.md."""
    import time

    from mailgrave.remote.client import Client, Timeouts, wire_format

    text = b"Subject: by BDAT\n\n" + b"".join(
        b".%06d a line that begins with a dot and some text after it\n" % i for i in range(60000)
    )
    assert len(text) > 3 * 1024 * 1024
    before = len(chain.inst.messages("alice"))
    took = {}
    for mode in ("BDAT", "DATA"):
        sock = socket.create_connection(("127.0.0.1", chain.port), timeout=10)
        client = Client(sock, "mx", Timeouts())
        client.greet("client.test")
        assert "CHUNKING" in client.extensions
        start = time.perf_counter()
        [result] = client.deliver(
            "s@client.test",
            ["alice@example.org"],
            wire_format(iter([text])),
            len(text),
            False,
            chunks=wire_format(iter([text]), dot_stuff=False) if mode == "BDAT" else None,
        )
        took[mode] = time.perf_counter() - start
        client.quit()
        assert result.code == "K", result
        assert any(line.startswith(">>> BDAT") for line in client.transcript) == (mode == "BDAT")
    print(f"\n3.6 MB to mailgrave-smtpd: BDAT {took['BDAT']:.3f}s, DATA {took['DATA']:.3f}s")
    wait_for(lambda: len(chain.inst.messages("alice")) >= before + 2)
    bdat, data = chain.inst.messages("alice")[-2:]
    assert bdat.endswith(text[-2000:]) and data.endswith(text[-2000:])
    assert bdat.split(b"\n\n", 1)[1] == data.split(b"\n\n", 1)[1] == text.split(b"\n\n", 1)[1]


def test_mailgrave_check_names_a_bad_virtual_key(tmp_path: Path) -> None:
    inst = Instance(tmp_path, local={"virtual": {"no-domain": "/x/"}})
    res = inst.run("mailgrave", "check")
    assert res.returncode != 0
    assert b"local.virtual" in res.stdout + res.stderr
    assert b"expected local@domain" in res.stdout + res.stderr


def test_sendmail_smtputf8_flag_declares_an_internationalised_message(chain: Chain) -> None:
    # sendmail -SMTPUTF8 (Postfix's flag) is the local submitter's MAIL ... SMTPUTF8:
    # a raw UTF-8 header then goes with SMTPUTF8, or bounces 5.6.7 where the next
    # hop lacks it. Without the flag such a header is passed on as it came.
    def inject(domain: str, subject: str, *flags: str) -> None:
        text = UTF8_HEADER.format(domain=domain, subject=subject).replace("\r\n", "\n")
        res = chain.inst.sendmail(*flags, "-f", "alice@example.org", f"x@{domain}",
                                  data=text.encode())  # fmt: skip
        assert res.returncode == 0, res.stderr

    inject("smtputf8.test", "inject-utf8", "-SMTPUTF8")
    meta, body = _received(chain.utf8_peer, b"inject-utf8")
    assert "SMTPUTF8" in meta["mail_options"]  # type: ignore[operator]
    assert "Subject: inject-utf8 Grüße".encode() in body
    before = len(chain.inst.messages("alice"))
    inject("nosmtputf8.test", "inject-bounce", "-SMTPUTF8")
    wait_for(lambda: len(chain.inst.messages("alice")) > before, timeout=30)
    assert b"Status: 5.6.7" in chain.inst.messages("alice")[-1]
    inject("nosmtputf8.test", "inject-legacy")
    meta, _ = _received(chain.peer, b"inject-legacy")
    assert "SMTPUTF8" not in meta["mail_options"]  # type: ignore[operator]
    assert not any(b"inject-bounce" in b for _, b in chain.peer.messages())
