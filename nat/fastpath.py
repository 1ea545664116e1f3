"""The common packet, read fast: IPv4 without options, whole, TCP or UDP.

``parse_common`` returns exactly the :class:`Packet` ``conntrack.parse_ip`` would, or
None for anything else (the caller then uses ``parse_ip``, which also reports errors).
A property test holds the two to the same answers.
"""
from __future__ import annotations

import struct

from conntrack.packet import Packet

_IP = struct.Struct("!xxHxxHxB")  # total length, flags/fragment, protocol
_TCP = struct.Struct("!HHIIBB")
_UDP = struct.Struct("!HHH")
_new = tuple.__new__  # Packet is a NamedTuple: every field given, in order


def parse_common(data) -> Packet | None:
    n = len(data)
    if n < 28 or data[0] != 0x45:
        return None
    total, frag, proto = _IP.unpack_from(data, 0)
    if frag & 0x3FFF or total > n or total < 28:
        return None
    if proto == 6:
        avail = total - 20
        if avail < 20:
            return None
        sport, dport, seq, ack, off, flags = _TCP.unpack_from(data, 20)
        doff = (off >> 4) * 4
        if doff < 20 or doff > avail:
            return None
        return _new(Packet, (4, 6, bytes(data[12:16]), bytes(data[16:20]), 0, 20, total, sport, dport, flags & 0x3F,
                             seq, ack, avail - doff, -1, -1, None, None, False))
    if proto == 17:
        sport, dport, ulen = _UDP.unpack_from(data, 20)
        if ulen < 8 or ulen > total - 20:
            return None
        return _new(Packet, (4, 17, bytes(data[12:16]), bytes(data[16:20]), 0, 20, total, sport, dport, 0, 0, 0,
                             ulen - 8, -1, -1, None, None, False))
    return None
