"""pyflannel: flannel, the Kubernetes overlay network, in Python."""

__version__ = "0.1.0"
# What `flanneld --version` prints and the logs and metrics name, in upstream's form (a release tag).
VERSION = f"v{__version__}"
