"""The lab's operations: up, down, add/remove a node, restart an agent, status and the ping matrix.

Built on the Testbed (underlay, etcd, nodes, real flanneld agents) and the CNI runtime driver (pods through
the real `flannel` + bridge/host-local + portmap chain, exec'd inside the node namespace). Agents and etcd run
in their own sessions so they outlive the `up` command; everything they write lives in the run directory.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..cni.driver import CNIError, Driver, RuntimeConf
from ..lease import make_subnet_key
from ..subnetenv import read_subnet_env
from . import kubemode, netns
from .fakekube import ApiError
from .netns import NetnsError, RunScope
from .state import MARKER, LabError, LabOptions, LabState, NodeState, PodState, load_state
from .testbed import DEFAULT_UNDERLAY6, IP_FAMILIES, REF_PLUGINS, Node, Testbed, cni_runtime

# Backends whose data plane carries IPv6 pods (ipip, udp and ipsec are IPv4 only, upstream and here).
IPV6_BACKENDS = ("vxlan", "host-gw", "wireguard")
READY_TIMEOUT = 120.0  # bounded, but roomy: a loaded or emulated machine (the VM pass) starts Python slowly

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def check_prerequisites(store: str = "etcd") -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces); run it with sudo")
    tools = ("ip", "etcd", "etcdctl", "bridge", "ping") if store == "etcd" else ("ip", "openssl", "bridge", "ping")
    missing = [t for t in (*tools, "unshare", "mount") if shutil.which(t) is None]
    missing += [f"{REF_PLUGINS}/{p}" for p in ("bridge", "host-local", "portmap") if not (REF_PLUGINS / p).is_file()]
    if missing:
        raise LabError(f"missing {', '.join(missing)}: run scripts/setup.sh (or scripts/lab.sh, which calls it)")


def check_prefix(prefix: str) -> None:
    # down removes every namespace starting with the prefix: never let it be something broad.
    if not prefix.startswith((netns.STEM_LAB, netns.STEM_TEST)) or not prefix.endswith("-"):
        raise LabError(f"prefix {prefix!r} must start with {netns.STEM_LAB!r} (or {netns.STEM_TEST!r}) and end in '-'")


def lab_namespaces(prefix: str) -> list[str]:
    return [ns for ns in netns.list_ns() if ns.startswith(prefix)]


def alive(pid: int) -> bool:
    """Running (a zombie is not: its parent may be an init that reaps late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def pid_in_ns(pid: int | None, ns: str) -> bool:
    """pid is alive and runs in `ns` (so a recycled pid is never mistaken for our agent)."""
    return pid is not None and pid in netns.ns_pids(ns)


def node_cni(st: LabState, node: NodeState) -> tuple[Driver, dict[str, Any]]:
    """The node's runtime: kube-flannel's conflist, its files at the tutorials' paths in the node's own
    /var/lib/cni (the node's run directory's var-lib-cni, mounted there)."""
    return cni_runtime(Path(st.state_dir), Path(node.dir), node.netns, tutorial_paths=True)


class Lab:
    """A lab described by `st`; `tb` drives the namespaces (a fresh Testbed for up, an attached one after)."""

    def __init__(self, st: LabState, scope: RunScope, tb: Testbed, say: Say = _quiet) -> None:
        self.st = st
        self.scope = scope
        self.tb = tb
        self.say = say

    @classmethod
    def open(cls, state_dir: Path, say: Say = _quiet) -> Lab:
        from .state import require_state

        st = require_state(state_dir)
        scope = RunScope(stem=netns.STEM_LAB, prefix=st.prefix, tmpdir=Path(st.state_dir))
        tb = Testbed.attach(
            scope,
            ul_ns=st.ul_ns,
            etcd_ns=st.etcd_ns,
            endpoint=st.endpoint,
            next_host=st.next_host,
            underlay=st.options.underlay,
            prefix=st.etcd_prefix,
            ip_family=st.options.ip_family,  # add-node's IPv6 address and route come from it
        )
        for n in st.nodes:
            tb.nodes[n.name] = Node(
                name=n.name, ns=n.netns, ip=n.ip, dir=Path(n.dir), extra_args=tuple(n.args), ip6=n.ip6 or None
            )
        return cls(st, scope, tb, say)

    # ---- nodes ---------------------------------------------------------------------------------------

    def _agent_args(self) -> list[str]:
        args = ["--iface=eth0", "--healthz-port=8471", "--healthz-ip=127.0.0.1"]
        if self.st.options.ip_masq:
            args.append("--ip-masq")
        return args

    def _new_node(self) -> tuple[NodeState, Node]:
        taken = {n.name for n in self.st.nodes}
        i = 1
        while f"n{i}" in taken:
            i += 1
        name = f"n{i}"
        node = self.tb.add_node(name)
        if self.st.options.backend == "ipsec":
            # ipsec programs no route: a pod's packet to another node's subnet takes the node's default route,
            # where the out policy tunnels it. The lab's own, whatever the test bed's defaults are.
            netns.run(["ip", "-n", node.ns, "route", "replace", "default", "via", self.tb.gateway])
        node.extra_args = tuple(self._agent_args())
        ns = NodeState(
            name=name, netns=node.ns, ip=node.ip, dir=str(node.dir), args=list(node.extra_args), ip6=node.ip6 or ""
        )
        self.st.nodes.append(ns)
        self.st.next_host = self.tb._next_host
        self.st.save()
        if self.st.options.store == "kube":
            # kubelet registers the Node, the controller manager gives it a podCIDR, the DaemonSet a pod.
            kubemode.register_node(self.st, ns)
            cidr = kubemode.allocate_pod_cidr(self.st, ns)
            kubemode.write_kubeconfig(self.st, ns)
            self.st.save()
            self.say(f"  Node {name} registered, podCIDR {cidr}")
        return ns, node

    def _start_agent(self, ns: NodeState, node: Node) -> None:
        """flanneld in the node, with the node's own mounts (its CNI server writes the plugins' files there)."""
        if self.st.options.store == "kube":
            cmd, env = kubemode.agent_command(self.st, ns)
        else:
            cmd, env = self.tb.agent_cmd(node), {}
        # Each node its own WireGuard key (all nodes share this machine's /run).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "WIREGUARD_KEY_FILE": str(Path(ns.dir) / "wgkey"), **env}
        node.proc = self.scope.spawn(ns.netns, [*netns.node_mounts(Path(ns.dir)), *cmd], log=node.log_file, env=env)
        ns.pid = node.proc.pid
        self.st.save()

    def _wait_ready(self, node: Node, since: float = 0.0) -> None:
        try:
            env = self.tb.wait_ready(node, timeout=READY_TIMEOUT, since=since)
        except NetnsError as e:
            raise LabError(f"flanneld on node {node.name} did not become ready: {e}") from None
        subnets = " ".join(str(x) for x in (env.subnet, env.ipv6_subnet) if x is not None)
        self.say(f"  {node.name}: flanneld pid {node.proc.pid if node.proc else '?'}, subnet {subnets}")

    def _add_pods(self, ns: NodeState, node: Node, count: int) -> None:
        driver, conflist = node_cni(self.st, ns)
        for _ in range(count):
            taken = {p.name for p in self.st.pods}
            i = 1
            while f"{node.name}-p{i}" in taken:
                i += 1
            name = f"{node.name}-p{i}"
            try:
                pod = self.tb.add_cni_pod(node, driver, conflist, name)
            except CNIError as e:
                raise LabError(f"CNI ADD of pod {name} on {node.name} failed: {e.msg} {e.details}".strip()) from None
            ip6 = pod.ip6 or ""
            self.st.pods.append(
                PodState(
                    name=pod.name,
                    node=node.name,
                    netns=pod.ns,
                    ip=pod.ip,
                    container_id=f"{self.scope.prefix}{name}",
                    ip6=ip6,
                )
            )
            self.st.save()
            shown = " ".join(dict.fromkeys(a for a in (pod.ip, ip6) if a))
            self.say(f"  pod {pod.name} on {node.name}: {shown}")

    def add_node(self, pods: int) -> NodeState:
        ns, node = self._new_node()
        t0 = time.time()
        self._start_agent(ns, node)
        self._wait_ready(node, since=t0 - 1)
        self._add_pods(ns, node, pods)
        self._wait_joined(ns)
        return ns

    def _wait_joined(self, ns: NodeState, timeout: float = 30) -> None:
        """The new node's first pod and another node's reach each other (every IP version): the peers have
        programmed its lease, so `check` right after `add-node` sees it in."""
        mine = self.st.pods_of(ns.name)
        other = next((ps[0] for n in self.st.nodes if n is not ns and (ps := self.st.pods_of(n.name))), None)
        if not mine or other is None or self.st.options.backend == "alloc":
            return
        for family in self.st.options.families:
            for a, b in ((mine[0], other), (other, mine[0])):
                if not self.tb.wait_ping(a.netns, b.addr(family), timeout=timeout):
                    raise LabError(f"pod {a.name} cannot reach pod {b.name} ({b.addr(family)}) after {timeout}s")

    def remove_node(self, name: str) -> None:
        ns = self.st.node(name)
        driver, conflist = node_cni(self.st, ns)
        key = self.lease_key(ns)
        for pod in self.st.pods_of(name):
            rt = RuntimeConf(container_id=pod.container_id, netns=f"/run/netns/{pod.netns}")
            with contextlib.suppress(CNIError):
                driver.delete(conflist, rt)
            netns.delete_ns(pod.netns)
            self.st.pods.remove(pod)
            self.st.save()
        self.stop_agent(ns)
        if self.st.options.store == "kube":
            kubemode.delete_node(self.st, name)  # `kubectl delete node`: the peers' watches see it go
        elif key is not None:
            # Upstream keeps a departed node's lease until its TTL; the lab drops it so peers forget the node now.
            self.tb.etcdctl("del", f"{self.st.etcd_prefix}/subnets/{key}")
        netns.delete_ns(ns.netns)
        shutil.rmtree(ns.dir, ignore_errors=True)
        self.st.nodes.remove(ns)
        self.st.save()

    def stop_agent(self, ns: NodeState, timeout: float = 15) -> None:
        pid = ns.pid
        if pid_in_ns(pid, ns.netns):
            assert pid is not None
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ns.pid = None
        self.st.save()

    def restart_agent(self, name: str) -> int:
        ns = self.st.node(name)
        self.stop_agent(ns)
        node = self.tb.nodes[name]
        t0 = time.time()
        self._start_agent(ns, node)
        self._wait_ready(node, since=t0 - 1)
        assert ns.pid is not None
        return ns.pid

    # ---- reading -------------------------------------------------------------------------------------

    def subnets_of(self, ns: NodeState) -> tuple[str | None, str | None]:
        """The node's IPv4 and IPv6 subnets, as its subnet.env has them (None: not there)."""
        env = read_subnet_env(Path(ns.dir) / "subnet.env")
        if env is None:
            return None, None
        return (
            str(env.subnet) if env.subnet is not None else None,
            str(env.ipv6_subnet) if env.ipv6_subnet is not None else None,
        )

    def subnet_of(self, ns: NodeState) -> str | None:
        """The node's subnet: its IPv4 one, or with IPv6 only its IPv6 one."""
        v4, v6 = self.subnets_of(ns)
        return v4 or v6

    def lease_key(self, ns: NodeState) -> str | None:
        """The node's lease key under <prefix>/subnets/ (`10.244.1.0-24&fd42:244:0:1::-64` when dual-stack)."""
        v4, v6 = self.subnets_of(ns)
        if v4 is None and v6 is None:
            return None
        return make_subnet_key(ipaddress.IPv4Network(v4) if v4 else None, ipaddress.IPv6Network(v6) if v6 else None)

    def leases(self) -> dict[str, dict[str, Any]]:
        if self.st.options.store == "kube":
            return kubemode.leases(self.st)
        try:
            return self.tb.leases()
        except NetnsError:
            return {}

    def status(self) -> dict[str, Any]:
        leases = self.leases()
        nodes = []
        for n in self.st.nodes:
            env = read_subnet_env(Path(n.dir) / "subnet.env")
            subnet, subnet6 = self.subnets_of(n)
            running = pid_in_ns(n.pid, n.netns)
            key = self.lease_key(n)
            lease = leases.get(key) if key else None
            bd = lease.get("BackendData") if lease else None
            bd6 = lease.get("BackendV6Data") if lease else None
            nodes.append(
                {
                    "name": n.name,
                    "netns": n.netns,
                    "ip": n.ip,
                    "ip6": n.ip6 or None,
                    "subnet": subnet,
                    "subnet6": subnet6,
                    "mtu": env.mtu if env is not None else None,
                    "pid": n.pid if running else None,
                    "running": running,
                    "ready": running and key is not None,
                    "vtep_mac": bd.get("VtepMAC") if isinstance(bd, dict) else None,
                    "vtep_mac6": bd6.get("VtepMAC") if isinstance(bd6, dict) else None,
                    "log": str(Path(n.dir) / "flanneld.log"),
                }
            )
        return {
            "store": self.st.options.store,
            "kube": {
                "netns": self.st.kube_ns,
                "server": self.st.kube_url,
                "pid": self.st.kube_pid,
                "running": pid_in_ns(self.st.kube_pid, self.st.kube_ns),
            }
            if self.st.options.store == "kube"
            else None,
            "services": len(self.st.services),
            "backend": self.st.options.backend,
            "network": self.st.options.network if 4 in self.st.options.families else None,
            "ip_family": self.st.options.ip_family,
            "ipv6_network": self.st.options.ipv6_network if 6 in self.st.options.families else None,
            "ip_masq": self.st.options.ip_masq,
            "state_dir": self.st.state_dir,
            "prefix": self.st.prefix,
            "status": self.st.status,
            "underlay": {
                "netns": self.st.ul_ns,
                "bridge": "br0",
                "cidr": self.st.options.underlay,
                "cidr6": DEFAULT_UNDERLAY6 if 6 in self.st.options.families else None,
            },
            "etcd": {
                "netns": self.st.etcd_ns,
                "endpoint": self.st.endpoint,
                "prefix": self.st.etcd_prefix,
                "pid": self.st.etcd_pid,
                "running": pid_in_ns(self.st.etcd_pid, self.st.etcd_ns),
            }
            if self.st.options.store == "etcd"
            else None,
            "nodes": nodes,
            "pods": [
                {"name": p.name, "node": p.node, "netns": p.netns, "ip": p.ip, "ip6": p.ip6 or None}
                for p in self.st.pods
            ],
        }

    def ping_matrix(self, family: int = 4, wait: float = 1.0) -> dict[tuple[str, str], bool]:
        """Every pod pings every other pod's address of IP version `family` (ping picks ICMP or ICMPv6)."""
        pods = self.st.pods
        pairs = [(a, b) for a in pods for b in pods if a is not b]

        def one(pair: tuple[PodState, PodState]) -> bool:
            a, b = pair
            dst = b.addr(family)
            if not dst:
                return False
            out = netns.run(
                ["ip", "netns", "exec", a.netns, "ping", "-c", "1", "-W", str(wait), dst], check=False, timeout=15
            )
            return "1 received" in out

        with ThreadPoolExecutor(max_workers=16) as ex:
            res = list(ex.map(one, pairs))
        return {(a.name, b.name): ok for (a, b), ok in zip(pairs, res, strict=True)}

    def wait_connected(self, timeout: float = 30) -> None:
        """Each node's first pod reaches the next node's first pod (a ring: every node sends and receives), over
        each IP version the pod network carries."""
        firsts = [ps[0] for n in self.st.nodes if (ps := self.st.pods_of(n.name))]
        if len(firsts) < 2:
            return
        for family in self.st.options.families:
            for a, b in zip(firsts, firsts[1:] + firsts[:1], strict=True):
                dst = b.addr(family)
                if not dst:
                    raise LabError(f"pod {b.name} has no IPv{family} address (its CNI result gave {b.ip})")
                if not self.tb.wait_ping(a.netns, dst, timeout=timeout):
                    raise LabError(f"pod {a.name} cannot reach pod {b.name} ({dst}) over IPv{family} after {timeout}s")


# ---- up and down -------------------------------------------------------------------------------------


def up(state_dir: Path, prefix: str, opts: LabOptions, *, force: bool = False, say: Say = _quiet) -> Lab:
    """Build the lab; on any failure remove everything made so far and raise LabError."""
    check_prefix(prefix)
    _validate(opts)
    existing = load_state(state_dir)
    left = lab_namespaces(prefix)
    if existing is not None or left:
        if not force:
            what = f"state in {state_dir}" if existing is not None else f"namespaces {', '.join(left[:4])}"
            raise LabError(f"a lab is already up ({what}); run `flannel-lab down` first, or `up --force` to replace it")
        say("replacing the lab that is up (--force)")
        down(state_dir, prefix)
    check_prerequisites(opts.store)
    check_kernel_module(opts.backend, prefix)

    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / MARKER).write_text("made by flannel-lab; `flannel-lab down` removes this directory\n")
    st = LabState(prefix=prefix, state_dir=str(state_dir), options=opts)
    st.save()
    scope = RunScope(stem=netns.STEM_LAB, prefix=prefix, tmpdir=state_dir)
    try:
        tb = Testbed(scope, underlay=opts.underlay, prefix=st.etcd_prefix, ip_family=opts.ip_family)
        st.ul_ns = tb.ul_ns
        st.save()
        nets = {"ipv4": opts.underlay, "dual": f"{opts.underlay} and {DEFAULT_UNDERLAY6}"}
        say(f"underlay {nets.get(opts.ip_family, f'{DEFAULT_UNDERLAY6} (IPv6 only)')} on bridge br0 in {tb.ul_ns}")
        psk = ipsec_psk(state_dir) if opts.backend == "ipsec" else None
        conf = net_conf(opts, psk)
        shown = json.dumps(net_conf(opts, PSK_SHOWN if psk else None))
        if opts.store == "kube":
            # The API server takes etcd's place on the underlay (.2); the net-conf is the ConfigMap's.
            # An IPv6-only underlay has the server at fd77:77::2 alone (the agents have no IPv4 to reach it).
            if opts.ip_family == "ipv6":
                ip = str(ipaddress.IPv6Network(DEFAULT_UNDERLAY6).network_address + 2)
            else:
                ip = str(ipaddress.IPv4Network(opts.underlay).network_address + 2)
            st.kube_ns = tb.add_host("kapi", ip)
            st.kube_url = f"https://{netns.url_host(ip)}:{kubemode.API_PORT}"
            st.save()
            st.kube_pid = kubemode.start_api(scope, st.kube_ns, ip, st)
            st.save()
            kubemode.write_configmap(st, conf)
            say(f"Kubernetes API server {st.kube_url} in {st.kube_ns} (Nodes; kubeconfig per node)")
            say(f"kube-flannel ConfigMap net-conf.json: {shown}")
        else:
            tb.start_etcd()
            st.etcd_ns = tb.etcd_ns
            st.endpoint = tb.endpoint
            st.etcd_ip = tb.etcd_members[0].ip
            st.etcd_pid = scope.procs[-1].pid
            st.save()
            say(f"etcd {tb.endpoint} in {tb.etcd_ns}")
            tb.put_config(conf)  # on etcdctl's stdin: never an ipsec PSK in argv
            say(f"net-conf.json: {shown}")
        lab = Lab(st, scope, tb, say)
        made = [lab._new_node() for _ in range(opts.nodes)]
        for ns, node in made:
            lab._start_agent(ns, node)
        say(f"started {len(made)} flanneld agents; waiting for their subnet.env")
        for _, node in made:
            lab._wait_ready(node)
        for ns, node in made:
            lab._add_pods(ns, node, opts.pods_per_node)
        if opts.backend == "alloc":
            say("alloc programs no data plane: pods on different nodes reach each other only if you route them")
        else:
            say("checking pod-to-pod connectivity")
            lab.wait_connected()
        st.status = "ready"
        st.save()
        return lab
    except BaseException as e:
        scope.procs.clear()  # down kills by namespace, which also finds what spawn() started
        down(state_dir, prefix)
        if isinstance(e, LabError):
            raise LabError(f"{e}\nlab not started; everything it made was removed") from None
        if isinstance(e, (NetnsError, CNIError, OSError, ApiError)):
            raise LabError(f"{e}\nlab not started; everything it made was removed") from None
        raise


