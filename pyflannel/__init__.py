"""pyflannel: flannel, the Kubernetes overlay network, in Python."""

__version__ = "0.1.0"
