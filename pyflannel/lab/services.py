"""`flannel-lab service add|list|del`: Services as the API server allocates them and kube-proxy programs them.

ClusterIPs come from the service CIDR (default 10.96.0.0/12; .1 and .10 are left to the `kubernetes` and
`kube-dns` Services of a real cluster), NodePorts from 30000-32767. Every node gets kube-proxy's rules
(kubeproxy.py) in one iptables-restore transaction, and in ipvs mode its virtual servers. Each backend pod runs
a small HTTP server that answers with its name and the client address it sees. Input is checked whole before
anything is made; a node that refuses its rules gets the previous ones back on every node, so a failed `add`
or `del` leaves the lab as it was.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import kubeproxy
from .lab import Lab, alive, pid_in_ns
from .netns import NetnsError, ns_exec, run, wait_for
from .state import LabError, LabState, NodeState, ServiceState

NAMESPACE = "default"
NODE_PORT_RANGE = (30000, 32767)
RESERVED_HOSTS = (1, 10)  # kubernetes, kube-dns
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
SERVER_LIFETIME = 24 * 3600  # a backend's HTTP server ends by itself after this, whatever happens to the lab

# A backend: answers every GET with the pod's name and the client address it sees (masqueraded or not).
_SERVER = """
import http.server, sys, threading
name, port, life = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
class H(http.server.BaseHTTPRequestHandler):
    timeout = 10
    def do_GET(self):
        body = f"{name} (client {self.client_address[0]})\\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("0.0.0.0", port), H)
srv.daemon_threads = True
threading.Timer(life, srv.shutdown).start()
print("serving", flush=True)
srv.serve_forever()
"""


def _bad(field: str, value: object, why: str) -> LabError:
    return LabError(f"Service is invalid: {field}: Invalid value: {value!r}: {why}")


def _parse_to(st: LabState, to: str, port: int) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for i, item in enumerate(x.strip() for x in to.split(",")):
        name, _, p = item.partition(":")
        try:
            target = int(p) if p else port
        except ValueError:
            raise _bad(f"--to[{i}]", item, "the target port must be a number") from None
        if not 1 <= target <= 65535:
            raise _bad(f"--to[{i}]", item, "the target port must be between 1 and 65535, inclusive")
        st.pod(name)  # an unknown pod: LabError naming the known ones
        if (name, target) in out:
            raise _bad(f"--to[{i}]", item, "duplicate endpoint")
        out.append((name, target))
    return out


def _allocate_ip(st: LabState) -> str:
    net = ipaddress.IPv4Network(st.options.service_cidr)
    taken = {s.cluster_ip for s in st.services}
    for host in range(RESERVED_HOSTS[-1] + 1, min(net.num_addresses - 1, 1 << 16)):
        ip = str(net.network_address + host)
        if ip not in taken:
            return ip
    raise LabError(f"Internal error: failed to allocate a serviceIP: range {net} is full")


def validate(
    st: LabState, name: str, port: int, to: str, node_port: int | None, mode: str
) -> tuple[ServiceState, list[str]]:
    """The Service `add` would make, and its backend pods; LabError (one line) for bad input, nothing made."""
    if len(name) > 63 or not _DNS1035.fullmatch(name):
        raise _bad(
            "metadata.name",
            name,
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
            "alphabetic character, and end with an alphanumeric character (regex used for validation is "
            "'[a-z]([-a-z0-9]*[a-z0-9])?')",
        )
    if any(s.name == name for s in st.services):
        raise LabError(f'services "{name}" already exists')
    if not 1 <= port <= 65535:
        raise _bad("spec.ports[0].port", port, "must be between 1 and 65535, inclusive")
    if node_port is not None:
        lo, hi = NODE_PORT_RANGE
        if not lo <= node_port <= hi:
            raise _bad(
                "spec.ports[0].nodePort",
                node_port,
                f"provided port is not in the valid range. The range of valid ports is {lo}-{hi}",
            )
        if any(s.node_port == node_port for s in st.services):
            raise _bad("spec.ports[0].nodePort", node_port, "provided port is already allocated")
    if mode not in ("iptables", "ipvs"):
        raise LabError(f"--mode must be iptables or ipvs, not {mode!r}")
    other = next((s for s in st.services if s.mode != mode), None)
    if other is not None:
        raise LabError(
            f"the lab's kube-proxy runs in {other.mode} mode (service {other.name}): one mode per cluster, as "
            "kube-proxy's --proxy-mode; `service del` those first"
        )
    if mode == "ipvs":
        check_ipvs(st)
    if not to.strip():
        raise _bad("--to", to, "at least one backend pod is needed (POD[:PORT][,POD...])")
    backends = _parse_to(st, to, port)
    svc = ServiceState(
        name=name,
        namespace=NAMESPACE,
        cluster_ip=_allocate_ip(st),
        port=port,
        protocol="tcp",
        endpoints=[f"{st.pod(p).ip}:{t}" for p, t in backends],
        backends=[f"{p}:{t}" for p, t in backends],
        node_port=node_port,
        mode=mode,
    )
    return svc, svc.backends


def has_ipvs(ns: str) -> bool:
    """IPVS is there for namespace `ns` (its /proc/net/ip_vs): the module is loaded, or built in."""
    try:
        ns_exec(ns, ["test", "-e", "/proc/net/ip_vs"], timeout=10)
    except NetnsError:
        return False
    return True


def check_ipvs(st: LabState) -> None:
    """One line when this kernel has no IPVS. The lab loads no module (nor lets ipvsadm, which would try):
    `modprobe ip_vs` first where the kernel has it."""
    if st.nodes and has_ipvs(st.nodes[0].netns):
        return
    raise LabError(
        f"--mode ipvs needs the kernel's ip_vs module, which this kernel ({os.uname().release}) has not loaded "
        "(the lab loads none: `modprobe ip_vs` where the kernel has it, e.g. Debian's stock kernel); "
        "use --mode iptables"
    )


# ---- programming the nodes ----------------------------------------------------------------------------


def _ports(services: Sequence[ServiceState]) -> list[kubeproxy.ServicePort]:
    return [
        kubeproxy.ServicePort(
            namespace=s.namespace,
            name=s.name,
            port_name=s.port_name,
            protocol=s.protocol,
            cluster_ip=s.cluster_ip,
            port=s.port,
            endpoints=tuple(s.endpoints),
            node_port=s.node_port,
        )
        for s in services
    ]


def program_node(st: LabState, node: NodeState, services: Sequence[ServiceState]) -> None:
    """Take node's kube-proxy state to `services` (none: remove every KUBE-* chain, IPVS service, ClusterIP)."""
    ports = _ports(services)
    mode = services[0].mode if services else "iptables"
    ns = node.netns
    if mode == "ipvs":
        want = kubeproxy.ipvs_iptables_rules(ports, st.options.network)
    else:
        want = kubeproxy.iptables_rules(ports, st.options.network)
    text = kubeproxy.restore_input(want if services else None, ns_exec(ns, ["iptables-save", "-t", "nat"]) +
                                   ns_exec(ns, ["iptables-save", "-t", "filter"]))  # fmt: skip
    if text:
        ns_exec(ns, ["iptables-restore", "--noflush", "-w", "5"], input=text)
    _program_ipvs(st, node, ports if mode == "ipvs" else [])