# The extension backend's example: host-gw style routes made by `ip route`. The shell is the command's own
# choice (flanneld runs none): lease values reach it only as the variables $SUBNET and $PUBLIC_IP.
EXTENSION_EXAMPLE = {
    "SubnetAddCommand": """sh -c 'ip route replace "$SUBNET" via "$PUBLIC_IP" dev eth0'""",
    "SubnetRemoveCommand": """sh -c 'ip route del "$SUBNET" via "$PUBLIC_IP" dev eth0'""",
}


def backend_conf(backend: str, psk: str | None = None, udp_encap: bool = False) -> dict[str, Any]:
    """net-conf.json's Backend for `up --backend`."""
    conf: dict[str, Any] = {"Type": backend}
    if backend == "extension":
        conf.update(EXTENSION_EXAMPLE)
    if backend == "ipsec" and psk is not None:
        conf["PSK"] = psk
    if backend == "ipsec" and udp_encap:
        conf["UDPEncap"] = True
    return conf


def net_conf(opts: LabOptions, psk: str | None = None) -> dict[str, Any]:
    """net-conf.json for the lab's options: Network, and with IPv6 EnableIPv6 + IPv6Network (IPv6 only:
    EnableIPv4 false and no Network)."""
    conf: dict[str, Any] = {}
    if 4 in opts.families:
        conf["Network"] = opts.network
    else:
        conf["EnableIPv4"] = False
    if 6 in opts.families:
        conf["EnableIPv6"] = True
        conf["IPv6Network"] = opts.ipv6_network
    conf["Backend"] = backend_conf(opts.backend, psk, opts.ipsec_udp_encap)
    if opts.nftables:
        conf["EnableNFTables"] = True
    return conf


