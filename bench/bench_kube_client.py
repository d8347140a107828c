"""What each Kubernetes client candidate costs the kube store: RSS and time, doing the store's work.

Each candidate runs in a fresh python (the same interpreter for all: a throwaway venv that has them all) inside
a network namespace, against the fake API server over HTTPS with a bearer token and 100 Nodes, and does what
the kube store does at start: load a kubeconfig (YAML, as kubectl writes it), list the Nodes, get one,
strategic-merge patch its status, and watch from the list's resourceVersion until the patch's event arrives.
Rows are interleaved over the runs; medians are printed. Not a test: nothing here asserts.

  import_ms  the client's imports (the agent pays them at every start)
  work_ms    config + list + get + patch + watch event, on a warm fake
  rss_mb     VmRSS of the process once done (VmHWM in brackets)

usage: sudo .venv/bin/python bench/bench_kube_client.py [--venv /tmp/pfkc-venv] [--runs 3] [--nodes 100]
The venv: python3.11 -m venv /tmp/pfkc-venv && /tmp/pfkc-venv/bin/pip install lightkube httpx aiohttp
          kubernetes_asyncio PyYAML
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyflannel.lab import netns
from pyflannel.lab.fakekube import KubeAdmin

REPO = Path(__file__).resolve().parent.parent

TOKEN = "bench-token"
P = "flannel.alpha.coreos.com/"

# Every worker gets: CFG (kubeconfig path), CA (CA file), URL, and measures around its imports.
PROLOGUE = """
import time, sys, json, asyncio
t0 = time.perf_counter()
"""
EPILOGUE = """
def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
print(json.dumps({"import_ms": (t1 - t0) * 1000, "work_ms": (t3 - t2) * 1000,
                  "rss_mb": _status("VmRSS:"), "hwm_mb": _status("VmHWM:"), "check": check}))
"""
PATCH = {"metadata": {"annotations": {P + "public-ip": "192.168.77.99"}}}

WORKERS: dict[str, str] = {
    "python + asyncio + ssl (floor)": """
import ssl
t1 = t2 = time.perf_counter()
ssl.create_default_context(cafile=CA)
t3 = time.perf_counter()
check = "n/a"
""",
    "own (kubeclient, in-cluster)": """
from pyflannel.store.kubeclient import KubeClient
from pyflannel.store.kubeconfig import in_cluster
t1 = time.perf_counter()
async def work():
    c = KubeClient(in_cluster(SA, HOST, PORT))
    lst = await c.list("/api/v1/nodes")
    await c.get("/api/v1/nodes/n1")
    await c.patch("/api/v1/nodes/n1/status", PATCH)
    q = {"watch": "true", "allowWatchBookmarks": "true", "resourceVersion": lst["metadata"]["resourceVersion"]}
    async for lines in c.watch("/api/v1/nodes", q, idle_timeout=30):
        ev = json.loads(lines[0]); break
    await c.close()
    return f"{len(lst['items'])} {ev['type']}"
t2 = time.perf_counter(); check = asyncio.run(work()); t3 = time.perf_counter()
""",
    "own (kubeclient, kubeconfig)": """
from pyflannel.store.kubeclient import KubeClient
from pyflannel.store.kubeconfig import load_kubeconfig
t1 = time.perf_counter()
async def work():
    c = KubeClient(load_kubeconfig(CFG))
    lst = await c.list("/api/v1/nodes")
    await c.get("/api/v1/nodes/n1")
    await c.patch("/api/v1/nodes/n1/status", PATCH)
    q = {"watch": "true", "allowWatchBookmarks": "true", "resourceVersion": lst["metadata"]["resourceVersion"]}
    async for lines in c.watch("/api/v1/nodes", q, idle_timeout=30):
        ev = json.loads(lines[0]); break
    await c.close()
    return f"{len(lst['items'])} {ev['type']}"
t2 = time.perf_counter(); check = asyncio.run(work()); t3 = time.perf_counter()
""",
    "httpx + yaml": """
