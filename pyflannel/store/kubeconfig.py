"""Where the Kubernetes API is and how we authenticate to it: in-cluster, kubeconfig, or an explicit URL.

The same sources and rules as client-go's clientcmd.BuildConfigFromFlags, which upstream flanneld uses:
- no --kube-api-url and no --kubeconfig-file: in-cluster (KUBERNETES_SERVICE_HOST/PORT, the service account's
  token and ca.crt; the token file is re-read every minute, as bound tokens rotate);
- a kubeconfig: its current-context (or a given one), with --kube-api-url overriding the cluster's server;
- only --kube-api-url: that server, with the service account's token and CA when the pod has them.

A kubeconfig user authenticates with a client certificate (files or -data), a token or tokenFile,
username/password, or an exec plugin (client.authentication.k8s.io v1 and v1beta1 ExecCredential). `auth-provider`
entries are refused with a clear error: upstream flanneld links none of client-go's auth providers (it fails
with `no Auth Provider found for name "oidc"`), and the gcp and azure providers are gone from client-go anyway;
their replacements are exec plugins (gke-gcloud-auth-plugin, kubelogin), which work here.

Every file is read through config.read_config_file (a regular file, size-capped). Secrets (tokens, passwords,
keys, the plugin's output) never appear in a message: fields holding them are left out of repr().
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import shutil
import signal
import ssl
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from ..config import ConfigError, cut, read_config_file
from . import http

log = logging.getLogger(__name__)

EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
# client-go re-reads a token file at most once a minute (transport.NewCachedFileTokenSource).
TOKEN_FILE_PERIOD = 60.0
# Bounds on an exec plugin: client-go has none; a plugin that hangs would stop the agent forever.
EXEC_TIMEOUT = 30.0
EXEC_MAX_OUTPUT = 1 << 20


class KubeConfigError(ConfigError):
    """The client cannot be configured: the message says which file, field or variable is wrong."""


# --- server ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Server:
    """The API server's address; `base_path` keeps a prefix such as Rancher's /k8s/clusters/<id>."""

    scheme: str
    host: str  # an IPv6 address without brackets
    port: int
    base_path: str = ""

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.base_path}"


def parse_server(url: str, what: str = "server") -> Server:
    """A server URL (`https://host[:port][/prefix]`, a bare host:port taken as https, as client-go does)."""
    text = url.strip()
    if "://" not in text:
        text = "https://" + text
    try:
        u = urlsplit(text)
        port = u.port
    except ValueError as e:
        raise KubeConfigError(f"{what} {cut(url)} is not a URL: {e}") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise KubeConfigError(f"{what} {cut(url)} is not an http(s) URL with a host")
    if u.query or u.fragment:
        raise KubeConfigError(f"{what} {cut(url)} must not have a query or fragment")
    if u.username is not None or u.password is not None:
        # Refused, not used: credentials in a URL end up in logs and messages.
        raise KubeConfigError(f"{what} must not carry credentials in the URL; use the kubeconfig's user")
    return Server(
        scheme=u.scheme,
        host=u.hostname,
        port=port or (443 if u.scheme == "https" else 80),
        base_path=u.path.rstrip("/"),
    )


# --- TLS ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TLSConfig:
    """What the TLS handshake needs. Files are re-read when they change (rotated certificates); -data is fixed."""

    ca_file: str = ""
    ca_data: bytes = field(default=b"", repr=False)
    insecure: bool = False
    server_name: str = ""
    cert_file: str = ""
    key_file: str = ""
    cert_data: bytes = field(default=b"", repr=False)
    key_data: bytes = field(default=b"", repr=False)

    def file_signature(self) -> tuple[Any, ...]:
        """Changes when one of the files changes: the client then builds a new SSL context."""
        sig: list[Any] = []
        for path in (self.ca_file, self.cert_file, self.key_file):
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            sig.append((st.st_ino, st.st_mtime_ns, st.st_size) if st else None)
        return tuple(sig)

    def check_files(self) -> None:
        """Read every file once through the capped reader, so a FIFO, a device or a huge file is a clear error at
        configuration and not a hang at the first connection."""
        for what, path in (("CA", self.ca_file), ("client certificate", self.cert_file), ("key", self.key_file)):
            if path:
                read_config_file(path, f"Kubernetes {what} file")

    def context(self, cert: bytes = b"", key: bytes = b"") -> ssl.SSLContext:
        """The client SSL context (store/http.py's); `cert`/`key` (PEM, from an exec plugin) win over the
        configured ones."""
        ca = b""
        if not self.insecure:
            ca = self.ca_data or (read_config_file(self.ca_file, "Kubernetes CA file") if self.ca_file else b"")
        if not (cert and key):
            cert = self.cert_data or (
                read_config_file(self.cert_file, "Kubernetes client certificate file") if self.cert_file else b""
            )
            key = self.key_data or (read_config_file(self.key_file, "Kubernetes key file") if self.key_file else b"")
        if (cert or key) and not (cert and key):
            raise KubeConfigError("a client certificate needs both the certificate and its key")
        try:
            return http.client_context(ca, cert, key, insecure=self.insecure)
        except http.TLSSetupError as e:
            if e.part == "CA":
                where = self.ca_file or "(certificate-authority-data)"
                raise KubeConfigError(f"the Kubernetes CA {where} is no PEM certificate: {e}") from None
            raise KubeConfigError(f"the Kubernetes client certificate or key cannot be used: {e}") from None


# --- credentials ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Creds:
    """What one request carries: an Authorization header value and/or a client certificate (exec plugins)."""

    authorization: str = field(default="", repr=False)
    cert: bytes = field(default=b"", repr=False)
    key: bytes = field(default=b"", repr=False)


class Credentials(ABC):
    @abstractmethod
    async def get(self, refresh: bool = False) -> Creds:
        """The current credentials; `refresh` after a 401: re-read or re-run whatever gave them."""

    def describe(self) -> str:
        return type(self).__name__


class NoCredentials(Credentials):
    async def get(self, refresh: bool = False) -> Creds:
        return Creds()

    def describe(self) -> str:
        return "no credentials"


class StaticCredentials(Credentials):
    """A token or username/password from the kubeconfig."""

    def __init__(self, authorization: str, what: str) -> None:
        self._creds = Creds(authorization=authorization)
        self._what = what

    async def get(self, refresh: bool = False) -> Creds:
        return self._creds

    def describe(self) -> str:
        return self._what

    def __repr__(self) -> str:
        return f"StaticCredentials({self._what})"


def bearer(token: str) -> str:
    return f"Bearer {token}"


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class TokenFile(Credentials):
    """A bearer token re-read from its file every `period` seconds (bound service account tokens rotate)."""

    def __init__(self, path: str, period: float = TOKEN_FILE_PERIOD) -> None:
        self.path = path
        self.period = period
        self._creds: Creds | None = None
        self._read_at = 0.0

    def read(self) -> Creds:
        text = read_config_file(self.path, "token file").decode("utf-8", "replace").strip()
        if not text:
            raise KubeConfigError(f"token file {self.path} is empty")
        if any(c in text for c in "\r\n\0"):
            raise KubeConfigError(f"token file {self.path} holds more than one line")
        return Creds(authorization=bearer(text))

    async def get(self, refresh: bool = False) -> Creds:
        now = time.monotonic()
        if self._creds is None or refresh or now - self._read_at >= self.period:
            try:
                self._creds = self.read()
            except ConfigError:
                if self._creds is None:
                    raise
                # A rotation in progress (the kubelet swaps a symlink): the last token is still good for a while.
                log.warning("cannot re-read token file %s, keeping the last token", self.path)
            self._read_at = now
        return self._creds

    def describe(self) -> str:
        return f"token file {self.path}"

    def __repr__(self) -> str:
        return f"TokenFile({self.path!r})"


@dataclass(frozen=True)
class ExecConfig:
    """A kubeconfig user's `exec` entry."""

    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    api_version: str = EXEC_API_VERSIONS[0]
    install_hint: str = ""
    provide_cluster_info: bool = False
    interactive_mode: str = "IfAvailable"
    cluster_info: Mapping[str, Any] = field(default_factory=dict, repr=False)


class ExecPlugin(Credentials):
    """Credentials from an exec plugin, run again when they expire (expirationTimestamp) or after a 401.

    Bounded where client-go is not: the plugin gets `timeout` seconds (then it and its process group are
    killed) and `max_output` bytes of output."""

    def __init__(self, cfg: ExecConfig, timeout: float = EXEC_TIMEOUT, max_output: int = EXEC_MAX_OUTPUT) -> None:
        self.cfg = cfg
        self.timeout = timeout
        self.max_output = max_output
        self._creds: Creds | None = None
        self._expiry: float | None = None  # wall clock; None: valid until a 401
        self._lock = asyncio.Lock()
        self.runs = 0

    def describe(self) -> str:
        return f"exec plugin {self.cfg.command}"

    def __repr__(self) -> str:
        return f"ExecPlugin({self.cfg.command!r})"

    async def get(self, refresh: bool = False) -> Creds:
        async with self._lock:
            if self._creds is None or refresh or (self._expiry is not None and time.time() >= self._expiry):
                self._creds, self._expiry = await self._run()
            return self._creds

    def _exec_info(self) -> str:
        spec: dict[str, Any] = {"interactive": False}
        if self.cfg.provide_cluster_info:
            spec["cluster"] = dict(self.cfg.cluster_info)
        return json.dumps({"apiVersion": self.cfg.api_version, "kind": "ExecCredential", "spec": spec})

    def _fail(self, why: str) -> KubeConfigError:
        return KubeConfigError(f"exec plugin {self.cfg.command}: {why}")

    async def _run(self) -> tuple[Creds, float | None]:
        cfg = self.cfg
        if cfg.interactive_mode == "Always":
            raise self._fail("interactiveMode Always needs a terminal, and flanneld has none")
        exe = cfg.command if os.sep in cfg.command else shutil.which(cfg.command)
        if not exe or not os.access(exe, os.X_OK):
            hint = f": {cfg.install_hint.strip()}" if cfg.install_hint.strip() else ""
            raise self._fail(f"executable not found{hint}")
        env = {**os.environ, **dict(cfg.env), "KUBERNETES_EXEC_INFO": self._exec_info()}
        self.runs += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                exe, *cfg.args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True,
            )  # fmt: skip
        except OSError as e:
            raise self._fail(f"cannot run it: {e.strerror or e}") from None
        readers = [asyncio.ensure_future(self._read(proc.stdout)), asyncio.ensure_future(self._read(proc.stderr))]
        try:
            async with asyncio.timeout(self.timeout):
                out, err = await asyncio.gather(*readers)
                code = await proc.wait()
        except TimeoutError:
            raise self._fail(f"did not finish within {self.timeout:g}s; killed") from None
        except _TooMuch:
            raise self._fail(f"wrote more than {self.max_output} bytes; killed") from None
        finally:
            for r in readers:
                r.cancel()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # our child leads its own session
                # wait() returns once the pipes are at their end too: drain what the killed group left in them.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await asyncio.gather(_drain(proc.stdout), _drain(proc.stderr), proc.wait())
        if code != 0:
            # Its stderr is for humans and holds no credential (those go to stdout): worth showing, cut short.
            detail = err.decode("utf-8", "replace").strip().splitlines()
            tail = f": {detail[-1][:200]}" if detail else ""
            raise self._fail(f"exited with status {code}{tail}")
        return self._parse(out)

    async def _read(self, stream: asyncio.StreamReader | None) -> bytes:
        assert stream is not None
        data = bytearray()
        while chunk := await stream.read(65536):
            data += chunk
            if len(data) > self.max_output:
                raise _TooMuch
        return bytes(data)

    def _parse(self, out: bytes) -> tuple[Creds, float | None]:
        # Nothing of the output in a message: it holds the credential.
        try:
            obj = json.loads(out)
        except (ValueError, RecursionError):
            raise self._fail("its output is not an ExecCredential JSON object") from None
        if not isinstance(obj, dict) or obj.get("kind") != "ExecCredential":
            raise self._fail("its output is not an ExecCredential")
        if obj.get("apiVersion") != self.cfg.api_version:
            raise self._fail(
                f"it answered with apiVersion {cut(obj.get('apiVersion'))}, the kubeconfig asks for "
                f"{self.cfg.api_version}"
            )
        status = obj.get("status")
        if not isinstance(status, dict):
            raise self._fail("its ExecCredential has no status")
        token = status.get("token") or ""
        cert = status.get("clientCertificateData") or ""
        key = status.get("clientKeyData") or ""
        if not all(isinstance(v, str) for v in (token, cert, key)):
            raise self._fail("its ExecCredential status holds a non-string credential")
        if bool(cert) != bool(key):
            raise self._fail("its ExecCredential has clientCertificateData without clientKeyData or the reverse")
        if not token and not cert:
            raise self._fail("its ExecCredential holds neither a token nor a client certificate")
        if any(c in token for c in "\r\n\0"):
            raise self._fail("its token holds a line break")
        expiry: float | None = None
        stamp = status.get("expirationTimestamp")
        if stamp:
            try:
                expiry = datetime.fromisoformat(str(stamp)).timestamp()
            except ValueError:
                raise self._fail(f"expirationTimestamp {cut(stamp)} is not an RFC 3339 time") from None
        creds = Creds(authorization=bearer(token) if token else "", cert=cert.encode(), key=key.encode())
        return creds, expiry


