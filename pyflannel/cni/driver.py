"""A small CNI runtime: what containerd/libcni does with a `.conflist`, for the tests, the lab and the bench.

ADD runs the plugins in order, each getting the previous plugin's result as `prevResult`; the final result
is cached (like libcni's `<cacheDir>/results/<net>-<container>-<ifname>`) so DEL and CHECK can hand it back.
DEL runs the plugins in reverse. Capabilities a plugin declares are filled from the runtime's capability
arguments into its `runtimeConfig`, as libcni does.

Plugins run as child processes; `exec_prefix` (e.g. `["ip", "netns", "exec", NODE]`) places them in a node
namespace, which is where plugins such as bridge and portmap make their links and rules.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyflannel.cni.conf import KUBE_FLANNEL_CONFLIST, CNIError

__all__ = [
    "KUBE_FLANNEL_CONFLIST",
    "CNIError",
    "Driver",
    "RuntimeConf",
    "kube_flannel_conflist",
    "load_conflist",
]


@dataclass
class RuntimeConf:
    """One attachment: container, its netns path, interface, CNI_ARGS and capability arguments."""

    container_id: str
    netns: str
    ifname: str = "eth0"
    args: Sequence[tuple[str, str]] = ()
    capability_args: Mapping[str, Any] = field(default_factory=dict)


def load_conflist(path: str | Path) -> dict[str, Any]:
    d: dict[str, Any] = json.loads(Path(path).read_text())
    if not isinstance(d, dict) or not isinstance(d.get("plugins"), list) or not d.get("name"):
        raise ValueError(f"{path}: not a CNI network configuration list")
    return d


def kube_flannel_conflist(
    *,
    name: str = "cbr0",
    cni_version: str = "0.3.1",
    subnet_file: str | None = None,
    data_dir: str | None = None,
    ipam_data_dir: str | None = None,
) -> dict[str, Any]:
    """kube-flannel's conflist, optionally pointed at other subnet.env and state directories."""
    conf: dict[str, Any] = json.loads(json.dumps(KUBE_FLANNEL_CONFLIST))
    conf["name"] = name
    conf["cniVersion"] = cni_version
    flannel = conf["plugins"][0]
    if subnet_file is not None:
        flannel["subnetFile"] = subnet_file
    if data_dir is not None:
        flannel["dataDir"] = data_dir
    if ipam_data_dir is not None:
        flannel["ipam"] = {"dataDir": ipam_data_dir}
    return conf


def _version_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        return (0,)


