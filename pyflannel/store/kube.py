"""The Kubernetes store (`--kube-subnet-mgr`): leases are Node objects, as upstream's kube subnet manager.

Our subnet is the node's `spec.podCIDRs` (or `spec.podCIDR`), handed out by the controller manager; nothing is
allocated here. What other nodes need from us goes into annotations on our Node, written with a
strategic-merge patch on the `status` subresource (the only write the upstream RBAC grants besides none):

    <p>/kube-subnet-manager: "true"      <p>/backend-type: "vxlan"
    <p>/backend-data: '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}'  (host-gw, ipip: 'null')
    <p>/public-ip: "192.168.64.3"        and, with IPv6 on, <p>/backend-v6-data, <p>/public-ipv6

Every Node annotated `kube-subnet-manager: "true"` is a peer; a list+watch on Nodes turns into lease events.

Two optional Store hooks carry what upstream's main.go and vxlan backend read from the Node:
`public_ip_overrides()` (the `<p>/node-public-ip` annotations win over the flags) and
`previous_backend_data()` (a restarted agent keeps its VTEP MAC, which peers hold in their neighbour/FDB entries).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from ..backoff import Backoff
from ..config import ConfigError, NetConfig, loads_json, parse_cidr, parse_ip, parse_net_config, read_config_file
from ..lease import EventType, Lease, LeaseAttrs, LeaseEvent, LeaseSnapshot, WatchUpdate
from ..subnetenv import SubnetEnv
from .base import LeaseRevokedError, Store, StoreError
from .kubeclient import STRATEGIC, KubeApiError, KubeClient, KubeClientError, path_segment
from .kubeconfig import ClientConfig, explicit_url, in_cluster, load_kubeconfig
from .options import KubeOptions

log = logging.getLogger(__name__)


class KubeNodeError(ConfigError):
    """Our Node cannot be used as a lease (no podCIDR, podCIDR outside Network): fatal, as upstream."""


@dataclass(frozen=True)
class Annotations:
    """The annotation names for a prefix, normalised as upstream's newAnnotations does."""

    prefix: str

    @classmethod
    def for_prefix(cls, prefix: str) -> Annotations:
        prefix = prefix.strip()
        if not prefix:
            raise ConfigError("--kube-annotation-prefix must not be empty")
        slashes = prefix.count("/")
        if slashes > 1:
            raise ConfigError(f"--kube-annotation-prefix {prefix!r}: a prefix may contain at most one slash")
        if slashes == 0:
            prefix += "/"
        if not prefix.endswith(("/", "-")):
            prefix += "-"
        return cls(prefix)

    @property
    def kube_managed(self) -> str:
        return self.prefix + "kube-subnet-manager"

    @property
    def backend_type(self) -> str:
        return self.prefix + "backend-type"

    @property
    def backend_data(self) -> str:
        return self.prefix + "backend-data"

    @property
    def backend_v6_data(self) -> str:
        return self.prefix + "backend-v6-data"

    @property
    def public_ip(self) -> str:
        return self.prefix + "public-ip"

    @property
    def public_ipv6(self) -> str:
        return self.prefix + "public-ipv6"

    @property
    def public_ip_overwrite(self) -> str:
        return self.prefix + "public-ip-overwrite"

    @property
    def public_ipv6_overwrite(self) -> str:
        return self.prefix + "public-ipv6-overwrite"

    @property
    def node_public_ip(self) -> str:
        return self.prefix + "node-public-ip"

    @property
    def node_public_ipv6(self) -> str:
        return self.prefix + "node-public-ipv6"


