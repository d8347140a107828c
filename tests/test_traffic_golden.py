"""Rule text of both modes against upstream flannel's (pkg/trafficmngr) for a sample network. No root needed."""

from __future__ import annotations

from ipaddress import ip_network

from pyflannel.traffic.iptables import golden_rules, parse_save
from pyflannel.traffic.nftables import masq_rule_text, parse_table_json, render_script

NET = ip_network("10.244.0.0/16")
POD = ip_network("10.244.1.0/24")
NET6 = ip_network("fd00:10:244::/56")
POD6 = ip_network("fd00:10:244:1::/64")

# upstream's rules as iptables-save prints them (wire-formats.md "ip-masq")
IPT4_NAT = """\
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
""".splitlines()

IPT4_FILTER = """\
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
""".splitlines()

IPT6_NAT = """\
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s fd00:10:244:1::/64 -d fd00:10:244::/56 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s fd00:10:244::/56 -d fd00:10:244:1::/64 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s fd00:10:244::/56 -d fd00:10:244:1::/64 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s fd00:10:244::/56 ! -d ff00::/8 -m comment --comment "flanneld masq" -j MASQUERADE
-A FLANNEL-POSTRTG ! -s fd00:10:244::/56 -d fd00:10:244::/56 -m comment --comment "flanneld masq" -j MASQUERADE
""".splitlines()

# upstream's knftables rules (nftables.go addMasqRules / SetupAndEnsureForwardRules), verbatim
NFT4_SCRIPT = """\
add table ip flannel-ipv4
delete table ip flannel-ipv4
add table ip flannel-ipv4 { comment "rules for flannel-ipv4" ; }
add chain ip flannel-ipv4 postrtg { type nat hook postrouting priority srcnat ; \
comment "chain to manage traffic masquerading by flannel" ; }
add rule ip flannel-ipv4 postrtg meta mark 0x4000 return
add rule ip flannel-ipv4 postrtg ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
add rule ip flannel-ipv4 postrtg ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
add rule ip flannel-ipv4 postrtg ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return
add rule ip flannel-ipv4 postrtg ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
add rule ip flannel-ipv4 postrtg ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
add chain ip flannel-ipv4 forward { type filter hook forward priority filter ; \
comment "chain to accept flannel traffic" ; }
add rule ip flannel-ipv4 forward ip saddr 10.244.0.0/16 accept
add rule ip flannel-ipv4 forward ip daddr 10.244.0.0/16 accept
"""

NFT6_MASQ = [
    "meta mark 0x4000 return",
    "ip6 saddr fd00:10:244:1::/64 ip6 daddr fd00:10:244::/56 return",
    "ip6 saddr fd00:10:244::/56 ip6 daddr fd00:10:244:1::/64 return",
    "ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244:1::/64 return",
    "ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade",
    "ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244::/56 masquerade",
]


def test_iptables_ipv4_golden() -> None:
    g = golden_rules(NET, POD)
    assert g["nat"] == IPT4_NAT
    assert g["filter"] == IPT4_FILTER


def test_iptables_ipv6_golden_without_random_fully() -> None:
    g = golden_rules(NET6, POD6, random_fully=False, forward=False)
    assert g == {"nat": IPT6_NAT}


def test_iptables_no_random_fully_drops_only_the_flag() -> None:
    with_rf = golden_rules(NET, POD)["nat"]
    without = golden_rules(NET, POD, random_fully=False)["nat"]
    assert [ln.replace(" --random-fully", "") for ln in with_rf] == without


def test_nftables_ipv4_script_golden() -> None:
    assert render_script(4, (NET, POD, True), NET) == NFT4_SCRIPT


def test_nftables_ipv6_golden() -> None:
    assert masq_rule_text(NET6, POD6, False) == NFT6_MASQ
    script = render_script(6, (NET6, POD6, False), NET6)
    assert 'add table ip6 flannel-ipv6 { comment "rules for flannel-ipv6" ; }' in script
    assert "add rule ip6 flannel-ipv6 forward ip6 saddr fd00:10:244::/56 accept" in script


def test_parse_save_ignores_comments_and_splits_tables() -> None:
    text = "# Generated\n*nat\n:FLANNEL-POSTRTG - [0:0]\n-A X -j Y\nCOMMIT\n# Completed\n*filter\nCOMMIT\n"
    assert parse_save(text) == {"nat": [":FLANNEL-POSTRTG - [0:0]", "-A X -j Y"], "filter": []}


def test_parse_table_json_drops_handles() -> None:
    a = '{"nftables":[{"chain":{"name":"c","handle":1,"type":"nat","hook":"postrouting","prio":100,"policy":"accept"}},'
    b = '{"rule":{"chain":"c","handle":%d,"expr":[{"return":null}]}}]}'
    assert parse_table_json(a + b % 5) == parse_table_json(a + b % 9)
