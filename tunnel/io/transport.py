"""The sockets the tunnel ends talk over: UDP datagrams, or TCP streams of length-framed messages.

Plain helpers for the drivers (:mod:`tunnel.io.host`, :mod:`tunnel.io.proxy`): endpoint
text, the UDP socket's options, and one TCP connection's send queue.  No engine
logic and no logging here.

MTU and overhead.  Each Ethernet frame gains a 16-byte header and a 16-byte tag
(32 bytes), then UDP/IPv4 (28) or UDP/IPv6 (48): a frame of F bytes becomes an
outer IPv4 packet of F + 60 bytes, so a full frame from a 1500-MTU TAP (1514
bytes) is a 1574-byte packet.  The TAP MTU defaults to 1500 so that the VM and
the home LAN keep their ordinary MTU (a smaller TAP MTU would make the bridges
silently drop the full-size frames the LAN's hosts send).  A message larger than
the path takes (``--path-mtu``, default 1500, less IP and UDP) leaves as tunnel
segments (:mod:`tunnel.segment`) that each fit, handed to the kernel in one
``sendmsg`` with UDP GSO (``UDP_SEGMENT``; datagram by datagram where the kernel
has none), and read back coalesced with UDP GRO: no outer datagram is an IP
fragment.  The socket stays ``IP_PMTUDISC_DONT``, so a path narrower than
``--path-mtu`` still works (the kernel fragments) rather than black-holing.
Over TCP the stream carries any frame size (2 bytes of length each).  Frames
above the TAP MTU (+ 14 header + 8 for two VLAN tags) are counted as OVERSIZED
and dropped, never truncated: reads use a 64 KiB buffer.
"""
from __future__ import annotations

import errno
import socket
import struct
from collections import Counter
from typing import Hashable

from ..stream import StreamDecoder, encode

IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DONT = getattr(socket, "IP_PMTUDISC_DONT", 0)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
IPV6_PMTUDISC_DONT = 0
SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h: GSO: one send of many equal datagrams
UDP_GRO = 104  # ... and GRO: one receive of many, with their size in a control message
IP_MTU = 14
IPV6_MTU = 24
#: The most bytes one UDP send may carry (65535 less IPv4 and UDP headers), and the most datagrams
#: one GSO send may make on any kernel that has it (UDP_MAX_SEGMENTS was 64 before 6.x).
UDP_MAX_PAYLOAD = 65507
GSO_MAX_SEGMENTS = 64
_GSO_OFF = frozenset({errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.ENOTSUP})
_CMSG_GRO = socket.CMSG_SPACE(4)
_H = struct.Struct("=H")
_I = struct.Struct("=i")
SOCKBUF = 4 << 20
TCP_BACKLOG_MAX = 4 << 20
#: The endpoint name of the one peer of a datagram socket given already connected (a socketpair
#: in the tests): it has no address of its own.
CONNECTED_PEER = ("connected", 0)