def _program_ipvs(st: LabState, node: NodeState, ports: Sequence[kubeproxy.ServicePort]) -> None:
    ns = node.netns
    have = {
        a.split("/")[0]
        for a in run(["ip", "-n", ns, "-o", "-4", "addr", "show", "dev", "lo"], check=False).split()
        if "/32" in a and ipaddress.IPv4Address(a.split("/")[0]) in ipaddress.IPv4Network(st.options.service_cidr)
    }
    want = {p.cluster_ip for p in ports}
    # ipvsadm is run only where IPVS exists: it would try to load the module itself.
    if ports or (have and has_ipvs(ns)):
        if ports:
            ns_exec(ns, ["sysctl", "-qw", "net.ipv4.vs.conntrack=1"])  # IPVS connections seen by iptables' NAT
        ns_exec(ns, ["ipvsadm", "-R"], input=kubeproxy.ipvsadm_input(ports, node.ip))
    for ip in sorted(want - have):
        run(["ip", "-n", ns, "addr", "add", f"{ip}/32", "dev", "lo"])
    for ip in sorted(have - want):
        run(["ip", "-n", ns, "addr", "del", f"{ip}/32", "dev", "lo"], check=False)


def sync(lab: Lab, services: Sequence[ServiceState], previous: Sequence[ServiceState]) -> None:
    """Every node to `services`; when one node fails, every node back to `previous`, and LabError."""
    done: list[NodeState] = []
    try:
        for node in lab.st.nodes:
            done.append(node)
            program_node(lab.st, node, services)
    except NetnsError as e:
        for node in done:
            with contextlib.suppress(NetnsError):
                program_node(lab.st, node, previous)
        why = str(e).strip().splitlines()[-1] if str(e).strip() else "failed"
        raise LabError(f"kube-proxy's rules were refused on node {done[-1].name} ({why}); nothing changed") from None


