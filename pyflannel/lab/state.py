"""The lab's run directory: state.json (what `up` made) and the per-node directories.

The state is written after every resource is made, so `down` after a crash of `up` (or of the machine's
shell) still knows what to remove; and `down` also sweeps by the namespace prefix when the file is lost.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path("/run/pyflannel-lab")
DEFAULT_PREFIX = "pfll-"
MARKER = ".pyflannel-lab"
STATE_FILE = "state.json"


class LabError(RuntimeError):
    """A failure with a message meant for the user (no traceback)."""


@dataclass
class NodeState:
    name: str
    netns: str
    ip: str
    dir: str
    pid: int | None = None
    args: list[str] = field(default_factory=list)
    ip6: str = ""  # the node's IPv6 underlay address (--ip-family dual or ipv6)


@dataclass
class PodState:
    name: str
    node: str
    netns: str
    ip: str  # its IPv4 address; with --ip-family ipv6 its only address, the IPv6 one
    container_id: str
    ip6: str = ""  # its IPv6 address (--ip-family dual or ipv6)

    def addr(self, family: int) -> str:
        """The pod's address of IP version `family` ("" when it has none)."""
        if family == 6:
            return self.ip6
        return self.ip if ":" not in self.ip else ""


@dataclass
class ServiceState:
    """A Service as `service add` made it: kube-proxy's view of it (ClusterIP, ports, endpoints)."""

    name: str
    namespace: str
    cluster_ip: str
    port: int
    protocol: str
    endpoints: list[str]  # "ip:port", in the order of --to
    backends: list[str]  # the pods behind them
    node_port: int | None = None
    mode: str = "iptables"
    port_name: str = "http"


@dataclass
class LabOptions:
    nodes: int = 3
    backend: str = "vxlan"
    pods_per_node: int = 2
    ip_masq: bool = False
    network: str = "10.244.0.0/16"
    underlay: str = "192.168.77.0/24"
    nftables: bool = False
    store: str = "etcd"  # or "kube": flanneld --kube-subnet-mgr against the lab's API server
    service_cidr: str = "10.96.0.0/12"
    ip_family: str = "ipv4"  # "dual" (EnableIPv6 too) or "ipv6" (EnableIPv4 false)
    ipv6_network: str = "fd42:244::/56"  # IPv6Network with IPv6 on: a ULA /56, a /64 per node
    ipsec_udp_encap: bool = False  # the ipsec backend's UDPEncap: ESP in UDP 4500

    @property
    def families(self) -> tuple[int, ...]:
        """The IP versions the pod network carries."""
        return {"dual": (4, 6), "ipv6": (6,)}.get(self.ip_family, (4,))


@dataclass
class LabState:
    prefix: str
    state_dir: str
    options: LabOptions
    status: str = "starting"
    ul_ns: str = ""
    etcd_ns: str = ""
    etcd_ip: str = ""
    endpoint: str = ""
    etcd_prefix: str = "/coreos.com/network"
    etcd_pid: int | None = None
    next_host: int = 11
    kube_ns: str = ""
    kube_url: str = ""
    kube_pid: int | None = None
    kube_last_cidr: int = -1  # the controller manager's range allocator: index of the last /24 given
    nodes: list[NodeState] = field(default_factory=list)
    pods: list[PodState] = field(default_factory=list)
    services: list[ServiceState] = field(default_factory=list)
    backend_pids: dict[str, int] = field(default_factory=dict)  # "pod:port" -> the HTTP server answering there

    def node(self, name: str) -> NodeState:
        for n in self.nodes:
            if n.name == name:
                return n
        raise LabError(f"no node {name!r}; nodes: {', '.join(n.name for n in self.nodes) or '(none)'}")

    def pod(self, name: str) -> PodState:
        for p in self.pods:
            if p.name == name:
                return p
        raise LabError(f"no pod {name!r}; pods: {', '.join(p.name for p in self.pods) or '(none)'}")

    def service(self, name: str) -> ServiceState:
        for s in self.services:
            if s.name == name:
                return s
        raise LabError(f"no service {name!r}; services: {', '.join(s.name for s in self.services) or '(none)'}")

    @property
    def kube_sock(self) -> str:
        """The API server's unix socket: the lab's own way in, from the root namespace."""
        return str(Path(self.state_dir) / "kube" / "kube.sock")

    def pods_of(self, node: str) -> list[PodState]:
        return [p for p in self.pods if p.node == node]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LabState:
        d = dict(d)
        d["options"] = LabOptions(**d["options"])
        d["nodes"] = [NodeState(**n) for n in d.get("nodes", [])]
        d["pods"] = [PodState(**p) for p in d.get("pods", [])]
        d["services"] = [ServiceState(**s) for s in d.get("services", [])]
        return cls(**d)

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)


def load_state(state_dir: Path) -> LabState | None:
    try:
        return LabState.from_json(json.loads((state_dir / STATE_FILE).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as e:
        raise LabError(f"{state_dir / STATE_FILE} is unreadable ({e}); `flannel-lab down` removes the lab") from None


def require_state(state_dir: Path) -> LabState:
    st = load_state(state_dir)
    if st is None:
        raise LabError(f"no lab is up (no {state_dir / STATE_FILE}); start one with `flannel-lab up`")
    return st