class _ApiError(StoreError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _WatchGone(Exception):
    """The watch's resourceVersion is older than the server's history: re-list."""


def _mapping(v: Any, what: str) -> Mapping[str, Any]:
    """A JSON object of a Node, `{}` when absent; ValueError when it is something else."""
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ValueError(f"{what} is not an object")
    return v


def _parse_pod_cidrs(node: Mapping[str, Any]) -> tuple[IPv4Network | None, IPv6Network | None]:
    """spec.podCIDRs (or spec.podCIDR) as one IPv4 and one IPv6 network; raises ValueError."""
    spec = _mapping(node.get("spec"), "spec")
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    if not isinstance(cidrs, list) or len(cidrs) > 2:
        raise ValueError(f"spec.podCIDRs {_cut(cidrs)} should be IPv4 and/or IPv6 only")
    v4: IPv4Network | None = None
    v6: IPv6Network | None = None
    for c in cidrs:
        net = parse_cidr(c)  # Go's net.ParseCIDR, as upstream reads them: no zone, no netmask form
        if isinstance(net, IPv4Network):
            if v4 is not None:
                raise ValueError(f"spec.podCIDRs {_cut(cidrs)} holds two IPv4 networks")
            v4 = net
        else:
            if v6 is not None:
                raise ValueError(f"spec.podCIDRs {_cut(cidrs)} holds two IPv6 networks")
            v6 = net
    return v4, v6


def _cut(v: Any, limit: int = 80) -> str:
    try:
        text = repr(v)
    except RecursionError:
        text = f"<{type(v).__name__} nested too deeply>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode_data(raw: Any) -> Any:
    """A backend-data annotation: JSON text (upstream's json.RawMessage), None when absent; raises ValueError."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise ValueError(f"backend data {_cut(raw)} is not a string")
    return loads_json(raw)


def _encode_data(data: Any) -> str:
    # Go's json.Marshal of a RawMessage: compact, key order kept; a nil message is "null".
    return json.dumps(data, separators=(",", ":"))


def _annotation_ip(a: Mapping[str, Any], key: str, version: int) -> Any:
    v = a.get(key, "")
    if not isinstance(v, str):
        raise ValueError(f"annotation {key} {_cut(v)} is not a string")
    ip = parse_ip(v)
    if ip.version != version:
        raise ValueError(f"annotation {key} {v!r} is not an IPv{version} address")
    return ip


def _lease_subnets(node: Any, net: NetConfig) -> tuple[IPv4Network | None, IPv6Network | None]:
    """The podCIDRs of a Node that a lease of `net` would hold; raises ValueError."""
    if not isinstance(node, Mapping):
        raise ValueError("the object is not a JSON object")
    v4, v6 = _parse_pod_cidrs(node)
    return (v4 if net.enable_ipv4 else None), (v6 if net.enable_ipv6 else None)


def node_annotations(node: Mapping[str, Any]) -> Mapping[str, Any]:
    """metadata.annotations of a Node; raises ValueError when the object does not have the shape of one."""
    meta = _mapping(node.get("metadata"), "metadata")
    return _mapping(meta.get("annotations"), "metadata.annotations")


def node_to_lease(node: Mapping[str, Any], ann: Annotations, net: NetConfig) -> Lease | None:
    """The lease a Node stands for; None when it is not a flannel node. Raises ValueError for a flannel node
    whose annotations or podCIDRs cannot be read (or an object that is no Node at all)."""
    if not isinstance(node, Mapping):
        raise ValueError("the object is not a JSON object")
    a = node_annotations(node)
    if a.get(ann.kube_managed) != "true":
        return None
    v4, v6 = _parse_pod_cidrs(node)
    pub4: IPv4Address | None = None
    pub6: IPv6Address | None = None
    data = data6 = None
    if net.enable_ipv4:
        if v4 is None:
            raise ValueError("no IPv4 podCIDR")
        pub4 = _annotation_ip(a, ann.public_ip, 4)
        data = _decode_data(a.get(ann.backend_data))
    else:
        v4 = None
    if net.enable_ipv6:
        if v6 is None:
            raise ValueError("no IPv6 podCIDR")
        pub6 = _annotation_ip(a, ann.public_ipv6, 6)
        data6 = _decode_data(a.get(ann.backend_v6_data))
    else:
        v6 = None
    btype = a.get(ann.backend_type, "")
    if not isinstance(btype, str):
        raise ValueError(f"annotation {ann.backend_type} {_cut(btype)} is not a string")
    attrs = LeaseAttrs(
        public_ip=pub4,
        public_ipv6=pub6,
        backend_type=btype,
        backend_data=data,
        backend_v6_data=data6,
    )
    return Lease(subnet=v4, ipv6_subnet=v6, attrs=attrs, expiration=None)


def _node_name(node: Any) -> str:
    meta = node.get("metadata") if isinstance(node, Mapping) else None
    name = meta.get("name") if isinstance(meta, Mapping) else None
    return name if isinstance(name, str) else "?"


@dataclass
class KubeStore(Store):
    name = "kube"
    opts: KubeOptions
    ann: Annotations = field(init=False)
    node_name: str = field(init=False, default="")
    _client: KubeClient | None = field(init=False, default=None)
    _net: NetConfig | None = field(init=False, default=None)
    _start_lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    # Our lease and the attrs we annotated it with, once acquired: the watch keeps the lease while our Node is
    # gone or unannotated, and annotates the Node again when it is back (see _own_node).
    _own: Lease | None = field(init=False, default=None)
    _own_attrs: LeaseAttrs | None = field(init=False, default=None)
    _own_trouble: str = field(init=False, default="")
    _reannotate_due: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.ann = Annotations.for_prefix(self.opts.annotation_prefix)

    # --- connection --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Build the client (kubeconfig, --kube-api-url or in-cluster) and resolve our node name."""
        async with self._start_lock:
            if self._client is not None:
                return
            self._client = KubeClient(await self._client_config(), timeout=self.opts.request_timeout)
            try:
                self.node_name = await self._resolve_node_name()
            except BaseException:
                await self.close()
                raise
            log.info("kube subnet manager for node %s, annotation prefix %s", self.node_name, self.ann.prefix)

    async def _client_config(self) -> ClientConfig:
        o = self.opts
        try:
            if o.kubeconfig_file:
                return load_kubeconfig(o.kubeconfig_file, context=o.kube_context, api_url=o.api_url)
            if o.api_url:
                return explicit_url(o.api_url, o.serviceaccount_dir)
            return in_cluster(o.serviceaccount_dir, o.service_host, o.service_port)
        except ConfigError as e:
            raise StoreError(
                f"cannot configure the Kubernetes client (use --kube-api-url, --kubeconfig-file, "
                f"or run in a pod with a service account): {e}"
            ) from None

    async def _resolve_node_name(self) -> str:
        if self.opts.node_name:
            return self.opts.node_name
        ns, pod_name = self.opts.pod_namespace, self.opts.pod_name
        if not pod_name or not ns:
            raise StoreError("env variables POD_NAME and POD_NAMESPACE must be set when NODE_NAME is not")
        path = f"/api/v1/namespaces/{path_segment(ns)}/pods/{path_segment(pod_name)}"
        pod = await self._call(f"pod {ns}/{pod_name}", self._kube().get(path))
        spec = pod.get("spec")
        name = spec.get("nodeName") if isinstance(spec, dict) else None
        if not name or not isinstance(name, str):
            raise StoreError(f"node name not present in pod spec '{ns}/{pod_name}'")
        return name

    def _kube(self) -> KubeClient:
        assert self._client is not None
        return self._client

    def _node_path(self, sub: str = "") -> str:
        return f"/api/v1/nodes/{path_segment(self.node_name)}{sub}"

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # --- requests ----------------------------------------------------------------------------------
    async def _call(self, what: str, request: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        """One request's JSON answer; raises _ApiError (with the HTTP status) or StoreError, naming `what`."""
        try:
            return await request
        except KubeApiError as e:
            self.observer.store_error()
            msg = e.message
            if e.status == 403:
                msg += " (check the flannel ClusterRole: pods get; nodes get/list/watch; nodes/status patch)"
            raise _ApiError(e.status, f"{what}: HTTP {e.status}: {msg}") from None
        except KubeClientError as e:
            self.observer.store_error()
            raise StoreError(f"{what}: {e}") from None

    async def get_node(self) -> dict[str, Any]:
        """Our Node object, as JSON."""
        await self.start()
        return await self._call(f"node {self.node_name}", self._kube().get(self._node_path()))

    async def _patch_status(self, body: dict[str, Any], what: str) -> dict[str, Any]:
        backoff = self._backoff()
        for attempt in range(1, self.opts.patch_attempts + 1):
            err: Exception
            try:
                return await self._call(what, self._kube().patch(self._node_path("/status"), body, STRATEGIC))
            except _ApiError as e:
                # 4xx other than conflicts and throttling will not get better by retrying.
                if (e.status < 500 and e.status not in (409, 429)) or attempt == self.opts.patch_attempts:
                    raise
                err = e
            except StoreError as e:
                if attempt == self.opts.patch_attempts:
                    raise
                err = e
            delay = backoff.next()
            log.warning("%s failed (attempt %d), retrying in %.1fs: %s", what, attempt, delay, err)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self) -> Backoff:
        return Backoff(self.opts.retry_delay, self.opts.retry_delay * 16)

    # --- Store ---------------------------------------------------------------------------------------
    async def get_network_config(self) -> NetConfig:
        path = self.opts.net_config_path
        try:
            text = read_config_file(path, "net conf")
        except ConfigError as e:
            raise ConfigError(f"failed to read {str(e).removeprefix('cannot read ')}") from None
        try:
            net = parse_net_config(text)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        self._net = net
        return net

    async def public_ip_overrides(self) -> tuple[IPv4Address | None, IPv6Address | None]:
        """The `<p>/node-public-ip` and `<p>/node-public-ipv6` annotations of our Node, if set."""
        node = await self.get_node()
        v4: IPv4Address | None = None
        v6: IPv6Address | None = None
        try:
            a = node_annotations(node)
            if a.get(self.ann.node_public_ip):
                v4 = _annotation_ip(a, self.ann.node_public_ip, 4)
            if a.get(self.ann.node_public_ipv6):
                v6 = _annotation_ip(a, self.ann.node_public_ipv6, 6)
        except ValueError as e:
            raise ConfigError(f"node {self.node_name}: bad {self.ann.prefix}node-public-ip annotation: {e}") from None
        return v4, v6

    async def previous_backend_data(self, backend_type: str) -> tuple[Any, Any]:
        """Our own decoded backend-data and backend-v6-data, when written by the same backend type."""
        node = await self.get_node()
        try:
            a = node_annotations(node)
        except ValueError:
            return None, None
        btype = a.get(self.ann.backend_type, "")
        if not isinstance(btype, str) or btype.lower() != backend_type.lower():
            return None, None
        res: list[Any] = []
        for key in (self.ann.backend_data, self.ann.backend_v6_data):
            try:
                res.append(_decode_data(a.get(key)))
            except ValueError:  # garbage in our own annotation: nothing to restore
                res.append(None)
        return res[0], res[1]

    async def _wait_pod_cidrs(self) -> tuple[dict[str, Any], IPv4Network | None, IPv6Network | None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.podcidr_wait
        while True:
            node = await self.get_node()
            try:
                v4, v6 = _parse_pod_cidrs(node)
            except ValueError as e:
                raise KubeNodeError(f"node {self.node_name}: {e}") from None
            if v4 is not None or v6 is not None:
                return node, v4, v6
            if loop.time() >= deadline:
                raise KubeNodeError(
                    f"node {self.node_name} pod cidr not assigned after {self.opts.podcidr_wait:.0f}s: "
                    "is the controller manager running with --allocate-node-cidrs and --cluster-cidr?"
                )
            log.info("waiting for node %s to be assigned a podCIDR", self.node_name)
            await asyncio.sleep(min(1.0, max(0.05, deadline - loop.time())))

    async def preflight(self, cfg: NetConfig) -> None:
        """Whether our Node can be a lease of `cfg` (podCIDRs assigned, of every enabled family, inside the
        networks), waiting for the podCIDRs as acquire_lease does; raises KubeNodeError. Meant to run before the
        backend creates its devices, so that a Node that cannot be used leaves nothing behind."""
        await self._usable_pod_cidrs(cfg)

    async def _usable_pod_cidrs(self, cfg: NetConfig) -> tuple[dict[str, Any], IPv4Network | None, IPv6Network | None]:
        node, v4, v6 = await self._wait_pod_cidrs()
        # A family the config enables but the Node lacks is fatal before anything is written: upstream v0.20.2
        # annotates the Node, then dies of a nil pointer in its informer (flannel-io/flannel#1789, #2115).
        missing = [f"IPv{v}" for v, on, sn in ((4, cfg.enable_ipv4, v4), (6, cfg.enable_ipv6, v6)) if on and sn is None]
        if missing:
            have = " ".join(str(sn) for sn in (v4, v6) if sn is not None)
            raise KubeNodeError(
                f"node {self.node_name} has no {' and no '.join(missing)} podCIDR (it has {have}) but "
                f"{self.opts.net_config_path} enables {' and '.join(missing)}: give the controller manager a "
                "--cluster-cidr of each enabled family, or disable the family in net-conf.json"
            )
        if cfg.enable_ipv4:
            assert v4 is not None
            assert cfg.network is not None
            if not v4.subnet_of(cfg.network):
                raise KubeNodeError(
                    f"node {self.node_name} podCIDR {v4} is not inside Network {cfg.network} of "
                    f"{self.opts.net_config_path}: the controller manager's --cluster-cidr must match it"
                )
        if cfg.enable_ipv6:
            assert v6 is not None and cfg.ipv6_network is not None
            if not v6.subnet_of(cfg.ipv6_network):
                raise KubeNodeError(
                    f"node {self.node_name} IPv6 podCIDR {v6} is not inside IPv6Network {cfg.ipv6_network} "
                    f"of {self.opts.net_config_path}"
                )
        return node, v4, v6

    async def acquire_lease(self, cfg: NetConfig, attrs: LeaseAttrs, prev: SubnetEnv | None) -> Lease:
        self._net = cfg
        node, v4, v6 = await self._usable_pod_cidrs(cfg)
        current: dict[str, str] = (node.get("metadata") or {}).get("annotations") or {}
        want = self._annotations(cfg, attrs, current)
        changed = {k: v for k, v in want.items() if current.get(k) != v}
        if changed:
            log.info("writing annotations on node %s: %s", self.node_name, ", ".join(sorted(changed)))
            await self._patch_status({"metadata": {"annotations": changed}}, f"patch node {self.node_name} status")
        if self.opts.set_node_network_unavailable:
            await self._set_network_available()
        own = Lease(
            subnet=v4 if cfg.enable_ipv4 else None,
            ipv6_subnet=v6 if cfg.enable_ipv6 else None,
            attrs=attrs,
            expiration=None,
        )
        self._own, self._own_attrs = own, attrs
        return own

    def _annotations(self, cfg: NetConfig, attrs: LeaseAttrs, current: Mapping[str, str]) -> dict[str, str]:
        a = self.ann
        want = {a.kube_managed: "true", a.backend_type: attrs.backend_type}
        if cfg.enable_ipv4:
            want[a.backend_data] = _encode_data(attrs.backend_data)
            overwrite = current.get(a.public_ip_overwrite, "")
            if overwrite:
                log.info("overriding public ip with %r from node annotation %r", overwrite, a.public_ip_overwrite)
            want[a.public_ip] = overwrite or str(attrs.public_ip or IPv4Address(0))
        if cfg.enable_ipv6:
            want[a.backend_v6_data] = _encode_data(attrs.backend_v6_data)
            overwrite6 = current.get(a.public_ipv6_overwrite, "")
            if overwrite6:
                log.info("overriding public ipv6 with %r from node annotation %r", overwrite6, a.public_ipv6_overwrite)
            want[a.public_ipv6] = overwrite6 or (str(attrs.public_ipv6) if attrs.public_ipv6 else "")
        return want

    async def _set_network_available(self) -> None:
        from datetime import datetime

        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        condition = {
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "FlannelIsUp",
            "message": "Flannel is running on this node",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }
        log.info("setting NetworkUnavailable=False on node %s", self.node_name)
        await self._patch_status({"status": {"conditions": [condition]}}, f"set node {self.node_name} condition")

    async def renew_lease(self, lease: Lease) -> Lease:
        return lease  # a Node does not expire

    # --- watch ----------------------------------------------------------------------------------------
    async def _network(self) -> NetConfig:
        if self._net is None:
            self._net = await self.get_network_config()
        return self._net

    def _leases(self, items: Any, net: NetConfig, before: Mapping[str, Lease]) -> dict[str, Lease]:
        """The leases of a node list; `before` (what the previous list and watch held) keeps a peer whose Node
        lost its annotation but not its podCIDR, as a watch event would have kept it."""
        out: dict[str, Lease] = {}
        if not isinstance(items, list):
            log.warning("the node list holds no list of items: %s", _cut(items))
            items = []
        own: Any = None
        for node in items:
            name = _node_name(node)
            if self._own is not None and name == self.node_name:
                own = node
                continue
            lease = self._lease_of(node, net)
            if lease is None and name in before and self._keeps_peer(node, before[name], net):
                lease = before[name]
            if lease is not None:
                out[name] = lease
        if self._own is not None:
            self._own_node(own, out, net)
        return out

    def _lease_of(self, node: Any, net: NetConfig) -> Lease | None:
        """node_to_lease, with a Node that cannot be used skipped with a warning: one bad node never stops the
        watch or the agent."""
        try:
            return node_to_lease(node, self.ann, net)
        except (ValueError, TypeError) as e:
            log.warning("skipping node %s: its flannel annotations or podCIDRs cannot be used: %s", _node_name(node), e)
            return None

    def _keeps_peer(self, node: Any, old: Lease, net: NetConfig) -> bool:
        """A peer whose Node lost its kube-subnet-manager annotation but kept its podCIDR stays a peer (as
        upstream keeps it): nothing says its flanneld stopped, and a pyflannel peer annotates itself again."""
        try:
            if node_annotations(node).get(self.ann.kube_managed) == "true":
                return False  # annotated but undecodable: not this case
            return _lease_subnets(node, net) == (old.subnet, old.ipv6_subnet)
        except ValueError:
            return False

    def _own_node(self, node: Any, current: dict[str, Lease], net: NetConfig) -> None:
        """Our own Node as the list or watch shows it (None: deleted or absent); keeps our lease in `current`.

        Deleted, unannotated or with garbage annotations, the Node is not a reason to stop: the data plane stays
        as it is, and when the Node is there with our podCIDR again, the watch annotates it again (_reannotate).
        Only a Node that comes back with another podCIDR ends our lease (LeaseRevokedError: the agent exits and
        its restart takes the new subnet)."""
        own = self._own
        assert own is not None
        current[self.node_name] = own
        if node is None:
            self._own_lost("was deleted")
            return
        try:
            subnets = _lease_subnets(node, net)
        except ValueError as e:
            self._own_lost(f"has podCIDRs that cannot be read ({e})")
            return
        if subnets == (None, None):
            self._own_lost("has no podCIDR")
            return
        if subnets != (own.subnet, own.ipv6_subnet):
            got = " ".join(str(sn) for sn in subnets if sn is not None)
            raise LeaseRevokedError(f"node {self.node_name} now has podCIDR {got}, our lease is {own.key}")
        try:
            annotated = node_to_lease(node, self.ann, net) is not None
        except ValueError:
            annotated = False
        if annotated:
            if self._own_trouble:
                log.info("node %s is annotated again", self.node_name)
            self._own_trouble = ""
            self._reannotate_due = False
        else:
            self._own_lost("lost its flannel annotations")
            self._reannotate_due = True

    def _own_lost(self, what: str) -> None:
        if self._own_trouble != what:
            log.warning(
                "our node %s %s: keeping this node's routes and entries, and annotating it again once it is back "
                "with podCIDR %s", self.node_name, what, self._own.key if self._own else "?",
            )  # fmt: skip
        self._own_trouble = what

    async def _reannotate(self) -> None:
        """Write our annotations (and the NetworkUnavailable condition) on our Node again; a failure is logged and
        retried at the next event about our Node."""
        self._reannotate_due = False
        net, attrs = self._net, self._own_attrs
        assert net is not None and attrs is not None
        try:
            node = await self.get_node()
            current = node_annotations(node)
            want = self._annotations(net, attrs, current)
            changed = {k: v for k, v in want.items() if current.get(k) != v}
            if changed:
                log.info("annotating node %s again: %s", self.node_name, ", ".join(sorted(changed)))
                await self._patch_status({"metadata": {"annotations": changed}}, f"patch node {self.node_name} status")
            if self.opts.set_node_network_unavailable:
                await self._set_network_available()
        except (StoreError, ValueError) as e:
            log.warning("cannot annotate node %s again yet: %s", self.node_name, e)
            self._reannotate_due = True

    async def watch_leases(self) -> AsyncIterator[WatchUpdate]:
        await self.start()
        net = await self._network()
        backoff = self._backoff()
        current: dict[str, Lease] = {}
        while True:
            try:
                listing = await self._call("list nodes", self._kube().list("/api/v1/nodes"))
            except StoreError as e:
                delay = backoff.next()
                log.warning("listing nodes failed, retrying in %.1fs: %s", delay, e)
                await asyncio.sleep(delay)
                continue
            meta = listing.get("metadata")
            rv = str(meta.get("resourceVersion", "")) if isinstance(meta, dict) else ""
            current = self._leases(listing.get("items") or [], net, current)
            yield LeaseSnapshot(tuple(current.values()))
            try:
                while True:
                    if self._reannotate_due:
                        await self._reannotate()
                    async for batch, new_rv in self._watch_once(rv, current, net):
                        rv = new_rv
                        backoff.reset()
                        if batch:
                            yield batch
                        if self._reannotate_due:
                            await self._reannotate()
                    # The server ended the watch (its timeout): carry on from where we are, no re-list.
            except LeaseRevokedError:
                raise
            except _WatchGone as e:
                log.info("watch of nodes expired (%s): listing again", e)
                self.observer.watch_restart("gone")
            except StoreError as e:
                delay = backoff.next()
                log.warning("watch of nodes lost, listing again in %.1fs: %s", delay, e)
                self.observer.store_error()
                self.observer.watch_restart("reconnect")
                await asyncio.sleep(delay)

    async def _watch_once(
        self, rv: str, current: dict[str, Lease], net: NetConfig
    ) -> AsyncIterator[tuple[list[LeaseEvent], str]]:
        """One watch request from `rv`; updates `current` in place and yields (events, rv) per batch of lines."""
        # Spread the timeouts as client-go's reflector does, so that agents do not re-watch in step.
        timeout = int(self.opts.watch_timeout * (1 + random.random()))
        query = {"watch": "true", "allowWatchBookmarks": "true", "resourceVersion": rv, "timeoutSeconds": str(timeout)}
        try:
            # No bookmark or event for this long means the connection is dead even if TCP did not say so.
            async for lines in self._kube().watch("/api/v1/nodes", query, idle_timeout=timeout + 30):
                batch: list[LeaseEvent] = []
                for line in lines:
                    rv = self._apply_watch_line(line, rv, current, net, batch)
                # Also without events: a bookmark moved rv, and the next watch should start there.
                yield batch, rv
        except KubeApiError as e:
            if e.status == 410:
                raise _WatchGone(f"HTTP 410 for resourceVersion {rv}") from None
            raise StoreError(f"watch nodes: HTTP {e.status}: {e.message[:200]}") from None
        except KubeClientError as e:
            raise StoreError(f"watch nodes: {str(e).removeprefix('watch /api/v1/nodes: ')}") from None

    def _apply_watch_line(
        self, line: bytes, rv: str, current: dict[str, Lease], net: NetConfig, batch: list[LeaseEvent]
    ) -> str:
        try:
            ev = json.loads(line)
            etype = ev["type"]
            obj = ev["object"]
        except (ValueError, RecursionError, KeyError, TypeError):
            raise StoreError(f"watch nodes: undecodable event {line[:200]!r}") from None
        if not isinstance(obj, dict):
            raise StoreError(f"watch nodes: event without an object: {line[:200]!r}")
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _WatchGone(str(obj.get("message", "Gone"))[:300])
            raise StoreError(f"watch nodes: error event {_cut(obj, 300)}")
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        new_rv = str(meta.get("resourceVersion") or rv)
        if etype == "BOOKMARK":
            return new_rv
        name = _node_name(obj)
        if self._own is not None and name == self.node_name:
            self._own_node(None if etype == "DELETED" else obj, current, net)
            return new_rv  # the agent holds its own lease; nothing to program
        old = current.get(name)
        lease = None if etype == "DELETED" else self._lease_of(obj, net)
        if lease is None:
            if old is not None and not (etype != "DELETED" and self._keeps_peer(obj, old, net)):
                del current[name]
                batch.append(LeaseEvent(EventType.REMOVED, old))
            return new_rv
        if old == lease:
            return new_rv  # a status heartbeat or an unrelated annotation: no lease change
        if old is not None and old.key != lease.key:
            batch.append(LeaseEvent(EventType.REMOVED, old))  # the node got another podCIDR
        current[name] = lease
        batch.append(LeaseEvent(EventType.ADDED, lease))
        return new_rv


STORE = KubeStore
