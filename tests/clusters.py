"""Building a test cluster: etcd, a net-conf, N nodes with real agents, one pod per node; and the small tools
the userspace-backend tests share (a program run in a namespace, the agent's logged counters, a pcap reader).

The Cluster type itself is test_cluster's, so every cluster test reads leases and subnets the same way.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from needs import need
from test_cluster import Cluster

from pyflannel.lab import netns
from pyflannel.lab.testbed import Node, Testbed


def build_cluster(
    tag: str,
    backend: dict[str, Any],
    nodes: tuple[str, ...] = ("n1", "n2", "n3"),
    network: str = "10.244.0.0/16",
    extra_args: tuple[str, ...] = ("--reconcile-interval=300",),
    pods: bool = True,
    before_start: Callable[[Node], None] | None = None,
    agent_env: Callable[[Node], dict[str, str]] | None = None,
) -> Iterator[Cluster]:
    """A module fixture's body: yields the ready cluster, removes everything afterwards. `before_start(node)`
    runs on each node namespace before its agent starts (to look at the kernel before the agent touches it)."""
    need(tools=("ip", "etcd", "etcdctl"))
    scope = netns.RunScope(tag=tag)
    try:
        tb = Testbed(scope)
        tb.start_etcd()
        tb.put_config({"Network": network, "Backend": backend})
        cl = Cluster(tb, str(backend["Type"]))
        for name in nodes:
            node = tb.add_node(name)
            node.extra_args = extra_args
            if before_start is not None:
                before_start(node)
            tb.start_agent(node, env=agent_env(node) if agent_env else None)
        for node in tb.nodes.values():
            cl.env[node.name] = tb.wait_ready(node)
            if pods:
                tb.add_pod(node, cl.env[node.name])
        yield cl
    finally:
        scope.close()


def py_in(ns: str, script: str, *args: str, timeout: float = 60) -> str:
    """Run a short Python program inside namespace `ns`; its stdout."""
    return netns.ns_exec(ns, [sys.executable, "-c", script, *args], timeout=timeout)


def py_spawn(scope: netns.RunScope, ns: str, script: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    return scope.spawn(ns, [sys.executable, "-c", script, *args], log=log)


def logged_counters(node: Node, prefix: str = "udp data path: ") -> dict[str, int]:
    """The last counter line the agent logged (the udp backend logs one at shutdown)."""
    lines = [ln for ln in node.log_file.read_text(errors="replace").splitlines() if prefix in ln]
    if not lines:
        return {}
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", lines[-1].split(prefix, 1)[1])}


def restart(tb: Testbed, node: Node) -> None:
    tb.stop_agent(node)
    since = time.time()
    tb.start_agent(node)
    tb.wait_ready(node, since=since)


def pcap_ipv4(path: Path) -> Iterator[bytes]:
    """The IPv4 packets of a classic pcap file of Ethernet frames (what `tcpdump -w` writes)."""
    data = path.read_bytes()
    if len(data) < 24:
        return
    magic = struct.unpack_from("<I", data)[0]
    end = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    off = 24
    while off + 16 <= len(data):
        incl = struct.unpack_from(f"{end}I", data, off + 8)[0]
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(frame) >= 34 and frame[12:14] == b"\x08\x00":
            yield frame[14:]