def parse_endpoint(text: str) -> tuple[str, int]:
    """``IP:PORT`` or ``[IPv6]:PORT``."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not IP:PORT: {text!r}")
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except (OSError, ValueError):  # its words ("illegal IP address string passed to inet_pton") name no text
        raise ValueError(f"not IP:PORT: {text!r}") from None
    return host, int(port)


def family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def same_ip(a: str, b: str) -> bool:
    try:
        return socket.inet_pton(family(a), a) == socket.inet_pton(family(b), b)
    except OSError:
        return False


def endpoint_text(ep: Hashable) -> str:
    if isinstance(ep, tuple) and len(ep) == 3 and ep[0] == "tcp":
        return f"tcp {ep[1]}:{ep[2]}"
    if isinstance(ep, tuple) and len(ep) >= 2:
        return f"{ep[0]}:{ep[1]}"
    return str(ep)


def udp_socket(fam: int) -> socket.socket:
    """A non-blocking UDP socket with large buffers that lets the kernel fragment (see above)."""
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setblocking(False)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, SOCKBUF)
        except OSError:
            pass
    if fam == socket.AF_INET:
        s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
    else:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT)
    return s


def segment_size(fam: int, path_mtu: int) -> int:
    """The largest UDP payload a path of ``path_mtu`` carries unfragmented."""
    return path_mtu - (48 if fam == socket.AF_INET6 else 28)


def route_mtu(fam: int, peer: tuple[str, int]) -> int | None:
    """The MTU of the route toward ``peer`` (no packet sent); None when there is none now."""
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect(peer)
            if fam == socket.AF_INET6:
                return s.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
            return s.getsockopt(socket.IPPROTO_IP, IP_MTU)
    except OSError:
        return None


class Datagrams:
    """One UDP socket's segmented I/O: sends a buffer of equal datagrams laid end to end with UDP GSO,
    receives with UDP GRO; falls back to one datagram per call where the kernel or socket has neither
    (a given socketpair in the tests), and says so in ``gso``/``gro``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.gso = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.gro = False
        if self.gso:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass

    def send(self, data: bytes, size: int, to) -> int:
        """Send ``data``: one datagram, or (longer than ``size``) datagrams of ``size`` bytes laid end to
        end; ``to`` None on a connected socket.  Returns the datagrams sent; raises OSError as send does."""
        if len(data) <= size:
            self.sock.send(data) if to is None else self.sock.sendto(data, to)
            return 1
        mv = memoryview(data)
        step = min(UDP_MAX_PAYLOAD // size, GSO_MAX_SEGMENTS) * size
        sent = 0
        for off in range(0, len(data), step):
            part = mv[off:off + step]
            if self.gso and len(part) > size:
                try:
                    cmsg = [(SOL_UDP, UDP_SEGMENT, _H.pack(size))]
                    self.sock.sendmsg([part], cmsg) if to is None else self.sock.sendmsg([part], cmsg, 0, to)
                    sent += -(-len(part) // size)
                    continue
                except OSError as exc:
                    if exc.errno not in _GSO_OFF:
                        raise
                    self.gso = False  # no UDP GSO here: datagram by datagram from now on
            for i in range(0, len(part), size):
                self.sock.send(part[i:i + size]) if to is None else self.sock.sendto(part[i:i + size], to)
                sent += 1
        return sent

    def receive(self) -> tuple[bytes, object, int]:
        """One read: ``(data, address, size)``; with GRO ``data`` may hold several datagrams of ``size``
        bytes laid end to end (``size`` 0: one datagram)."""
        if not self.gro:
            data, addr = self.sock.recvfrom(65535)
            return data, addr, 0
        data, anc, _flags, addr = self.sock.recvmsg(65535, _CMSG_GRO)
        for level, kind, value in anc:
            if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
                return data, addr, _I.unpack_from(value)[0]
        return data, addr, 0


class TcpConn:
    """One TCP connection carrying length-framed messages."""

    def __init__(self, sock: socket.socket, endpoint: Hashable, max_len: int, opened: float = 0.0) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.decoder = StreamDecoder(max_len)
        self.out = bytearray()
        self.connected = True
        self.writing = False  # registered for EVENT_WRITE
        self.opened = opened
        self.last_authentic: float | None = None  # time of its latest authentic message (proxy side)
        self.closed = False

    def queue(self, message: bytes, counters: Counter) -> None:
        """Send now if nothing waits, else append (bounded); OSError means the connection broke."""
        if len(self.out) > TCP_BACKLOG_MAX:
            counters["tcp_backlog_drops"] += 1
            return
        data = encode(message)
        if not self.out and self.connected:
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            data = data[n:]
        self.out += data

    def flush(self) -> None:
        while self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            del self.out[:n]

    def drain(self, timeout: float) -> None:
        """Shutting down: give what is queued ``timeout`` seconds to go (best effort)."""
        if not self.out:
            return
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(timeout)
            self.sock.sendall(bytes(self.out))
        except OSError:
            pass
