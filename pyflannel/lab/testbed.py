"""A multi-node flannel cluster in network namespaces: the test bed of the integration tests and the lab.

    underlay ns: bridge br0 (192.168.77.1/24)
      |-- etcd ns   eth0 192.168.77.2     (real etcd; start_etcd(members=3) adds etcd2 .3 and etcd3 .4)
      |-- node ns   eth0 192.168.77.1x    (real flanneld; cni0 bridge for its pods)
              |-- pod ns  eth0 <subnet>.x (veth into cni0)

Every name carries the RunScope's prefix and everything is removed by RunScope.close().

IP families of the underlay (`Testbed(..., ip_family=)`):

- "ipv4" (default): the layout above, nothing of IPv6 configured.
- "dual": as "ipv4", and br0 also gets the ULA `fd77:77::1/64`; every member of the underlay gets
  `fd77:77::<its last IPv4 number>` (node 192.168.77.11 is fd77:77::11, etcd .2 is fd77:77::2), etcd listens
  on both, agents reach it over IPv4 (the endpoints stay the IPv4 URLs).
- "ipv6": an IPv6-only underlay. Nodes and etcd members get only their `fd77:77::<n>` address (no IPv4 on their
  eth0), etcd listens on `http://[fd77:77::2]:2379` and agents reach it there. This is what an IPv6-only
  cluster (net-conf `EnableIPv4: false`) has in practice: the machines have no IPv4 route to each other at
  all, so the agent has to pick its interface, reach its store and build its data path without any IPv4 (an
  underlay that kept IPv4 for etcd would hide an agent that quietly depends on it). `Node.ip` is then the
  node's IPv6 address (the address it is reached at), as is `Node.ip6`. br0 keeps its IPv4 gateway, so
  add_host() with an IPv4 address still works (a host outside the cluster may speak both).

Every IPv6 address is added `nodad` (no duplicate address detection delay: the addresses are unique by
construction) and every node namespace has `net.ipv6.conf.all.forwarding=1` (as ip_forward for IPv4), set
inside the namespace only. Additional segments (add_segment) are IPv4 only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cni.driver import Driver, RuntimeConf, kube_flannel_conflist
from ..cni.launcher import install as install_launcher
from ..subnetenv import SubnetEnv, read_subnet_env
from .netns import (
    VAR_LIB_CNI,
    NetnsError,
    RunScope,
    etcdctl,
    kill_ns_processes,
    node_exec,
    ns_exec,
    run,
    spawn_etcd,
    url_host,
    veth,
    wait_etcd,
)

DEFAULT_UNDERLAY = "192.168.77.0/24"
DEFAULT_UNDERLAY6 = "fd77:77::/64"
IP_FAMILIES = ("ipv4", "dual", "ipv6")
REF_PLUGINS = Path("/usr/lib/cni")  # Debian's containernetworking-plugins


def cni_runtime(
    bin_root: Path, node_dir: Path, node_ns: str, *, tutorial_paths: bool = False
) -> tuple[Driver, dict[str, Any]]:
    """A node's CNI runtime: kube-flannel's conflist with every data dir under `node_dir` (never /var/lib/cni),
    the `flannel` client in `bin_root`/cni-bin, and the plugins exec'd inside the node namespace, where the
    bridge and portmap plugins make their links and rules. The client asks the node's agent (its CNI socket is
    beside its subnet.env, so `node_dir`/cni.sock) and runs the standalone plugin while none serves.

    With `tutorial_paths` the data dirs are libcni's and the plugins' defaults under /var/lib/cni, which the
    plugins see in the node's own mount namespace (netns.node_exec: `node_dir`/var-lib-cni mounted there);
    the node's agent must run under the same prefix."""
    bin_dir = bin_root / "cni-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    if not (bin_dir / "flannel").exists():
        install_launcher(bin_dir / "flannel")
    env = {**os.environ, "FLANNEL_CNI_SOCKET": str(node_dir / "cni.sock")}
    if tutorial_paths:
        conflist = kube_flannel_conflist(subnet_file=str(node_dir / "subnet.env"))
        prefix = node_exec(node_ns, node_dir)
        return Driver([bin_dir, REF_PLUGINS], node_dir / VAR_LIB_CNI, exec_prefix=prefix, env=env), conflist
    conflist = kube_flannel_conflist(
        subnet_file=str(node_dir / "subnet.env"),
        data_dir=str(node_dir / "cni" / "flannel"),
        ipam_data_dir=str(node_dir / "cni" / "ipam"),
    )
    driver = Driver(
        [bin_dir, REF_PLUGINS],
        node_dir / "cni" / "cache",
        exec_prefix=["ip", "netns", "exec", node_ns],
        env=env,
    )
    return driver, conflist