class _TooMuch(Exception):
    pass


async def _drain(stream: asyncio.StreamReader | None) -> None:
    while stream is not None and await stream.read(65536):
        pass


# --- whole configuration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientConfig:
    server: Server
    tls: TLSConfig
    credentials: Credentials
    source: str  # for messages: "in-cluster", "kubeconfig /x context y"


def in_cluster(serviceaccount_dir: str, host: str, port: str) -> ClientConfig:
    """rest.InClusterConfig: KUBERNETES_SERVICE_HOST/PORT, the service account's token (re-read) and CA."""
    if not host or not port:
        raise KubeConfigError("not in a cluster: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be defined")
    host = host.strip("[]")  # an IPv6 address, bracketed or not
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise KubeConfigError(f"KUBERNETES_SERVICE_PORT {cut(port)} is not a port")
    token = TokenFile(os.path.join(serviceaccount_dir, "token"))
    token.read()  # present and readable now, or a clear error now
    ca = os.path.join(serviceaccount_dir, "ca.crt")
    tls = TLSConfig(ca_file=ca if os.path.exists(ca) else "")
    tls.check_files()
    server = Server("https", host, int(port))
    return ClientConfig(server=server, tls=tls, credentials=token, source="in-cluster")


def explicit_url(api_url: str, serviceaccount_dir: str) -> ClientConfig:
    """--kube-api-url alone: inside a pod the service account's token and CA still authenticate us to it."""
    server = parse_server(api_url, "--kube-api-url")
    token_path = os.path.join(serviceaccount_dir, "token")
    creds: Credentials = NoCredentials()
    tls = TLSConfig()
    if os.path.isfile(token_path):
        tf = TokenFile(token_path)
        tf.read()
        creds = tf
        ca = os.path.join(serviceaccount_dir, "ca.crt")
        if os.path.isfile(ca):
            tls = TLSConfig(ca_file=ca)
    tls.check_files()
    return ClientConfig(server=server, tls=tls, credentials=creds, source="--kube-api-url")


