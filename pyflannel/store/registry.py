"""The stores by name: each is loaded only when chosen, so kube mode never imports grpc and etcd mode never
imports the Kubernetes client (each costs several MB of resident memory and a noticeable start-up)."""

from __future__ import annotations

import importlib

from .base import Store
from .options import EtcdOptions, KubeOptions

# name -> module under pyflannel.store; the module defines STORE, a Store class taking its options.
STORES = {"etcd": "etcd", "kube": "kube"}


def create_store(options: EtcdOptions | KubeOptions) -> Store:
    name = "kube" if isinstance(options, KubeOptions) else "etcd"
    mod = importlib.import_module(f"{__package__}.{STORES[name]}")
    store: Store = mod.STORE(options)
    return store
