"""A picture of the lab: the underlay bridge with etcd, each node (underlay IP, subnet, VTEP, cni0) and its pods.

SVG is written by hand (no drawing library); PNG goes through a converter if one is installed.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import tempfile
from html import escape
from pathlib import Path
from typing import Any

NODE_W, NODE_H, GAP = 250, 230, 30
POD_H = 34


def _box(x: float, y: float, w: float, h: float, fill: str, stroke: str, rx: int = 8) -> str:
    return (
        f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="{rx}" fill="{fill}" stroke="{stroke}" stroke-width="1.5"/>'
    )


def _text(x: float, y: float, s: str, size: int = 13, weight: str = "normal", anchor: str = "start") -> str:
    return (
        f'<text x="{x}" y="{y}" font-family="monospace" font-size="{size}" font-weight="{weight}" '
        f'text-anchor="{anchor}">{escape(s)}</text>'
    )


def _store(status: dict[str, Any]) -> tuple[str, str]:
    """(what, namespace) of the store every agent talks to: etcd, or the Kubernetes API server."""
    kube = status.get("kube")
    if kube:
        return f"kube-apiserver  {kube['server']}", str(kube["netns"])
    return f"etcd  {status['etcd']['endpoint']}", str(status["etcd"]["netns"])


def svg(status: dict[str, Any]) -> str:
    nodes = status["nodes"]
    pods = status["pods"]
    vx = status["backend"] == "vxlan"
    max_pods = max([sum(1 for p in pods if p["node"] == n["name"]) for n in nodes] + [0])
    node_h = NODE_H + max_pods * (POD_H + 8)
    width = max(2 * GAP + len(nodes) * (NODE_W + GAP) - GAP, 640)
    ul_y, node_y = 110, 190
    height = node_y + node_h + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        _text(GAP, 30, f"flannel lab: backend {status['backend']}, network {status['network']}", 16, "bold"),
        _box(GAP, 45, 330, 44, "#fff4d6", "#c99a2e"),
        _text(GAP + 10, 63, _store(status)[0], 12),
        _text(GAP + 10, 80, f"netns {_store(status)[1]}", 11),
        f'<line x1="{GAP + 125}" y1="89" x2="{GAP + 125}" y2="{ul_y}" stroke="#555" stroke-width="2"/>',
        _box(GAP / 2, ul_y, width - GAP, 30, "#e8e8e8", "#666", 4),
        _text(
            GAP, ul_y + 20, f"underlay {status['underlay']['cidr']}  (bridge br0 in {status['underlay']['netns']})", 12
        ),
    ]
    for i, n in enumerate(nodes):
        x = GAP + i * (NODE_W + GAP)
        cx = x + NODE_W / 2
        out.append(f'<line x1="{cx}" y1="{ul_y + 30}" x2="{cx}" y2="{node_y}" stroke="#555" stroke-width="2"/>')
        out.append(_text(cx + 6, node_y - 10, f"eth0 {_addrs(n)}", 11))
        ok = "#2e7d32" if n["ready"] else "#c62828"
        out.append(_box(x, node_y, NODE_W, node_h, "#eef4ff", ok))
        out.append(_text(x + 10, node_y + 22, f"node {n['name']}", 14, "bold"))
        out.append(_text(x + 10, node_y + 40, f"netns {n['netns']}", 11))
        out.append(_text(x + 10, node_y + 56, f"subnet {_subnets(n)}", 12))
        agent = f"flanneld pid {n['pid']}" if n["running"] else "flanneld NOT RUNNING"
        out.append(_text(x + 10, node_y + 72, agent, 11))
        y = node_y + 84
        if vx:
            out.append(_box(x + 10, y, NODE_W - 20, 40, "#e3f2e1", "#4c8c4a", 4))
            out.append(_text(x + 18, y + 16, "flannel.1  VNI 1  UDP 8472", 11))
            out.append(_text(x + 18, y + 32, f"VTEP {n.get('vtep_mac') or '?'}", 11))
        else:
            out.append(_box(x + 10, y, NODE_W - 20, 40, "#e3f2e1", "#4c8c4a", 4))
            out.append(_text(x + 18, y + 16, "host-gw: routes via peers'", 11))
            out.append(_text(x + 18, y + 32, "underlay IPs (no tunnel)", 11))
        y += 52
        gw = " ".join(str(ipaddress.ip_network(c).network_address + 1) for c in (n["subnet"], n.get("subnet6")) if c)
        out.append(_box(x + 10, y, NODE_W - 20, 30, "#fde7ef", "#b0476f", 4))
        out.append(_text(x + 18, y + 19, f"cni0 bridge {gw}", 11))
        y += 42
        for p in (p for p in pods if p["node"] == n["name"]):
            out.append(f'<line x1="{x + 30}" y1="{y - 12}" x2="{x + 30}" y2="{y}" stroke="#b0476f"/>')
            out.append(_box(x + 20, y, NODE_W - 40, POD_H, "#ffffff", "#888", 4))
            out.append(_text(x + 28, y + 21, f"pod {p['name']}  {_addrs(p)}", 11))
            y += POD_H + 8
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _subnets(n: dict[str, Any]) -> str:
    """A node's subnets, IPv4 then IPv6 (a dual-stack lab has both)."""
    return " ".join(str(c) for c in (n["subnet"], n.get("subnet6")) if c) or "-"


