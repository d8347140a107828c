"""The lab's Kubernetes: an API server for Nodes in its own namespace, and what the control plane and kubelet
would write into it, so flanneld runs as kube-flannel runs it (`--ip-masq --kube-subnet-mgr`, a kubeconfig).

    underlay: kapi ns eth0 192.168.77.2 (pyflannel.lab.fakekube over HTTPS :6443, a service account token)

- kubelet registers each Node (labels, addresses, nodeInfo, a Ready condition);
- kube-controller-manager (`--allocate-node-cidrs --cluster-cidr=<Network> --node-cidr-mask-size=24`) patches
  `spec.podCIDR(s)` in order, the next free /24 after the last one it gave (released ones come round again);
- the kube-flannel DaemonSet's pod on each node (POD_NAME/POD_NAMESPACE, from which flanneld finds its Node)
  reads the ConfigMap's net-conf.json and cni-conf.json, which the lab keeps in <state>/kube-flannel/.

`get nodes` prints the Node objects the way kubectl does. The lab itself talks to the server over its unix
socket (unauthenticated, from the root namespace); the agents go over the underlay with their kubeconfig.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..cni.driver import KUBE_FLANNEL_CONFLIST
from ..lease import make_subnet_key
from .fakekube import ApiError, KubeAdmin
from .netns import NetnsError, RunScope, url_host, wait_for
from .state import LabError, LabState, NodeState

NAMESPACE = "kube-flannel"  # where the kube-flannel manifest runs its DaemonSet
DAEMONSET = "kube-flannel-ds"
API_PORT = 6443
P = "flannel.alpha.coreos.com/"
KUBELET_VERSION = "v1.30.0"
NODE_CIDR_MASK = 24
NODE_CIDR_MASK_V6 = 64  # kube-controller-manager's --node-cidr-mask-size-ipv6 default


def kube_dir(st: LabState) -> Path:
    return Path(st.state_dir) / "kube"


def configmap_dir(st: LabState) -> Path:
    """The kube-flannel ConfigMap's keys as files, where the DaemonSet mounts them (/etc/kube-flannel)."""
    return Path(st.state_dir) / "kube-flannel"


def admin(st: LabState) -> KubeAdmin:
    return KubeAdmin(unix_path=st.kube_sock)


def _openssl(cwd: Path, *args: str) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise LabError(f"openssl {args[0]}: {p.stderr.strip().splitlines()[-1:] or p.returncode}")


def make_pki(d: Path, ip: str) -> None:
    """A throwaway cluster CA and the API server's certificate for `ip` (EC keys: fast to make)."""
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "30", "-subj", "/CN=lab-ca")
    _openssl(d, "req", *ec, "-keyout", "apiserver.key", "-out", "apiserver.csr", "-subj", "/CN=kube-apiserver")
    (d / "san.ext").write_text(f"subjectAltName=IP:{ip},DNS:kubernetes,DNS:kubernetes.default\n")
    _openssl(d, "x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "apiserver.crt", "-days", "30", "-extfile", "san.ext")  # fmt: skip


def start_api(scope: RunScope, ns: str, ip: str, st: LabState) -> int:
    """Start the API server in `ns` on `ip`:6443 (HTTPS, the service account token); return its pid once the
    lab's socket answers."""
    d = kube_dir(st)
    make_pki(d, ip)
    token = d / "token"
    if not token.exists():
        token.write_text(secrets.token_urlsafe(32))
        token.chmod(0o600)
    p = scope.spawn(
        ns,
        [sys.executable, "-m", "pyflannel.lab.fakekube", "--listen", f"{url_host(ip)}:{API_PORT}",
         "--unix", st.kube_sock, "--state", str(d / "objects.json"), "--tls-cert", str(d / "apiserver.crt"),
         "--tls-key", str(d / "apiserver.key"), "--token-file", str(token)],
        log=d / "apiserver.log",
    )  # fmt: skip

    def answers() -> bool:
        with contextlib.suppress(OSError, ApiError, ValueError):
            admin(st).request("GET", "/api/v1/nodes")
            return True
        return False

    if not wait_for(answers, timeout=30, step=0.1):
        tail = (d / "apiserver.log").read_text(errors="replace")[-1500:]
        raise NetnsError(f"the API server in {ns} did not answer in 30s:\n{tail}")
    return p.pid


def write_configmap(st: LabState, net_conf: dict[str, Any]) -> None:
    """net-conf.json and cni-conf.json as the kube-flannel ConfigMap carries them."""
    d = configmap_dir(st)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "net-conf.json"
    # 0600 from the start: an ipsec net-conf carries the PSK. The mode of open() applies only to a new file: one
    # left from an earlier run with a looser mode is tightened before anything is written to it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(net_conf, indent=2) + "\n")
    (d / "cni-conf.json").write_text(json.dumps(KUBE_FLANNEL_CONFLIST, indent=2) + "\n")


def write_kubeconfig(st: LabState, node: NodeState) -> Path:
    """The node's kubeconfig: the cluster's CA, the server on the underlay, the flannel service account's
    token (one token for every node, as every kube-flannel pod mounts the same service account)."""
    d = kube_dir(st)
    ca = base64.b64encode((d / "ca.crt").read_bytes()).decode()
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "lab", "cluster": {"server": st.kube_url, "certificate-authority-data": ca}}],
        "users": [{"name": "flannel", "user": {"tokenFile": str(d / "token")}}],
        "contexts": [{"name": "flannel@lab", "context": {"cluster": "lab", "user": "flannel", "namespace": NAMESPACE}}],
        "current-context": "flannel@lab",
    }
    path = Path(node.dir) / "kubeconfig"
    path.write_text(json.dumps(doc, indent=2) + "\n")  # JSON is YAML: the client reads either
    path.chmod(0o600)
    return path


