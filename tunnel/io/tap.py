"""TAP devices for the tunnel ends: made through /dev/net/tun, configured by the kernel's own ioctls.

The device is created by the ``TUNSETIFF`` ioctl with ``IFF_TAP | IFF_NO_PI``
(Ethernet frames, no packet-information prefix) and is *not* persistent: it
disappears when :meth:`Tap.close` closes the descriptor (or the process dies),
so a clean shutdown, and even an unclean one, removes it.  Its MTU, bridge port
and up flag are set with the classic interface ioctls (``SIOCSIFMTU``,
``SIOCBRADDIF``, ``SIOCSIFFLAGS``), and in offload mode its ``gso_max_size`` with
one rtnetlink ``RTM_NEWLINK`` message declared below.

Why not pyroute2 here (the rest of the project configures links with it): a host
end is often started at the moment a VM arrives, and importing pyroute2 costs
0.1-0.2 s of start-up, all of it on the migration's critical path.  These four
settings need none of it.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
VNET_HDR_LEN = 10
#: In offload mode, the TAP's ``gso_max_size``: the kernel segments (in software, before the TAP)
#: any GSO frame of this many bytes or more, so every super-frame we read, with its 10-byte
#: virtio-net header and the 32 bytes of tunnel overhead, still fits one IPv4 UDP datagram
#: (65507 bytes of payload) and one TCP-framed message (65535).  A TCP sender's own GSO frames
#: stay below it (its size goal is 65536 minus header room), so they pass whole.
#: Not ``gso_max_segs``: that limit applies to *every* forwarded GSO frame with more segments
#: (a bridged VM's TCP makes 44 or 45), which the kernel then cut into single segments.
OFFLOAD_GSO_MAX_SIZE = 65507 - 32 - VNET_HDR_LEN + 1
IFNAMSIZ = 16
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFMTU, SIOCGIFHWADDR, SIOCGIFINDEX, SIOCBRADDIF = (
    0x8913, 0x8914, 0x8922, 0x8927, 0x8933, 0x89A2)
IFF_UP = 0x1
_IFREQ_INT = struct.Struct("16si20x")  # struct ifreq with an int (ifindex, mtu)
_IFREQ_FLAGS = struct.Struct("16sH22x")
_IFREQ_HWADDR = struct.Struct("16sH6s16x")
# rtnetlink: nlmsghdr, ifinfomsg, one u32 attribute; the answer is an nlmsgerr (0 = done).
RTM_NEWLINK, NLMSG_ERROR, NLM_F_REQUEST, NLM_F_ACK = 16, 2, 0x1, 0x4
IFLA_GSO_MAX_SIZE = 41
_NLMSG = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_RTA_U32 = struct.Struct("=HHI")
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
        self.bridge = bridge  # the bridge it is a port of (a host agent watches the bridge's other ports)
        #: Whether frames carry a virtio-net header (asked for, and the kernel agreed): an end whose
        #: TAP cannot falls back to plain frames, and its sessions negotiate no offload.
        self.offload = offload
        self.offloads_on = False  # the kernel may hand us GSO super-frames and partial checksums now
        self.fd = -1
        try:
            self._open(name, offload)
        except OSError as exc:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            if not offload:
                raise TapError(exc.errno, f"making {name}: {exc.strerror or exc}") from exc
            self.offload = False  # no virtio-net headers here: plain frames
            try:
                self._open(name, False)
            except OSError as exc2:
                if self.fd >= 0:
                    os.close(self.fd)
                raise TapError(exc2.errno, f"making {name}: {exc2.strerror or exc2}") from exc2
        try:
            if self.offload:
                self.set_offload(True)
            _quiet_ipv6(name)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
                ifname = name.encode()
                self.index = _ioctl_int(ctl, SIOCGIFINDEX, ifname, 0)
                _ioctl_int(ctl, SIOCSIFMTU, ifname, mtu)
                if self.offload:
                    _set_link_u32(self.index, IFLA_GSO_MAX_SIZE, OFFLOAD_GSO_MAX_SIZE)
                if bridge:
                    try:
                        _ioctl_int(ctl, SIOCBRADDIF, bridge.encode(), self.index)
                    except OSError as exc:
                        why = "not found" if exc.errno == errno.ENODEV else f"cannot take the port ({exc.strerror})"
                        raise TapError(exc.errno, f"bridge {bridge!r} {why}") from None
                (_, flags) = _IFREQ_FLAGS.unpack(fcntl.ioctl(ctl, SIOCGIFFLAGS, _IFREQ_FLAGS.pack(ifname, 0)))
                fcntl.ioctl(ctl, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(ifname, flags | IFF_UP))
                (_, _, hw) = _IFREQ_HWADDR.unpack(fcntl.ioctl(ctl, SIOCGIFHWADDR, _IFREQ_HWADDR.pack(ifname, 0, b"")))
                self.mac = ":".join(f"{b:02x}" for b in hw)
        except TapError:
            os.close(self.fd)
            raise
        except OSError as exc:
            os.close(self.fd)
            raise TapError(exc.errno, f"configuring {name}: {exc.strerror or exc}") from exc
        except BaseException:
            os.close(self.fd)
            raise

    def _open(self, name: str, vnet: bool) -> None:
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI
                                                    | (IFF_VNET_HDR if vnet else 0)))
        if vnet:  # frames carry a little-endian virtio-net header
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(self.fd, TUNSETVNETLE, struct.pack("i", 1))

    def set_offload(self, on: bool) -> None:
        """On: the kernel may hand us (TCP GSO super-frames, partial checksums) instead of segmenting
        and checksumming before the TAP.  Frames keep their virtio-net header either way."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN) if on else 0)
        self.offloads_on = on

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


def _ioctl_int(ctl: socket.socket, request: int, ifname: bytes, value: int) -> int:
    """An interface ioctl whose ifreq carries an int (ifindex, MTU); returns the int it gives back."""
    return _IFREQ_INT.unpack(fcntl.ioctl(ctl, request, _IFREQ_INT.pack(ifname, value)))[1]


def _set_link_u32(index: int, attr: int, value: int) -> None:
    """``ip link set`` of one u32 attribute (e.g. IFLA_GSO_MAX_SIZE) by one rtnetlink request."""
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0) + _RTA_U32.pack(_RTA_U32.size, attr, value)
    msg = _NLMSG.pack(_NLMSG.size + len(body), RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.settimeout(2.0)
        nl.sendto(msg, (0, 0))
        answer = nl.recv(4096)
    length, mtype, _flags, seq, _pid = _NLMSG.unpack_from(answer, 0)
    if mtype != NLMSG_ERROR or seq != 1 or length < _NLMSG.size + 4:
        raise OSError(errno.EPROTO, f"unexpected rtnetlink answer type {mtype}")
    (err,) = struct.unpack_from("=i", answer, _NLMSG.size)
    if err:
        raise OSError(-err, os.strerror(-err))


def _quiet_ipv6(name: str) -> None:
    """No IPv6 addresses on the TAP itself: it is a bridge port, and its own link-local
    traffic (DAD, router solicitations, MLD) would otherwise travel the tunnel and be
    learned as a VM.  Best effort (IPv6 may be off altogether)."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass
