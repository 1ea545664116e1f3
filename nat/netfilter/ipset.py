"""The kernel's IP sets for the kernel path (:mod:`.kernelpath`): made and removed through
pyroute2's IPSet, members written by a small client of our own.

Why our own for members: pyroute2's ``IPSet.add`` runs an asyncio round per call (measured:
134 us a member), and members change with every mapping made or freed.  Here changes are
queued and go out in one sendmsg (the kernel reads every message of one datagram), with
no acknowledgement asked: an add of a present member and a delete of an absent one are
no errors without NLM_F_EXCL (ip_set_core.c ``call_ad``), and the rare real error comes
back as a message that :meth:`SetWriter.errors` counts.
Constants from linux include/uapi/linux/netfilter/ipset/ip_set.h.
"""
from __future__ import annotations

import errno
import socket
import struct

from .netlink import NLA_F_NESTED, attr, messages, netfilter_socket

NFNL_SUBSYS_IPSET = 6
IPSET_CMD_ADD, IPSET_CMD_DEL = 9, 10
IPSET_ATTR_PROTOCOL, IPSET_ATTR_SETNAME, IPSET_ATTR_DATA = 1, 2, 7
IPSET_ATTR_IP, IPSET_ATTR_PORT, IPSET_ATTR_TIMEOUT, IPSET_ATTR_PROTO = 1, 4, 6, 7
IPSET_ATTR_CIDR = 3
IPSET_ATTR_IPADDR_IPV4 = 1
IPSET_PROTOCOL = 6  # the oldest the kernel takes (IPSET_PROTOCOL_MIN): what ADD and DEL need has not changed
NLA_F_NET_BYTEORDER = 0x4000
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
_NLH = struct.Struct("=IHHII")
_NFG = struct.Struct("=BBH")
MAXNAMELEN = 31  # IPSET_MAXNAMELEN less the NUL


def _be(kind: int, fmt: str, v: int) -> bytes:
    return attr(kind | NLA_F_NET_BYTEORDER, struct.pack(fmt, v))


def member(ip: bytes | None = None, port: int | None = None, proto: int | None = None, cidr: int | None = None,
           timeout: int | None = None) -> bytes:
    """One member's IPSET_ATTR_DATA payload: an IPv4 address (and prefix length), a port (and its
    protocol: hash:ip,port keeps TCP and UDP apart), a timeout in seconds."""
    parts = []
    if ip is not None:
        parts.append(attr(IPSET_ATTR_IP | NLA_F_NESTED, attr(IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, ip)))
    if cidr is not None:
        parts.append(attr(IPSET_ATTR_CIDR, bytes([cidr])))
    if port is not None:
        parts.append(_be(IPSET_ATTR_PORT, "!H", port))
    if proto is not None:
        parts.append(attr(IPSET_ATTR_PROTO, bytes([proto])))
    if timeout is not None:
        parts.append(_be(IPSET_ATTR_TIMEOUT, "!I", timeout))
    return b"".join(parts)


class SetWriter:
    """Queued member changes, sent together by :meth:`send` (one datagram, no waiting)."""

    def __init__(self) -> None:
        self.sock = netfilter_socket(1 << 18)
        self.sock.setblocking(False)
        self._out: list[bytes] = []
        self._size = 0
        self._seq = 0
        self.failed = 0  # changes the kernel refused (counted as the error messages come back)
        self._buf = bytearray(1 << 14)
        self._heads: dict[str, bytes] = {}

    def change(self, add: bool, name: str, data: bytes) -> None:
        head = self._heads.get(name)
        if head is None:  # (a few sets, a change per mapping made or freed: built once)
            head = self._heads[name] = _NFG.pack(socket.AF_INET, 0, 0) \
                + attr(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL])) + attr(IPSET_ATTR_SETNAME, name.encode() + b"\0")
        body = head + attr(IPSET_ATTR_DATA | NLA_F_NESTED, data)
        self._seq += 1
        msg = _NLH.pack(_NLH.size + len(body), (NFNL_SUBSYS_IPSET << 8) | (IPSET_CMD_ADD if add else IPSET_CMD_DEL),
                        NLM_F_REQUEST, self._seq, 0) + body
        self._out.append(msg)
        self._size += len(msg)
        if self._size > 48 << 10:  # one datagram stays well inside the socket's send buffer
            self.send()

    def send(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        self._size = 0
        try:
            self.sock.sendto(data, (0, 0))
        except OSError as exc:  # the kernel took none of them: counted, the next reconciliation repairs
            self.failed += 1
            if exc.errno not in (errno.ENOBUFS, errno.EAGAIN):
                raise

    def errors(self) -> int:
        """Read the refusals that came back (counted in :attr:`failed`)."""
        while True:
            try:
                n = self.sock.recv_into(self._buf)
            except BlockingIOError:
                return self.failed
            except OSError as exc:  # ENOBUFS: more refusals than the buffer held
                if exc.errno != errno.ENOBUFS:
                    raise
                self.failed += 1
                continue
            for off, _, kind, _ in messages(self._buf, n):
                if kind == NLMSG_ERROR and struct.unpack_from("=i", self._buf, off + _NLH.size)[0]:
                    self.failed += 1

    def close(self) -> None:
        self.sock.close()


def names() -> list[str]:
    """The IP sets of this network namespace."""
    from pyroute2.ipset import IPSet

    with IPSet() as s:
        return [m.get_attr("IPSET_ATTR_SETNAME") for m in s.list()]


def create(name: str, kind: str, ports: tuple[int, int] | None = None, timeout: int | None = None,
           maxelem: int | None = None) -> None:
    """A new set (an old one of the name is an error: names carry the owner's pid)."""
    from pyroute2.ipset import IPSet

    with IPSet() as s:
        s.create(name, stype=kind, bitmap_ports_range=ports, timeout=timeout, maxelem=maxelem)


def destroy(name: str) -> bool:
    """Remove a set; False if it is gone already or a rule still uses it."""
    from pyroute2.ipset import IPSet
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPSet() as s:
            s.destroy(name)
        return True
    except NetlinkError:
        return False


def flush(name: str) -> None:
    from pyroute2.ipset import IPSet

    with IPSet() as s:
        s.flush(name)
