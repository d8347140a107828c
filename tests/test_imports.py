"""The package's import graph has no cycles (TYPE_CHECKING and function-local imports included), and the agent
loads only the backend it runs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pyflannel

ROOT = Path(pyflannel.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule, not (only) the package's __init__.
            subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known}
            found.update(subs or {mod})
    return {m for m in found if m in known and m != name}


def test_no_import_cycles() -> None:
    mods = _modules()
    known = set(mods)
    graph = {name: _imports(name, path, known) for name, path in mods.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append([*stack[stack.index(m) :], m])
            elif m not in state:
                visit(m, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_agent_imports_only_its_backend() -> None:
    code = (
        "import sys; from pyflannel.backend.registry import backend_class; backend_class('host-gw'); "
        "print(sorted(m for m in sys.modules if m.startswith('pyflannel.backend.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    loaded = set(ast.literal_eval(out))
    assert "pyflannel.backend.hostgw" in loaded
    assert "pyflannel.backend.vxlan" not in loaded


def _loaded_after(code: str) -> set[str]:
    code += "; import sys; print(sorted(m.partition('.')[0] for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(ast.literal_eval(out))


def test_each_store_loads_only_its_client_library() -> None:
    clients = {"grpc", "etcd3aio", "kubernetes_asyncio", "aiohttp"}
    base = "from pyflannel.store.registry import create_store; from pyflannel.store.options import "
    # pyroute2 costs ~10 MB of resident memory: the agent's netlink is the package's own codec.
    assert not _loaded_after("import pyflannel.daemon") & (clients | {"pyroute2"})
    kube = _loaded_after(base + "KubeOptions; create_store(KubeOptions())")
    assert not kube & {"grpc", "etcd3aio"}
    # etcd mode speaks to etcd's JSON gateway over the package's own HTTP/1.1 client (store/etcdclient.py).
    etcd = _loaded_after(base + "EtcdOptions; create_store(EtcdOptions())")
    assert "pyflannel" in etcd
    assert not etcd & (clients | {"google", "yaml", "pyroute2"})
