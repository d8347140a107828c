"""Masquerade and forward rules (iptables or nftables), kept in place by a periodic resync."""

from pyflannel.traffic.base import CommandRunner, TrafficError, TrafficManager
from pyflannel.traffic.manager import create_traffic_manager

__all__ = ["CommandRunner", "TrafficError", "TrafficManager", "create_traffic_manager"]
