"""Flow tuples: the public, readable form, and the packed bytes the table keys on.

A key is ``proto | src | dst | sport | dport`` packed (13 bytes for IPv4, 37 for
IPv6): bytes hash once and cost far less memory than objects.  ICMP queries key on
the identifier (as ``sport``) and the message type (as ``dport``), so a request and
its reply map onto each other's tuples, as in Linux.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

#: a packed key's length by address family
KEY_SIZE = {4: 13, 6: 37}

from .packet import ICMP4_QUERIES, ICMP6_QUERIES, Packet, Proto

_K4 = struct.Struct("!B4s4sHH")
_K6 = struct.Struct("!B16s16sHH")
_ICMP4_PAIR = {**ICMP4_QUERIES, **{v: k for k, v in ICMP4_QUERIES.items()}}
_ICMP6_PAIR = {**ICMP6_QUERIES, **{v: k for k, v in ICMP6_QUERIES.items()}}
_PORTLESS = 0


@dataclass(frozen=True, slots=True)
class FlowTuple:
    """One direction of a flow. For ICMP queries ``sport`` is the id and ``dport`` the type."""

    proto: int
    src: bytes
    dst: bytes
    sport: int = 0
    dport: int = 0

    @property
    def family(self) -> int:
        return 4 if len(self.src) == 4 else 6

    @property
    def is_icmp(self) -> bool:
        return self.proto in (Proto.ICMP, Proto.ICMPV6)

    def reversed(self) -> "FlowTuple":
        """The tuple of the answer; reversing twice gives the tuple back."""
        if self.is_icmp:
            pair = _ICMP4_PAIR if self.proto == Proto.ICMP else _ICMP6_PAIR
            return FlowTuple(self.proto, self.dst, self.src, self.sport, pair.get(self.dport, self.dport))
        return FlowTuple(self.proto, self.dst, self.src, self.dport, self.sport)

    def key(self) -> bytes:
        return (_K4 if len(self.src) == 4 else _K6).pack(self.proto, self.src, self.dst, self.sport, self.dport)

    @classmethod
    def from_key(cls, key: bytes) -> "FlowTuple":
        return cls(*(_K4 if len(key) == _K4.size else _K6).unpack(key))

    @classmethod
    def make(cls, proto: int, src: str, dst: str, sport: int = 0, dport: int = 0) -> "FlowTuple":
        """Build from text addresses (tests and tools)."""
        return cls(proto, ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed, sport, dport)

    @property
    def src_text(self) -> str:
        return str(ipaddress.ip_address(self.src))

    @property
    def dst_text(self) -> str:
        return str(ipaddress.ip_address(self.dst))


_PORTED = frozenset({6, 17, 136, 132, 33})  # as packet._PORT_PROTOS, plain ints
_PACK4, _PACK6 = _K4.pack, _K6.pack
_UNPACK4, _UNPACK6 = _K4.unpack, _K6.unpack
_K4_SIZE = _K4.size


def packet_key(pkt: Packet) -> bytes | None:
    """The key of the tuple this packet travels on, or None if it cannot be tracked alone."""
    family, proto, src, dst, _, l4, _, sport, dport, _, _, _, _, icmp_type = pkt[:14]
    pack = _PACK4 if family == 4 else _PACK6
    if l4 < 0:
        return None
    if proto in _PORTED:
        return pack(proto, src, dst, sport, dport)
    if proto == (1 if family == 4 else 58):
        queries = ICMP4_QUERIES if family == 4 else ICMP6_QUERIES
        if icmp_type in queries or icmp_type in queries.values():
            return pack(proto, src, dst, sport, icmp_type)
        return None
    return pack(proto, src, dst, _PORTLESS, _PORTLESS)


def reverse_key(key: bytes) -> bytes:
    """The key of the answer's tuple (as ``FlowTuple.reversed``), without building tuples."""
    if len(key) == _K4_SIZE:
        proto, src, dst, sport, dport = _UNPACK4(key)
        pack = _PACK4
    else:
        proto, src, dst, sport, dport = _UNPACK6(key)
        pack = _PACK6
    if proto == 1:
        return pack(proto, dst, src, sport, _ICMP4_PAIR.get(dport, dport))
    if proto == 58:
        return pack(proto, dst, src, sport, _ICMP6_PAIR.get(dport, dport))
    return pack(proto, dst, src, dport, sport)
