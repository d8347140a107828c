"""Traffic rules in real network namespaces: rule text, packets crossing the NAT, resync, subnet change,
mode switch, missing/failing tools. Every tool runs through `ip netns exec`; the root namespace's rules are
captured at module start and compared at the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest
from needs import need

from pyflannel.lab.netns import RunScope, ns_exec, run, veth
from pyflannel.subnetenv import SubnetEnv
from pyflannel.traffic import TrafficManager, create_traffic_manager
from pyflannel.traffic.iptables import golden_rules, parse_save

pytestmark = pytest.mark.integration

NET = IPv4Network("10.244.0.0/16")
POD = IPv4Network("10.244.1.0/24")
NET6 = IPv6Network("fd00:10:244::/56")
POD6 = IPv6Network("fd00:10:244:1::/64")

NFT4_LISTING = """\
table ip flannel-ipv4 {
	comment "rules for flannel-ipv4"
	chain postrtg {
		comment "chain to manage traffic masquerading by flannel"
		type nat hook postrouting priority srcnat; policy accept;
		meta mark 0x00004000 return
		ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
		ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
		ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return
		ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
		ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
	}

	chain forward {
		comment "chain to accept flannel traffic"
		type filter hook forward priority filter; policy accept;
		ip saddr 10.244.0.0/16 accept
		ip daddr 10.244.0.0/16 accept
	}
}
"""

NFT6_LISTING = """\
table ip6 flannel-ipv6 {
	comment "rules for flannel-ipv6"
	chain postrtg {
		comment "chain to manage traffic masquerading by flannel"
		type nat hook postrouting priority srcnat; policy accept;
		meta mark 0x00004000 return
		ip6 saddr fd00:10:244:1::/64 ip6 daddr fd00:10:244::/56 return
		ip6 saddr fd00:10:244::/56 ip6 daddr fd00:10:244:1::/64 return
		ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244:1::/64 return
		ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade fully-random
		ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244::/56 masquerade fully-random
	}

	chain forward {
		comment "chain to accept flannel traffic"
		type filter hook forward priority filter; policy accept;
		ip6 saddr fd00:10:244::/56 accept
		ip6 daddr fd00:10:244::/56 accept
	}
}
"""


# --- the root namespace must come out exactly as it went in ------------------------------------------------


def _root_rules() -> str:
    """iptables-save, ip6tables-save and nft list ruleset of the root namespace.

    Only iptables-save's "# Generated/Completed on <date>" lines and packet counters are masked: they change
    by themselves (time, the host's own traffic); everything else must match byte for byte.
    """
    parts = []
    for cmd in (["iptables-save"], ["ip6tables-save"], ["nft", "list", "ruleset"]):
        if shutil.which(cmd[0]):
            out = run(cmd, check=False)
            out = "".join(ln for ln in out.splitlines(keepends=True) if not ln.startswith("# "))
            out = re.sub(r"\[\d+:\d+\]", "[N:N]", out)
            out = re.sub(r"packets \d+ bytes \d+", "packets N bytes N", out)
            parts.append(f"== {' '.join(cmd)}\n{out}")
    return "".join(parts)


@pytest.fixture(scope="module", autouse=True)
def _root_namespace_untouched() -> Iterator[None]:
    if os.geteuid() != 0:
        yield
        return
    before = _root_rules()
    yield
    assert _root_rules() == before, "the root namespace's iptables/nftables rules changed"


@pytest.fixture(autouse=True)
def _need_tools() -> None:
    need(tools=("iptables", "iptables-restore", "ip6tables-restore", "nft"))


# --- helpers -----------------------------------------------------------------------------------------------


def mgr(ns: str, nft: bool, **kw: object) -> TrafficManager:
    return create_traffic_manager(nft, cmd_prefix=["ip", "netns", "exec", ns], **kw)  # type: ignore[arg-type]


def ipt(ns: str, fam: int = 4) -> dict[str, list[str]]:
    return parse_save(ns_exec(ns, ["iptables-save" if fam == 4 else "ip6tables-save"]))


def flannel_lines(ns: str, table: str, fam: int = 4) -> list[str]:
    """Every flannel rule of one table in iptables-save order (jumps from built-in chains come first)."""
    lines = ipt(ns, fam).get(table, [])
    return [ln for ln in lines if ln.startswith("-A") and ("FLANNEL" in ln or "flanneld" in ln)]


def flannel_chains(ns: str, fam: int = 4) -> list[str]:
    return [ln for lines in ipt(ns, fam).values() for ln in lines if ln.startswith(":FLANNEL")]


def nft_tables(ns: str) -> set[tuple[str, str]]:
    data = json.loads(ns_exec(ns, ["nft", "-j", "list", "ruleset"]))
    return {(i["table"]["family"], i["table"]["name"]) for i in data["nftables"] if "table" in i}


def nft_listing(ns: str, fam: int = 4) -> str:
    return ns_exec(ns, ["nft", "list", "table", "ip" if fam == 4 else "ip6", f"flannel-ipv{fam}"])


def nft_state(ns: str) -> tuple[str, str]:
    """Both flannel tables as nft lists them; a missing table reads as an empty string."""
    return tuple(  # type: ignore[return-value]
        ns_exec(ns, ["nft", "list", "table", fam, f"flannel-ipv{v}"], check=False) for fam, v in (("ip", 4), ("ip6", 6))
    )


async def setup_all(m: TrafficManager, *, v6: bool = True, subnet: IPv4Network = POD, net: IPv4Network = NET,
                    prev: SubnetEnv | None = None) -> None:  # fmt: skip
    assert await m.setup_and_ensure_masq_rules(net, subnet, NET6 if v6 else None, POD6 if v6 else None, prev=prev)
    assert await m.setup_and_ensure_forward_rules(net, NET6 if v6 else None)
    assert m.ready, m.last_error


def expected_ipt(net: IPv4Network | IPv6Network = NET, pod: IPv4Network | IPv6Network = POD) -> dict[str, list[str]]:
    return golden_rules(net, pod, random_fully=True)


# --- rule text in a namespace ------------------------------------------------------------------------------


def test_iptables_rules_match_upstream(scope: RunScope) -> None:
    ns = scope.add_ns("node")
    m = mgr(ns, False)

    async def body() -> None:
        await setup_all(m)
        # a second setup (daemon restart) and a resync pass change nothing and never duplicate the jump
        await setup_all(m)
        assert await m.ensure_once()

    asyncio.run(body())
    assert flannel_lines(ns, "nat") == expected_ipt()["nat"]
    assert flannel_lines(ns, "filter") == expected_ipt()["filter"]
    assert flannel_lines(ns, "nat", 6) == expected_ipt(NET6, POD6)["nat"]
    assert flannel_lines(ns, "filter", 6) == expected_ipt(NET6, POD6)["filter"]
    # the jump into our chain is appended to POSTROUTING, like upstream
    assert ipt(ns)["nat"][-7] == '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'


def test_nftables_rules_match_upstream(scope: RunScope) -> None:
    ns = scope.add_ns("node")
    m = mgr(ns, True)

    async def body() -> None:
        await setup_all(m)
        await setup_all(m)
        assert await m.ensure_once()

    asyncio.run(body())
    assert nft_listing(ns, 4) == NFT4_LISTING
    assert nft_listing(ns, 6) == NFT6_LISTING
    # nftables mode creates nothing but its own two tables (no iptables-nft nat/filter tables)
    assert nft_tables(ns) == {("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6")}


# --- packets: masquerade to the outside, source kept inside the pod network ---------------------------------

UDP_SERVER = r"""
import socket, sys
log, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
open(log + ".ready", "w").close()
for _ in range(1000):
    data, (src, _p) = s.recvfrom(2048)
    with open(log, "a") as f:
        f.write(f"{data.decode()} {src}\n")
"""

UDP_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"""


def _start_udp_server(scope: RunScope, ns: str, name: str) -> Path:
    log = scope.tmpdir / f"{name}.udp"
    scope.spawn(ns, [sys.executable, "-c", UDP_SERVER, str(log), "5555"])
    deadline = time.monotonic() + 10
    while not Path(str(log) + ".ready").exists():
        assert time.monotonic() < deadline, f"UDP server in {ns} did not start"
        time.sleep(0.05)
    return log


def _source_seen(pod: str, dst: str, log: Path, tag: str) -> str:
    """Send one datagram from `pod` (a fresh socket, so a fresh conntrack entry) and return its source as received."""
    ns_exec(pod, [sys.executable, "-c", UDP_SEND, dst, "5555", tag])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if log.exists():
            for line in log.read_text().splitlines():
                t, _, src = line.partition(" ")
                if t == tag:
                    return src
        time.sleep(0.05)
    raise AssertionError(f"datagram {tag!r} never reached {dst}")


@pytest.mark.parametrize("nft", [False, True], ids=["iptables", "nftables"])
def test_masquerade_datapath(scope: RunScope, nft: bool) -> None:
    node, pod, ext, pod2 = (scope.add_ns(n) for n in ("node", "pod", "ext", "pod2"))
    # pod 10.244.1.2 behind the node; a host outside the pod network; a pod of "another node" (10.244.2.0/24)
    veth(node, "pod0", pod, "eth0")
    veth(node, "ext0", ext, "eth0")
    veth(node, "peer0", pod2, "eth0")
    for ns, cmds in {
        node: [
            "addr add 10.244.1.1/24 dev pod0", "link set pod0 up",
            "addr add 192.168.50.1/24 dev ext0", "link set ext0 up",
            "link set peer0 up", "route add 10.244.2.0/24 dev peer0",
        ],
        pod: ["addr add 10.244.1.2/24 dev eth0", "link set eth0 up", "route add default via 10.244.1.1"],
        ext: ["addr add 192.168.50.2/24 dev eth0", "link set eth0 up"],
        pod2: ["addr add 10.244.2.2/24 dev eth0", "link set eth0 up", "route add default dev eth0"],
    }.items():  # fmt: skip
        for c in cmds:
            ns_exec(ns, ["ip", *c.split()])
    ns_exec(node, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    ext_log = _start_udp_server(scope, ext, "ext")
    pod2_log = _start_udp_server(scope, pod2, "pod2")

    # without the rules the outside sees the pod's own address: proves the check below can fail
    assert _source_seen(pod, "192.168.50.2", ext_log, "before") == "10.244.1.2"

    m = mgr(node, nft)
    asyncio.run(setup_all(m, v6=False))
    assert _source_seen(pod, "192.168.50.2", ext_log, "after") == "192.168.50.1"
    assert _source_seen(pod, "10.244.2.2", pod2_log, "pod-to-pod") == "10.244.1.2"


# --- resync ------------------------------------------------------------------------------------------------


def test_iptables_resync_restores_deleted_rules(scope: RunScope) -> None:
    ns = scope.add_ns("node")
    m = mgr(ns, False)
    jump = ["-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG"]
    want = expected_ipt()

    def it(*args: str) -> None:
        ns_exec(ns, ["iptables", "-w", *args])

    async def body() -> None:
        await setup_all(m, v6=False)
        damage: list[list[list[str]]] = [
            [["-t", "nat", "-D", "FLANNEL-POSTRTG", "3"]],  # one rule
            [["-t", "nat", "-D", "POSTROUTING", *jump]],  # the jump
            [["-t", "nat", "-A", "POSTROUTING", *jump]],  # a duplicated jump
            [["-t", "nat", "-I", "FLANNEL-POSTRTG", "1", "-j", "RETURN"]],  # a foreign rule in our chain
            [["-t", "nat", "-D", "POSTROUTING", *jump], ["-t", "nat", "-F", "FLANNEL-POSTRTG"],
             ["-t", "nat", "-X", "FLANNEL-POSTRTG"]],  # the whole chain
            [["-t", "filter", "-F", "FLANNEL-FWD"]],  # the forward chain's rules
        ]  # fmt: skip
        for step in damage:
            for args in step:
                it(*args)
            assert flannel_lines(ns, "nat") + flannel_lines(ns, "filter") != want["nat"] + want["filter"]
            assert await m.ensure_once()
            assert flannel_lines(ns, "nat") == want["nat"], step
            assert flannel_lines(ns, "filter") == want["filter"], step

        # the periodic loop does the same on its own; cancelling it (SIGTERM) leaves the rules in place
        it("-t", "filter", "-D", "FLANNEL-FWD", "1")
        task = asyncio.create_task(m.run_resync(0.1))
        deadline = time.monotonic() + 10
        while flannel_lines(ns, "filter") != want["filter"]:
            assert time.monotonic() < deadline, "resync loop did not restore the rule"
            await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(body())
    assert flannel_lines(ns, "nat") == want["nat"]


def test_nftables_resync_restores_rule_chain_and_table(scope: RunScope) -> None:
    ns = scope.add_ns("node")
    m = mgr(ns, True)

    def nft(*args: str) -> None:
        ns_exec(ns, ["nft", *args])

    def handle_of(chain: str, index: int) -> str:
        data = json.loads(ns_exec(ns, ["nft", "-a", "-j", "list", "chain", "ip", "flannel-ipv4", chain]))
        rules = [i["rule"] for i in data["nftables"] if "rule" in i]
        return str(rules[index]["handle"])

    async def body() -> None:
        await setup_all(m)
        steps: list[Callable[[], None]] = [
            lambda: nft("delete", "rule", "ip", "flannel-ipv4", "postrtg", "handle", handle_of("postrtg", 2)),
            lambda: nft("add", "rule", "ip", "flannel-ipv4", "postrtg", "ip", "saddr", "10.244.0.0/16", "return"),
            lambda: nft("delete", "chain", "ip", "flannel-ipv4", "forward"),
            lambda: nft("delete", "table", "ip", "flannel-ipv4"),
            lambda: nft("delete", "table", "ip6", "flannel-ipv6"),
        ]
        for damage in steps:
            damage()
            assert nft_state(ns) != (NFT4_LISTING, NFT6_LISTING)
            assert await m.ensure_once()
            assert nft_listing(ns, 4) == NFT4_LISTING
            assert nft_listing(ns, 6) == NFT6_LISTING

    asyncio.run(body())


# --- subnet change and mode switch ------------------------------------------------------------------------


@pytest.mark.parametrize("nft", [False, True], ids=["iptables", "nftables"])
def test_subnet_change_replaces_old_rules(scope: RunScope, nft: bool) -> None:
    ns = scope.add_ns("node")
    new_sub, new_net = IPv4Network("10.245.7.0/24"), IPv4Network("10.245.0.0/16")
    if not nft:
        # a rule an older flannel put straight into POSTROUTING: removed along with the old subnet's rules
        ns_exec(ns, ["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.244.0.0/16", "-d", "10.244.0.0/16",
                     "-m", "comment", "--comment", "flanneld masq", "-j", "RETURN"])  # fmt: skip

    async def body() -> None:
        await setup_all(mgr(ns, nft), v6=False)
        # a restarted agent: a new manager, the previous subnet.env says 10.244.1.0/24 in 10.244.0.0/16
        prev = SubnetEnv(networks=(NET,), subnet=POD, mtu=1450, ipmasq=True)
        await setup_all(mgr(ns, nft), v6=False, subnet=new_sub, net=new_net, prev=prev)

    asyncio.run(body())
    if nft:
        listing = nft_listing(ns, 4)
        assert "10.244." not in listing
        assert listing.count("10.245.7.0/24") == 3 and listing.count("return") == 4
    else:
        want = golden_rules(new_net, new_sub)
        assert flannel_lines(ns, "nat") == want["nat"]
        assert flannel_lines(ns, "filter") == want["filter"]


def test_switch_modes_cleans_up_the_other(scope: RunScope) -> None:
    ns = scope.add_ns("node")

    async def body() -> None:
        await setup_all(mgr(ns, False))
        assert flannel_chains(ns, 4) and flannel_chains(ns, 6)
        m = mgr(ns, True)
        assert await m.cleanup_other_mode()
        await setup_all(m)
        assert not flannel_chains(ns, 4) and not flannel_chains(ns, 6)
        assert not flannel_lines(ns, "nat") and not flannel_lines(ns, "filter")
        assert not flannel_lines(ns, "nat", 6) and not flannel_lines(ns, "filter", 6)
        assert {("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6")} <= nft_tables(ns)
        # and back again
        m2 = mgr(ns, False)
        assert await m2.cleanup_other_mode()
        await setup_all(m2)
        assert not {t for t in nft_tables(ns) if t[1].startswith("flannel")}
        assert flannel_lines(ns, "nat") == expected_ipt()["nat"]

    asyncio.run(body())


# --- missing or failing tools --------------------------------------------------------------------------------


@pytest.mark.parametrize("nft", [False, True], ids=["iptables", "nftables"])
def test_missing_tool_is_not_ready_then_recovers(scope: RunScope, nft: bool, caplog: pytest.LogCaptureFixture) -> None:
    ns = scope.add_ns("node")
    bindir = scope.tmpdir / "bin"
    bindir.mkdir()
    m = mgr(ns, nft, search_path=str(bindir))
    caplog.set_level(logging.INFO, logger="pyflannel.traffic")

    async def body() -> None:
        assert not await m.setup_and_ensure_masq_rules(NET, POD)
        assert not m.ready
        assert m.last_error is not None and "not found" in m.last_error
        assert not await m.ensure_once()  # the resync keeps failing quietly, it never raises
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("not found" in e and ("iptables" in e or "nft" in e) for e in errors), errors
        # the tools appear (package installed): the next resync installs everything and the manager is ready
        for tool in ("nft",) if nft else ("iptables", "iptables-save", "iptables-restore"):
            (bindir / tool).symlink_to(shutil.which(tool) or tool)
        assert await m.ensure_once()
        assert m.ready and m.last_error is None

    asyncio.run(body())
    if nft:
        assert "masquerade" in nft_listing(ns, 4)
    else:
        assert flannel_lines(ns, "nat") == expected_ipt()["nat"]


def _failing_wrapper(path: Path, real: str, bad_line: str) -> None:
    """A tool that feeds the real one our transaction plus one invalid line, so the kernel-side commit fails."""
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--noflush" ] || [ "$1" = "-f" ]; then\n'
        f"  {{ sed '/^COMMIT$/d'; echo '{bad_line}'; echo COMMIT; }} | {real} \"$@\"; exit $?\n"
        "fi\n"
        f'exec {real} "$@"\n'
    )
    path.chmod(0o755)


def test_failing_iptables_restore_leaves_old_rules_whole(scope: RunScope) -> None:
    ns = scope.add_ns("node")
    bindir = scope.tmpdir / "bin"
    bindir.mkdir()
    for tool in ("iptables", "iptables-save"):
        (bindir / tool).symlink_to(shutil.which(tool) or tool)
    _failing_wrapper(
        bindir / "iptables-restore", shutil.which("iptables-restore") or "", "-A FLANNEL-POSTRTG -j NO-SUCH-TARGET"
    )

    async def body() -> None:
        good = mgr(ns, False)
        await setup_all(good, v6=False)
        bad = mgr(ns, False, search_path=str(bindir))
        prev = SubnetEnv(networks=(NET,), subnet=POD)
        ok = await bad.setup_and_ensure_masq_rules(NET, IPv4Network("10.244.9.0/24"), prev=prev)
        assert not ok and not bad.ready
        assert bad.last_error is not None and "iptables-restore" in bad.last_error
        # a fresh namespace with the failing tool gets nothing at all, not half a rule set
        ns2 = scope.add_ns("fresh")
        bad2 = mgr(ns2, False, search_path=str(bindir))
        assert not await bad2.setup_and_ensure_masq_rules(NET, POD)
        assert not flannel_chains(ns2) and not flannel_lines(ns2, "nat")

    asyncio.run(body())
    assert flannel_lines(ns, "nat") == expected_ipt()["nat"]  # the old rules, complete


def test_failing_nft_leaves_old_table_whole(scope: RunScope) -> None:
    ns = scope.add_ns("node")
    bindir = scope.tmpdir / "bin"
    bindir.mkdir()
    real = shutil.which("nft") or "nft"
    (bindir / "nft").write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-f" ]; then\n'
        f"  {{ cat; echo 'add rule ip flannel-ipv4 nosuchchain return'; }} | {real} \"$@\"; exit $?\n"
        "fi\n"
        f'exec {real} "$@"\n'
    )
    (bindir / "nft").chmod(0o755)

    async def body() -> None:
        await setup_all(mgr(ns, True))
        bad = mgr(ns, True, search_path=str(bindir))
        assert not await bad.setup_and_ensure_masq_rules(NET, IPv4Network("10.244.9.0/24"))
        assert not bad.ready and bad.last_error is not None and "nft" in bad.last_error
        ns2 = scope.add_ns("fresh")
        assert not await mgr(ns2, True, search_path=str(bindir)).setup_and_ensure_forward_rules(NET)
        assert not nft_tables(ns2)

    asyncio.run(body())
    assert nft_listing(ns, 4) == NFT4_LISTING
