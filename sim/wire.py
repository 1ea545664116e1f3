"""Real packet bytes for the simulator: IPv4 + TCP/UDP and Ethernet, built with struct.

The simulator's endpoints speak through these builders and read with
:func:`conntrack.parse_ip`, so every packet that crosses the simulated network is a
well-formed IPv4 datagram with correct checksums that the real NAT and tunnel
engines can rewrite and carry.  No scapy here: this is the data path.
"""
from __future__ import annotations

import ipaddress
import struct

from conntrack import Proto, TcpFlag
from conntrack.checksum import internet_checksum as checksum

_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_ETH = struct.Struct("!6s6sH")
_PSEUDO = struct.Struct("!4s4sBBH")

SYN, ACK, RST, PSH, FIN = TcpFlag.SYN, TcpFlag.ACK, TcpFlag.RST, TcpFlag.PSH, TcpFlag.FIN
ETH_IPV4 = 0x0800
MSS = 1400
_ZEROS = bytes(MSS)


def zeros(n: int) -> bytes:
    """``n`` zero bytes of payload (at most :data:`MSS`)."""
    return _ZEROS[:n]


def addr(text: str) -> bytes:
    """Packed IPv4 address from text."""
    return ipaddress.IPv4Address(text).packed


def text(packed: bytes) -> str:
    return str(ipaddress.IPv4Address(packed))


def _ip_header(src: bytes, dst: bytes, proto: int, l4_len: int, ident: int, ttl: int = 64) -> bytes:
    total = 20 + l4_len
    hdr = _IP.pack(0x45, 0, total, ident & 0xFFFF, 0x4000, ttl, proto, 0, src, dst)
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]


def tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
        payload_len: int = 0, ident: int = 0, window: int = 65535) -> bytes:
    """An IPv4 TCP segment carrying ``payload_len`` zero bytes (at most :data:`MSS`)."""
    payload = _ZEROS[:payload_len]
    seg = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, window, 0, 0) + payload
    pseudo = _PSEUDO.pack(src, dst, 0, Proto.TCP, len(seg))
    csum = checksum(pseudo + seg)
    seg = seg[:16] + struct.pack("!H", csum) + seg[18:]
    return _ip_header(src, dst, Proto.TCP, len(seg), ident) + seg


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload_len: int = 0, ident: int = 0,
        payload: bytes | None = None) -> bytes:
    """An IPv4 UDP datagram; ``payload`` if given, else ``payload_len`` zero bytes."""
    body = payload if payload is not None else _ZEROS[:payload_len]
    length = 8 + len(body)
    pseudo = _PSEUDO.pack(src, dst, 0, Proto.UDP, length)
    csum = checksum(pseudo + _UDP.pack(sport, dport, length, 0) + body) or 0xFFFF
    return _ip_header(src, dst, Proto.UDP, length, ident) + _UDP.pack(sport, dport, length, csum) + body


def ether(dst_mac: bytes, src_mac: bytes, ip_packet: bytes, ethertype: int = ETH_IPV4) -> bytes:
    """An Ethernet II frame around ``ip_packet``."""
    return _ETH.pack(dst_mac, src_mac, ethertype) + ip_packet


def mac(text_mac: str) -> bytes:
    parts = text_mac.replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {text_mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_text(packed: bytes) -> str:
    return ":".join(f"{b:02x}" for b in packed)


def verify(packet: bytes) -> bool:
    """True when the IPv4 header and TCP/UDP checksums of ``packet`` verify (tests, tools)."""
    ihl = (packet[0] & 0x0F) * 4
    if checksum(packet[:ihl]) != 0:
        return False
    total = struct.unpack_from("!H", packet, 2)[0]
    proto = packet[9]
    l4 = packet[ihl:total]
    pseudo = _PSEUDO.pack(packet[12:16], packet[16:20], 0, proto, len(l4))
    if proto == Proto.UDP and struct.unpack_from("!H", l4, 6)[0] == 0:
        return True
    if proto in (Proto.TCP, Proto.UDP):
        return checksum(pseudo + l4) == 0
    return True
