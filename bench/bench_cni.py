"""What the flannel CNI plugin adds to a pod's ADD+DEL, measured against its own delegate config.

In one run, inside a node namespace, each iteration does ADD then DEL of the same pod namespace with:
  bridge      the exact delegate config flannel stores, handed straight to Debian's bridge (the baseline)
  fast        the `flannel` client (pyflannel/cni/launcher.c) served by a CNI server in the node namespace
              (`python -m pyflannel.cniserver`: the code flanneld runs for it, without the rest of an agent,
              which a bench's idle agent would not add to), with the kube-flannel plugin config
  container   the same client served by a CNI server shaped as kube-flannel's DaemonSet runs it: in a mount
              namespace of its own where the plugin's state directories are empty tmpfs, from another working
              directory, so every call runs switched into the client's view (pyflannel/cniserver.py)
  fallback    the same client with no server at its socket: it execs the standalone plugin below
  flannel-py  the standalone plugin: the Python launcher the client falls back to (what `flannel` was before)
  flannel-bin the host-installable build (scripts/build-cni.sh: the client, serving off, execing its bundled
              python3.11), built first when absent or stale (a few seconds)
  conflist    the whole kube-flannel conflist (flannel served + portmap), for reference
  py-floor    the floor of any plugin in Python: this interpreter (-I -S) only posix_spawns the bridge with
              the same delegate config on the inherited stdin/stdout and leaves with posix._exit
Variants are interleaved per iteration so drift hits them alike. ADD and DEL are timed separately with a
pause (--settle-ms) after each: the reference bridge's DEL takes ~7 ms longer once the pod's veth has been
up for more than ~10 ms (kernel link work that follows ADD; the same with IPv6 off), and without the pause
the baseline's DEL, started ~1 ms after its ADD, would dodge that cost while the plugin's, which starts an
interpreter first, pays it: ~7 ms of "added" time that is not the plugin's. A real pod lives longer than
that. Reported: median and p95 of ADD+DEL (per iteration, pauses excluded); the added time, the median
over iterations of the variant's ADD+DEL minus the bridge's in the same iteration, with a 90% bootstrap
interval; ADD and DEL added apart (paired the same way); also each executable's time for
`CNI_COMMAND=VERSION` (in the node namespace, where the server serves) and the interpreter's own floor.
Paired, because the bridge's DEL alone spreads over ~16 ms (22-38 ms): the difference of two variants'
medians then swings by several ms from run to run (a 90% interval of -0.4..5 ms at 150 iterations), while
the pairs, taken in the same iteration, share the drift: the interval narrows to about 2 ms.

usage (root): python bench/bench_cni.py [--iterations 60] [--settle-ms 50] [--variants fast,flannel-py]
             [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyflannel.cni.driver import Driver, RuntimeConf, kube_flannel_conflist  # noqa: E402
from pyflannel.cni.launcher import STANDALONE_SUFFIX, install  # noqa: E402
from pyflannel.lab import netns  # noqa: E402

REF = Path("/usr/lib/cni")
DEFAULT_BUILT = ROOT / "build" / "cni" / "flannel.dist" / "flannel"
GOAL_MS = 3.0
VERSION_CALLS = 30  # per executable, for its time with CNI_COMMAND=VERSION


PY_FLOOR = """#!{python} -IS
import posix
pid = posix.posix_spawn("{bridge}", ["{bridge}"], posix.environ)
posix._exit(posix.waitstatus_to_exitcode(posix.waitpid(pid, 0)[1]))
"""


def paired_median(xs: list[float], base: list[float]) -> float:
    """The median of xs[i] - base[i]: each variant against the bridge of the same iteration."""
    return statistics.median(x - b for x, b in zip(xs, base, strict=True))


def paired(xs: list[float], base: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """paired_median and its 90% bootstrap interval (fixed seed: a run reports the same)."""
    diffs = [x - b for x, b in zip(xs, base, strict=True)]
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return statistics.median(diffs), meds[resamples // 20], meds[resamples - 1 - resamples // 20]


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def clean_env(socket: str) -> dict[str, str]:
    # A container runtime does not set these; they would make every start recompile bytecode.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    env["FLANNEL_CNI_SOCKET"] = socket
    return env


def start_time(exe: Path, socket: str, n: int) -> float:
    env = clean_env(socket)
    env["CNI_COMMAND"] = "VERSION"
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([str(exe)], input=b"{}", capture_output=True, env=env, check=True)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def bin_dir(work: Path, name: str, exe: Path) -> Path:
    d = work / f"bin-{name}"
    d.mkdir(exist_ok=True)
    (d / "flannel").unlink(missing_ok=True)
    (d / "flannel").symlink_to(exe)
    return d


# The container's start: its own mounts over the node's CNI state (COVER); its working directory is another.
CONTAINER = 'for d in $COVER; do mount -t tmpfs bench-cover "$d" || exit 1; done; exec "$@"'


def start_server(work: Path, name: str, container: bool) -> subprocess.Popen[bytes]:
    sock = work / name / "cni.sock"
    log = work / f"{name}.log"
    # At the agent's default verbosity (a line per call at -v 1 would be ~0.15 ms of each call's time); the
    # calls it served are counted from the line it logs as it stops.
    cmd = [sys.executable, "-m", "pyflannel.cniserver", "--socket", str(sock)]
    env, cwd = clean_env(""), None
    if container:
        cover = [work / "flannel", work / "ipam"]
        for d in cover:
            d.mkdir(exist_ok=True)
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", CONTAINER, "-", *cmd]
        env["COVER"] = " ".join(map(str, cover))
        cwd = work / f"{name}-cwd"
        cwd.mkdir(exist_ok=True)
    with open(log, "wb") as logf:
        server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                  cwd=cwd)  # fmt: skip
    deadline = time.monotonic() + 30
    while not sock.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"no CNI server: {log.read_text()}")
        time.sleep(0.05)
    return server


def inner(args: argparse.Namespace) -> dict[str, Any]:
    """Runs inside the node namespace."""
    work = Path(args.workdir)
    client = work / "client" / "flannel"
    client.parent.mkdir(exist_ok=True)
    install(client)  # the client and, beside it, the standalone plugin's launcher it falls back to
    launcher = client.with_name("flannel" + STANDALONE_SUFFIX)
    none = str(work / "no-agent.sock")
    servers = [start_server(work, "srv", container=False)]
    try:
        servers.append(start_server(work, "ctr", container=True))
        res = _measure(args, work, client, launcher, str(work / "srv" / "cni.sock"), none)
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=10)
    # Every fast and conflist call (and the warm-up's, and the served VERSION calls) must have been served, not
    # fallen back; and every container one, by the container's server; none refused.
    for name in ("srv", "ctr"):
        log = (work / f"{name}.log").read_text()
        m = re.search(r"CNI server: stopped; served (\d+) calls, refused (\d+)", log)
        if m is None:
            raise SystemExit(f"the {name} CNI server did not log its count: {log}")
        res[f"served_{name}"], res[f"refused_{name}"] = int(m[1]), int(m[2])
    return res


def _measure(
    args: argparse.Namespace, work: Path, client: Path, launcher: Path, sock: str, none: str
) -> dict[str, Any]:
    subnet_file = work / "subnet.env"
    subnet_file.write_text(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
    )
    conflist = kube_flannel_conflist(
        subnet_file=str(subnet_file), data_dir=str(work / "flannel"), ipam_data_dir=str(work / "ipam")
    )
    only_flannel = dict(conflist, plugins=[conflist["plugins"][0]])
    cache = work / "cache"
    client_dir = bin_dir(work, "client", client)
    drivers = {
        "fast": Driver([client_dir, REF], cache, env=clean_env(sock)),
        "container": Driver([client_dir, REF], cache, env=clean_env(str(work / "ctr" / "cni.sock"))),
        "fallback": Driver([client_dir, REF], cache, env=clean_env(none)),
        "flannel-py": Driver([bin_dir(work, "py", launcher), REF], cache, env=clean_env(none)),
    }
    if args.built:
        drivers["flannel-bin"] = Driver([bin_dir(work, "built", Path(args.built)), REF], cache, env=clean_env(""))
    rt = RuntimeConf(container_id="bench-pod", netns=args.podns, ifname="eth0")

    # Warm-up: caches, bytecode, the bridge itself; and the exact delegate config flannel stores.
    for name in drivers:
        drivers[name].add(only_flannel, rt)
        delegate = (work / "flannel" / rt.container_id).read_bytes()
        drivers[name].delete(only_flannel, rt)
    bridge_net = {"name": conflist["name"], "cniVersion": conflist["cniVersion"], "plugins": [json.loads(delegate)]}
    floor = client_dir / "py-floor"
    floor.write_text(PY_FLOOR.format(python=sys.executable, bridge=REF / "bridge"))
    floor.chmod(0o755)
    floor_net = dict(bridge_net, plugins=[dict(bridge_net["plugins"][0], type="py-floor")])

    variants: dict[str, tuple[Driver, dict[str, Any]]] = {
        "bridge": (drivers["fast"], bridge_net),
        "fast": (drivers["fast"], only_flannel),
        "container": (drivers["container"], only_flannel),
        "fallback": (drivers["fallback"], only_flannel),
        "flannel-py": (drivers["flannel-py"], only_flannel),
        "conflist": (drivers["fast"], conflist),
        "py-floor": (drivers["fast"], floor_net),
    }
    if "flannel-bin" in drivers:
        variants["flannel-bin"] = (drivers["flannel-bin"], only_flannel)
    if args.variants:
        keep = {"bridge", *args.variants.split(",")}
        variants = {k: v for k, v in variants.items() if k in keep}
    settle = args.settle_ms / 1000
    times: dict[str, dict[str, list[float]]] = {k: {"ADD": [], "DEL": []} for k in variants}
    for _ in range(args.iterations):
        for name, (drv, net) in variants.items():
            t = time.perf_counter()
            drv.add(net, rt)
            times[name]["ADD"].append((time.perf_counter() - t) * 1000)
            time.sleep(settle)
            t = time.perf_counter()
            drv.delete(net, rt)
            times[name]["DEL"].append((time.perf_counter() - t) * 1000)
            time.sleep(settle)
    leftover = sorted(p.name for p in (work / "ipam" / conflist["name"]).iterdir() if p.name[0].isdigit())
    starts = {
        "flannel client, served": start_time(client, sock, VERSION_CALLS),
        "flannel client, served from a container": start_time(client, str(work / "ctr" / "cni.sock"), VERSION_CALLS),
        "flannel client, no agent (falls back)": start_time(client, none, VERSION_CALLS),
        "flannel-py (standalone plugin)": start_time(launcher, none, VERSION_CALLS),
    }
    if args.built:
        starts["flannel-bin (standalone build)"] = start_time(Path(args.built), "", VERSION_CALLS)
    return {"times": times, "leftover_ips": leftover, "delegate": delegate.decode(), "starts": starts,
            "expected_srv": 2 + VERSION_CALLS + 2 * args.iterations * len({"fast", "conflist"} & variants.keys()),
            "expected_ctr": 2 + VERSION_CALLS + 2 * args.iterations * ("container" in variants)}  # fmt: skip


def stale_build(built: Path) -> bool:
    """The default build predates the plugin's sources (it carries copies of them, and the client)."""
    app = built.parent / "app" / "pyflannel" / "cni"
    for src in (ROOT / "pyflannel" / "cni").glob("*.py"):
        copy = app / src.name
        if copy.exists() and copy.read_bytes() != src.read_bytes():
            return True
    return built.stat().st_mtime < (ROOT / "pyflannel" / "cni" / "launcher.c").stat().st_mtime


