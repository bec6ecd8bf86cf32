"""The queue's streaming relaxed body hash against dkimpy's own canonicalization."""

from __future__ import annotations

import base64
import hashlib

from dkim.canonicalization import Relaxed
from hypothesis import given
from hypothesis import strategies as st

from mailgrave.queue.dkimsign import RelaxedBody, Signer


def wire(stored: bytes) -> bytes:
    """What mailgrave-remote sends for a spool body (remote.client.wire_format, no dots)."""
    lines = stored.split(b"\n")
    last = lines.pop()
    out = b"".join((line[:-1] if line.endswith(b"\r") else line) + b"\r\n" for line in lines)
    if last.endswith(b"\r"):
        last = last[:-1]
        return out + last + b"\r\n"
    return out + (last + b"\r\n" if last else b"")


def expected(stored: bytes) -> bytes:
    return base64.b64encode(hashlib.sha256(Relaxed.canonicalize_body(wire(stored))).digest())


def streamed(stored: bytes, cuts: list[int]) -> bytes:
    body = RelaxedBody()
    prev = 0
    for cut in sorted(c % (len(stored) + 1) for c in cuts):
        body.feed(stored[prev:cut])
        prev = cut
    body.feed(stored[prev:])
    return body.digest()


@given(
    st.lists(
        st.sampled_from([b"a", b"b", b" ", b"\t", b"\n", b"\r", b"\n\n", b"  \n"]), max_size=60
    ).map(b"".join),
    st.lists(st.integers(min_value=0, max_value=1000), max_size=6),
)
def test_relaxed_body_matches_dkimpy_at_any_chunking(stored: bytes, cuts: list[int]) -> None:
    assert streamed(stored, cuts) == expected(stored)


def test_long_lines_are_hashed_as_they_come() -> None:
    for stored in (
        b"x" * 300_000 + b"   \n\n\n",
        b" " * 300_000 + b"\n" + b"y\t" * 100_000 + b"\r" + b"\n\n",
        b"a \t" * 100_000,
        b"a\r" * 100_000 + b"\r",
    ):
        body = RelaxedBody()
        for i in range(0, len(stored), 65536):
            body.feed(stored[i : i + 65536])
            assert len(body.carry) <= 65536
        assert body.digest() == expected(stored), stored[:20]


def test_header_section_split_at_any_chunk_boundary() -> None:
    message = b"From: a@example.org\r\nSubject: x\r\n\r\nbody \r\n\r\n"
    for cut in range(len(message) + 1):
        signer = Signer({"example.org": ("s", "/nonexistent", "rsa-sha256")})
        signer.feed(message[:cut])
        signer.feed(message[cut:])
        assert signer.domain == "example.org"
        assert signer.header == b"From: a@example.org\nSubject: x\n"
        assert signer.body is not None
        assert signer.body.digest() == expected(b"body \n\n")


def test_foreign_or_ambiguous_from_is_not_signed() -> None:
    keys = {"example.org": ("s", "/nonexistent", "rsa-sha256")}
    for header in (
        b"From: a@example.com\n\n",
        b"From: a@example.org, b@example.com\n\n",
        b"From: a@example.org\nFrom: b@example.org\n\n",
        b"Subject: none\n\n",
    ):
        signer = Signer(keys)
        signer.feed(header + b"x\n")
        assert signer.field() is None, header
