"""flannel-lab: a multi-node flannel cluster in network namespaces on one machine, and tools to look inside it.

flannel-lab up [--nodes N] [--backend vxlan|host-gw|ipip|udp|wireguard|ipsec|alloc|extension] [--pods-per-node K]
               [--[no-]ip-masq] [--network CIDR] [--store etcd|kube] [--ip-family ipv4|dual|ipv6] [--ipv6-network CIDR]
               [--ipsec-udp-encap]
flannel-lab status [--json] | check | show NODE [--services] | exec POD|NODE -- CMD...
flannel-lab status NODE --agent [--json] | metrics NODE        (the agent's /status and /metrics)
flannel-lab trace SRC_POD DST_POD|SERVICE:PORT [-6] [--capture underlay|cni0|flannel.1|pod ...]
flannel-lab get nodes [-o wide|yaml|json] | get node NAME [-o yaml|json]        (--store kube)
flannel-lab service add NAME --port P --to POD[:PORT][,POD...] [--nodeport N] [--mode iptables|ipvs]
flannel-lab service list | service del NAME
flannel-lab add-node | remove-node NAME | restart-agent NAME | diagram [-o FILE.svg|png] | down
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import agentstatus, capture, diagram, kubemode, netns, services, show
from .lab import Lab, down, up
from .state import DEFAULT_PREFIX, DEFAULT_STATE_DIR, LabError, LabOptions, load_state


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flannel-lab",
        description="A flannel cluster in network namespaces: real etcd, real flanneld agents, pods via real CNI.",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("FLANNEL_LAB_STATE_DIR", str(DEFAULT_STATE_DIR))),
        help=f"run directory: state.json, agent logs, CNI data (default {DEFAULT_STATE_DIR})",
    )
    p.add_argument(
        "--prefix",
        default=os.environ.get("FLANNEL_LAB_PREFIX", DEFAULT_PREFIX),
        help=f"namespace name prefix (default {DEFAULT_PREFIX})",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    u = sub.add_parser("up", help="bring up a cluster; returns when it is ready")
    u.add_argument("--nodes", type=int, default=3)
    u.add_argument(
        "--backend",
        default="vxlan",
        help="vxlan, host-gw, ipip, udp, wireguard (kernel, else wireguard-go), ipsec (strongSwan, needs the "
        "kernel's esp4; a generated PSK), alloc or extension (an example that makes host-gw routes with ip route); "
        "default vxlan",
    )
    u.add_argument("--pods-per-node", type=int, default=2)
    # On by default as kube-flannel runs it: flanneld masquerades only what leaves the pod network, so pods see
    # each other's real addresses (with it off, the bridge plugin SNATs everything leaving the node's subnet).
    u.add_argument(
        "--ip-masq",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run flanneld with --ip-masq, as kube-flannel does (default on; --no-ip-masq for the bridge's SNAT)",
    )
    u.add_argument("--nftables", action="store_true", help="EnableNFTables in net-conf.json")
    u.add_argument("--network", default="10.244.0.0/16")
    # Checked by the lab (one line naming the choices), not by argparse's choices (a usage block first).
    u.add_argument(
        "--ip-family",
        default="ipv4",
        help="the pod network's IP versions: ipv4 (default), dual (EnableIPv6 with --ipv6-network too) or ipv6 "
        "(EnableIPv4 false); the underlay gets fd77:77::/64 beside its IPv4",
    )
    u.add_argument("--ipv6-network", default=LabOptions.ipv6_network, help="IPv6Network (default %(default)s)")
    u.add_argument("--ipsec-udp-encap", action="store_true", help="--backend ipsec with UDPEncap: ESP in UDP 4500")
    u.add_argument(
        "--store",
        default="etcd",
        choices=("etcd", "kube"),
        help="etcd (default), or kube: a Kubernetes API server with Node objects, flanneld --kube-subnet-mgr",
    )
    u.add_argument("--force", action="store_true", help="replace a lab that is up")

    sub.add_parser("down", help="remove everything the lab made (also after a crash)")
    s = sub.add_parser(
        "status", help="nodes and pods; with NODE --agent, what that agent believes and the kernel holds"
    )
    s.add_argument("--json", action="store_true")
    s.add_argument("node", nargs="?")
    s.add_argument("--agent", action="store_true", help="the node agent's /status: each peer's kernel entries")
    sub.add_parser("metrics", help="a node agent's Prometheus metrics (/metrics)").add_argument("node")
    c = sub.add_parser("check", help="every pod pings every other pod")
    c.add_argument("--json", action="store_true")
    e = sub.add_parser("exec", help="run a command inside a pod or node: exec NAME -- CMD...")
    e.add_argument("target", help="pod or node name (or 'underlay', 'etcd')")
    e.add_argument("command", nargs=argparse.REMAINDER)
    sh = sub.add_parser("show", help="a node's subnet.env, routes, flannel.1, ARP, FDB, cni0, rules, lease")
    sh.add_argument("node")
    sh.add_argument("--services", action="store_true", help="kube-proxy's chains (and IPVS) for the Services")
    t = sub.add_parser("trace", help="the path of a packet from one pod to another, then proof on the wire")
    t.add_argument("src")
    t.add_argument("dst", help="a pod, or SERVICE:PORT (the DNAT and which backend answered)")
    t.add_argument("--no-capture", action="store_true")
    t.add_argument("-6", dest="ipv6", action="store_true", help="trace the pods' IPv6 addresses (dual-stack lab)")
    t.add_argument(
        "--capture",
        action="append",
        choices=capture.POINTS,
        default=[],
        help="capture the probe there too (repeatable): the underlay port, the source node's cni0 or flannel.1, "
        "the destination pod; default: underlay",
    )
    a = sub.add_parser("add-node", help="a new node with its agent and pods")
    a.add_argument("--pods", type=int, default=None, help="pods on it (default: --pods-per-node of up)")
    r = sub.add_parser("remove-node", help="delete a node's pods, stop its agent, drop its lease")
    r.add_argument("name")
    ra = sub.add_parser("restart-agent", help="stop and start a node's flanneld")
    ra.add_argument("name")
    sv = sub.add_parser("service", help="Services: ClusterIP and NodePort, programmed as kube-proxy does")
    svs = sv.add_subparsers(dest="service_cmd", required=True, metavar="add|list|del")
    sa = svs.add_parser("add", help="a Service in front of pods (each runs a small HTTP server naming itself)")
    sa.add_argument("name")
    sa.add_argument("--port", type=int, required=True, help="the Service's port on its ClusterIP")
    sa.add_argument("--to", required=True, metavar="POD[:PORT][,POD...]", help="the backends (PORT: default --port)")
    sa.add_argument("--nodeport", type=int, help="also a NodePort (30000-32767) on every node's underlay IP")
    sa.add_argument("--mode", default="iptables", choices=("iptables", "ipvs"), help="kube-proxy's proxy mode")
    svs.add_parser("list", help="the Services, their ClusterIPs, NodePorts and endpoints")
    sd = svs.add_parser("del", help="remove a Service and its rules on every node")
    sd.add_argument("name")
    g = sub.add_parser("get", help="kubectl get nodes / get node NAME (kube mode): the Node objects")
    g.add_argument("kind", help="nodes (or node, no)")
    g.add_argument("name", nargs="?")
    g.add_argument("-o", "--output", choices=("wide", "yaml", "json"))
    d = sub.add_parser("diagram", help="the topology as text, or as SVG/PNG with -o")
    d.add_argument("-o", "--output", type=Path)
    return p


def _print_status(st: dict[str, object]) -> None:
    nodes = st["nodes"]
    pods = st["pods"]
    assert isinstance(nodes, list) and isinstance(pods, list)
    kube, etcd = st.get("kube"), st.get("etcd")
    if isinstance(kube, dict):
        store = f"kube (flanneld --kube-subnet-mgr; API server {kube['server']} in {kube['netns']})"
    else:
        assert isinstance(etcd, dict)
        store = f"etcd ({etcd['endpoint']} in {etcd['netns']}, prefix {etcd['prefix']})"
    print(f"store {store}")
    nets = ", ".join(str(x) for x in (st["network"], st.get("ipv6_network")) if x)
    print(f"backend {st['backend']}, network {nets} ({st.get('ip_family', 'ipv4')}), state {st['state_dir']}")
    print(f"{'NODE':8} {'NETNS':14} {'UNDERLAY IP':15} {'SUBNET':16} {'AGENT PID':10} READY")
    for n in nodes:
        subnet = n["subnet"] or n.get("subnet6") or "-"
        print(f"{n['name']:8} {n['netns']:14} {n['ip']:15} {subnet:16} {n['pid'] or '-'!s:10} {n['ready']}")
        if n["subnet"] and n.get("subnet6"):  # dual-stack: the IPv6 address and subnet on a line of their own
            print(f"{'':8} {'':14} {n.get('ip6') or '-':15} {n['subnet6']}")
    print()
    print(f"{'POD':10} {'NODE':8} {'NETNS':16} IP")
    for p in pods:
        extra = f"  {p['ip6']}" if p.get("ip6") and p["ip6"] != p["ip"] else ""
        print(f"{p['name']:10} {p['node']:8} {p['netns']:16} {p['ip']}{extra}")


def _check(lab: Lab, as_json: bool) -> int:
    """The ping matrix over each IP version of the pod network (a dual-stack lab: one for IPv4, one for IPv6)."""
    families = lab.st.options.families
    names = [p.name for p in lab.st.pods]
    failed: list[str] = []
    pairs = 0
    report: dict[str, dict[str, object]] = {}
    for fam in families:
        res = lab.ping_matrix(fam)
        bad = [f"{a}->{b}" for (a, b), ok in res.items() if not ok]
        # A one-family lab names pairs as before; a dual-stack one says which family failed.
        failed += [f"{x} (IPv{fam})" for x in bad] if len(families) > 1 else bad
        pairs += len(res)
        report[f"ipv{fam}"] = {"ok": not bad, "failed": bad, "pairs": len(res)}
        if as_json:
            continue
        w = max([len(n) for n in names] + [6])
        title = f"   (row pings column over IPv{fam})" if len(families) > 1 or fam == 6 else "   (row pings column)"
        print(" " * (w + 1) + " ".join(f"{n:>{w}}" for n in names) + title)
        for a in names:
            cells = ["-" if a == b else ("ok" if res[(a, b)] else "FAIL") for b in names]
            print(f"{a:>{w}} " + " ".join(f"{c:>{w}}" for c in cells))
        fam_note = f" over IPv{fam}" if len(families) > 1 or fam == 6 else ""
        print(f"{len(res) - len(bad)}/{len(res)} pairs ok{fam_note}" + (f"; failed: {', '.join(bad)}" if bad else ""))
    if as_json:
        doc: dict[str, object] = {"ok": not failed, "failed": failed, "pairs": pairs}
        if len(families) > 1 or families != (4,):
            doc["families"] = report
        print(json.dumps(doc))
    return 0 if not failed else 1


def _target_ns(lab: Lab, target: str) -> str:
    if target in ("underlay", "ul"):
        return lab.st.ul_ns
    if target == "etcd" and lab.st.etcd_ns:
        return lab.st.etcd_ns
    if target in ("kapi", "apiserver") and lab.st.kube_ns:
        return lab.st.kube_ns
    for p in lab.st.pods:
        if p.name == target:
            return p.netns
    for n in lab.st.nodes:
        if n.name == target:
            return n.netns
    names = [n.name for n in lab.st.nodes] + [p.name for p in lab.st.pods]
    names += ["underlay", "kapi" if lab.st.kube_ns else "etcd"]
    raise LabError(f"no pod or node {target!r}; known: {', '.join(names)}")


def _service(lab: Lab, args: argparse.Namespace) -> int:
    if args.service_cmd == "add":
        svc = services.add(lab, args.name, args.port, args.to, args.nodeport, args.mode)
        where = f" and NodePort {svc.node_port} on every node" if svc.node_port is not None else ""
        print(f"service/{svc.name} created: ClusterIP {svc.cluster_ip}:{svc.port}{where}, {svc.mode} mode")
        print(f"  endpoints {', '.join(f'{e} ({b})' for e, b in zip(svc.endpoints, svc.backends, strict=True))}")
        pod, node = lab.st.pods[0].name, lab.st.nodes[0].name
        url = f"http://{svc.cluster_ip}:{svc.port}/"
        print(f"next: exec {pod} -- curl -s {url} | trace {pod} {svc.name}:{svc.port} | show {node} --services")
    elif args.service_cmd == "list":
        print(services.listing(lab.st), end="")
    else:
        services.delete(lab, args.name)
        print(f'service "{args.name}" deleted')
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    state_dir: Path = args.state_dir
    prefix: str = args.prefix
    say = lambda s: print(s, flush=True)  # noqa: E731
    if args.cmd == "up":
        opts = LabOptions(
            nodes=args.nodes,
            backend=args.backend,
            pods_per_node=args.pods_per_node,
            ip_masq=args.ip_masq,
            network=args.network,
            nftables=args.nftables,
            store=args.store,
            ip_family=args.ip_family,
            ipv6_network=args.ipv6_network,
            ipsec_udp_encap=args.ipsec_udp_encap,
        )
        lab = up(state_dir, prefix, opts, force=args.force, say=say)
        print()
        _print_status(lab.status())
        print("\nnext: flannel-lab check | show n1 | trace n1-p1 n2-p1 | exec n1-p1 -- ping -c1 <ip> | down")
        return 0
    if args.cmd == "down":
        st = load_state(state_dir)
        removed = down(state_dir, st.prefix if st is not None else prefix)
        print(f"removed {len(removed)} namespaces and {state_dir}" if removed else "nothing to remove")
        return 0
    lab = Lab.open(state_dir, say)
    if args.cmd == "status" and (args.agent or args.node):
        if not (args.agent and args.node):
            raise LabError("status NODE --agent: both a node and --agent")
        print(agentstatus.node_status(lab.st, args.node, args.json))
        return 0
    if args.cmd == "metrics":
        print(agentstatus.node_metrics(lab.st, args.node), end="")
        return 0
    if args.cmd == "status":
        status = lab.status()
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            _print_status(status)
        return 0
    if args.cmd == "check":
        return _check(lab, args.json)
    if args.cmd == "exec":
        cmd = list(args.command)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        if not cmd:
            raise LabError("exec needs a command: flannel-lab exec NAME -- CMD...")
        target_ns = _target_ns(lab, args.target)
        node = next((n for n in lab.st.nodes if n.netns == target_ns), None)
        # A node's commands see its own /var/lib/cni, as its agent and CNI plugins do.
        runner = netns.node_exec(target_ns, Path(node.dir)) if node else ["ip", "netns", "exec", target_ns]
        argv_ = [*runner, *cmd]
        sys.stdout.flush()
        # exec, not a child: signals (Ctrl-C, kill) reach the command itself, and its exit code is ours.
        os.execvp(argv_[0], argv_)
    if args.cmd == "show":
        print(show.show_services(lab, args.node) if args.services else show.show_node(lab, args.node))
        return 0
    if args.cmd == "service":
        return _service(lab, args)
    if args.cmd == "trace" and services.resolve(lab.st, args.dst) is not None:
        print(show.trace_service(lab, args.src, args.dst), flush=True)
        return 0
    if args.cmd == "trace":
        out = show.trace(
            lab, args.src, args.dst, do_capture=not args.no_capture, captures=args.capture, family=6 if args.ipv6 else 0
        )
        print(out, flush=True)
        return 0
    if args.cmd == "add-node":
        pods = args.pods if args.pods is not None else lab.st.options.pods_per_node
        n = lab.add_node(pods)
        services.resync(lab)  # kube-proxy on the new node too
        print(f"added node {n.name} ({n.netns}, {n.ip}), subnet {lab.subnet_of(n)}")
        return 0
    if args.cmd == "remove-node":
        lab.remove_node(args.name)
        services.resync(lab)  # its pods are no endpoints any more
        print(f"removed node {args.name}")
        return 0
    if args.cmd == "restart-agent":
        pid = lab.restart_agent(args.name)
        print(f"flanneld on {args.name} restarted, pid {pid}")
        return 0
    if args.cmd == "get":
        print(kubemode.get(lab.st, args.kind, args.name, args.output), end="")
        return 0
    if args.cmd == "diagram":
        status = lab.status()
        if args.output is None:
            print(diagram.text(status), end="")
            return 0
        try:
            print(diagram.write(status, args.output))
        except RuntimeError as e:
            raise LabError(str(e)) from None
        return 0
    raise AssertionError(args.cmd)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except LabError as e:
        print(f"flannel-lab: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
