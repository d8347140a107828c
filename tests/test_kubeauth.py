"""Every way the kube store authenticates, against the fake API server over TLS where certificates are involved.

A throwaway CA, server and client certificates are made with openssl per test module. The fake and the client
run in a thread inside a network namespace of this run (see test_store_kube.run_in_netns).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from needs import need
from test_store_kube import run_in_netns

from pyflannel.lab import netns
from pyflannel.lab.fakekube import FakeKube, KubeAdmin
from pyflannel.store.base import StoreError
from pyflannel.store.kube import KubeOptions, KubeStore
from pyflannel.store.kubeclient import KubeApiError, KubeClient, KubeClientError
from pyflannel.store.kubeconfig import ExecPlugin, TokenFile, in_cluster, load_kubeconfig

TOKEN = "s3cr3t-token-Zq9"
PASSWORD = "pa55-Wd7x"


# --- certificates ----------------------------------------------------------------------------------------
@dataclass
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # signed nothing we serve
    named_cert: Path  # a server certificate for the name kube.test only
    named_key: Path

    def data(self, path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign", cwd=d)  # fmt: skip


def _leaf(d: Path, name: str, ca: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    need(root=False, tools=["openssl"])
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other")
    _leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\n")
    _leaf(d, "named", "ca", "subjectAltName=DNS:kube.test\nextendedKeyUsage=serverAuth\n")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    return Pki(d, d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key",
               d / "other.crt", d / "named.crt", d / "named.key")  # fmt: skip


# --- running against the fake ----------------------------------------------------------------------------
Body = Callable[[FakeKube, KubeAdmin], Awaitable[None]]


@pytest.fixture
def kns(scope: netns.RunScope) -> str:
    ns = scope.add_ns("kauth")
    netns.run(["ip", "-n", ns, "link", "set", "lo", "up"])
    return ns


@pytest.fixture
def serve(kns: str) -> Callable[..., None]:
    """serve(body, **fake_kwargs): a FakeKube with node n1 in the namespace, body(fk, admin) run against it."""

    def runner(body: Body, **kw: Any) -> None:
        def go() -> None:
            with FakeKube(**kw) as fk:
                assert fk.unix_path is not None
                admin = KubeAdmin(unix_path=fk.unix_path)
                admin.create_node("n1", ["10.244.1.0/24"])
                asyncio.run(asyncio.wait_for(body(fk, admin), 40))

        run_in_netns(kns, go)

    return runner


@pytest.fixture
def sock(tmp_path: Path) -> str:
    return str(tmp_path / "kube.sock")


def tls(pki: Pki, sock: str, **kw: Any) -> dict[str, Any]:
    return {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "unix_path": sock, **kw}


def kubeconfig(tmp: Path, server: str, cluster: dict[str, Any], user: dict[str, Any], **extra: Any) -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, **cluster}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
        **extra,
    }
    path = tmp / "kubeconfig"
    # YAML as kubectl writes it, so the YAML path is what is tested (json.dumps output is YAML too: indent it).
    import yaml

    path.write_text(yaml.safe_dump(doc))
    return str(path)


async def list_nodes(client: KubeClient) -> list[str]:
    try:
        out = await client.list("/api/v1/nodes")
    finally:
        await client.close()
    return [n["metadata"]["name"] for n in out["items"]]


def auth_stats(admin: KubeAdmin) -> dict[str, int]:
    return {k: v for k, v in admin.stats().items() if k.startswith("auth ")}


# --- TLS and certificates --------------------------------------------------------------------------------
def test_ca_file_and_token(serve: Any, pki: Pki, sock: str, tmp_path: Path) -> None:
    async def body(fk: FakeKube, admin: KubeAdmin) -> None:
        cfg = load_kubeconfig(kubeconfig(tmp_path, fk.url, {"certificate-authority": str(pki.ca)}, {"token": TOKEN}))
        assert await list_nodes(KubeClient(cfg)) == ["n1"]
        assert auth_stats(admin) == {"auth token": 1}

    serve(body, **tls(pki, sock, tokens={TOKEN}))


def test_client_certificate_data_and_ca_data_leave_no_file(
    serve: Any, pki: Pki, sock: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "tmp"
    empty.mkdir()
    monkeypatch.setenv("TMPDIR", str(empty))

    async def body(fk: FakeKube, admin: KubeAdmin) -> None:
        cluster = {"certificate-authority-data": pki.data(pki.ca)}
        user = {"client-certificate-data": pki.data(pki.client_cert), "client-key-data": pki.data(pki.client_key)}
        cfg = load_kubeconfig(kubeconfig(tmp_path, fk.url, cluster, user))
        assert await list_nodes(KubeClient(cfg)) == ["n1"]
        assert auth_stats(admin) == {"auth cert": 1}
        assert "PRIVATE KEY" not in repr(cfg)

    serve(body, **tls(pki, sock, client_ca=str(pki.ca)))
    assert list(empty.iterdir()) == []  # the key went through a memfd, not a temp file


def test_client_certificate_files_relative_to_the_kubeconfig(serve: Any, pki: Pki, sock: str) -> None:
    async def body(fk: FakeKube, admin: KubeAdmin) -> None:
        # Relative paths are relative to the kubeconfig's directory, as clientcmd resolves them.
        cluster = {"certificate-authority": "ca.crt"}
        user = {"client-certificate": "client.crt", "client-key": "client.key"}
        cfg = load_kubeconfig(kubeconfig(pki.dir, fk.url, cluster, user))
        assert await list_nodes(KubeClient(cfg)) == ["n1"]
        assert auth_stats(admin) == {"auth cert": 1}

    serve(body, **tls(pki, sock, client_ca=str(pki.ca)))


def test_untrusted_server_and_missing_client_certificate_are_clear_errors(
    serve: Any, pki: Pki, sock: str, tmp_path: Path
) -> None:
    async def body(fk: FakeKube, admin: KubeAdmin) -> None:
        bad_ca = load_kubeconfig(kubeconfig(tmp_path, fk.url, {"certificate-authority": str(pki.other_ca)}, {}))
        with pytest.raises(KubeClientError, match=r"cannot reach the Kubernetes API at https://127\.0\.0\.1:\d+: "
                                                  r"TLS: (unable to get local issuer|.*certificate)"):  # fmt: skip
            await list_nodes(KubeClient(bad_ca))
        no_cert = load_kubeconfig(kubeconfig(tmp_path, fk.url, {"certificate-authority": str(pki.ca)}, {}))
        with pytest.raises(KubeApiError, match=r"HTTP 401: Unauthorized \(the API server refused no credentials\)"):
            await list_nodes(KubeClient(no_cert))

    serve(body, **tls(pki, sock, client_ca=str(pki.ca)))


def test_insecure_skip_tls_verify_and_tls_server_name(serve: Any, pki: Pki, sock: str, tmp_path: Path) -> None:
    async def body(fk: FakeKube, admin: KubeAdmin) -> None:
        insecure = load_kubeconfig(kubeconfig(tmp_path, fk.url, {"insecure-skip-tls-verify": True}, {"token": TOKEN}))
        assert await list_nodes(KubeClient(insecure)) == ["n1"]
        # The server's certificate names kube.test only: verified against that name, not the address dialled.
        named = {"certificate-authority": str(pki.ca), "tls-server-name": "kube.test"}
        assert await list_nodes(KubeClient(load_kubeconfig(kubeconfig(tmp_path, fk.url, named, {"token": TOKEN})))) == [
            "n1"
        ]
        wrong = load_kubeconfig(kubeconfig(tmp_path, fk.url, {"certificate-authority": str(pki.ca)}, {"token": TOKEN}))
        with pytest.raises(KubeClientError, match=r"TLS: .*(mismatch|not valid)"):
            await list_nodes(KubeClient(wrong))

    serve(body, **tls(pki, sock, tokens={TOKEN}, tls_cert=str(pki.named_cert), tls_key=str(pki.named_key)))


# --- tokens, passwords ---------------------------------------------------------------------------------------
def test_basic_auth_and_wrong_password(serve: Any, pki: Pki, sock: str, tmp_path: Path) -> None:
    async def body(fk: FakeKube, admin: KubeAdmin) -> None:
        ca = {"certificate-authority": str(pki.ca)}
        good = load_kubeconfig(kubeconfig(tmp_path, fk.url, ca, {"username": "admin", "password": PASSWORD}))
        assert await list_nodes(KubeClient(good)) == ["n1"]
        bad = load_kubeconfig(kubeconfig(tmp_path, fk.url, ca, {"username": "admin", "password": "nope"}))
        with pytest.raises(KubeApiError) as e:
            await list_nodes(KubeClient(bad))
        assert e.value.status == 401
        assert "nope" not in str(e.value) and "nope" not in repr(bad)
        assert "username/password" in str(e.value)

    serve(body, **tls(pki, sock, basic={("admin", PASSWORD)}))


def test_token_file_rotation_is_picked_up(serve: Any, pki: Pki, sock: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("tok-1\n")

    async def body(fk: FakeKube, admin: KubeAdmin) -> None:
        cfg = load_kubeconfig(
            kubeconfig(tmp_path, fk.url, {"certificate-authority": str(pki.ca)}, {"tokenFile": str(token_file)})
        )
        client = KubeClient(cfg)
        try:
            assert (await client.get("/api/v1/nodes/n1"))["metadata"]["name"] == "n1"
            # Rotated under us: the server takes only the new token; the 401 makes the client re-read the file.
            token_file.write_text("tok-2\n")
            fk.state.tokens = {"tok-2"}
            assert (await client.get("/api/v1/nodes/n1"))["metadata"]["name"] == "n1"
            assert auth_stats(admin) == {"auth token": 2, "auth refused": 1}
            # And re-read after its period without any 401.
            assert isinstance(cfg.credentials, TokenFile)
            cfg.credentials.period = 0
            token_file.write_text("tok-3\n")
            fk.state.tokens = {"tok-2", "tok-3"}
            await client.get("/api/v1/nodes/n1")
            fk.state.tokens = {"tok-3"}
            await client.get("/api/v1/nodes/n1")
            assert auth_stats(admin) == {"auth token": 4, "auth refused": 1}
        finally:
            await client.close()

    serve(body, **tls(pki, sock, tokens={"tok-1"}))


def test_in_cluster_over_ipv6_with_rotating_service_account_token(
    serve: Any, pki: Pki, sock: str, tmp_path: Path, kns: str
) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("sa-1")
    (sa / "ca.crt").write_bytes(pki.ca.read_bytes())

    async def body(fk: FakeKube, admin: KubeAdmin) -> None:
        st = KubeStore(KubeOptions(node_name="n1", service_host="::1", service_port=str(fk.port),
                                   serviceaccount_dir=str(sa)))  # fmt: skip
        try:
            assert (await st.get_node())["metadata"]["name"] == "n1"
            (sa / "token").write_text("sa-2")
            fk.state.tokens = {"sa-2"}
            assert (await st.get_node())["metadata"]["name"] == "n1"
        finally:
            await st.close()
        assert auth_stats(admin) == {"auth token": 2, "auth refused": 1}

    serve(body, **tls(pki, sock, tokens={"sa-1"}, host="::1"))


def test_api_url_overrides_the_kubeconfig_server_and_a_context_is_chosen(
    serve: Any, pki: Pki, sock: str, tmp_path: Path
) -> None:
    async def body(fk: FakeKube, admin: KubeAdmin) -> None:
        path = kubeconfig(
            tmp_path, "https://192.0.2.1:1", {"certificate-authority": str(pki.ca)}, {"token": "wrong"},
            contexts=[{"name": "x", "context": {"cluster": "c", "user": "u"}},
                      {"name": "y", "context": {"cluster": "c", "user": "v"}}],
            users=[{"name": "u", "user": {"token": "wrong"}}, {"name": "v", "user": {"token": TOKEN}}],
        )  # fmt: skip
        st = KubeStore(KubeOptions(node_name="n1", kubeconfig_file=path, kube_context="y", api_url=fk.url))
        try:
            assert (await st.get_node())["metadata"]["name"] == "n1"
        finally:
            await st.close()
        with pytest.raises(StoreError, match="no context named 'z'"):
            await KubeStore(KubeOptions(node_name="n1", kubeconfig_file=path, kube_context="z")).start()

    serve(body, **tls(pki, sock, tokens={TOKEN}))


def test_auth_provider_is_refused_with_the_way_out(tmp_path: Path) -> None:
    path = kubeconfig(tmp_path, "https://127.0.0.1:6443", {}, {"auth-provider": {"name": "oidc", "config": {}}})
    st = KubeStore(KubeOptions(node_name="n1", kubeconfig_file=path))
    with pytest.raises(StoreError, match=r"auth-provider 'oidc' is not supported .*use an exec plugin"):
        asyncio.run(st.start())


# --- exec plugins --------------------------------------------------------------------------------------------
def plugin(tmp: Path, name: str, code: str) -> str:
    """An exec plugin: a Python script (counting its runs in <name>.runs)."""
    path = tmp / name
    head = f"#!{sys.executable}\nimport json, os, sys, time\n"
    count = f"open({str(tmp / (name + '.runs'))!r}, 'a').write('x')\n"
    path.write_text(head + count + textwrap.dedent(code))
    path.chmod(0o755)
    return str(path)


def runs(tmp: Path, name: str) -> int:
    p = tmp / f"{name}.runs"
    return len(p.read_text()) if p.exists() else 0


def exec_user(command: str, api: str = "client.authentication.k8s.io/v1", **kw: Any) -> dict[str, Any]:
    return {"exec": {"apiVersion": api, "command": command, "interactiveMode": "Never", **kw}}


CRED = """
info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
status = {"token": sys.argv[1] + os.environ["TOKEN_TAIL"]}
if len(sys.argv) > 2:
    status["expirationTimestamp"] = sys.argv[2]