def flannel_pod_name(node: str) -> str:
    """A DaemonSet pod's name: `<ds>-<5 chars>`, stable per node here so a restart finds the same pod."""
    alphabet = "bcdfghjklmnpqrstvwxz2456789"  # the API server's name generator's alphabet
    h = hashlib.sha256(node.encode()).digest()
    return f"{DAEMONSET}-" + "".join(alphabet[b % len(alphabet)] for b in h[:5])


def register_node(st: LabState, node: NodeState) -> None:
    """What kubelet writes when it registers its Node, and the DaemonSet's pod bound to it."""
    kube = admin(st)
    u = os.uname()
    body = {
        "metadata": {
            "name": node.name,
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": node.name,
                "kubernetes.io/os": "linux",
            },
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        },
        "spec": {},
        "status": {
            # kubelet lists an InternalIP of each family (--node-ip with two addresses on a dual-stack node).
            "addresses": [
                *({"type": "InternalIP", "address": a} for a in dict.fromkeys((node.ip, node.ip6)) if a),
                {"type": "Hostname", "address": node.name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": _now(),
                    "lastTransitionTime": _now(),
                }
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kernelVersion": u.release,
                "osImage": "pyflannel lab (network namespace)",
                "containerRuntimeVersion": "cni://pyflannel-lab",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": KUBELET_VERSION,
            },
        },
    }
    kube.request("POST", "/api/v1/nodes", body)
    pod = {
        "metadata": {"name": flannel_pod_name(node.name), "labels": {"app": "flannel", "tier": "node"}},
        "spec": {"nodeName": node.name, "hostNetwork": True, "serviceAccountName": "flannel", "containers": []},
    }
    with contextlib.suppress(ApiError):  # a node re-added under the same name finds its pod still there
        kube.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cluster_cidrs(st: LabState) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]]:
    """--cluster-cidr (one per IP family, IPv4 first as kube-controller-manager takes them) and each one's
    node mask."""
    out: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]] = []
    if 4 in st.options.families:
        out.append((ipaddress.IPv4Network(st.options.network), NODE_CIDR_MASK))
    if 6 in st.options.families:
        out.append((ipaddress.IPv6Network(st.options.ipv6_network), NODE_CIDR_MASK_V6))
    return out


def _nth(net: ipaddress.IPv4Network | ipaddress.IPv6Network, mask: int, i: int) -> str:
    """The i-th /mask of `net`, computed (an IPv6 cluster CIDR holds too many to list)."""
    return f"{net.network_address + (i << (net.max_prefixlen - mask))}/{mask}"