PSK_FILE = "ipsec.psk"
PSK_SHOWN = "(hidden: ipsec.psk in the state dir, mode 0600)"


def ipsec_psk(state_dir: Path) -> str:
    """A fresh pre-shared key for the ipsec backend (upstream wants >= 96 characters: 128 hex digits), kept
    only in a 0600 file of the run directory (and in the net-conf the agents read); never printed."""
    psk = secrets.token_hex(64)
    fd = os.open(state_dir / PSK_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(psk + "\n")
    return psk


# Backends that need a kernel module this lab cannot assume (a stripped kernel may lack it).
BACKEND_MODULES = {"ipip": "ipip"}


def check_kernel_module(backend: str, prefix: str = "") -> None:
    """Fail at once, in one line, when the backend needs a module the running kernel cannot load."""
    if backend == "ipsec":
        check_esp(prefix)
        return
    module = BACKEND_MODULES.get(backend)
    if module is None or Path(f"/sys/module/{module}").exists():
        return
    r = subprocess.run(["modprobe", module], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["failed"])[-1]
        raise LabError(
            f"the {backend} backend needs the kernel's {module} module, which this kernel ({os.uname().release}) "
            f"cannot load ({why}); use --backend vxlan or host-gw, or a kernel with {module} (Debian's stock kernel)"
        )


# An ESP state in a throwaway namespace: adding it makes the kernel load esp4 on demand (xfrm-type-2-50), so it
# succeeds exactly when the agents' could (without esp4: "Requested type not found"). AES-CBC and HMAC-SHA256, the
# ciphers every kernel with xfrm has, so a refusal names ESP and not a cipher. Zero keys; the namespace goes at once.
_ESP_PROBE = ["xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp", "spi", "0x100",
              "mode", "tunnel", "enc", "cbc(aes)", "0x" + "00" * 16,
              "auth", "hmac(sha256)", "0x" + "00" * 32]  # fmt: skip


def check_esp(prefix: str) -> None:
    """The ipsec backend needs ESP (esp4) in the kernel: probe it in a namespace of the lab's own, never in the
    machine's, and refuse in one line without it."""
    check_prefix(prefix)  # the probe namespace must carry the lab's prefix, or `down` would never sweep it
    ns = f"{prefix}espprobe"
    try:
        netns.run(["ip", "netns", "add", ns])
    except NetnsError as e:
        raise LabError(f"cannot make a namespace to probe for ESP: {e}") from None
    try:
        r = subprocess.run(["ip", "-n", ns, *_ESP_PROBE], capture_output=True, text=True, timeout=20, check=False)
    finally:
        netns.delete_ns(ns)
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["failed"])[-1].removeprefix("Error: ").rstrip(".")
        raise LabError(
            f"the ipsec backend needs the kernel's esp4 module (ESP), which this kernel ({os.uname().release}) lacks "
            f"(an ESP xfrm state: {why}); use --backend wireguard for encryption, or a kernel with esp4 (Debian's "
            "stock kernel)"
        )