import httpx, ssl, yaml
t1 = time.perf_counter()
async def work():
    doc = yaml.safe_load(open(CFG))
    server = doc["clusters"][0]["cluster"]["server"]
    ctx = ssl.create_default_context(cafile=doc["clusters"][0]["cluster"]["certificate-authority"])
    h = {"Authorization": "Bearer " + doc["users"][0]["user"]["token"]}
    async with httpx.AsyncClient(base_url=server, verify=ctx, headers=h, timeout=30) as c:
        lst = (await c.get("/api/v1/nodes")).json()
        (await c.get("/api/v1/nodes/n1")).json()
        (await c.patch("/api/v1/nodes/n1/status", json=PATCH,
                       headers={"Content-Type": "application/strategic-merge-patch+json"})).json()
        q = {"watch": "true", "allowWatchBookmarks": "true", "resourceVersion": lst["metadata"]["resourceVersion"]}
        async with c.stream("GET", "/api/v1/nodes", params=q) as r:
            async for line in r.aiter_lines():
                ev = json.loads(line); break
    return f"{len(lst['items'])} {ev['type']}"
t2 = time.perf_counter(); check = asyncio.run(work()); t3 = time.perf_counter()
""",
    "aiohttp + yaml": """
import aiohttp, ssl, yaml
t1 = time.perf_counter()
async def work():
    doc = yaml.safe_load(open(CFG))
    server = doc["clusters"][0]["cluster"]["server"]
    ctx = ssl.create_default_context(cafile=doc["clusters"][0]["cluster"]["certificate-authority"])
    h = {"Authorization": "Bearer " + doc["users"][0]["user"]["token"]}
    async with aiohttp.ClientSession(server, headers=h, connector=aiohttp.TCPConnector(ssl=ctx)) as c:
        async with c.get("/api/v1/nodes") as r:
            lst = await r.json()
        async with c.get("/api/v1/nodes/n1") as r:
            await r.json()
        async with c.patch("/api/v1/nodes/n1/status", data=json.dumps(PATCH),
                           headers={"Content-Type": "application/strategic-merge-patch+json"}) as r:
            await r.json()
        q = {"watch": "true", "allowWatchBookmarks": "true", "resourceVersion": lst["metadata"]["resourceVersion"]}
        async with c.get("/api/v1/nodes", params=q) as r:
            ev = json.loads(await r.content.readline())
    return f"{len(lst['items'])} {ev['type']}"
t2 = time.perf_counter(); check = asyncio.run(work()); t3 = time.perf_counter()
""",
    "lightkube": """
from lightkube import AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Node
from lightkube.types import PatchType
t1 = time.perf_counter()
async def work():
    c = AsyncClient(config=KubeConfig.from_file(CFG))
    nodes = [n async for n in c.list(Node)]
    await c.get(Node, "n1")
    await c.patch(Node.Status, "n1", PATCH, patch_type=PatchType.STRATEGIC)
    rv = nodes[0].metadata.resourceVersion  # lightkube's list hides the list's own resourceVersion
    async for etype, obj in c.watch(Node, resource_version=rv):
        if obj.metadata.name == "n1" and etype == "MODIFIED":
            break
    await c.close()
    return f"{len(nodes)} {etype}"
t2 = time.perf_counter(); check = asyncio.run(work()); t3 = time.perf_counter()
""",
    "kubernetes_asyncio (before)": """
from kubernetes_asyncio import client, config
t1 = time.perf_counter()
async def work():
    cfg = client.Configuration()
    await config.load_kube_config(config_file=CFG, client_configuration=cfg)
    api = client.ApiClient(configuration=cfg)
    core = client.CoreV1Api(api)
    r = await core.list_node(_preload_content=False); lst = json.loads(await r.read()); r.release()
    r = await core.read_node("n1", _preload_content=False); await r.read(); r.release()
    r = await core.patch_node_status("n1", PATCH, _content_type="application/strategic-merge-patch+json",
                                     _preload_content=False); await r.read(); r.release()
    r = await core.list_node(watch=True, allow_watch_bookmarks=True,
                             resource_version=lst["metadata"]["resourceVersion"], _preload_content=False)
    ev = json.loads(await r.content.readline()); r.release()
    await api.close()
    return f"{len(lst['items'])} {ev['type']}"
