from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv6Interface

import pytest

from pyflannel.iface import IfaceError, IfaceRequest, LinkAddrs, external_interface

LINKS = [
    LinkAddrs("lo", 1, 65536, (IPv4Interface("127.0.0.1/8"),)),
    LinkAddrs("eth0", 2, 1500, (IPv4Interface("192.168.1.10/24"), IPv6Interface("fe80::1/64"))),
    LinkAddrs("eth1", 3, 9000, (IPv4Interface("10.0.0.5/24"), IPv6Interface("fd00::5/64"))),
]


def test_default_route_interface() -> None:
    ext = external_interface(IfaceRequest(), LINKS, default_index=2)
    assert (ext.name, ext.mtu, ext.public_ip) == ("eth0", 1500, IPv4Address("192.168.1.10"))


def test_iface_by_name_and_ip_first_match_wins() -> None:
    assert external_interface(IfaceRequest(ifaces=("nope", "eth1")), LINKS, 2).name == "eth1"
    ext = external_interface(IfaceRequest(ifaces=("10.0.0.5",)), LINKS, 2)
    assert ext.name == "eth1" and ext.iface_addr == IPv4Address("10.0.0.5")


def test_iface_regex_matches_addresses_then_names() -> None:
    assert external_interface(IfaceRequest(iface_regexes=(r"^10\.0\.",)), LINKS, 2).name == "eth1"
    assert external_interface(IfaceRequest(iface_regexes=(r"eth1",)), LINKS, 2).name == "eth1"


def test_can_reach_and_public_ip_override() -> None:
    ext = external_interface(IfaceRequest(can_reach="10.0.0.99", public_ip="1.2.3.4"), LINKS, 2, reach_index=3)
    assert ext.name == "eth1"
    assert ext.iface_addr == IPv4Address("10.0.0.5")
    assert ext.public_ip == IPv4Address("1.2.3.4")


def test_ipv6_needs_a_global_address() -> None:
    with pytest.raises(IfaceError):
        external_interface(IfaceRequest(need_ipv6=True, ifaces=("eth0",)), LINKS, 2)
    ext = external_interface(IfaceRequest(need_ipv6=True), LINKS, 3)
    assert str(ext.public_ipv6) == "fd00::5"


@pytest.mark.parametrize(
    "req,default",
    [(IfaceRequest(ifaces=("eth9",)), 2), (IfaceRequest(iface_regexes=("(",)), 2), (IfaceRequest(), None),
     (IfaceRequest(public_ip="nope"), 2)],
)  # fmt: skip
def test_clear_errors(req: IfaceRequest, default: int | None) -> None:
    with pytest.raises(IfaceError):
        external_interface(req, LINKS, default)


def test_addresses_with_a_zone_are_refused_as_go_refuses_them() -> None:
    with pytest.raises(IfaceError, match="zone"):
        external_interface(IfaceRequest(need_ipv6=True, public_ipv6="fd00::7%eth1"), LINKS, 3)
    with pytest.raises(IfaceError):
        # A zone never names an address of a link, so --iface with one selects nothing.
        external_interface(IfaceRequest(ifaces=("fd00::5%eth1",)), LINKS, 2)


def test_missing_family_errors_say_what_the_config_needs() -> None:
    v4only = [LinkAddrs("eth0", 2, 1500, (IPv4Interface("192.168.1.10/24"), IPv6Interface("fe80::1/64")))]
    with pytest.raises(IfaceError, match=r"interface eth0 \(of the IPv4 default route\) has no global IPv6 address, "
                       "which EnableIPv6 needs"):  # fmt: skip
        external_interface(IfaceRequest(need_ipv6=True), v4only, 2)
    with pytest.raises(IfaceError, match="no IPv6 default route"):
        external_interface(IfaceRequest(need_ipv4=False, need_ipv6=True), v4only, None)
    with pytest.raises(IfaceError, match="EnableIPv6 needs one"):
        external_interface(IfaceRequest(need_ipv6=True, can_reach="10.0.0.1"), v4only, 2, reach_index=2)


def test_ipv6_only_selection_by_v6_address_and_can_reach() -> None:
    v6 = [
        LinkAddrs("eth0", 2, 1500, (IPv6Interface("fd77:77::11/64"),)),
        LinkAddrs("eth1", 3, 1400, (IPv6Interface("fd99::11/64"), IPv4Interface("10.99.0.11/24"))),
    ]
    req = IfaceRequest(need_ipv4=False, need_ipv6=True)
    ext = external_interface(req, v6, 2)
    assert (ext.name, ext.public_ip, str(ext.public_ipv6)) == ("eth0", None, "fd77:77::11")
    ext = external_interface(IfaceRequest(ifaces=("fd99::11",), need_ipv4=False, need_ipv6=True), v6, 2)
    assert (ext.name, str(ext.iface_addr6)) == ("eth1", "fd99::11")
    ext = external_interface(IfaceRequest(can_reach="fd99::1", need_ipv4=False, need_ipv6=True), v6, 2, reach_index=3)
    assert (ext.name, ext.mtu, str(ext.public_ipv6)) == ("eth1", 1400, "fd99::11")
    dual = IfaceRequest(ifaces=("fd99::11",), need_ipv6=True, public_ipv6="2001:db8::9")
    ext = external_interface(dual, v6, 2)
    assert (str(ext.public_ip), str(ext.iface_addr6), str(ext.public_ipv6)) == ("10.99.0.11", "fd99::11", "2001:db8::9")