def median_run(argv: list[str], n: int) -> float:
    t = []
    for _ in range(n):
        s = time.perf_counter()
        subprocess.run(argv, check=True)
        t.append((time.perf_counter() - s) * 1000)
    return statistics.median(t)


def outer(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    built = Path(args.built) if args.built else DEFAULT_BUILT
    if not args.built and (not built.is_file() or stale_build(built)):
        subprocess.run([str(ROOT / "scripts" / "build-cni.sh")], check=True)
    scope = netns.RunScope(stem=netns.STEM_LAB, tag="bcni")
    try:
        node = scope.add_ns("node")
        pod = scope.add_ns("pod")
        cmd = [
            "ip", "netns", "exec", node, sys.executable, __file__, "--inner",
            "--workdir", str(scope.tmpdir), "--podns", f"/run/netns/{pod}",
            "--iterations", str(args.iterations), "--settle-ms", str(args.settle_ms),
            "--variants", args.variants,
        ]  # fmt: skip
        if built.is_file():
            cmd += ["--built", str(built)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            print(p.stdout, p.stderr, file=sys.stderr)
            return 1
        res = json.loads(p.stdout)
        # The floor of any Python plugin: an interpreter that starts and leaves at once (the plugin too ends
        # with posix._exit, skipping the orderly shutdown that `-c pass` includes).
        exit_now = "import posix; posix._exit(0)"
        starts = {
            "python -S -I -c pass": median_run([sys.executable, "-S", "-I", "-c", "pass"], 30),
            "python -S -I, posix._exit": median_run([sys.executable, "-S", "-I", "-c", exit_now], 30),
            **res["starts"],
        }
        if built.is_file():
            bundled = str(built.parent / "python" / "python3.11")
            starts["bundled python -S -I -c pass"] = median_run([bundled, "-S", "-I", "-c", "pass"], 30)
    finally:
        scope.close()

    times: dict[str, dict[str, list[float]]] = res["times"]
    sums = {k: [a + d for a, d in zip(v["ADD"], v["DEL"], strict=True)] for k, v in times.items()}
    report: dict[str, Any] = {
        "iterations": args.iterations, "settle_ms": args.settle_ms, "variants": {}, "start_ms": starts,
    }  # fmt: skip
    print(f"ADD+DEL of one pod, {args.iterations} iterations each, interleaved, same run, {args.settle_ms} ms pauses")
    print("added: the median of (variant - bridge) over the iterations' pairs [90% bootstrap interval]")
    head = ("variant", "median ms", "p95 ms", "added ms", "[90%]", "ADD added", "DEL added")
    print(f"{head[0]:<12} {head[1]:>10} {head[2]:>8} {head[3]:>9} {head[4]:>15} {head[5]:>10} {head[6]:>10}")
    for name, xs in sums.items():
        med, p95 = statistics.median(xs), pct(xs, 95)
        added, lo, hi = paired(xs, sums["bridge"])
        add = paired_median(times[name]["ADD"], times["bridge"]["ADD"])
        dele = paired_median(times[name]["DEL"], times["bridge"]["DEL"])
        report["variants"][name] = {
            "median_ms": med, "p95_ms": p95, "added_median_ms": added, "added_90_ms": [lo, hi],
            "add_added_ms": add, "del_added_ms": dele,
        }  # fmt: skip
        span = f"[{lo:.2f}, {hi:.2f}]"
        print(f"{name:<12} {med:>10.2f} {p95:>8.2f} {added:>9.2f} {span:>15} {add:>+10.2f} {dele:>+10.2f}")
    print(f"CNI_COMMAND=VERSION, median of {VERSION_CALLS}:")
    for k, v in starts.items():
        print(f"  {k:<40} {v:7.2f} ms")
    v = {k: x["added_median_ms"] for k, x in report["variants"].items()}
    if "fast" in v:
        met = "met" if v["fast"] <= GOAL_MS else "NOT met"
        print(f"goal <= {GOAL_MS:g} ms added median (fast path): {met} ({v['fast']:.2f} ms)")
    words = {"fast": "the fast path", "container": "the fast path from a container (switched)",
             "flannel-py": "the standalone plugin", "fallback": "the client falling back",
             "py-floor": "an interpreter in front of the bridge and nothing else"}  # fmt: skip
    print("  added: " + "; ".join(f"{words[k]} {v[k]:.2f} ms" for k in words if k in v))
    for name, what in (("srv", "the CNI server"), ("ctr", "the container's CNI server")):
        print(f"  served by {what}: {res['served_' + name]} of the {res['expected_' + name]} calls sent to it, "
              f"refused {res['refused_' + name]}")  # fmt: skip
        if (res[f"served_{name}"], res[f"refused_{name}"]) != (res[f"expected_{name}"], 0):
            print(f"WARNING: some calls sent to {what} fell back to the standalone plugin")
    if res["leftover_ips"]:
        print(f"WARNING: host-local kept {res['leftover_ips']}")
    report["leftover_ips"] = res["leftover_ips"]
    report["times_ms"] = times  # every iteration's ADD and DEL, per variant, for a closer look
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--settle-ms", type=float, default=50.0, help="pause after each ADD and DEL (default 50)")
    ap.add_argument("--built", help=f"the standalone build (default: {DEFAULT_BUILT}, built when absent)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--variants", default="", help="only these (comma-separated; the bridge always runs)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--podns", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        print(json.dumps(inner(args)))
        return 0
    return outer(args)


if __name__ == "__main__":
    sys.exit(main())
