"""deploy/kube-flannel.yml against the Kubernetes schemas (offline, kubernetes-validate ships them), what it
must hold to work with flanneld, and the init containers' install step run against a temporary root."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pyflannel.cli import parse_args
from pyflannel.config import parse_net_config
from pyflannel.daemon import agent_config_from_options

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "deploy" / "kube-flannel.yml"
INSTALL = REPO / "scripts" / "install-cni.sh"
DOCKERFILE = REPO / "Dockerfile"
IMAGE_INSTALL = "/usr/local/bin/install-cni.sh"
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs() if d["kind"] == kind]
    return doc


def daemonset_pod() -> dict[str, Any]:
    spec: dict[str, Any] = by_kind("DaemonSet")["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifest_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    kinds = []
    for d in docs():
        # strict: unknown fields (a typo in a key) are errors too.
        kubernetes_validate.validate(d, version, strict=True)
        kinds.append(d["kind"])
    assert kinds == ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]


def test_schema_validation_catches_a_broken_manifest() -> None:
    ds = by_kind("DaemonSet")
    ds["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSIONS[-1], strict=True)


def test_rbac_is_exactly_what_flanneld_needs() -> None:
    rules = {
        (tuple(r["apiGroups"]), tuple(r["resources"]), tuple(sorted(r["verbs"])))
        for r in by_kind("ClusterRole")["rules"]
    }
    assert rules == {
        (("",), ("pods",), ("get",)),
        (("",), ("nodes",), ("get", "list", "watch")),
        (("",), ("nodes/status",), ("patch",)),
    }
    binding = by_kind("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == by_kind("ClusterRole")["metadata"]["name"]
    sa = by_kind("ServiceAccount")["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    assert daemonset_pod()["serviceAccountName"] == sa["name"]
    assert sa["namespace"] == by_kind("Namespace")["metadata"]["name"] == "kube-flannel"


def test_configmap_holds_upstream_conflist_and_a_valid_net_conf() -> None:
    data = by_kind("ConfigMap")["data"]
    assert json.loads(data["cni-conf.json"]) == {
        "name": "cbr0",
        "cniVersion": "0.3.1",
        "plugins": [
            {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    net = parse_net_config(data["net-conf.json"])
    assert str(net.network) == "10.244.0.0/16"
    assert net.backend.type == "vxlan"


def test_daemonset_runs_flanneld_in_kube_mode_with_health_probes() -> None:
    pod = daemonset_pod()
    assert pod["hostNetwork"] is True
    (c,) = pod["containers"]
    opts = parse_args(c["args"], {})
    assert opts["kube-subnet-mgr"] and opts["ip-masq"]
    # The CNI fast path: the socket on (its default, /run/flannel/cni.sock, on the host through the "run"
    # volume), the runtime's pid visible, and what entering its view of the files takes (pyflannel/cniserver.py).
    sock = agent_config_from_options(opts).cni_socket
    assert sock == "/run/flannel/cni.sock" and pod["hostPID"] is True
    sec = c["securityContext"]
    assert sec["privileged"] is False
    assert set(sec["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_CHROOT", "SYS_PTRACE"}
    assert sec["appArmorProfile"] == {"type": "Unconfined"}
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "valueFrom" in e}
    assert env == {"NODE_NAME": "spec.nodeName", "POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
    assert (live["path"], ready["path"]) == ("/healthz", "/readyz")
    assert live["port"] == ready["port"] == opts["healthz-port"] != 0
    assert live["host"] == ready["host"] == opts["healthz-ip"]
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in c["volumeMounts"]}
    # net-conf.json where --net-config-path expects it, subnet.env where the CNI plugin reads it on the host.
    assert mounts["/etc/kube-flannel"] == "flannel-cfg"
    assert Path(opts["net-config-path"]).parent == Path("/etc/kube-flannel")
    assert mounts["/run/flannel"] == "run" and Path(opts["subnet-file"]).parent == Path("/run/flannel")
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["run"]["hostPath"]["path"] == "/run/flannel"
    assert vols["cni-plugin"]["hostPath"]["path"] == "/opt/cni/bin"
    assert vols["cni"]["hostPath"]["path"] == "/etc/cni/net.d"


def test_dockerfile_provides_what_the_manifest_runs() -> None:
    text = DOCKERFILE.read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    for pkg in ("iptables", "nftables", "iproute2"):
        assert pkg in text
    assert "scripts/build-cni.sh" in text
    assert f"COPY scripts/install-cni.sh {IMAGE_INSTALL}" in text
    # The plugin directory lands where install-cni.sh takes it from.
    assert "/opt/flannel/cni/flannel.dist" in text and "/opt/flannel/cni/flannel.dist" in INSTALL.read_text()
    pod = daemonset_pod()
    for c in pod["initContainers"]:
        assert c["command"][0] == IMAGE_INSTALL
    assert pod["containers"][0]["command"] == ["/usr/local/bin/flanneld"]


def fake_plugin_dist(root: Path, version: str) -> Path:
    """A stand-in for scripts/build-cni.sh's output: an executable plus a library beside it."""
    dist = root / "opt/flannel/cni/flannel.dist"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "libpython-stub.so").write_text(version)
    exe = dist / "flannel"
    exe.write_text('#!/bin/sh\ncat "$(dirname "$(readlink -f "$0")")/libpython-stub.so"\n')
    exe.chmod(0o755)
    return dist