def load_kubeconfig(path: str, context: str = "", api_url: str = "") -> ClientConfig:
    """A kubeconfig file (YAML or JSON) at its current-context or `context`; `api_url` overrides the server."""
    raw = read_config_file(path, "kubeconfig file")
    doc = _parse_document(raw, path)
    where = f"kubeconfig {path}"
    ctx_name = context or _str(doc, "current-context", where)
    if not ctx_name:
        raise KubeConfigError(f"{where} has no current-context")
    ctx = _named(doc, "contexts", "context", ctx_name, where)
    where = f"{where} context {ctx_name}"
    cluster_name = _str(ctx, "cluster", where)
    user_name = _str(ctx, "user", where)
    if not cluster_name and not api_url:
        raise KubeConfigError(f"{where} names no cluster")
    cluster = _named(doc, "clusters", "cluster", cluster_name, where) if cluster_name else {}
    user = _named(doc, "users", "user", user_name, where) if user_name else {}
    base = os.path.dirname(os.path.abspath(path))

    def resolve(p: str) -> str:
        return p if not p or os.path.isabs(p) else os.path.join(base, p)

    server_text = api_url or _str(cluster, "server", where)
    if not server_text:
        raise KubeConfigError(f"{where}: the cluster has no server")
    server = parse_server(server_text, "--kube-api-url" if api_url else f"{where}: server")
    if cluster.get("proxy-url"):
        raise KubeConfigError(f"{where}: proxy-url is not supported; reach the API server directly")
    tls = TLSConfig(
        ca_file=resolve(_str(cluster, "certificate-authority", where)),
        ca_data=_b64(cluster, "certificate-authority-data", where),
        insecure=_bool(cluster, "insecure-skip-tls-verify", where),
        server_name=_str(cluster, "tls-server-name", where),
        cert_file=resolve(_str(user, "client-certificate", where)),
        key_file=resolve(_str(user, "client-key", where)),
        cert_data=_b64(user, "client-certificate-data", where),
        key_data=_b64(user, "client-key-data", where),
    )
    if tls.insecure and (tls.ca_file or tls.ca_data):
        # client-go refuses this too: "specifying a root certificates file with the insecure flag is not allowed"
        raise KubeConfigError(f"{where}: insecure-skip-tls-verify together with a certificate-authority")
    tls.check_files()
    creds = _user_credentials(user, where, resolve, server, tls, cluster)
    return ClientConfig(server=server, tls=tls, credentials=creds, source=where)