def _validate(opts: LabOptions) -> None:
    if not 1 <= opts.nodes <= 50:
        raise LabError("--nodes must be between 1 and 50")
    if not 0 <= opts.pods_per_node <= 20:
        raise LabError("--pods-per-node must be between 0 and 20")
    if opts.ip_family not in IP_FAMILIES:
        raise LabError(f"--ip-family must be ipv4, dual or ipv6, not {opts.ip_family!r}")
    try:
        net = ipaddress.IPv4Network(opts.network)
    except ValueError as e:
        raise LabError(f"--network: {e}") from None
    if net.prefixlen > 22:
        raise LabError("--network must be /22 or larger (each node leases a /24)")
    if 6 in opts.families:
        try:
            net6 = ipaddress.IPv6Network(opts.ipv6_network)
        except ValueError as e:
            raise LabError(f"--ipv6-network: {e}") from None
        if net6.prefixlen > 62:
            raise LabError("--ipv6-network must be /62 or larger (each node leases a /64)")
        if opts.backend not in IPV6_BACKENDS:
            raise LabError(
                f"--ip-family {opts.ip_family}: the {opts.backend} backend carries IPv4 only; "
                f"use {', '.join(IPV6_BACKENDS)}"
            )
    if opts.store not in ("etcd", "kube"):
        raise LabError(f"--store must be etcd or kube, not {opts.store!r}")
    if opts.ipsec_udp_encap and opts.backend != "ipsec":
        raise LabError(f"--ipsec-udp-encap is an option of --backend ipsec, not of {opts.backend}")


