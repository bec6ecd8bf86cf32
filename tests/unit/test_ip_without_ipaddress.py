"""Client addresses and relay_networks with inet_pton instead of ipaddress: the same
answers as ipaddress gives, for any address."""

from __future__ import annotations

import ipaddress

from hypothesis import assume, given
from hypothesis import strategies as st

from mailgrave import config
from mailgrave.smtpd.session import _plain_ip


def reference_plain_ip(ip: str) -> str:
    """What smtpd did with ipaddress."""
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return str(addr.ipv4_mapped)
    return str(addr)


def reference_may_relay(networks: list[str], ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr in ipaddress.ip_network(n, strict=False) for n in networks)


v4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
# IPv6 with many zero groups (compression), mapped and compatible IPv4, and anything.
v6 = st.one_of(
    st.integers(0, 2**128 - 1),
    st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF, 0xABCD]), min_size=8, max_size=8).map(
        lambda hs: sum(h << (16 * i) for i, h in enumerate(hs))
    ),
    st.integers(0, 2**32 - 1).map(lambda n: 0xFFFF00000000 | n),
    st.integers(0, 2**32 - 1),
).map(lambda n: str(ipaddress.IPv6Address(n)))
texts = st.one_of(v4, v6, v6.map(str.upper), v6.map(lambda a: a + "%eth0"), st.text(max_size=20))


@given(texts)
def test_plain_ip_writes_what_ipaddress_writes(ip: str) -> None:
    assert _plain_ip(ip) == reference_plain_ip(ip)


def test_plain_ip_examples() -> None:
    assert _plain_ip("::ffff:192.0.2.1") == "192.0.2.1"
    assert _plain_ip("2001:DB8:0:0:0:0:0:1") == "2001:db8::1"
    assert _plain_ip("fe80::1%eth0") == "fe80::1"
    assert _plain_ip("unknown") == "unknown"


networks = st.lists(
    st.one_of(
        st.tuples(v4, st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}"),
        st.tuples(v6, st.integers(0, 128)).map(lambda t: f"{t[0]}/{t[1]}"),
    ),
    min_size=1,
    max_size=4,
)


def relaying(nets: list[str]) -> config.Config:
    """A config with these relay_networks, as the converter normalises them."""
    return config.Config(relay_networks=tuple(config._network(n) for n in nets))


def test_relay_networks_from_yaml() -> None:
    c = config.parse_text('relay_networks: ["10.1.2.3/8", "::ffff:192.0.2.0/120"]\n')
    assert c.relay_networks == ("10.0.0.0/8", "::ffff:c000:200/120")
    assert c.may_relay("10.200.0.1") and not c.may_relay("11.0.0.1")
    assert not c.may_relay("::ffff:192.0.2.7")  # IPv4-mapped is IPv4, as with ipaddress


@given(networks, st.one_of(v4, v6, st.text(max_size=10)))
def test_may_relay_answers_as_ipaddress_does(nets: list[str], ip: str) -> None:
    assert relaying(nets).may_relay(ip) == reference_may_relay(nets, ip)


@given(networks, st.one_of(v4, v6))
def test_may_relay_inside_a_network(nets: list[str], ip: str) -> None:
    # An address taken from inside the first network always relays.
    net = ipaddress.ip_network(nets[0], strict=False)
    inside_addr = net.network_address + (hash(ip) % net.num_addresses)
    # ipaddress's rule, kept: an IPv4-mapped address is IPv4, never in an IPv6 network.
    assume(not (isinstance(inside_addr, ipaddress.IPv6Address) and inside_addr.ipv4_mapped))
    inside = str(inside_addr)
    assert relaying(nets).may_relay(inside)
