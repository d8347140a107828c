"""The stores by name: each is loaded only when chosen, so one mode never pays for the other's client code and
configuration loading (kubeconfig parsing, YAML)."""

from __future__ import annotations

import importlib

from .base import Store, StoreObserver
from .options import EtcdOptions, KubeOptions

# name -> module under pyflannel.store; the module defines STORE, a Store class taking its options.
STORES = {"etcd": "etcd", "kube": "kube"}


def create_store(options: EtcdOptions | KubeOptions, observer: StoreObserver | None = None) -> Store:
    """The store for `options`; `observer` hears of its watch restarts and failed requests (the agent's metrics)."""
    name = "kube" if isinstance(options, KubeOptions) else "etcd"
    mod = importlib.import_module(f"{__package__}.{STORES[name]}")
    store: Store = mod.STORE(options)
    if observer is not None:
        store.observer = observer
    return store