def allocate_pod_cidr(st: LabState, node: NodeState) -> str:
    """kube-controller-manager's range allocator: the next free /24 of the cluster CIDR after the last one
    given, wrapping round (dual-stack: the same index's /64 of the IPv6 cluster CIDR as the second podCIDR);
    patched into the Node's spec. Returns the podCIDRs, comma-separated."""
    kube = admin(st)
    cidrs = _cluster_cidrs(st)
    count = min(2 ** (mask - net.prefixlen) for net, mask in cidrs)
    taken: set[str] = set()
    for n in list_nodes(st):
        taken.update((n.get("spec") or {}).get("podCIDRs") or [])
    last = st.kube_last_cidr
    for k in range(count):
        i = (last + 1 + k) % count
        mine = [_nth(net, mask, i) for net, mask in cidrs]
        if not taken.intersection(mine):
            st.kube_last_cidr = i
            kube.set_pod_cidrs(node.name, mine)
            return ",".join(mine)
    raise LabError(f"the cluster CIDR {cidrs[0][0]} has no free /{cidrs[0][1]} left")


def agent_command(st: LabState, node: NodeState) -> tuple[list[str], dict[str, str]]:
    """flanneld as the kube-flannel DaemonSet runs it (and its environment)."""
    cmd = [
        sys.executable, "-m", "pyflannel.cli",
        "--kube-subnet-mgr",
        f"--kubeconfig-file={Path(node.dir) / 'kubeconfig'}",
        f"--net-config-path={configmap_dir(st) / 'net-conf.json'}",
        f"--subnet-file={Path(node.dir) / 'subnet.env'}",
        *node.args,
    ]  # fmt: skip
    env = {"POD_NAME": flannel_pod_name(node.name), "POD_NAMESPACE": NAMESPACE}
    return cmd, env


def list_nodes(st: LabState) -> list[dict[str, Any]]:
    try:
        out = admin(st).request("GET", "/api/v1/nodes")
    except (OSError, ApiError, ValueError):
        return []
    items = out.get("items") if isinstance(out, dict) else None
    return [i for i in items or [] if isinstance(i, dict)]


def delete_node(st: LabState, name: str) -> None:
    kube = admin(st)
    for path in (f"/api/v1/nodes/{name}", f"/api/v1/namespaces/{NAMESPACE}/pods/{flannel_pod_name(name)}"):
        with contextlib.suppress(ApiError):
            kube.request("DELETE", path)


def leases(st: LabState) -> dict[str, dict[str, Any]]:
    """The Nodes flannel annotated, in the etcd lease's shape (keyed as the lease key: `10.244.1.0-24`,
    dual-stack `10.244.1.0-24&fd42:244:0:1::-64`), for status and show."""
    out: dict[str, dict[str, Any]] = {}
    for n in list_nodes(st):
        ann = (n.get("metadata") or {}).get("annotations") or {}
        spec = n.get("spec") or {}
        cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
        if ann.get(P + "kube-subnet-manager") != "true" or not cidrs:
            continue
        try:
            nets = [ipaddress.ip_network(c) for c in cidrs]
        except ValueError:
            continue
        v4 = next((x for x in nets if isinstance(x, ipaddress.IPv4Network)), None)
        v6 = next((x for x in nets if isinstance(x, ipaddress.IPv6Network)), None)
        out[make_subnet_key(v4, v6)] = {
            "PublicIP": ann.get(P + "public-ip"),
            "PublicIPv6": ann.get(P + "public-ipv6"),
            "BackendType": ann.get(P + "backend-type"),
            "BackendData": _json(ann.get(P + "backend-data")),
            "BackendV6Data": _json(ann.get(P + "backend-v6-data")),
        }
    return out


def _json(text: str | None) -> Any:
    try:
        return json.loads(text or "null")
    except ValueError:
        return None


def flannel_annotations(st: LabState, name: str) -> str:
    """`kubectl get node NAME -o yaml | grep flannel.alpha`: the annotations flanneld wrote."""
    for n in list_nodes(st):
        if (n.get("metadata") or {}).get("name") == name:
            ann = (n["metadata"].get("annotations")) or {}
            lines = [f"    {k}: {_yaml_scalar(v)}" for k, v in sorted(ann.items()) if k.startswith(P)]
            spec = n.get("spec") or {}
            cidrs = [f"  - {c}" for c in spec.get("podCIDRs") or []]
            return "\n".join([*lines, f"  podCIDR: {spec.get('podCIDR')}", "  podCIDRs:", *cidrs])
    return f"(no Node {name})"


# ---- kubectl get ----------------------------------------------------------------------------------------


def _dumper() -> Any:
    import yaml

    class KubectlDumper(yaml.SafeDumper):  # type: ignore[misc]
        """Strings that would read back as something else ("true", "12", a timestamp) in double quotes, as
        Go's YAML encoder writes them; those holding a double quote keep PyYAML's single quotes, as Go's."""

    def str_repr(d: yaml.SafeDumper, v: str) -> Any:
        plain_tag = d.resolve(yaml.ScalarNode, v, (True, False))
        style = '"' if plain_tag != "tag:yaml.org,2002:str" and '"' not in v else None
        return d.represent_scalar("tag:yaml.org,2002:str", v, style=style)

    KubectlDumper.add_representer(str, str_repr)
    return KubectlDumper


def _yaml_scalar(v: str) -> str:
    import yaml

    return str(yaml.dump(v, Dumper=_dumper(), width=10**6)).strip().removesuffix("...").strip()


def to_yaml(obj: Any) -> str:
    """kubectl's YAML: keys sorted (it marshals through JSON), block style, long strings unbroken."""
    import yaml

    return str(yaml.dump(obj, Dumper=_dumper(), default_flow_style=False, sort_keys=True, width=10**6))


def age(created: str, now: float | None = None) -> str:
    """kubectl's AGE column (duration.HumanDuration)."""
    try:
        t = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return "<unknown>"
    s = int((now if now is not None else time.time()) - t)
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    return f"{h // 24}d"


def _status(n: dict[str, Any]) -> str:
    conds = {c.get("type"): c.get("status") for c in (n.get("status") or {}).get("conditions") or []}
    return "Ready" if conds.get("Ready") == "True" else "NotReady"


def _rows(nodes: list[dict[str, Any]], wide: bool) -> Iterator[list[str]]:
    head = ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    if wide:
        head += ["INTERNAL-IP", "EXTERNAL-IP", "OS-IMAGE", "KERNEL-VERSION", "CONTAINER-RUNTIME"]
    yield head
    for n in nodes:
        meta, status = n.get("metadata") or {}, n.get("status") or {}
        info = status.get("nodeInfo") or {}
        roles = sorted(k.split("/", 1)[1] for k in meta.get("labels") or {} if k.startswith("node-role.kubernetes.io/"))
        row = [
            str(meta.get("name")),
            _status(n),
            ",".join(roles) or "<none>",
            age(str(meta.get("creationTimestamp", ""))),
            str(info.get("kubeletVersion", "")),
        ]
        if wide:
            addr = {a.get("type"): a.get("address") for a in status.get("addresses") or []}
            row += [
                str(addr.get("InternalIP") or "<none>"),
                str(addr.get("ExternalIP") or "<none>"),
                str(info.get("osImage", "")),
                str(info.get("kernelVersion", "")),
                str(info.get("containerRuntimeVersion", "")),
            ]
        yield row


def get(st: LabState, kind: str, name: str | None, output: str | None) -> str:
    """`kubectl get nodes|node [NAME] [-o wide|yaml|json]`."""
    if st.options.store != "kube":
        raise LabError("this lab runs in etcd mode: there are no Node objects (`up --store kube` makes them)")
    if kind not in ("nodes", "node", "no"):
        raise LabError(f'the server doesn\'t have a resource type "{kind}" (the lab serves nodes)')
    nodes = sorted(list_nodes(st), key=lambda n: str((n.get("metadata") or {}).get("name")))
    if name is not None:
        nodes = [n for n in nodes if (n.get("metadata") or {}).get("name") == name]
        if not nodes:
            raise LabError(f'Error from server (NotFound): nodes "{name}" not found')
    if output in ("yaml", "json"):
        doc: Any = nodes[0] if name is not None else {
            "apiVersion": "v1", "items": nodes, "kind": "List", "metadata": {"resourceVersion": ""},
        }  # fmt: skip
        return to_yaml(doc) if output == "yaml" else json.dumps(doc, indent=4) + "\n"
    if output not in (None, "wide"):
        raise LabError(f"unable to match a printer suitable for the output format {output!r}: wide, yaml or json")
    rows = list(_rows(nodes, output == "wide"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in rows)
