"""TAP devices for the tunnel ends: made through /dev/net/tun, configured with pyroute2.

The device is created by the ``TUNSETIFF`` ioctl with ``IFF_TAP | IFF_NO_PI``
(Ethernet frames, no packet-information prefix) and is *not* persistent: it
disappears when :meth:`Tap.close` closes the descriptor (or the process dies),
so a clean shutdown, and even an unclean one, removes it.  pyroute2 sets its MTU,
enslaves it to a bridge when asked, and brings it up.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
VNET_HDR_LEN = 10
#: In offload mode, at most this many TCP segments per GSO frame the kernel hands us, so that
#: a super-frame (40 x 1448 + headers) fits one 65535-byte tunnel message.
OFFLOAD_GSO_MAX_SEGS = 40
IFNAMSIZ = 16
#: Read buffer: far above any MTU, so a frame is never cut short by the read itself.
READ_SIZE = 65536


class TapError(OSError):
    pass


class Tap:
    def __init__(self, name: str, mtu: int = 1500, bridge: str | None = None, offload: bool = False) -> None:
        if not name or len(name.encode()) >= IFNAMSIZ:
            raise TapError(errno.EINVAL, f"interface name {name!r} must be 1..15 bytes")
        self.name = name
        self.mtu = mtu
        self.offload = offload
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
            if offload:
                # Frames carry a little-endian virtio-net header; the kernel may hand us (and take
                # from us) TCP GSO super-frames with partial checksums instead of segmenting them.
                fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                fcntl.ioctl(self.fd, TUNSETVNETLE, struct.pack("i", 1))
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
            _quiet_ipv6(name)
            with IPRoute() as ipr:
                (idx,) = ipr.link_lookup(ifname=name)
                self.index = idx
                ipr.link("set", index=idx, mtu=mtu)
                if offload:
                    ipr.link("set", index=idx, gso_max_segs=OFFLOAD_GSO_MAX_SEGS)
                if bridge:
                    found = ipr.link_lookup(ifname=bridge)
                    if not found:
                        raise TapError(errno.ENODEV, f"bridge {bridge!r} not found")
                    ipr.link("set", index=idx, master=found[0])
                ipr.link("set", index=idx, state="up")
                self.mac = ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")
        except NetlinkError as exc:
            os.close(self.fd)
            raise TapError(exc.code, f"configuring {name}: {exc}") from exc
        except BaseException:
            os.close(self.fd)
            raise

    def fileno(self) -> int:
        return self.fd

    def read(self) -> bytes | None:
        try:
            return os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None

    def write(self, frame: bytes) -> bool:
        try:
            os.write(self.fd, frame)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:  # e.g. EIO while the link is down: a lost frame, not a crash
            if exc.errno in (errno.EIO, errno.EINVAL, errno.EMSGSIZE):
                return False
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # not persistent: the kernel removes the device now
            self.fd = -1


def _quiet_ipv6(name: str) -> None:
    """No IPv6 addresses on the TAP itself: it is a bridge port, and its own link-local
    traffic (DAD, router solicitations, MLD) would otherwise travel the tunnel and be
    learned as a VM.  Best effort (IPv6 may be off altogether)."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass
