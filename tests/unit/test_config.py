from __future__ import annotations

from pathlib import Path

import pytest

from mailgrave import config


def test_example_keys_load() -> None:
    c = config.parse_text(
        """
hostname: mx.example.org
spool: /var/spool/mailgrave
run_dir: /run/mailgrave
local_domains: [example.org]
relay_networks: ["127.0.0.0/8", "::1/128"]
local:
  mailbox: maildir
  aliases: /etc/aliases
  recipient_delimiter: "+"
  virtual:
    alice@example.org: /var/mail/virtual/alice/Maildir/
queue:
  lifetime: 5d
smtpd:
  max_message_size: 10M
  timeout: 90s
"""
    )
    assert c.hostname == "mx.example.org"
    assert c.queue.lifetime == 5 * 86400
    assert c.smtpd.max_message_size == 10 * 1024 * 1024
    assert c.smtpd.timeout == 90
    assert c.local.virtual["alice@example.org"] == "/var/mail/virtual/alice/Maildir/"
    assert c.is_local_domain("EXAMPLE.org")
    assert c.is_local_domain("localhost")
    assert c.may_relay("127.0.0.9") and c.may_relay("::1") and not c.may_relay("192.0.2.1")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "smtpd:\n  max_recipients: lots\n",
            'smtpd.max_recipients: expected an integer, got "lots"',
        ),
        ("bogus: 1\n", "bogus: unknown key"),
        ("queue:\n  lifetime: forever\n", "queue.lifetime: expected a duration"),
        ("local:\n  mailbox: mh\n", "local.mailbox: expected one of maildir, mbox"),
        ("relay_networks: [10.0.0.0/33]\n", "relay_networks: item 0: expected a network"),
        ("local: [1, 2]\n", "local: expected a mapping"),
        ("smtpd:\n  max_message_size: big\n", "smtpd.max_message_size: expected a size"),
        ("hostname: [a]\n", "hostname: expected a string"),
        ("remote:\n  tls: maybe\n", "remote.tls: expected one of"),
    ],
)
def test_problem_names_file_and_key(text: str, problem: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse_text(text, "/etc/mailgrave/mailgrave.yaml")
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("/etc/mailgrave/mailgrave.yaml: ")
    assert problem in err.value.problems[0]


def test_every_problem_reported() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse_text("a: 1\nsmtpd: {max_errors: x, timeout: y}\n", "f")
    assert len(err.value.problems) == 3


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.parse_text("a: [", "f")
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(str(tmp_path / "absent.yaml"))


def test_config_is_frozen() -> None:
    c = config.parse_text("local:\n  virtual: {a@b.c: /x/}\n")
    with pytest.raises(AttributeError):
        c.hostname = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.local.virtual["z@b.c"] = "/y/"  # type: ignore[index]


def test_sizes_and_durations() -> None:
    assert config.parse_size("10M") == 10 * 1024 * 1024
    assert config.parse_size("512K") == 512 * 1024
    assert config.parse_size(1000) == 1000
    assert [config.parse_duration(x) for x in ("90s", "5m", "4h", "5d", 7)] == [
        90,
        300,
        14400,
        432000,
        7,
    ]


def test_virtual_domains_are_local() -> None:
    c = config.parse_text("local:\n  virtual: {a@virt.example: /x/}\n")
    assert c.is_local_domain("virt.example") and not c.is_local_domain("other.example")


def test_checks_spf_modes() -> None:
    assert config.parse_text("").checks.spf == "record"
    assert config.parse_text("checks: {spf: enforce}\n").checks.spf == "enforce"
    with pytest.raises(config.ConfigError) as info:
        config.parse_text("checks: {spf: reject}\n")
    assert "checks.spf" in str(info.value)


def test_checks_dkim_dmarc_modes() -> None:
    c = config.parse_text("")
    assert (c.checks.dkim, c.checks.dmarc) == ("record", "record")
    assert config.parse_text("checks: {dmarc: enforce}\n").checks.dmarc == "enforce"
    for key in ("dkim", "dmarc"):
        with pytest.raises(config.ConfigError) as info:
            config.parse_text(f"checks: {{{key}: reject}}\n")
        assert f"checks.{key}" in str(info.value)