def _orphans(state_dir: Path) -> list[int]:
    """Our agents or etcd whose namespace is gone (so a namespace sweep cannot find them)."""
    needle = str(state_dir).rstrip("/") + "/"
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        # Only etcd and agents: a `tail -f` on a log in the state dir is the user's, not ours.
        ours = Path(argv[0]).name == "etcd" or "pyflannel.cli" in argv or "pyflannel.lab.fakekube" in argv
        if ours and any(needle in a for a in argv):
            pids.append(int(d.name))
    return pids


def down(state_dir: Path, prefix: str, grace: float = 5.0) -> list[str]:
    """Remove the lab: processes, namespaces (found by prefix, so also without state) and the run directory."""
    check_prefix(prefix)
    namespaces = lab_namespaces(prefix)
    pids = {p for ns in namespaces for p in netns.ns_pids(ns)} | set(_orphans(state_dir))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        _reap_children()
        pids = {p for p in pids if alive(p)}
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for ns in namespaces:
        netns.delete_ns(ns)
    # Only a directory the lab made is removed: --state-dir may point somewhere with other files.
    if (state_dir / MARKER).exists():
        shutil.rmtree(state_dir, ignore_errors=True)
    return namespaces


def _reap_children() -> None:
    # When up fails, the agents are our children: reap them, or they linger as zombies that look alive.
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