print(json.dumps({"apiVersion": info["apiVersion"], "kind": "ExecCredential", "status": status}))
"""


@pytest.mark.parametrize("api", ["client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1"])
def test_exec_plugin_token_with_args_env_and_expiry(serve: Any, pki: Pki, sock: str, tmp_path: Path, api: str) -> None:
    far, past = "2999-01-01T00:00:00Z", "2000-01-01T00:00:00Z"

    async def body(fk: FakeKube, admin: KubeAdmin) -> None:
        cmd = plugin(tmp_path, "cred", CRED)
        for stamp, want_runs in ((far, 1), (past, 3)):
            (tmp_path / "cred.runs").unlink(missing_ok=True)
            user = exec_user(cmd, api, args=[TOKEN[:6], stamp], env=[{"name": "TOKEN_TAIL", "value": TOKEN[6:]}])
            cfg = load_kubeconfig(kubeconfig(tmp_path, fk.url, {"certificate-authority": str(pki.ca)}, user))
            client = KubeClient(cfg)
            try:
                for _ in range(3):
                    await client.get("/api/v1/nodes/n1")
            finally:
                await client.close()
            # Valid until 2999: run once; expired at once: run again for every request.
            assert runs(tmp_path, "cred") == want_runs
        assert auth_stats(admin) == {"auth token": 6}

    serve(body, **tls(pki, sock, tokens={TOKEN}))


def test_exec_plugin_runs_again_after_a_401_and_sees_the_cluster(
    serve: Any, pki: Pki, sock: str, tmp_path: Path
) -> None:
    async def body(fk: FakeKube, admin: KubeAdmin) -> None:
        cmd = plugin(tmp_path, "seq", """
            info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
            assert info["spec"]["interactive"] is False
            assert info["spec"]["cluster"]["server"].startswith("https://127.0.0.1:"), info
            assert info["spec"]["cluster"]["certificate-authority-data"]
            n = len(open(sys.argv[1] + ".runs").read())
            print(json.dumps({"apiVersion": info["apiVersion"], "kind": "ExecCredential",
                              "status": {"token": f"t{n}"}}))
        """)  # fmt: skip
        user = exec_user(cmd, args=[cmd], provideClusterInfo=True)
        cfg = load_kubeconfig(kubeconfig(tmp_path, fk.url, {"certificate-authority": str(pki.ca)}, user))
        client = KubeClient(cfg)
        try:
            await client.get("/api/v1/nodes/n1")
            fk.state.tokens = {"t2"}
            await client.get("/api/v1/nodes/n1")
        finally:
            await client.close()
        assert runs(tmp_path, "seq") == 2
        assert auth_stats(admin) == {"auth token": 2, "auth refused": 1}

    serve(body, **tls(pki, sock, tokens={"t1"}))


def test_exec_plugin_client_certificate(serve: Any, pki: Pki, sock: str, tmp_path: Path) -> None:
    async def body(fk: FakeKube, admin: KubeAdmin) -> None:
        cmd = plugin(tmp_path, "certs", f"""
            info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
            status = {{"clientCertificateData": open({str(pki.client_cert)!r}).read(),
                      "clientKeyData": open({str(pki.client_key)!r}).read()}}
            print(json.dumps({{"apiVersion": info["apiVersion"], "kind": "ExecCredential", "status": status}}))
        """)  # fmt: skip
        cfg = load_kubeconfig(kubeconfig(tmp_path, fk.url, {"certificate-authority": str(pki.ca)}, exec_user(cmd)))
        assert await list_nodes(KubeClient(cfg)) == ["n1"]
        assert auth_stats(admin) == {"auth cert": 1}

    serve(body, **tls(pki, sock, client_ca=str(pki.ca)))


def _exec_error(tmp: Path, user: dict[str, Any], timeout: float = 30, max_output: int = 1 << 20) -> str:
    cfg = load_kubeconfig(kubeconfig(tmp, "https://127.0.0.1:1", {"insecure-skip-tls-verify": True}, user))
    assert isinstance(cfg.credentials, ExecPlugin)
    cfg.credentials.timeout = timeout
    cfg.credentials.max_output = max_output
    with pytest.raises(KubeClientError) as e:
        asyncio.run(asyncio.wait_for(KubeClient(cfg).get("/api/v1/nodes/n1"), 60))
    return str(e.value)


def test_exec_plugin_that_hangs_is_killed_with_its_children(tmp_path: Path) -> None:
    cmd = plugin(tmp_path, "hang", f"""
        import subprocess
        child = subprocess.Popen(["sleep", "300"])
        open({str(tmp_path / "pids")!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(300)
    """)  # fmt: skip
    msg = _exec_error(tmp_path, exec_user(cmd), timeout=1)
    assert msg == f"GET /api/v1/nodes/n1: exec plugin {cmd}: did not finish within 1s; killed"
    for pid in map(int, (tmp_path / "pids").read_text().split()):
        assert netns.wait_for(lambda pid=pid: not netns.pid_alive(pid), 10), f"pid {pid} survived"  # type: ignore[misc]


def test_exec_plugin_failures_are_clear_errors_without_secrets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fails = plugin(tmp_path, "fails", 'sys.stderr.write("boom: no credentials here\\n"); sys.exit(3)\n')
    garbage = plugin(tmp_path, "garbage", f'print("not json {TOKEN}")\n')
    wrong_api = plugin(tmp_path, "wrongapi", f"""
        print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                          "status": {{"token": {TOKEN!r}}}}}))
    """)  # fmt: skip
    flood = plugin(tmp_path, "flood", 'sys.stdout.write("x" * (4 << 20))\n')
    with caplog.at_level(logging.DEBUG):
        assert _exec_error(tmp_path, exec_user(fails)).endswith(f"exec plugin {fails}: exited with status 3: boom: "
                                                                 "no credentials here")  # fmt: skip
        assert _exec_error(tmp_path, exec_user(garbage)).endswith("its output is not an ExecCredential JSON object")
        assert "answered with apiVersion 'client.authentication.k8s.io/v1beta1'" in _exec_error(
            tmp_path, exec_user(wrong_api)
        )
        assert _exec_error(tmp_path, exec_user(flood), max_output=1 << 20).endswith(
            "wrote more than 1048576 bytes; killed"
        )
        missing = _exec_error(tmp_path, exec_user("no-such-plugin-xyz", installHint="install it with: apt install xyz"))
        assert missing.endswith(
            "exec plugin no-such-plugin-xyz: executable not found: install it with: apt install xyz"
        )
    assert TOKEN not in caplog.text


def test_secrets_never_reach_messages_or_logs(serve: Any, pki: Pki, sock: str, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    async def body(fk: FakeKube, admin: KubeAdmin) -> None:
        ca = {"certificate-authority": str(pki.ca)}
        for user in ({"token": TOKEN}, {"username": "admin", "password": PASSWORD},
                     {"client-certificate-data": pki.data(pki.client_cert),
                      "client-key-data": pki.data(pki.client_key)}):  # fmt: skip
            path = kubeconfig(tmp_path, fk.url, ca, user)
            st = KubeStore(KubeOptions(node_name="n1", kubeconfig_file=path, net_config_path=str(tmp_path / "none")))
            fk.state.tokens = {"other"}  # nothing we send is accepted
            with pytest.raises(StoreError) as e:
                await st.get_node()
            await st.close()
            text = f"{e.value} {st!r} {st.opts!r}"
            cfg = await st._client_config()
            text += repr(cfg) + repr(cfg.credentials) + repr(cfg.tls) + repr(await cfg.credentials.get())
            for secret in (TOKEN, PASSWORD, base64.b64encode(f"admin:{PASSWORD}".encode()).decode(),
                           pki.client_key.read_text().splitlines()[1]):  # fmt: skip
                assert secret not in text
                assert secret not in caplog.text
            assert "HTTP 401" in str(e.value)

    with caplog.at_level(logging.DEBUG):
        serve(body, **tls(pki, sock, tokens={"other"}))


def test_kubeconfig_errors_are_one_clear_line(tmp_path: Path) -> None:
    cases: list[tuple[Any, str]] = [
        ({"users": [{"name": "u", "user": {"token": "a", "username": "b", "password": "c"}}]}, "not both"),
        ({"users": [{"name": "u", "user": {"client-key-data": "!!!"}}]}, "client-key-data is not valid base64"),
        ({"users": [{"name": "u", "user": exec_user("x", api="client.authentication.k8s.io/v1alpha1")}]},
         "apiVersion 'client.authentication.k8s.io/v1alpha1' is not one of"),
        ({"current-context": "nope"}, "no context named 'nope'"),
        ({"clusters": [{"name": "c", "cluster": {"server": "ftp://x"}}]}, "is not an http"),
        ({"clusters": [{"name": "c", "cluster": {"server": "https://u:pw@h"}}]}, "must not carry credentials"),
    ]  # fmt: skip
    for override, want in cases:
        path = kubeconfig(tmp_path, "https://127.0.0.1:6443", {}, {"token": TOKEN}, **override)
        st = KubeStore(KubeOptions(node_name="n1", kubeconfig_file=path))
        with pytest.raises(StoreError, match=want) as e:
            asyncio.run(st._client_config())
        assert "\n" not in str(e.value) and len(str(e.value)) < 400
        assert "pw" not in str(e.value).split("carry")[0]
    (tmp_path / "kubeconfig").write_text("a: [b\n")
    with pytest.raises(StoreError, match=r"is not valid YAML \(line 2\)"):
        asyncio.run(KubeStore(KubeOptions(kubeconfig_file=str(tmp_path / "kubeconfig")))._client_config())


def test_in_cluster_needs_the_environment_and_the_token(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be defined"):
        in_cluster(str(tmp_path), "", "443")
    with pytest.raises(ValueError, match=r"cannot read token file .*token"):
        in_cluster(str(tmp_path), "10.96.0.1", "443")


def test_temp_file_fallback_for_keys_is_private_and_removed(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without memfd_create the key goes to a 0600 file in a 0700 directory, removed at once."""
    import ssl
    import tempfile

    from pyflannel.store import http

    seen: list[tuple[int, int]] = []
    real = ssl.SSLContext.load_cert_chain

    def spy(self: ssl.SSLContext, certfile: str, keyfile: str | None = None, password: Any = None) -> None:
        assert keyfile is not None
        seen.append((stat.S_IMODE(os.stat(keyfile).st_mode), stat.S_IMODE(os.stat(os.path.dirname(keyfile)).st_mode)))
        real(self, certfile, keyfile)

    monkeypatch.delattr(os, "memfd_create")
    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    http.load_cert_chain(ssl.create_default_context(), pki.client_cert.read_bytes(), pki.client_key.read_bytes())
    assert seen == [(0o600, 0o700)]
    assert list(tmp_path.iterdir()) == []