def run_init_containers(root: Path) -> list[str]:
    """Run each init container's command as the manifest gives it, with the host and ConfigMap mounts
    mapped under `root` (the script's CNI_ROOT)."""
    outs = []
    for c in daemonset_pod()["initContainers"]:
        cmd = [*c["command"], *c.get("args", [])]
        assert cmd[0] == IMAGE_INSTALL
        cmd[0] = str(INSTALL)
        p = subprocess.run(
            ["/bin/sh", *cmd], env={"PATH": os.environ["PATH"], "CNI_ROOT": str(root)}, capture_output=True, text=True
        )
        assert p.returncode == 0, f"{shlex.join(cmd)}: {p.stderr}"
        outs.append(p.stdout)
    return outs


def test_init_containers_install_plugin_and_conflist(tmp_path: Path) -> None:
    root = tmp_path / "root"
    conf = root / "etc/kube-flannel/cni-conf.json"  # the ConfigMap mount
    conf.parent.mkdir(parents=True)
    conf.write_text(by_kind("ConfigMap")["data"]["cni-conf.json"])
    fake_plugin_dist(root, "v1")
    run_init_containers(root)
    plugin = root / "opt/cni/bin/flannel"
    assert plugin.is_symlink() and not os.readlink(plugin).startswith("/")  # valid on the host too
    assert subprocess.run([str(plugin)], capture_output=True, text=True).stdout == "v1"
    conflist = root / "etc/cni/net.d/10-flannel.conflist"
    assert json.loads(conflist.read_text())["plugins"][0]["type"] == "flannel"
    assert stat.S_IMODE(conflist.stat().st_mode) == 0o644
    digest = hashlib.sha256(conflist.read_bytes()).hexdigest()

    # A restart with the same image changes nothing; a new image replaces the plugin and drops the old copy.
    before = sorted(p.name for p in (root / "opt/cni/bin").iterdir())
    run_init_containers(root)
    assert sorted(p.name for p in (root / "opt/cni/bin").iterdir()) == before
    fake_plugin_dist(root, "v2")
    run_init_containers(root)
    assert subprocess.run([str(plugin)], capture_output=True, text=True).stdout == "v2"
    dists = [p.name for p in (root / "opt/cni/bin").iterdir() if p.name.startswith(".flannel-")]
    assert len(dists) == 1 and dists != [n for n in before if n.startswith(".flannel-")]
    assert hashlib.sha256(conflist.read_bytes()).hexdigest() == digest
    assert not [p for p in (root / "etc/cni/net.d").iterdir() if p.name.startswith(".")]


def test_install_fails_clearly_without_a_plugin(tmp_path: Path) -> None:
    p = subprocess.run(
        ["/bin/sh", str(INSTALL), "plugin"], env={"PATH": os.environ["PATH"], "CNI_ROOT": str(tmp_path)},
        capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode != 0 and "no executable" in p.stderr
    assert not (tmp_path / "opt/cni/bin/flannel").exists()