def _user_credentials(
    user: Mapping[str, Any],
    where: str,
    resolve: Any,
    server: Server,
    tls: TLSConfig,
    cluster: Mapping[str, Any],
) -> Credentials:
    provider = user.get("auth-provider")
    if provider:
        name = provider.get("name") if isinstance(provider, Mapping) else None
        raise KubeConfigError(
            f"{where}: auth-provider {cut(name)} is not supported (upstream flanneld has none either); "
            "use an exec plugin (client.authentication.k8s.io), e.g. kubelogin or gke-gcloud-auth-plugin"
        )
    token = _str(user, "token", where)
    token_file = resolve(_str(user, "tokenFile", where))
    username = _str(user, "username", where)
    password = _str(user, "password", where)
    exec_entry = user.get("exec")
    if (token or token_file) and (username or password):
        raise KubeConfigError(f"{where}: username/password or a bearer token may be set, but not both")
    if exec_entry:
        if token or token_file or username or password:
            raise KubeConfigError(f"{where}: an exec plugin and a token or password may not both be set")
        return ExecPlugin(_exec_config(exec_entry, where, resolve, server, tls, cluster))
    if token:
        if any(c in token for c in "\r\n\0"):
            raise KubeConfigError(f"{where}: the user's token holds a line break")
        return StaticCredentials(bearer(token), f"the token of {where}")
    if token_file:
        tf = TokenFile(token_file)
        tf.read()
        return tf
    if username or password:
        return StaticCredentials(basic(username, password), f"the username/password of {where}")
    return NoCredentials()


