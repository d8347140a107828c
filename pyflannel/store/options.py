"""What each store is configured with: plain typed values, importable without the store's client library.

The daemon builds these from flags before it knows which store runs, so they must not pull in an HTTP
client; the store modules (loaded lazily through store.registry) take them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ETCD_DEFAULT_ENDPOINTS = ("http://127.0.0.1:4001", "http://127.0.0.1:2379")
ETCD_DEFAULT_PREFIX = "/coreos.com/network"
KUBE_DEFAULT_PREFIX = "flannel.alpha.coreos.com"
KUBE_DEFAULT_NET_CONFIG = "/etc/kube-flannel/net-conf.json"
SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass
class EtcdOptions:
    endpoints: list[str] = field(default_factory=lambda: list(ETCD_DEFAULT_ENDPOINTS))
    prefix: str = ETCD_DEFAULT_PREFIX
    # TLS files and credentials; empty or None means unset.
    keyfile: str | None = None
    certfile: str | None = None
    cafile: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr of the agent's config
    lease_ttl: int = 24 * 3600
    renew_margin: int = 60 * 60
    # Deadline of one etcd call (then the next member is tried).
    call_timeout: float = 10.0
    # Longest pause between retries while etcd is unreachable: short, so that nodes are back within a few
    # seconds of etcd's return (a retry against a dead member is a refused connection, cheap on both sides).
    max_backoff: float = 3.0
    # Liveness of the watched member: a probe (a linearizable count of the config key) every interval (0: none);
    # this many intervals (+ 0.5) without a watch message or a probe answer and the member is treated as gone.
    watch_probe_interval: float = 1.0
    watch_probes_lost: int = 2


@dataclass(frozen=True)
class KubeOptions:
    api_url: str = ""
    kubeconfig_file: str = ""
    kube_context: str = ""  # the kubeconfig's context to use; empty: its current-context
    annotation_prefix: str = KUBE_DEFAULT_PREFIX
    node_name: str = ""  # NODE_NAME; when empty the pod below is read for spec.nodeName
    pod_name: str = ""
    pod_namespace: str = ""
    net_config_path: str = KUBE_DEFAULT_NET_CONFIG
    set_node_network_unavailable: bool = True
    podcidr_wait: float = 30.0  # how long to wait for the controller manager to assign spec.podCIDR
    # In-cluster configuration (used when neither api_url nor kubeconfig_file is given).
    service_host: str = ""  # KUBERNETES_SERVICE_HOST
    service_port: str = ""  # KUBERNETES_SERVICE_PORT
    serviceaccount_dir: str = SERVICEACCOUNT_DIR
    watch_timeout: float = 300.0  # server-side timeout of one watch request; then we watch again
    request_timeout: float = 30.0
    patch_attempts: int = 5
    retry_delay: float = 0.5  # first backoff step for patches and re-lists, doubled up to 16x