# ---- backends -----------------------------------------------------------------------------------------


def _start_backend(lab: Lab, key: str) -> None:
    pid = lab.st.backend_pids.get(key)
    pod_name, port = key.rsplit(":", 1)
    pod = lab.st.pod(pod_name)
    if pid is not None and pid_in_ns(pid, pod.netns):
        return
    log = Path(lab.st.state_dir) / "services" / f"{pod_name}-{port}.log"
    log.parent.mkdir(exist_ok=True)
    p = lab.scope.spawn(pod.netns, [sys.executable, "-c", _SERVER, pod_name, port, str(SERVER_LIFETIME)], log=log)
    lab.st.backend_pids[key] = p.pid
    lab.st.save()

    def listening() -> bool:
        out = run(["ip", "netns", "exec", pod.netns, "ss", "-Htln", f"sport = :{port}"], check=False, timeout=10)
        return bool(out.strip()) or p.poll() is not None

    if not wait_for(listening, timeout=15, step=0.05) or p.poll() is not None:
        raise LabError(f"the HTTP server of pod {pod_name} on port {port} did not start: {log.read_text()[-300:]}")


def _stop_unused_backends(st: LabState) -> None:
    used = {b for s in st.services for b in s.backends}
    for key in [k for k in st.backend_pids if k not in used]:
        pid = st.backend_pids.pop(key)
        pod = next((p for p in st.pods if p.name == key.rsplit(":", 1)[0]), None)
        if pod is not None and pid_in_ns(pid, pod.netns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    st.save()


# ---- the commands -------------------------------------------------------------------------------------


def add(lab: Lab, name: str, port: int, to: str, node_port: int | None = None, mode: str = "iptables") -> ServiceState:
    st = lab.st
    if 4 not in st.options.families:
        # kube-proxy's rules here are iptables' (IPv4) and the ClusterIPs come from an IPv4 service CIDR.
        raise LabError("Services in the lab are IPv4 (ClusterIP, iptables/IPVS): not in an --ip-family ipv6 lab")
    svc, backends = validate(st, name, port, to, node_port, mode)
    previous = list(st.services)
    try:
        for key in backends:
            _start_backend(lab, key)
        sync(lab, [*previous, svc], previous)
    except BaseException:
        _stop_unused_backends(st)
        raise
    st.services.append(svc)
    st.save()
    return svc


def delete(lab: Lab, name: str) -> None:
    st = lab.st
    svc = st.service(name)
    previous = list(st.services)
    sync(lab, [s for s in previous if s is not svc], previous)
    st.services.remove(svc)
    _stop_unused_backends(st)


def resync(lab: Lab) -> None:
    """After add-node or remove-node: endpoints of pods that are gone dropped (as their EndpointSlice would
    drop them), every node (a new one too) programmed."""
    st = lab.st
    pods = {p.name for p in st.pods}
    for s in st.services:
        keep = [i for i, b in enumerate(s.backends) if b.rsplit(":", 1)[0] in pods]
        s.backends = [s.backends[i] for i in keep]
        s.endpoints = [s.endpoints[i] for i in keep]
    st.save()
    _stop_unused_backends(st)
    if st.services:
        sync(lab, st.services, st.services)


def listing(st: LabState) -> str:
    """`kubectl get services -o wide` with the endpoints."""
    rows = [["NAME", "TYPE", "CLUSTER-IP", "PORT(S)", "MODE", "ENDPOINTS", "BACKENDS"]]
    for s in st.services:
        ports = f"{s.port}:{s.node_port}/TCP" if s.node_port is not None else f"{s.port}/TCP"
        kind = "NodePort" if s.node_port is not None else "ClusterIP"
        rows.append([s.name, kind, s.cluster_ip, ports, s.mode, ",".join(s.endpoints), ",".join(s.backends)])
    if len(rows) == 1:
        return "No resources found in default namespace.\n"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in rows)


def resolve(st: LabState, target: str) -> tuple[ServiceState, int] | None:
    """`SERVICE:PORT` or `CLUSTER-IP:PORT` of a lab Service, else None (then it names a pod)."""
    name, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    for s in st.services:
        if name in (s.name, s.cluster_ip):
            if int(port) != s.port:
                raise LabError(f"service {s.name} has port {s.port}, not {port}")
            return s, s.port
    if any(p.name == name for p in st.pods):
        return None
    raise LabError(f"no service {name!r}; services: {', '.join(s.name for s in st.services) or '(none)'}")
