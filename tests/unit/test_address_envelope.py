from __future__ import annotations

import io

import pytest

from mailgrave.address import AddressError, parse, parse_or_local, to_ascii_domain
from mailgrave.envelope import Envelope, EnvelopeError, decode, read_envelope


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
