from __future__ import annotations

import io
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgrave.address import AddressError, parse, parse_or_local, to_ascii_domain
from mailgrave.envelope import Envelope, EnvelopeError, decode, read_envelope, read_fields


def test_domain_lowercased_and_idn_to_a_labels() -> None:
    assert str(parse("Alice@Example.ORG")) == "Alice@example.org"
    assert to_ascii_domain("bücher.example") == "xn--bcher-kva.example"
    assert str(parse("jürgen@bücher.example")) == "jürgen@xn--bcher-kva.example"


def test_utf8_local_part_allowed_and_flagged() -> None:
    addr = parse("jürgen@example.org")
    assert addr.needs_smtputf8
    assert not parse("j@example.org").needs_smtputf8


@pytest.mark.parametrize(
    "text",
    [
        "a" * 65 + "@example.org",  # local part > 64 octets
        "ü" * 33 + "@example.org",  # 66 octets in UTF-8
        "a@" + ("b" * 63 + ".") * 4 + "c",  # domain > 255
        "a@exa mple.org",
        "a\x00b@example.org",
        "a\rb@example.org",
        "a\nb@example.org",
        "a@example\x7f.org",
        "noatsign",
        "@example.org",
        "a@",
        "a@-bad.example",
        "a@ex..ample",
        "x" * 200 + "@" + "y" * 60 + ".org",  # path > 256
    ],
)
def test_rfc5321_limits_and_control_characters(text: str) -> None:
    with pytest.raises(AddressError):
        parse(text)


def test_at_inside_quoted_local_part_splits_at_last_at() -> None:
    addr = parse('"a@b"@example.org')
    assert addr.local == '"a@b"' and addr.domain == "example.org"


def test_address_literals() -> None:
    assert parse("a@[192.0.2.1]").domain == "[192.0.2.1]"
    assert parse("a@[IPv6:2001:db8::1]").domain == "[IPv6:2001:db8::1]"
    with pytest.raises(AddressError):
        parse("a@[999.0.0.1]")


def test_bare_name_gets_default_domain() -> None:
    assert str(parse_or_local("root", "mx.example.org")) == "root@mx.example.org"


def test_envelope_round_trip_with_null_sender() -> None:
    env = Envelope("", ("a@example.org", "b@example.net"))
    raw = env.encode()
    assert raw == b"F\0Ta@example.org\0Tb@example.net\0\0"
    assert decode(raw) == env
    assert read_envelope(io.BytesIO(raw + b"trailing")) == raw


def test_smtputf8_flag_round_trip() -> None:
    # RFC 6531: the client declared SMTPUTF8; a U field after F (and any R, E).
    env = Envelope("a@example.org", ("b@example.net",), ret="HDRS", utf8=True)
    raw = env.encode()
    assert raw == b"Fa@example.org\0RHDRS\0U\0Tb@example.net\0\0"
    assert decode(raw) == env and decode(raw).utf8
    assert not decode(b"Fa@example.org\0Tb@example.net\0\0").utf8


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"Ta@b.c\0\0",  # no F
        b"Fa@b.c\0\0",  # no recipient
        b"Fa@b.c\0Ta@b.c\0",  # not terminated
        b"Fa@b.c\0Xa@b.c\0\0",  # bad field
        b"Fa@b.c\0Tnodomain\0\0",  # bad recipient
        b"Fa@b.c\0T\xff@b.c\0\0",  # not UTF-8
        b"Fa@b.c\0U1\0Ta@b.c\0\0",  # U takes no value
        b"Fa@b.c\0U\0U\0Ta@b.c\0\0",  # twice
        b"Fa@b.c\0Ta@b.c\0U\0\0",  # U belongs to the message, before the recipients
    ],
)
def test_bad_envelopes_are_refused(raw: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode(raw)


def test_read_envelope_truncated() -> None:
    with pytest.raises(EnvelopeError):
        read_envelope(io.BytesIO(b"Fa@b.c\0Ta@b"))
    with pytest.raises(EnvelopeError):
        read_envelope(io.BytesIO(b"Xjunk"))


class _Chunky(io.RawIOBase):
    """A raw stream that hands out its data in the given piece sizes (as a socket may)."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes = data, sizes or [1]
        self.calls = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.sizes[self.calls % len(self.sizes)], len(self.data))
        self.calls += 1
        b[:n], self.data = self.data[:n], self.data[n:]
        return n


fields = st.lists(st.binary(min_size=1, max_size=12).filter(lambda f: b"\0" not in f), max_size=6)


@given(
    fields,
    st.binary(max_size=20),
    st.lists(st.integers(1, 7), max_size=5),
    st.integers(1, 16),
)
def test_read_fields_stops_exactly_at_the_end_of_the_block(
    items: list[bytes], rest: bytes, sizes: list[int], buffer: int
) -> None:
    block = b"".join(f + b"\0" for f in items) + b"\0"
    raw = _Chunky(block + rest, sizes)
    stream = io.BufferedReader(raw, buffer_size=buffer)
    assert read_fields(stream, 1000) == block
    assert stream.read() == rest  # nothing after the block was consumed
    # Without peek (one byte at a time) the answer is the same.
    plain = io.BytesIO(block + rest)
    assert read_fields(plain, 1000) == block and plain.read() == rest


def test_read_fields_limits_and_truncation() -> None:
    with pytest.raises(OverflowError):
        read_fields(io.BufferedReader(io.BytesIO(b"a" * 100 + b"\0\0")), 50)
    with pytest.raises(OverflowError):  # a block longer than the limit, found in one peek
        read_fields(io.BufferedReader(io.BytesIO(b"a" * 60 + b"\0\0")), 50)
    with pytest.raises(EOFError):
        read_fields(io.BufferedReader(io.BytesIO(b"a\0b\0")), 50)
    # A wrong first byte is refused before anything else is read.
    raw = _Chunky(b"X" + b"y" * 10_000, [1])
    with pytest.raises(ValueError):
        read_fields(io.BufferedReader(raw, buffer_size=1), 1 << 20, first=b"F")
    assert raw.calls == 1
