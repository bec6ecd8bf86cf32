"""The queue's inbound filter: forged Authentication-Results: removed in any
chunking, and DKIM body hashes equal to dkimpy's canonicalization."""

from __future__ import annotations

import hashlib

import pytest
from dkim.canonicalization import Relaxed, Simple  # type: ignore[import-untyped]
from hypothesis import given
from hypothesis import strategies as st

from mailgrave.queue.inbound import Inbound, claims

MESSAGE = (
    b"Received: from x\r\n"
    b"Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=a@b.test\r\n"
    b"Authentication-Results: (comment) MX.Example.Org.;\r\n\tdkim=pass header.d=b.test\r\n"
    b"Authentication-Results: other.example; spf=fail\r\n"
    b"Authentication-Results: mx.example.org.evil; spf=pass\r\n"
    b"Subject: hi\r\n"
    b"\r\n"
    b"Authentication-Results: mx.example.org; in the body stays\r\n"
)
EXPECTED = (
    b"Received: from x\r\n"
    b"Authentication-Results: other.example; spf=fail\r\n"
    b"Authentication-Results: mx.example.org.evil; spf=pass\r\n"
    b"Subject: hi\r\n"
    b"\r\n"
    b"Authentication-Results: mx.example.org; in the body stays\r\n"
)


def run(chunks: list[bytes], keep: bool = False) -> tuple[bytes, Inbound]:
    inbound = Inbound("mx.example.org", keep)
    out = b"".join(inbound.feed(c) for c in chunks) + inbound.end()
    return out, inbound


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
def test_forged_fields_removed_in_any_chunking(size: int) -> None:
    chunks = [MESSAGE[i : i + size] for i in range(0, len(MESSAGE), size)]
    out, inbound = run(chunks)
    assert out == EXPECTED and inbound.removed == 2


def test_claims() -> None:
    assert claims(b'Authentication-Results: "mx.example.org" 1; none\n', "mx.example.org")
    assert not claims(b"Authentication-Results-X: mx.example.org; none\n", "mx.example.org")
    assert not claims(b"Subject: mx.example.org\n", "mx.example.org")


def test_a_long_forged_field_is_still_removed() -> None:
    field = b"Authentication-Results: mx.example.org; x=" + b"y" * 200_000 + b"\r\n"
    out, _ = run([b"A: b\r\n", field[:70_000], field[70_000:], b"\r\nbody\r\n"])
    assert out == b"A: b\r\n\r\nbody\r\n"


def test_headers_only_message() -> None:
    out, _ = run([b"Subject: x\r\nAuthentication-Results: mx.example.org; none"])
    assert out == b"Subject: x\r\n"


bodies = st.lists(
    st.sampled_from([b"", b" ", b"\t", b"a", b"b  c", b"d \t", b"  e", b"\r\n", b"\r\n\r\n"]),
    max_size=30,
).map(b"".join)


@given(body=bodies, size=st.integers(1, 20), limit=st.one_of(st.none(), st.integers(0, 40)))
def test_body_hash_is_dkimpys(body: bytes, size: int, limit: int | None) -> None:
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"  # as over SMTP: the body ends with CRLF
    message = b"Subject: x\r\n\r\n" + body
    for relaxed, canon in ((False, Simple), (True, Relaxed)):
        inbound = Inbound("mx.example.org", True, lambda _h: [(relaxed, "sha256", limit)])
        for i in range(0, len(message), size):
            inbound.feed(message[i : i + size])
        inbound.end()
        hashes = inbound.body_hashes()
        assert hashes is not None
        want = canon.canonicalize_body(body)
        if limit is not None:
            want = want[:limit]
        assert hashes[(relaxed, "sha256", limit)] == hashlib.sha256(want).digest()
