"""The one packet builder: IPv4 with TCP, UDP or ICMP, and Ethernet around it, with
correct checksums; plus the checks and fixes that go with building.

The simulator's endpoints, the benchmarks, the tests and the NFQUEUE client's checksum
completion all build here, so a fix reaches every copy.  Plain ``struct`` (no scapy):
the simulator builds packets on its data path.
"""
from __future__ import annotations

import struct

from .checksum import internet_checksum, l4_checksum, pseudo_sum

_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_ICMP = struct.Struct("!BBHHH")
_ETH = struct.Struct("!6s6sH")
_H = struct.Struct("!H")

TCP, UDP, ICMP = 6, 17, 1
DF = 0x4000
ETH_IPV4 = 0x0800
ETH_RARP = 0x8035
BROADCAST = b"\xff" * 6


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, ident: int = 0, ttl: int = 64,
         frag: int = DF, options: bytes = b"") -> bytes:
    """An IPv4 packet around ``payload`` (an L4 segment whose checksum is already right).

    ``frag`` is the flags/fragment-offset word; ``options`` (a multiple of 4 bytes) go
    after the fixed header."""
    ihl = 5 + len(options) // 4
    hdr = _IP.pack(0x40 | ihl, 0, ihl * 4 + len(payload), ident & 0xFFFF, frag, ttl, proto, 0, src, dst) + options
    return hdr[:10] + _H.pack(internet_checksum(hdr)) + hdr[12:] + payload


def tcp_segment(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
                payload: bytes = b"", window: int = 65535) -> bytes:
    """A TCP segment (header + payload) with its checksum under ``src``/``dst``."""
    seg = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, window, 0, 0) + payload
    return seg[:16] + _H.pack(l4_checksum(src, dst, TCP, seg)) + seg[18:]


def udp_datagram(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"",
                 checksum: bool = True) -> bytes:
    """A UDP header + payload; ``checksum=False`` sends the RFC 768 "no checksum" zero."""
    seg = _UDP.pack(sport, dport, 8 + len(payload), 0) + payload
    if not checksum:
        return seg
    return seg[:6] + _H.pack(l4_checksum(src, dst, UDP, seg)) + seg[8:]


def icmp_message(icmp_type: int, code: int, rest: int = 0, body: bytes = b"") -> bytes:
    """An ICMP message: type, code, the 4-byte rest-of-header as an int, then ``body``."""
    m = _ICMP.pack(icmp_type, code, 0, rest >> 16, rest & 0xFFFF) + body
    return m[:2] + _H.pack(internet_checksum(m)) + m[4:]


def tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
        payload: bytes = b"", ident: int = 0, window: int = 65535, ttl: int = 64) -> bytes:
    """An IPv4 TCP packet."""
    return ipv4(src, dst, TCP, tcp_segment(src, dst, sport, dport, seq, ack, flags, payload, window), ident, ttl)


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"", ident: int = 0,
        checksum: bool = True, ttl: int = 64) -> bytes:
    """An IPv4 UDP packet."""
    return ipv4(src, dst, UDP, udp_datagram(src, dst, sport, dport, payload, checksum), ident, ttl)


def icmp(src: bytes, dst: bytes, icmp_type: int, code: int, rest: int = 0, body: bytes = b"",
         ident: int = 0, ttl: int = 64) -> bytes:
    """An IPv4 ICMP packet (an error quotes the offending packet's head in ``body``)."""
    return ipv4(src, dst, ICMP, icmp_message(icmp_type, code, rest, body), ident, ttl, frag=0)


def ether(dst_mac: bytes, src_mac: bytes, payload: bytes, ethertype: int = ETH_IPV4) -> bytes:
    """An Ethernet II frame around ``payload``."""
    return _ETH.pack(dst_mac, src_mac, ethertype) + payload


def rarp_announce(mac: bytes) -> bytes:
    """The frame QEMU sends for a guest the moment a live migration resumes it (``qemu_announce_self``):
    a broadcast RARP "who is ``mac``, tell ``mac``", padded to 60 bytes, so that every switch and
    agent on the way learns where the guest is now before the guest says anything."""
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_IPV4, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return ether(BROADCAST, mac, body.ljust(46, b"\0"), ETH_RARP)


def _l4_field(proto: int) -> int | None:
    """Offset of the checksum in the L4 header, for the protocols whose checksum covers a
    pseudo-header."""
    return 16 if proto == TCP else 6 if proto == UDP else None


def verify(packet: bytes | bytearray) -> bool:
    """True when an unfragmented IPv4 packet's header and TCP/UDP/ICMP checksums verify."""
    ihl = (packet[0] & 0x0F) * 4
    if internet_checksum(packet[:ihl]) != 0:
        return False
    total = _H.unpack_from(packet, 2)[0]
    proto = packet[9]
    l4 = bytes(packet[ihl:total])
    if proto == ICMP:
        return internet_checksum(l4) == 0
    if proto == UDP and _H.unpack_from(l4, 6)[0] == 0:
        return True  # RFC 768: no checksum
    if _l4_field(proto) is None:
        return True
    return internet_checksum(l4, pseudo_sum(bytes(packet[12:16]), bytes(packet[16:20]), proto, len(l4))) == 0


def fill_l4_checksum(buf: bytearray) -> None:
    """Write a complete TCP/UDP checksum into the unfragmented IPv4 packet in ``buf``, or the
    IPv6 one without extension headers (computed over it as it is); anything else is left alone."""
    if len(buf) >= 40 and buf[0] >> 4 == 6:
        total, proto = 40 + (buf[4] << 8 | buf[5]), buf[6]
        at = _l4_field(proto)
        if at is None or total > len(buf) or 40 + at + 2 > total:
            return
        buf[40 + at:42 + at] = b"\0\0"
        _H.pack_into(buf, 40 + at, l4_checksum(bytes(buf[8:24]), bytes(buf[24:40]), proto, bytes(buf[40:total])))
        return
    if len(buf) < 20 or buf[0] >> 4 != 4:
        return
    ihl = (buf[0] & 15) * 4
    total = buf[2] << 8 | buf[3]
    proto = buf[9]
    at = _l4_field(proto)
    if at is None or _H.unpack_from(buf, 6)[0] & 0x3FFF or total > len(buf) or ihl + at + 2 > total:
        return
    at += ihl
    buf[at:at + 2] = b"\0\0"
    _H.pack_into(buf, at, l4_checksum(bytes(buf[12:16]), bytes(buf[16:20]), proto, bytes(buf[ihl:total])))