def _exec_config(
    entry: Any, where: str, resolve: Any, server: Server, tls: TLSConfig, cluster: Mapping[str, Any]
) -> ExecConfig:
    what = f"{where}: exec"
    if not isinstance(entry, Mapping):
        raise KubeConfigError(f"{what} is not a mapping")
    command = _str(entry, "command", what)
    if not command:
        raise KubeConfigError(f"{what} has no command")
    api_version = _str(entry, "apiVersion", what)
    if api_version not in EXEC_API_VERSIONS:
        raise KubeConfigError(f"{what}: apiVersion {cut(api_version)} is not one of {', '.join(EXEC_API_VERSIONS)}")
    args = entry.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise KubeConfigError(f"{what}: args must be a list of strings")
    env: list[tuple[str, str]] = []
    for item in entry.get("env") or []:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"]:
            raise KubeConfigError(f"{what}: every env entry needs a name and a value")
        value = item.get("value", "")
        if not isinstance(value, str):
            raise KubeConfigError(f"{what}: env {item['name']} needs a string value")
        env.append((item["name"], value))
    mode = _str(entry, "interactiveMode", what) or "IfAvailable"
    if mode not in ("Never", "IfAvailable", "Always"):
        raise KubeConfigError(f"{what}: interactiveMode {cut(mode)} is not Never, IfAvailable or Always")
    # As clientcmd: only a command with a path separator is relative to the kubeconfig; a bare name is looked up
    # in PATH.
    if os.sep in command:
        command = resolve(command)
    info: dict[str, Any] = {"server": server.url}
    if tls.server_name:
        info["tls-server-name"] = tls.server_name
    if tls.insecure:
        info["insecure-skip-tls-verify"] = True
    if tls.ca_data:
        info["certificate-authority-data"] = base64.b64encode(tls.ca_data).decode()
    elif tls.ca_file:
        info["certificate-authority-data"] = base64.b64encode(read_config_file(tls.ca_file, "CA file")).decode()
    ext = cluster.get("extensions")
    if isinstance(ext, list):
        for e in ext:
            if isinstance(e, Mapping) and e.get("name") == "client.authentication.k8s.io/exec":
                info["config"] = e.get("extension")
    return ExecConfig(
        command=command,
        args=tuple(args),
        env=tuple(env),
        api_version=api_version,
        install_hint=_str(entry, "installHint", what),
        provide_cluster_info=_bool(entry, "provideClusterInfo", what),
        interactive_mode=mode,
        cluster_info=info,
    )


