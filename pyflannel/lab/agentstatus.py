"""A node agent's own view, read from its health server inside the node: `flannel-lab metrics NODE` (/metrics)
and `flannel-lab status NODE --agent` (/status). The tests read agents the same way.

The request is made by a short Python run inside the node's namespace (the agents listen on the node's
loopback), so nothing here opens a socket in the lab machine's own namespace.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .netns import NetnsError, ns_exec
from .state import LabError, LabState

# Where the lab and the test bed's agents serve /healthz, /readyz, /metrics and /status (--healthz-*).
AGENT_HOST = "127.0.0.1"
AGENT_PORT = 8471

_GET = """
import sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}{sys.argv[3]}", timeout=float(sys.argv[4]))
    code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read()
except OSError as e:
    print(f"cannot reach the agent: {e}", file=sys.stderr)
    sys.exit(3)
sys.stdout.write(f"{code}\\n")
sys.stdout.flush()
sys.stdout.buffer.write(body)
"""


def fetch(
    ns: str, path: str, *, host: str = AGENT_HOST, port: int = AGENT_PORT, timeout: float = 10
) -> tuple[int, str]:
    """GET `path` from the agent of namespace `ns`: (HTTP status, body)."""
    try:
        out = ns_exec(ns, [sys.executable, "-c", _GET, host, str(port), path, str(timeout)], timeout=timeout + 20)
    except NetnsError as e:
        raise LabError(f"{path} of the agent in {ns}: {str(e).strip()}") from None
    code, _, body = out.partition("\n")
    return int(code), body


def metrics_text(ns: str) -> str:
    code, body = fetch(ns, "/metrics")
    if code != 200:
        raise LabError(f"/metrics answered {code}: {body.strip()}")
    return body


def status(ns: str) -> dict[str, Any]:
    code, body = fetch(ns, "/status")
    if code != 200:
        raise LabError(f"/status answered {code}: {body.strip()}")
    doc: dict[str, Any] = json.loads(body)
    return doc


def format_status(doc: dict[str, Any]) -> str:
    """/status as a table: the agent's lease, then each peer with what the kernel holds and lacks for it."""
    lines = [f"flanneld {doc['version']}, store {doc['store']}, backend {doc['backend']}, "
             f"ready {'yes' if doc['ready'] else 'no: ' + doc['reason']}"]  # fmt: skip
    lease = doc.get("lease")
    if lease:
        subnets = " ".join(s for s in (lease["subnet"], lease["ipv6_subnet"]) if s)
        lines.append(f"own lease {subnets} public IP {lease['public_ip'] or lease['public_ipv6']}")
    own = doc["own"]
    for e in own["present"]:
        lines.append(f"    ok       {e}")
    for e in own["missing"]:
        lines.append(f"    MISSING  {e}")
    if not doc.get("kernel_inspected", True):
        lines.append("(this backend does not compare the kernel's state with its leases)")
    if doc.get("kernel_error"):
        lines.append(f"kernel read failed: {doc['kernel_error']}")
    lines.append("")
    lines.append(f"{'PEER SUBNET':20} {'PUBLIC IP':16} {'BACKEND':10} KERNEL")
    for p in doc["peers"]:
        state = "ok" if not p["missing"] else f"{len(p['missing'])} missing"
        subnets = " ".join(s for s in (p["subnet"], p["ipv6_subnet"]) if s)
        lines.append(f"{subnets:20} {p['public_ip'] or p['public_ipv6'] or '-':16} {p['backend_type'] or '-':10} "
                     f"{state}")  # fmt: skip
        for e in p["present"]:
            lines.append(f"    ok       {e}")
        for e in p["missing"]:
            lines.append(f"    MISSING  {e}")
    if doc["unexpected"]:
        lines.append("")
        lines.append("unexpected (no lease asks for them; the next repair removes them):")
        lines += [f"    {e}" for e in doc["unexpected"]]
    s = doc["summary"]
    lines.append("")
    lines.append(f"{s['complete']}/{s['peers']} peers complete, {s['missing']} entries missing, "
                 f"{s['unexpected']} unexpected")  # fmt: skip
    return "\n".join(lines)


def node_metrics(st: LabState, node: str) -> str:
    """`flannel-lab metrics NODE`: the node agent's /metrics as it serves them."""
    return metrics_text(st.node(node).netns)


def node_status(st: LabState, node: str, as_json: bool = False) -> str:
    """`flannel-lab status NODE --agent`: the node agent's /status, as a table or as its JSON."""
    doc = status(st.node(node).netns)
    return json.dumps(doc, indent=2) if as_json else format_status(doc)