@dataclass
class EtcdMember:
    name: str
    ns: str
    ip: str
    proc: subprocess.Popen[bytes] | None = None
    # Set while the test has it stopped or cut off: etcdctl then goes through another member.
    down: bool = False

    # Its IPv6 address on a "dual" or "ipv6" underlay; on "ipv6" `ip` is the same address.
    ip6: str | None = None

    @property
    def url(self) -> str:
        return f"http://{url_host(self.ip)}:2379"


@dataclass
class Pod:
    name: str
    ns: str
    node: str
    # The pod's IPv4 address; an IPv6-only pod's IPv6 one (then also `ip6`).
    ip: str
    ip6: str | None = None


@dataclass
class Node:
    name: str
    ns: str
    ip: str
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    pods: list[Pod] = field(default_factory=list)
    extra_args: tuple[str, ...] = ()
    # The node's IPv6 underlay address ("dual" and "ipv6" test beds); on "ipv6" `ip` is the same address.
    ip6: str | None = None

    @property
    def subnet_file(self) -> Path:
        return self.dir / "subnet.env"

    @property
    def log_file(self) -> Path:
        return self.dir / "flanneld.log"


class Testbed:
    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        scope: RunScope,
        underlay: str = DEFAULT_UNDERLAY,
        prefix: str = "/coreos.com/network",
        ip_family: str = "ipv4",
    ) -> None:
        if ip_family not in IP_FAMILIES:
            raise ValueError(f"ip_family must be one of {', '.join(IP_FAMILIES)}, not {ip_family!r}")
        self.scope = scope
        self.underlay = ipaddress.IPv4Network(underlay)
        self.gateway = str(self.underlay.network_address + 1)
        self.prefix = prefix
        self.ip_family = ip_family
        self.underlay6 = ipaddress.IPv6Network(DEFAULT_UNDERLAY6) if ip_family != "ipv4" else None
        self.gateway6 = self._v6(self.gateway) if self.underlay6 is not None else None
        self.ul_ns = scope.add_ns("ul")
        run(["ip", "-n", self.ul_ns, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", self.ul_ns, "addr", "add", f"{self.gateway}/{self.underlay.prefixlen}", "dev", "br0"])
        if self.gateway6 is not None:
            self._add_addr6(self.ul_ns, "br0", self.gateway6)
        run(["ip", "-n", self.ul_ns, "link", "set", "br0", "up"])
        self.nodes: dict[str, Node] = {}
        self.etcd_ns = ""
        self.endpoint = ""
        self.etcd_members: list[EtcdMember] = []
        self._next_host = 11
        # Each etcd member's further client addresses (a "dual" member also serves on its IPv6 one).
        self._etcd_listen: dict[str, tuple[str, ...]] = {}
        # Further L2 segments behind the underlay namespace, which routes between them: {bridge: (net, next host)}.
        self.segments: dict[str, tuple[ipaddress.IPv4Network, int]] = {}

    @classmethod
    def attach(
        cls,
        scope: RunScope,
        *,
        ul_ns: str,
        etcd_ns: str,
        endpoint: str,
        next_host: int,
        underlay: str = DEFAULT_UNDERLAY,
        prefix: str = "/coreos.com/network",
        ip_family: str = "ipv4",
    ) -> Testbed:
        """A Testbed for an underlay and etcd that already exist (the lab's later commands), creating nothing;
        `ip_family` must be the one the underlay was built with."""
        if ip_family not in IP_FAMILIES:
            raise ValueError(f"ip_family must be one of {', '.join(IP_FAMILIES)}, not {ip_family!r}")
        tb = cls.__new__(cls)
        tb.scope = scope
        tb.underlay = ipaddress.IPv4Network(underlay)
        tb.gateway = str(tb.underlay.network_address + 1)
        tb.prefix = prefix
        tb.ip_family = ip_family
        tb.underlay6 = ipaddress.IPv6Network(DEFAULT_UNDERLAY6) if ip_family != "ipv4" else None
        tb.gateway6 = tb._v6(tb.gateway) if tb.underlay6 is not None else None
        tb.ul_ns = ul_ns
        tb.nodes = {}
        tb.etcd_ns = etcd_ns
        tb.endpoint = endpoint
        tb.etcd_members = []
        tb._next_host = next_host
        tb._etcd_listen = {}
        tb.segments = {}
        return tb

    # --- underlay and etcd ---------------------------------------------------------------------------
    def _v6(self, ip4: str) -> str:
        """The IPv6 twin of an underlay IPv4 address: the same last number, written as the last group
        (192.168.77.11 is fd77:77::11), so a reader maps one to the other at a glance."""
        assert self.underlay6 is not None
        return str(ipaddress.IPv6Address(f"{self.underlay6.network_address}{ip4.rsplit('.', 1)[1]}"))

    def _add_addr6(self, ns: str, dev: str, ip6: str) -> None:
        assert self.underlay6 is not None
        # nodad: the address is unique by construction, and DAD would keep it tentative (unusable) for ~1 s.
        run(["ip", "-n", ns, "addr", "add", f"{ip6}/{self.underlay6.prefixlen}", "dev", dev, "nodad"])

    def _attach(
        self, ns: str, port: str, ip: str, bridge: str = "br0", *, ip6: str | None = None, v4: bool = True
    ) -> None:
        """Plug `ns` into `bridge` as eth0: `ip` (unless not `v4`) and `ip6` (if any) with default routes."""
        net = self.underlay if bridge == "br0" else self.segments[bridge][0]
        veth(ns, "eth0", self.ul_ns, port)
        run(["ip", "-n", self.ul_ns, "link", "set", "dev", port, "master", bridge, "up"])
        if v4:
            run(["ip", "-n", ns, "addr", "add", f"{ip}/{net.prefixlen}", "dev", "eth0"])
        if ip6 is not None:
            self._add_addr6(ns, "eth0", ip6)
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        if v4:
            run(["ip", "-n", ns, "route", "add", "default", "via", str(net.network_address + 1)])
        if ip6 is not None and self.gateway6 is not None:
            run(["ip", "-n", ns, "-6", "route", "add", "default", "via", self.gateway6])

    def add_segment(self, network: str) -> str:
        """Another L2 segment (a bridge in the underlay namespace, gateway .1 there), routed to the others by the
        underlay namespace: nodes on it reach the rest of the cluster through a router, not on one L2."""
        net = ipaddress.IPv4Network(network)
        bridge = f"br{len(self.segments) + 1}"
        run(["ip", "-n", self.ul_ns, "link", "add", bridge, "type", "bridge"])
        run(["ip", "-n", self.ul_ns, "addr", "add", f"{net.network_address + 1}/{net.prefixlen}", "dev", bridge])
        run(["ip", "-n", self.ul_ns, "link", "set", bridge, "up"])
        ns_exec(self.ul_ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.segments[bridge] = (net, 11)
        return bridge

    def add_host(self, short: str, ip: str, ip6: str | None = None) -> str:
        """A namespace on the underlay with address `ip`: a server that is no node (the lab's API server, an
        outside host). On a "dual" or "ipv6" test bed it also gets `ip6` (default: the IPv6 twin of `ip`);
        an IPv6 `ip` makes it an IPv6-only host."""
        ns = self.scope.add_ns(short)
        if ipaddress.ip_address(ip).version == 6:
            if self.underlay6 is None:
                raise NetnsError(f"host {short}: an IPv6 address needs a dual or ipv6 test bed")
            self._attach(ns, short, ip, ip6=ip, v4=False)
            return ns
        if ip6 is None and self.underlay6 is not None:
            ip6 = self._v6(ip)
        self._attach(ns, short, ip, ip6=ip6)
        return ns

    def start_etcd(self, members: int = 1) -> str:
        """etcd on the underlay: one member in namespace `etcd` (192.168.77.2), or a cluster of `members` with
        the others in `etcd2`, `etcd3`... (.3, .4, ...). Agents are given every member's endpoint. Returns the
        first member's endpoint (`endpoint`; `endpoints` has them all)."""
        cluster = []
        for i in range(members):
            name = "etcd" if i == 0 else f"etcd{i + 1}"
            ns = self.scope.add_ns(name)
            ip4 = str(self.underlay.network_address + 2 + i)
            ip6 = self._v6(ip4) if self.underlay6 is not None else None
            self._attach(ns, name, ip4, ip6=ip6, v4=self.ip_family != "ipv6")
            # On an IPv6-only underlay etcd is reached over IPv6; on "dual" it listens on both, IPv4 advertised.
            ip = ip6 if self.ip_family == "ipv6" and ip6 is not None else ip4
            listen = (ip6,) if self.ip_family == "dual" and ip6 is not None else ()
            self.etcd_members.append(EtcdMember(name, ns, ip, ip6=ip6))
            self._etcd_listen[name] = listen
            cluster.append(f"{name}=http://{url_host(ip)}:2380")
        self.etcd_ns = self.etcd_members[0].ns
        self.endpoint = self.etcd_members[0].url
        self._cluster = ",".join(cluster)
        self.restart_etcd()
        return self.endpoint

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.etcd_members] or [self.endpoint]

    def stop_etcd(self) -> None:
        """Stop every member (SIGTERM, then SIGKILL)."""
        if not self.etcd_members:  # attached to the lab's etcd: stop what runs in its namespace
            kill_ns_processes(self.etcd_ns)
            return
        for i in range(len(self.etcd_members)):
            self.stop_member(i, signal.SIGTERM)

    def restart_etcd(self) -> None:
        """Start every stopped member again on its data dir (same members, same keys), and wait until all are
        healthy."""
        if not self.etcd_members:  # attached to the lab's one-member etcd
            ip = str(self.underlay.network_address + 2)
            if self.ip_family == "ipv6":
                ip = self._v6(ip)
            spawn_etcd(self.scope, self.etcd_ns, ip)
            wait_etcd(self.scope, self.etcd_ns, ip)
            return
        stopped = [m for m in self.etcd_members if m.proc is None or m.proc.poll() is not None]
        for m in stopped:
            m.proc = spawn_etcd(
                self.scope,
                m.ns,
                m.ip,
                name=m.name,
                cluster=getattr(self, "_cluster", None),
                extra_client_ips=self._etcd_listen.get(m.name, ()),
            )
        for m in stopped:
            wait_etcd(self.scope, m.ns, m.ip, name=m.name, timeout=30)
            m.down = False

    def stop_member(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Stop one member by its PID (SIGKILL by default: no goodbye to its peers or clients)."""
        m = self.etcd_members[i]
        m.down = True
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(sig)
            try:
                m.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait(timeout=5)

    def start_member(self, i: int) -> None:
        self.restart_etcd()

    def partition_member(self, i: int) -> None:
        """Cut member i off silently: every packet in or out of its namespace (but loopback) is dropped, so its
        TCP connections hang instead of being reset. Only inside the member's own namespace."""
        m = self.etcd_members[i]
        m.down = True
        for tool in self._firewalls(m):
            for chain in ("INPUT", "OUTPUT"):
                ns_exec(m.ns, [tool, "-w", "-I", chain, "!", "-i" if chain == "INPUT" else "-o", "lo", "-j", "DROP"])

    @staticmethod
    def _firewalls(m: EtcdMember) -> tuple[str, ...]:
        # A member with an IPv6 address is cut off on both families (on "ipv6" IPv6 is all it speaks).
        return ("iptables", "ip6tables") if m.ip6 is not None else ("iptables",)

    def heal_member(self, i: int, timeout: float = 30) -> None:
        m = self.etcd_members[i]
        for tool in self._firewalls(m):
            for chain in ("INPUT", "OUTPUT"):
                ns_exec(m.ns, [tool, "-w", "-D", chain, "!", "-i" if chain == "INPUT" else "-o", "lo", "-j", "DROP"])
        wait_etcd(self.scope, m.ns, m.ip, name=m.name, timeout=timeout)
        m.down = False

    def _status(self, m: EtcdMember) -> dict[str, Any]:
        out = etcdctl(m.ns, m.url, "endpoint", "status", "-w", "json")
        st: dict[str, Any] = json.loads(out)[0]["Status"]
        return st

    def etcd_leader(self) -> int:
        """Index of the current leader among etcd_members (asked of a member that is up)."""
        st = self._status(self._ctl_member())
        ids = {self._status(m)["header"]["member_id"]: i for i, m in enumerate(self.etcd_members) if not m.down}
        return ids[st["leader"]]

    def member_watchers(self, i: int) -> int:
        """How many watchers member i serves now (etcd's own gauge), i.e. which member the agents watch on."""
        m = self.etcd_members[i]
        out = ns_exec(m.ns, ["curl", "-s", "--max-time", "3", f"{m.url}/metrics"])
        for line in out.splitlines():
            if line.startswith("etcd_debugging_mvcc_watcher_total "):
                return int(float(line.split()[1]))
        return 0

    def _ctl_member(self) -> EtcdMember:
        for m in self.etcd_members:
            if not m.down:
                return m
        raise NetnsError("every etcd member is down")

    def etcdctl(self, *args: str, input: str | None = None) -> str:
        if not self.etcd_members:
            return etcdctl(self.etcd_ns, self.endpoint, *args, input=input)
        m = self._ctl_member()
        return etcdctl(m.ns, m.url, *args, input=input)

    def put_config(self, conf: dict[str, Any] | str) -> None:
        text = conf if isinstance(conf, str) else json.dumps(conf)
        # On etcdctl's stdin, not its command line: any user's `ps` shows argv, and a failed command is quoted in
        # NetnsError; the config may hold an ipsec PSK.
        self.etcdctl("put", f"{self.prefix}/config", input=text)

    def leases(self) -> dict[str, dict[str, Any]]:
        out = self.etcdctl("get", "--prefix", f"{self.prefix}/subnets/", "-w", "json")
        import base64

        res: dict[str, dict[str, Any]] = {}
        for kv in json.loads(out).get("kvs", []):
            key = base64.b64decode(kv["key"]).decode().rsplit("/", 1)[-1]
            with contextlib.suppress(ValueError):
                res[key] = json.loads(base64.b64decode(kv["value"]))
        return res

    # --- nodes and agents ----------------------------------------------------------------------------
    def add_node(self, name: str, segment: str = "br0") -> Node:
        """A node namespace on the underlay (or on a segment from add_segment())."""
        ns = self.scope.add_ns(name)
        if segment == "br0":
            ip = str(self.underlay.network_address + self._next_host)
            self._next_host += 1
        else:
            if self.ip_family == "ipv6":
                raise NetnsError("segments are IPv4 only: no node on one in an ipv6 test bed")
            net, host = self.segments[segment]
            ip = str(net.network_address + host)
            self.segments[segment] = (net, host + 1)
        ip6 = self._v6(ip) if self.underlay6 is not None and segment == "br0" else None
        self._attach(ns, name, ip, segment, ip6=ip6, v4=self.ip_family != "ipv6")
        ns_exec(ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        if ip6 is not None:
            # Inside the node's namespace only: its pods' IPv6 traffic is routed through it.
            ns_exec(ns, ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        if self.ip_family == "ipv6" and ip6 is not None:
            ip = ip6
        d = self.scope.tmpdir / name
        d.mkdir(parents=True, exist_ok=True)
        node = Node(name=name, ns=ns, ip=ip, dir=d, ip6=ip6)
        self.nodes[name] = node
        return node

    def agent_cmd(self, node: Node, *extra: str) -> list[str]:
        # The node's own WireGuard key file, in the command itself: however the command is run, an agent of the
        # test bed never falls back to the machine's /run/flannel/wgkey (the nodes share one filesystem).
        return [
            shutil.which("env") or "/usr/bin/env", f"WIREGUARD_KEY_FILE={node.dir / 'wgkey'}",
            sys.executable, "-m", "pyflannel.cli",
            f"--etcd-endpoints={','.join(self.endpoints)}",
            f"--etcd-prefix={self.prefix}",
            f"--subnet-file={node.subnet_file}",
            *node.extra_args, *extra,
        ]  # fmt: skip

    def start_agent(self, node: Node, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start flanneld in the node's namespace; `env` entries override the inherited environment."""
        if node.proc is not None and node.proc.poll() is None:
            raise NetnsError(f"agent on {node.name} is already running")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        node.proc = self.scope.spawn(node.ns, self.agent_cmd(node, *extra), log=node.log_file, env=env)
        return node.proc

    def stop_agent(self, node: Node, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        p = node.proc
        if p is None:
            return None
        if p.poll() is None:
            # `ip netns exec` execs the command, so the Popen pid is the agent itself.
            p.send_signal(sig)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        node.proc = None
        return p.returncode

    def wait_ready(self, node: Node, timeout: float = 120, since: float = 0.0) -> SubnetEnv:
        """Wait until the agent wrote subnet.env (after `since`, a time.time() value). The bound is roomy: under
        emulation (the VM pass) a cold agent takes tens of seconds to start; a dead agent is reported at once."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if node.subnet_file.stat().st_mtime >= since:
                    env = read_subnet_env(node.subnet_file)
                    if env is not None and (env.subnet is not None or env.ipv6_subnet is not None):
                        return env
            except FileNotFoundError:
                pass
            if node.proc is not None and node.proc.poll() is not None:
                raise NetnsError(f"flanneld on {node.name} exited with {node.proc.returncode}:\n{self.log_tail(node)}")
            time.sleep(0.1)
        raise NetnsError(f"flanneld on {node.name} not ready after {timeout}s:\n{self.log_tail(node)}")

    def log_tail(self, node: Node, chars: int = 3000) -> str:
        try:
            return node.log_file.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    # --- pods ----------------------------------------------------------------------------------------
    def ensure_bridge(self, node: Node, env: SubnetEnv) -> None:
        """cni0 with the subnets' gateway addresses, as the bridge CNI plugin would set it up."""
        assert env.subnet is not None or env.ipv6_subnet is not None
        if run(["ip", "-n", node.ns, "link", "show", "cni0"], check=False).strip() == "":
            run(["ip", "-n", node.ns, "link", "add", "cni0", "type", "bridge"])
            run(["ip", "-n", node.ns, "link", "set", "cni0", "mtu", str(env.mtu)])
        if env.subnet is not None:
            gw = f"{env.subnet.network_address + 1}/{env.subnet.prefixlen}"
            run(["ip", "-n", node.ns, "addr", "replace", gw, "dev", "cni0"])
        if env.ipv6_subnet is not None:
            gw6 = f"{env.ipv6_subnet.network_address + 1}/{env.ipv6_subnet.prefixlen}"
            run(["ip", "-n", node.ns, "addr", "replace", gw6, "dev", "cni0", "nodad"])
        run(["ip", "-n", node.ns, "link", "set", "cni0", "up"])

    def add_pod(self, node: Node, env: SubnetEnv | None = None) -> Pod:
        """A pod on cni0 (without CNI): address .10+i of the node's subnet, and of its IPv6 subnet if any."""
        env = env or read_subnet_env(node.subnet_file)
        if env is None or (env.subnet is None and env.ipv6_subnet is None):
            raise NetnsError(f"{node.name} has no subnet.env yet")
        self.ensure_bridge(node, env)
        idx = len(node.pods) + 1
        name = f"{node.name}p{idx}"
        ns = self.scope.add_ns(name)
        port = f"vp{idx}"
        veth(ns, "eth0", node.ns, port, mtu=env.mtu)
        run(["ip", "-n", node.ns, "link", "set", "dev", port, "master", "cni0", "up"])
        ip = ip6 = None
        if env.subnet is not None:
            ip = str(env.subnet.network_address + 10 + idx)
            run(["ip", "-n", ns, "addr", "add", f"{ip}/{env.subnet.prefixlen}", "dev", "eth0"])
        if env.ipv6_subnet is not None:
            ip6 = str(env.ipv6_subnet.network_address + 10 + idx)
            run(["ip", "-n", ns, "addr", "add", f"{ip6}/{env.ipv6_subnet.prefixlen}", "dev", "eth0", "nodad"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        if env.subnet is not None:
            run(["ip", "-n", ns, "route", "add", "default", "via", str(env.subnet.network_address + 1)])
        if env.ipv6_subnet is not None:
            run(["ip", "-n", ns, "-6", "route", "add", "default", "via", str(env.ipv6_subnet.network_address + 1)])
        pod = Pod(name=name, ns=ns, node=node.name, ip=ip or str(ip6), ip6=ip6)
        node.pods.append(pod)
        return pod

    def add_cni_pod(
        self, node: Node, driver: Driver | None = None, conflist: dict[str, Any] | None = None, name: str = ""
    ) -> Pod:
        """A pod namespace attached through the real CNI chain (`driver` execs the plugins inside the node);
        by default the node's kube-flannel runtime from cni_runtime()."""
        if driver is None or conflist is None:
            driver, conflist = cni_runtime(self.scope.tmpdir, node.dir, node.ns)
        name = name or f"{node.name}p{len(node.pods) + 1}"
        ns = self.scope.add_ns(name)
        rt = RuntimeConf(
            container_id=f"{self.scope.prefix}{name}",
            netns=f"/run/netns/{ns}",
            args=(("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", "default"), ("K8S_POD_NAME", name)),
        )
        try:
            res = driver.add(conflist, rt)
            addrs = [ipaddress.ip_interface(a["address"]).ip for a in res["ips"]]
            v4 = [str(a) for a in addrs if a.version == 4]
            v6 = [str(a) for a in addrs if a.version == 6]
            ip = (v4 or v6)[0]
        except Exception:
            self.scope.remove_ns(ns)
            raise
        pod = Pod(name=name, ns=ns, node=node.name, ip=ip, ip6=v6[0] if v6 else None)
        node.pods.append(pod)
        return pod

    def ping(self, src_ns: str, dst: str, count: int = 1, wait: float = 1.0) -> bool:
        """One echo (or `count`) from `src_ns` to `dst`, an IPv4 or IPv6 address (pinged with -6)."""
        family = ["-6"] if ":" in dst else []
        p = subprocess.run(
            ["ip", "netns", "exec", src_ns, "ping", *family, "-c", str(count), "-W", str(wait), "-i", "0.2", dst],
            capture_output=True, timeout=count * wait + 10,
        )  # fmt: skip
        return p.returncode == 0

    def wait_ping(self, src_ns: str, dst: str, timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping(src_ns, dst):
                return True
            time.sleep(0.2)
        return False

    def all_pods(self) -> list[Pod]:
        return [p for n in self.nodes.values() for p in n.pods]