t2 = time.perf_counter(); check = asyncio.run(work()); t3 = time.perf_counter()
""",
}


def make_pki(d: Path) -> None:
    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=bench-ca", "-addext", "basicConstraints=critical,CA:TRUE")  # fmt: skip
    (d / "srv.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=kube")
    ossl("x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "srv.crt",
         "-days", "2", "-extfile", "srv.ext")  # fmt: skip


def bench_node(i: int) -> dict[str, object]:
    """A Node as a kubelet and flanneld leave it (annotations, addresses, conditions): not an empty shell."""
    ip = f"192.168.{i // 250}.{i % 250 + 1}"
    return {
        "annotations": {
            P + "kube-subnet-manager": "true", P + "backend-type": "vxlan", P + "public-ip": ip,
            P + "backend-data": json.dumps({"VNI": 1, "VtepMAC": f"aa:bb:cc:00:{i // 256:02x}:{i % 256:02x}"}),
            "node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true",
        },
        "ip": ip,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", default="/tmp/pfkc-venv")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=100)
    args = ap.parse_args()
    py = Path(args.venv) / "bin" / "python"
    if not py.exists():
        sys.exit(f"no {py}: see this script's docstring for the throwaway venv")
    with netns.RunScope(tag="kcbench") as scope:
        ns = scope.add_ns("kapi")
        netns.run(["ip", "-n", ns, "link", "set", "lo", "up"])
        d = scope.tmpdir
        make_pki(d)
        sock = str(d / "kube.sock")
        fake = [sys.executable, "-m", "pyflannel.lab.fakekube", "--listen", "127.0.0.1:6443", "--unix", sock,
                "--tls-cert", str(d / "srv.crt"), "--tls-key", str(d / "srv.key"), "--token", TOKEN,
                "--bookmark-interval", "5"]  # fmt: skip
        scope.spawn(ns, fake, log=d / "fakekube.log", env={**os.environ, "PYTHONPATH": str(REPO)})
        assert netns.wait_for(lambda: os.path.exists(sock), 10), "fake API server did not start"
        admin = KubeAdmin(unix_path=sock)
        for i in range(args.nodes):
            n = bench_node(i)
            admin.create_node(f"n{i + 1}", [f"10.{i // 256}.{i % 256}.0/24"], n["annotations"], str(n["ip"]))  # type: ignore[arg-type]
        sa = d / "sa"
        sa.mkdir()
        (sa / "token").write_text(TOKEN)
        (sa / "ca.crt").write_bytes((d / "ca.crt").read_bytes())
        import yaml

        cfg = d / "kubeconfig"
        cfg.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "x",
            "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443",
                                                   "certificate-authority": str(d / "ca.crt")}}],
            "users": [{"name": "u", "user": {"token": TOKEN}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        }))  # fmt: skip
        consts = (f"CFG={str(cfg)!r}; CA={str(d / 'ca.crt')!r}; SA={str(sa)!r}; HOST='127.0.0.1'; PORT='6443'\n"
                  f"PATCH={PATCH!r}\n")  # fmt: skip
        results: dict[str, list[dict[str, float]]] = {name: [] for name in WORKERS}
        patches = 0
        for _ in range(args.runs):
            for name, code in WORKERS.items():
                # Each run patches a different value, so that every patch is a change and sends an event.
                patches += 1
                patch = {"metadata": {"annotations": {P + "public-ip": f"192.168.{patches // 250}.{patches % 250}"}}}
                src = PROLOGUE + consts.replace(repr(PATCH), repr(patch)) + textwrap.dedent(code) + EPILOGUE
                env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
                t = time.monotonic()
                p = subprocess.run(["ip", "netns", "exec", ns, str(py), "-c", src], env=env, timeout=120,
                                   capture_output=True, text=True)  # fmt: skip
                if p.returncode != 0:
                    sys.exit(f"{name} failed:\n{p.stderr[-2000:]}")
                out = p.stdout
                res = json.loads(out.strip().splitlines()[-1])
                res["wall_ms"] = (time.monotonic() - t) * 1000
                results[name].append(res)
        print(f"{args.nodes} Nodes over HTTPS + token, median of {args.runs} runs (interleaved)")
        print(f"{'candidate':34} {'import_ms':>9} {'work_ms':>8} {'rss_mb':>7} {'(hwm)':>7}  check")
        for name, rows in results.items():
            med = {k: statistics.median(r[k] for r in rows) for k in ("import_ms", "work_ms", "rss_mb", "hwm_mb")}
            print(f"{name:34} {med['import_ms']:9.0f} {med['work_ms']:8.0f} {med['rss_mb']:7.1f} "
                  f"({med['hwm_mb']:5.1f})  {rows[-1]['check']}")  # fmt: skip


if __name__ == "__main__":
    main()
