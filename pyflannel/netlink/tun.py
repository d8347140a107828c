"""TUN devices: created and attached with ioctls on /dev/net/tun (no netlink message does this).

The device is made in the calling process's network namespace. Addresses, MTU, state and routes of the device
are set through Netlink like those of any other link; this module only hands back the packet file descriptor.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

TUN_PATH = "/dev/net/tun"

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags in the union

# linux/virtio_net.h: struct virtio_net_hdr (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset), in
# the machine's byte order (the kernel's default for TUN on little-endian hosts).
VNET_HDR = struct.Struct("=BBHHHH")
VNET_HDR_LEN = VNET_HDR.size
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1


class TunError(OSError):
    """The TUN device could not be opened; the message says why in one line."""


def open_tun(name: str, *, persist: bool = True, vnet_hdr: bool = False) -> tuple[int, str]:
    """A non-blocking fd for the TUN device `name` (created, or attached when it already exists as a TUN of
    the same kind), and the name the kernel gave it. Packets are bare IP packets (IFF_NO_PI).

    persist=True keeps the device (with its addresses and routes) when the fd is closed, so a process restart
    does not take the interface and its routes away; the next open attaches to it again.

    vnet_hdr=True prefixes every packet read and written with a struct virtio_net_hdr (VNET_HDR_LEN bytes),
    which lets a writer hand the kernel one TCP segmentation-offload packet in place of a train of segments."""
    if not 0 < len(name.encode()) < 16:
        raise TunError(errno.EINVAL, f"TUN device name {name!r} must have 1 to 15 bytes")
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TunError(e.errno or errno.EIO, f"cannot open {TUN_PATH}: {e.strerror}") from e
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        res = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
        if persist:
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as e:
        os.close(fd)
        why = e.strerror
        if e.errno == errno.EBUSY:
            why = "it is in use by another process, or is not a TUN device"
        elif e.errno == errno.EINVAL:
            why = "a device of that name exists and is not a TUN device without packet info"
        raise TunError(e.errno or errno.EIO, f"cannot attach TUN device {name}: {why}") from e
    got = _IFREQ.unpack(res)[0].rstrip(b"\0").decode()
    return fd, got


__all__ = [
    "TUN_PATH",
    "VIRTIO_NET_HDR_F_NEEDS_CSUM",
    "VIRTIO_NET_HDR_GSO_NONE",
    "VIRTIO_NET_HDR_GSO_TCPV4",
    "VNET_HDR",
    "VNET_HDR_LEN",
    "TunError",
    "open_tun",
]
