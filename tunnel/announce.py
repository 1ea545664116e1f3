"""Frames that tell a LAN where an address now lives: gratuitous ARP and unsolicited NA.

Also the small readers that learn a VM's addresses from the frames it sends
(ARP sender address, IPv4/IPv6 source), which the proxy announces on re-attach,
and the home LAN's own neighbour bindings from its ARP and neighbour-discovery
frames, which the proxy tells a VM that has just moved (its link went down and
up: Linux then forgets its neighbours, and would wait up to a second, ARP's
retransmission time, before asking again).
Plain ``struct`` over bytes; no scapy in the data path.
"""
from __future__ import annotations

import struct

from conntrack.checksum import internet_checksum

BROADCAST = b"\xff" * 6
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"
ALL_NODES_V6 = bytes.fromhex("ff020000000000000000000000000001")

_ETH = struct.Struct("!6s6sH")


def gratuitous_arp(mac: bytes, ip4: bytes) -> bytes:
    """An ARP announcement (RFC 5227): request, sender = target = ``ip4``."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip4, b"\x00" * 6, ip4)
    return _ETH.pack(BROADCAST, mac, 0x0806) + arp


def unsolicited_na(mac: bytes, ip6: bytes) -> bytes:
    """An unsolicited neighbour advertisement (RFC 4861 7.2.6) to all nodes, Override set."""
    icmp = struct.pack("!BBHI16sBB6s", 136, 0, 0, 0x20000000, ip6, 2, 1, mac)
    pseudo = ip6 + ALL_NODES_V6 + struct.pack("!I3xB", len(icmp), 58)
    csum = internet_checksum(pseudo + icmp)
    icmp = icmp[:2] + struct.pack("!H", csum) + icmp[4:]
    ip = struct.pack("!IHBB16s16s", 0x60000000, len(icmp), 58, 255, ip6, ALL_NODES_V6)
    return _ETH.pack(ALL_NODES_MAC, mac, 0x86DD) + ip + icmp


def announcement(mac: bytes, address: bytes) -> bytes:
    return gratuitous_arp(mac, address) if len(address) == 4 else unsolicited_na(mac, address)


def source_address(frame: bytes) -> bytes | None:
    """The sender's own IP address in an untagged frame, if it names one usable for announcing."""
    if len(frame) < 14:
        return None
    ethertype = (frame[12] << 8) | frame[13]
    if ethertype == 0x0800 and len(frame) >= 34:
        src = bytes(frame[26:30])
        return src if src != b"\x00\x00\x00\x00" and src[0] < 224 and src[0] != 127 else None
    if ethertype == 0x0806 and len(frame) >= 42 and frame[14:16] == b"\x00\x01" and frame[16:18] == b"\x08\x00":
        src = bytes(frame[28:32])
        return src if src != b"\x00\x00\x00\x00" else None
    if ethertype == 0x86DD and len(frame) >= 54:
        src = bytes(frame[22:38])
        if src == b"\x00" * 16 or src[0] == 0xFF:
            return None
        return src
    return None


def neighbour_binding(frame: bytes | memoryview) -> tuple[bytes, bytes] | None:
    """``(address, mac)`` a LAN host states about itself in an ARP or neighbour-discovery frame
    (untagged): the ARP sender, the target of a neighbour advertisement, the source of a
    neighbour solicitation; only when the link-layer address in the frame is its Ethernet
    source.  None for any other frame."""
    if len(frame) < 42:
        return None
    if frame[12] == 0x08 and frame[13] == 0x06:
        if frame[14:22] != b"\x00\x01\x08\x00\x06\x04\x00\x01" and frame[14:22] != b"\x00\x01\x08\x00\x06\x04\x00\x02":
            return None
        mac, ip4 = bytes(frame[22:28]), bytes(frame[28:32])
        if mac != frame[6:12] or mac[0] & 1 or ip4 == b"\x00\x00\x00\x00" or ip4[0] >= 224 or ip4[0] == 127:
            return None
        return ip4, mac
    if frame[12] == 0x86 and frame[13] == 0xDD and len(frame) >= 78 and frame[20] == 58 and frame[21] == 255:
        icmp_type = frame[54]
        if icmp_type == 136:
            addr = bytes(frame[62:78])
        elif icmp_type == 135:
            addr = bytes(frame[22:38])
        else:
            return None
        mac = bytes(frame[6:12])
        if addr == b"\x00" * 16 or addr[0] == 0xFF or mac[0] & 1:
            return None
        return addr, mac
    return None