# --- document helpers -----------------------------------------------------------------------------------
def _parse_document(raw: bytes, path: str) -> Mapping[str, Any]:
    try:
        doc = json.loads(raw)  # JSON is YAML too; a JSON kubeconfig then needs no YAML parser
    except (ValueError, RecursionError):
        try:
            import yaml
        except ImportError:
            raise KubeConfigError(f"kubeconfig {path} is YAML, and PyYAML is not installed") from None
        try:
            doc = yaml.safe_load(raw)
        except (yaml.YAMLError, RecursionError, ValueError) as e:
            mark = getattr(e, "problem_mark", None)
            at = f" (line {mark.line + 1})" if mark is not None else ""
            raise KubeConfigError(f"kubeconfig {path} is not valid YAML{at}") from None
    if not isinstance(doc, Mapping):
        raise KubeConfigError(f"kubeconfig {path} is not a mapping")
    return doc


def _named(doc: Mapping[str, Any], list_key: str, item_key: str, name: str, where: str) -> Mapping[str, Any]:
    items = doc.get(list_key) or []
    if not isinstance(items, list):
        raise KubeConfigError(f"{where}: {list_key} is not a list")
    for item in items:
        if isinstance(item, Mapping) and item.get("name") == name:
            value = item.get(item_key) or {}
            if not isinstance(value, Mapping):
                raise KubeConfigError(f"{where}: {item_key} {cut(name)} is not a mapping")
            return value
    raise KubeConfigError(f"{where}: no {item_key} named {cut(name)}")


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    v = obj.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise KubeConfigError(f"{where}: {key} is not a string")
    return v


def _bool(obj: Mapping[str, Any], key: str, where: str) -> bool:
    v = obj.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise KubeConfigError(f"{where}: {key} is not true or false")
    return v


def _b64(obj: Mapping[str, Any], key: str, where: str) -> bytes:
    v = obj.get(key)
    if not v:
        return b""
    if not isinstance(v, str):
        raise KubeConfigError(f"{where}: {key} is not a base64 string")
    try:
        return base64.b64decode("".join(v.split()), validate=True)
    except (binascii.Error, ValueError):
        raise KubeConfigError(f"{where}: {key} is not valid base64") from None
