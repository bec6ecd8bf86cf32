"""Routing of remote mail: remote.routes, the smarthost and its password, and MX look-ups
against a real DNS server on loopback (dnslib)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from mailgrave.config import Config, parse_text
from mailgrave.errors import PermFail, TempFail
from mailgrave.remote.route import hops, route_for, smarthost_password
from tests.integration.dnsserver import dns_server

ZONE: dict[str, list[Any]] = {
    "example.net": [("MX", 20, "mx2.example.net."), ("MX", 10, "mx1.example.net.")],
    "mx1.example.net": [("A", "127.0.0.11")],
    "mx2.example.net": [("A", "127.0.0.12"), ("AAAA", "::12")],
    "dual.example.net": [("A", "127.0.0.21"), ("AAAA", "::21")],
    "nullmx.example.net": [("MX", 0, ".")],
    "only6.example.net": [("AAAA", "::31")],
    "gw.example.com": [("MX", 5, "in.example.com.")],
    "in.example.com": [("A", "127.0.0.41")],
}


def config(dns_port: int = 9, **remote: Any) -> Config:
    remote.setdefault("dns", {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": "2s"})
    return parse_text(json.dumps({"hostname": "mx.example.org", "remote": remote}))


@pytest.fixture(scope="module")
def dns() -> Any:
    with dns_server(ZONE, servfail=["broken.example.net"], silent=["slow.example.net"]) as s:
        yield s


def test_mx_hosts_in_preference_order_with_their_addresses(dns: Any) -> None:
    found = hops(config(dns[0]), "example.net")
    assert [(h.host, h.addresses, h.port) for h in found] == [
        ("mx1.example.net", ("127.0.0.11",), 25),
        ("mx2.example.net", ("::12", "127.0.0.12"), 25),
    ]


def test_ip_version_limits_the_addresses(dns: Any) -> None:
    assert hops(config(dns[0], ip_version="4"), "dual.example.net")[0].addresses == ("127.0.0.21",)
    assert hops(config(dns[0], ip_version="6"), "dual.example.net")[0].addresses == ("::21",)
    with pytest.raises(TempFail):  # a host with IPv6 only, and only IPv4 allowed
        hops(config(dns[0], ip_version="4"), "only6.example.net")


def test_no_mx_falls_back_to_the_domains_own_address(dns: Any) -> None:
    [hop] = hops(config(dns[0]), "dual.example.net")
    assert hop.host == "dual.example.net" and set(hop.addresses) == {"127.0.0.21", "::21"}


def test_null_mx_and_nxdomain_are_permanent(dns: Any) -> None:
    with pytest.raises(PermFail, match="null MX"):
        hops(config(dns[0]), "nullmx.example.net")
    with pytest.raises(PermFail, match=r"5\.1\.2"):
        hops(config(dns[0]), "nowhere.example.net")


def test_servfail_and_timeout_are_temporary(dns: Any) -> None:
    with pytest.raises(TempFail, match=r"4\.4\.3"):
        hops(config(dns[0]), "broken.example.net")
    start = time.monotonic()
    with pytest.raises(TempFail):
        hops(
            config(dns[0], dns={"nameservers": ["127.0.0.1"], "port": dns[0], "timeout": "1s"}),
            "slow.example.net",
        )
    assert time.monotonic() - start < 5


def test_configured_nameservers_are_the_only_ones_asked(dns: Any) -> None:
    before = len(dns[1].queries)
    hops(config(dns[0]), "example.net")
    assert ("example.net.", "MX") in dns[1].queries[before:]


def test_bracketed_route_skips_mx_and_plain_route_looks_up_mx_of_the_host(dns: Any) -> None:
    cfg = config(
        dns[0],
        routes={
            "example.net": "[dual.example.net]:10025",
            "other.test": "gw.example.com:2626",
            ".sub.test": "[127.0.0.9]",
        },
    )
    before = len(dns[1].queries)
    [hop] = hops(cfg, "example.net")  # no MX lookup of example.net nor of the route's host
    assert (hop.host, hop.port) == ("dual.example.net", 10025)
    asked = {q for q, _ in dns[1].queries[before:]}
    assert asked == {"dual.example.net."}
    assert ("dual.example.net.", "MX") not in dns[1].queries[before:]
    [hop] = hops(cfg, "other.test")
    assert (hop.host, hop.addresses, hop.port) == ("in.example.com", ("127.0.0.41",), 2626)
    [hop] = hops(cfg, "a.b.sub.test")  # ".domain" covers subdomains, default port
    assert (hop.addresses, hop.port) == (("127.0.0.9",), 25)
    with pytest.raises(PermFail):  # "sub.test" itself is not covered by ".sub.test"
        hops(cfg, "sub.test")


def test_routes_win_over_the_smarthost_and_star_is_the_default() -> None:
    cfg = config(
        routes={"example.net": "[10.0.0.1]:25"},
        smarthost={"host": "relay.example.com", "port": 587},
    )
    assert route_for(cfg, "example.net") == ("[10.0.0.1]:25", False)
    assert route_for(cfg, "example.com") == ("[relay.example.com]:587", True)
    star = config(routes={"*": "[10.0.0.2]:10025"}, smarthost={"host": "relay.example.com"})
    assert route_for(star, "anything.test") == ("[10.0.0.2]:10025", False)
    assert route_for(config(), "anything.test") == ("", False)


def test_smarthost_password_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("SMTP_AUTH_PASSWORD", "from-env")
    assert smarthost_password(config(smarthost={"host": "relay.test"})) == "from-env"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "smtp-password").write_text("from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert smarthost_password(config(smarthost={"host": "relay.test"})) == "from-credential"
    pw = tmp_path / "pw"
    pw.write_text("from-file\r\nsecond line\n")
    cfg = config(smarthost={"host": "relay.test", "password_file": str(pw)})
    assert smarthost_password(cfg) == "from-file"