def _addrs(x: dict[str, Any]) -> str:
    """A node's or pod's addresses, IPv4 then IPv6 (an IPv6-only one's `ip` is its IPv6 address)."""
    return " ".join(dict.fromkeys(str(a) for a in (x["ip"], x.get("ip6")) if a))


def text(status: dict[str, Any]) -> str:
    """The same topology as plain text, for the terminal."""
    lines = [
        f"{' '.join(_store(status)[0].split())} ({_store(status)[1]})",
        "  |",
        f"underlay {status['underlay']['cidr']}: bridge br0 in {status['underlay']['netns']}",
    ]
    vx = status["backend"] == "vxlan"
    for n in status["nodes"]:
        lines.append("  |")
        state = "ready" if n["ready"] else "NOT READY"
        lines.append(f"  +-- eth0 {_addrs(n)}  node {n['name']} ({n['netns']}), subnet {_subnets(n)}, {state}")
        if vx:
            lines.append(f"  |     flannel.1 VTEP {n.get('vtep_mac') or '?'} (VNI 1, UDP 8472)")
        for p in status["pods"]:
            if p["node"] == n["name"]:
                lines.append(f"  |     cni0 --- pod {p['name']} {_addrs(p)} ({p['netns']})")
    return "\n".join(lines) + "\n"


def write(status: dict[str, Any], path: Path) -> str:
    """Write an SVG or PNG; return a note on what was written. Raises RuntimeError if PNG cannot be made."""
    data = svg(status)
    if path.suffix.lower() != ".png":
        path.write_text(data)
        return f"wrote {path} (SVG)"
    with tempfile.TemporaryDirectory() as td:
        src = Path(td) / "lab.svg"
        src.write_text(data)
        tried = []
        for conv in (
            ["rsvg-convert", "-o", str(path), str(src)],
            ["inkscape", str(src), "--export-type=png", f"--export-filename={path}"],
            ["magick", str(src), str(path)],
        ):
            if shutil.which(conv[0]) is None:
                continue
            tried.append(conv[0])
            p = subprocess.run(conv, capture_output=True, timeout=60)
            if p.returncode == 0 and path.is_file() and path.read_bytes()[:4] == b"\x89PNG":
                return f"wrote {path} (PNG via {conv[0]})"
    raise RuntimeError(
        f"cannot write PNG: no working SVG converter ({', '.join(tried) or 'none of rsvg-convert, inkscape, magick'}"
        " found); install librsvg2-bin (apt-get install librsvg2-bin) or use -o FILE.svg"
    )
