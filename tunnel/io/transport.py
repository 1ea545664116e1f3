"""The sockets the tunnel ends talk over: UDP datagrams, or TCP streams of length-framed messages.

Plain helpers for the drivers (:mod:`tunnel.io.host`, :mod:`tunnel.io.proxy`): endpoint
text, the UDP socket's options, and one TCP connection's send queue.  No engine
logic and no logging here.

MTU and overhead.  Each Ethernet frame gains a 16-byte header and a 16-byte tag
(32 bytes), then UDP/IPv4 (28) or UDP/IPv6 (48): a frame of F bytes becomes an
outer IPv4 packet of F + 60 bytes, so a full frame from a 1500-MTU TAP (1514
bytes) is a 1574-byte packet.  The TAP MTU defaults to 1500 so that the VM and
the home LAN keep their ordinary MTU (a smaller TAP MTU would make the bridges
silently drop the full-size frames the LAN's hosts send); the UDP socket is set
to ``IP_PMTUDISC_DONT`` so the kernel *fragments* outer datagrams larger than the
path MTU instead of refusing them.  Give ``--mtu 1426`` (IPv4 underlay of 1500;
1406 for IPv6) and the same MTU on the VM and the LAN to avoid fragmentation.
Over TCP the stream carries any frame size (2 bytes of length each).  Frames
above the TAP MTU (+ 14 header + 8 for two VLAN tags) are counted as OVERSIZED
and dropped, never truncated: reads use a 64 KiB buffer.
"""
from __future__ import annotations

import socket
from collections import Counter
from typing import Hashable

from ..stream import StreamDecoder, encode

IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DONT = getattr(socket, "IP_PMTUDISC_DONT", 0)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
IPV6_PMTUDISC_DONT = 0
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
    socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
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
