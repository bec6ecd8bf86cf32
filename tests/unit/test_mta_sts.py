"""MTA-STS (RFC 8461) without the network: the TXT record, the policy file,
which MX hosts a policy allows, expiry, and the cache's form."""

from __future__ import annotations

import pytest

from mailgrave.config import ConfigError, parse_text
from mailgrave.remote.mtasts import MAX_AGE, Policy, PolicyError, parse_policy, parse_txt

T0 = 1_800_000_000.0


def test_txt_record_needs_exactly_one_stsv1_with_an_id() -> None:
    assert parse_txt(["v=STSv1; id=20260101T000000;"]) == "20260101T000000"
    assert parse_txt(["v=spf1 -all", "v=STSv1; id=abc"]) == "abc"
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None
    assert parse_txt(["v=STSv1;"]) is None
    assert parse_txt(["v=STSv1; id=not-alnum"]) is None
    assert parse_txt([]) is None


def test_policy_file() -> None:
    text = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\nmx: *.Example.NET.\nmax_age: 604800\n"
    p = parse_policy("example.com", "id1", text, T0)
    assert (p.mode, p.mx, p.max_age) == ("enforce", ("mail.example.com", "*.example.net"), 604800)
    assert p.allows("mail.example.com") and p.allows("MX1.example.net.")
    assert not p.allows("example.net") and not p.allows("a.b.example.net")
    assert not p.allows("evil.example.com")
    assert not p.expired(T0 + 604799) and p.expired(T0 + 604800)
    assert Policy.from_json(p.to_json()) == p
    huge = parse_policy("d.test", "i", text.replace("604800", "99999999999"[:10]), T0)
    assert huge.max_age == MAX_AGE


@pytest.mark.parametrize(
    "text",
    [
        "mode: enforce\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: soon\n",
    ],
)
def test_bad_policy_files(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy("d.test", "i", text, T0)


def test_config_keys() -> None:
    assert parse_text("remote: {}\n").remote.mta_sts == "on"
    assert parse_text("remote: {mta_sts: off}\n").remote.mta_sts == "off"  # YAML's false
    assert parse_text("remote: {mta_sts: 'on'}\n").remote.mta_sts == "on"
    with pytest.raises(ConfigError, match=r"remote\.mta_sts: expected one of off, on"):
        parse_text("remote: {mta_sts: enforce}\n")