class Driver:
    """Execs CNI plugins found in `plugin_path` and caches ADD results under `cache_dir`."""

    def __init__(
        self,
        plugin_path: Sequence[str | Path],
        cache_dir: str | Path,
        *,
        exec_prefix: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.plugin_path = [str(p) for p in plugin_path]
        self.cache_dir = Path(cache_dir)
        self.exec_prefix = list(exec_prefix)
        self.env = dict(env) if env is not None else dict(os.environ)
        self.timeout = timeout

    # ---- one plugin ----------------------------------------------------------------------------------

    def find(self, plugin_type: str) -> str:
        for d in self.plugin_path:
            p = Path(d) / plugin_type
            if p.is_file():
                return str(p)
        raise CNIError(999, f'failed to find plugin "{plugin_type}" in path {self.plugin_path}')

    def exec_plugin(
        self, command: str, conf: Mapping[str, Any] | bytes, rt: RuntimeConf | None = None
    ) -> dict[str, Any] | None:
        """Run one plugin for `command`; return its parsed stdout (None if empty) or raise CNIError."""
        data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
        ptype = json.loads(data)["type"]
        env = dict(self.env)
        env.update({"CNI_COMMAND": command, "CNI_PATH": os.pathsep.join(self.plugin_path)})
        for k in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"):
            env.pop(k, None)
        if rt is not None:
            env["CNI_CONTAINERID"] = rt.container_id
            env["CNI_NETNS"] = rt.netns
            env["CNI_IFNAME"] = rt.ifname
            if rt.args:
                env["CNI_ARGS"] = ";".join(f"{k}={v}" for k, v in rt.args)
        try:
            p = subprocess.run(
                [*self.exec_prefix, self.find(ptype)],
                input=data,
                capture_output=True,
                env=env,
                timeout=self.timeout,
            )
        except subprocess.TimeoutExpired:
            raise CNIError(999, f"plugin {ptype} {command} timed out after {self.timeout}s") from None
        if p.returncode != 0:
            try:
                e = json.loads(p.stdout)
                raise CNIError(int(e.get("code", 999)), str(e.get("msg", "")), str(e.get("details", "") or ""))
            except (ValueError, AttributeError):
                raise CNIError(
                    999, f"plugin {ptype} {command} failed (exit {p.returncode})", (p.stdout + p.stderr).decode()
                ) from None
        return json.loads(p.stdout) if p.stdout.strip() else None

    # ---- conflists -----------------------------------------------------------------------------------

    @staticmethod
    def build_config(
        net: Mapping[str, Any], plugin: Mapping[str, Any], prev: Mapping[str, Any] | None, rt: RuntimeConf | None
    ) -> dict[str, Any]:
        """libcni buildOneConfig: inject name, cniVersion, prevResult and runtimeConfig from capabilities."""
        conf = dict(plugin)
        conf["name"] = net["name"]
        conf["cniVersion"] = net.get("cniVersion", "")
        if prev is not None:
            conf["prevResult"] = prev
        if rt is not None:
            caps = plugin.get("capabilities") or {}
            rc = {k: v for k, v in rt.capability_args.items() if caps.get(k)}
            if rc:
                conf["runtimeConfig"] = rc
        return conf

    def _cache_path(self, net: Mapping[str, Any], rt: RuntimeConf) -> Path:
        return self.cache_dir / "results" / f"{net['name']}-{rt.container_id}-{rt.ifname}"

    def cached_result(self, net: Mapping[str, Any], rt: RuntimeConf) -> dict[str, Any] | None:
        try:
            d = json.loads(self._cache_path(net, rt).read_text())
        except (FileNotFoundError, ValueError):
            return None
        r = d.get("result")
        return r if isinstance(r, dict) else None

    def add(self, net: Mapping[str, Any], rt: RuntimeConf) -> dict[str, Any]:
        """ADD the attachment through every plugin; return (and cache) the final result."""
        prev: dict[str, Any] | None = None
        for plugin in net["plugins"]:
            prev = self.exec_plugin("ADD", self.build_config(net, plugin, prev, rt), rt)
        if prev is None:
            raise CNIError(999, f"network {net['name']}: no result from ADD")
        path = self._cache_path(net, rt)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        cache = {
            "kind": "cniCacheV1",
            "containerId": rt.container_id,
            "ifName": rt.ifname,
            "networkName": net["name"],
            "cniArgs": [list(a) for a in rt.args],
            "capabilityArgs": dict(rt.capability_args),
            "config": net,
            "result": prev,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(path)
        return prev

    def delete(self, net: Mapping[str, Any], rt: RuntimeConf) -> None:
        """DEL in reverse order (prevResult = the cached result from 0.4.0 on), then drop the cache."""
        prev = self.cached_result(net, rt) if _version_tuple(net.get("cniVersion", "")) >= (0, 4, 0) else None
        for plugin in reversed(net["plugins"]):
            self.exec_plugin("DEL", self.build_config(net, plugin, prev, rt), rt)
        self._cache_path(net, rt).unlink(missing_ok=True)

    def check(self, net: Mapping[str, Any], rt: RuntimeConf) -> None:
        """CHECK every plugin against the cached result (needs cniVersion >= 0.4.0)."""
        prev = self.cached_result(net, rt)
        if prev is None:
            raise CNIError(3, f"no cached result for {rt.container_id}/{rt.ifname} in network {net['name']}")
        for plugin in net["plugins"]:
            self.exec_plugin("CHECK", self.build_config(net, plugin, prev, rt), rt)

    def gc(self, net: Mapping[str, Any], valid: Sequence[RuntimeConf]) -> None:
        """GC every plugin with the attachments that are still valid (cniVersion 1.1.0)."""
        attachments = [{"containerID": a.container_id, "ifname": a.ifname} for a in valid]
        for plugin in net["plugins"]:
            conf = self.build_config(net, plugin, None, None)
            conf["cni.dev/valid-attachments"] = attachments
            self.exec_plugin("GC", conf, None)

    def status(self, net: Mapping[str, Any]) -> None:
        """STATUS every plugin (cniVersion 1.1.0); raises CNIError (code 50 = not ready)."""
        for plugin in net["plugins"]:
            self.exec_plugin("STATUS", self.build_config(net, plugin, None, None), None)

    def version(self, plugin_type: str) -> dict[str, Any]:
        r = self.exec_plugin("VERSION", {"cniVersion": "1.1.0", "type": plugin_type}, None)
        return r or {}
