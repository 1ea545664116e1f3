"""Packet headers from raw bytes: Ethernet (with VLAN tags), IPv4, IPv6, TCP, UDP, ICMP.

``parse_ip`` reads what NFQUEUE delivers (an IP packet); ``parse_frame`` reads what a
TAP device or an Ethernet capture delivers.  Both return frozen values holding the
header fields the tracker needs and the *absolute offsets* of each layer, so the NAT
can rewrite the same buffer in place.  Their only failure is :class:`ParseError`.

``Packet`` and ``Fragment`` are immutable ``NamedTuple`` values rather than frozen
dataclasses: one is built per packet, and a frozen dataclass with eighteen fields costs
about ten times as much to build (one ``object.__setattr__`` per field).  Hot paths
build them with ``tuple.__new__`` and every field given (``_new``).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from .errors import ParseError, Malformed


class Proto(IntEnum):
    """IP protocol numbers roam knows by name."""

    HOPOPT = 0
    ICMP = 1
    TCP = 6
    UDP = 17
    DCCP = 33
    ROUTING = 43
    FRAGMENT = 44
    GRE = 47
    ESP = 50
    AH = 51
    ICMPV6 = 58
    NONE = 59
    DSTOPTS = 60
    SCTP = 132
    UDPLITE = 136


class EtherType(IntEnum):
    IPV4 = 0x0800
    ARP = 0x0806
    VLAN = 0x8100
    IPV6 = 0x86DD
    QINQ = 0x88A8
    QINQ_OLD = 0x9100


class TcpFlag(IntEnum):
    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20


#: ICMP query types (request -> reply), keyed by identifier like Linux does.
ICMP4_QUERIES = {8: 0, 13: 14, 15: 16, 17: 18}
ICMP6_QUERIES = {128: 129, 139: 140}
#: ICMP error types, which quote the packet that caused them.
ICMP4_ERRORS = frozenset({3, 4, 5, 11, 12})
ICMP6_ERRORS = frozenset({1, 2, 3, 4})

#: Protocols whose first four L4 bytes are source and destination ports (plain ints: hashing
#: an IntEnum member costs more than hashing an int).
_PORT_PROTOS = frozenset({6, 17, 136, 132, 33})
#: IPv6 extension headers whose length is (hdrlen + 1) * 8.
_EXT_GENERIC = frozenset({0, 43, 60, 135, 139, 140})
_TCP, _UDP, _UDPLITE, _ICMP, _ICMPV6, _AH, _FRAG = 6, 17, 136, 1, 58, 51, 44
_MAX_EXT_HEADERS = 16
_MAX_VLAN_TAGS = 4

_H = struct.Struct("!H")
_HH = struct.Struct("!HH")
_I = struct.Struct("!I")
_HHH = struct.Struct("!HHH")
_HHII = struct.Struct("!HHII")
_IPV4 = struct.Struct("!xxHxxHxB")  # total length, flags/fragment offset, protocol
_new = tuple.__new__


class Fragment(NamedTuple):
    """An IP fragment: tracked by (src, dst, proto, ident) until its head is known."""

    ident: int
    offset: int  # bytes from the start of the original payload
    more: bool

    @property
    def first(self) -> bool:
        return self.offset == 0


class Packet(NamedTuple):
    """One IP packet's headers; offsets index the buffer it was parsed from (immutable)."""

    family: int  # 4 or 6
    proto: int  # upper-layer protocol (after any IPv6 extension headers)
    src: bytes
    dst: bytes
    l3: int  # offset of the IP header
    l4: int  # offset of the upper-layer header, -1 for a non-first fragment
    end: int  # offset just past the IP packet (Ethernet padding excluded)
    sport: int = 0  # ports; ICMP query identifier in sport
    dport: int = 0
    tcp_flags: int = 0
    seq: int = 0
    ack: int = 0
    payload_len: int = 0  # bytes after the upper-layer header
    icmp_type: int = -1
    icmp_code: int = -1
    fragment: Fragment | None = None
    inner: "Packet | None" = None  # the packet an ICMP error quotes
    truncated: bool = False  # a quoted packet cut short by the ICMP error

    @property
    def length(self) -> int:
        return self.end - self.l3

    @property
    def has_ports(self) -> bool:
        return self.l4 >= 0 and self.proto in _PORT_PROTOS

    @property
    def is_icmp(self) -> bool:
        return self.proto == (1 if self.family == 4 else 58)

    @property
    def is_icmp_error(self) -> bool:
        return self.inner is not None

    @property
    def is_icmp_query(self) -> bool:
        if not self.is_icmp or self.l4 < 0:
            return False
        queries = ICMP4_QUERIES if self.family == 4 else ICMP6_QUERIES
        return self.icmp_type in queries or self.icmp_type in queries.values()


@dataclass(frozen=True, slots=True)
class Frame:
    """One Ethernet frame; ``packet`` is None for non-IP payloads such as ARP."""

    dst: bytes
    src: bytes
    ethertype: int
    vlans: tuple[int, ...]
    l3: int
    packet: Packet | None


def parse_frame(buf: bytes | bytearray | memoryview) -> Frame:
    """Parse an Ethernet II frame, its 802.1Q/802.1ad tags and, if IP, its packet."""
    n = len(buf)
    if n < 14:
        raise ParseError(Malformed.TRUNCATED, f"ethernet header needs 14 bytes, have {n}")
    (ethertype,) = _H.unpack_from(buf, 12)
    off = 14
    vlans: list[int] = []
    while ethertype in (EtherType.VLAN, EtherType.QINQ, EtherType.QINQ_OLD):
        if len(vlans) == _MAX_VLAN_TAGS:
            raise ParseError(Malformed.BAD_VLAN, f"more than {_MAX_VLAN_TAGS} VLAN tags")
        if n < off + 4:
            raise ParseError(Malformed.TRUNCATED, f"VLAN tag at {off} cut short")
        tci, ethertype = _HH.unpack_from(buf, off)
        vlans.append(tci & 0x0FFF)
        off += 4
    if ethertype < 0x0600:
        raise ParseError(Malformed.BAD_ETHERTYPE, f"802.3 length field {ethertype:#06x}, not Ethernet II")
    packet = None
    if ethertype == EtherType.IPV4 or ethertype == EtherType.IPV6:
        packet = parse_ip(buf, off)
        if packet.family != (4 if ethertype == EtherType.IPV4 else 6):
            raise ParseError(Malformed.BAD_IP_VERSION, f"IPv{packet.family} under ethertype {ethertype:#06x}")
    return Frame(bytes(buf[0:6]), bytes(buf[6:12]), ethertype, tuple(vlans), off, packet)


def parse_ip(buf: bytes | bytearray | memoryview, offset: int = 0) -> Packet:
    """Parse an IPv4 or IPv6 packet starting at ``offset``."""
    # The common packet read inline (whole option-less IPv4, TCP or UDP, well-formed); all
    # else, errors included, goes the general way, which gives this case the same answer.
    n = len(buf)
    if n - offset >= 28 and buf[offset] == 0x45:
        total, frag, proto = _IPV4.unpack_from(buf, offset)
        end = offset + total
        if not frag & 0x3FFF and 28 <= total and end <= n:
            l4 = offset + 20
            if proto == _TCP:
                if total >= 40:
                    doff = (buf[l4 + 12] >> 4) * 4
                    if 20 <= doff <= total - 20:
                        sport, dport, seq, ack = _HHII.unpack_from(buf, l4)
                        return _new(Packet, (4, 6, bytes(buf[offset + 12:l4 - 4]), bytes(buf[l4 - 4:l4]), offset, l4,
                                             end, sport, dport, buf[l4 + 13] & 0x3F, seq, ack, total - 20 - doff,
                                             -1, -1, None, None, False))
            elif proto == _UDP:
                sport, dport, ulen = _HHH.unpack_from(buf, l4)
                if 8 <= ulen <= total - 20:
                    return _new(Packet, (4, 17, bytes(buf[offset + 12:l4 - 4]), bytes(buf[l4 - 4:l4]), offset, l4, end,
                                         sport, dport, 0, 0, 0, ulen - 8, -1, -1, None, None, False))
    return _parse_ip(buf, offset, n, False)


def _parse_ip(buf, off: int, limit: int, quoted: bool) -> Packet:
    if limit - off < 1:
        raise ParseError(Malformed.TRUNCATED, "empty IP packet")
    version = buf[off] >> 4
    if version == 4:
        return _parse_ipv4(buf, off, limit, quoted)
    if version == 6:
        return _parse_ipv6(buf, off, limit, quoted)
    raise ParseError(Malformed.BAD_IP_VERSION, f"version {version}")


def _end(end: int, limit: int, quoted: bool, claim: str, present: int) -> tuple[int, bool]:
    """Where the IP packet ends, and whether it is cut short: only a packet quoted in an
    ICMP error may be (routers quote just its head); anywhere else that is malformed."""
    if end <= limit:
        return end, False
    if not quoted:
        raise ParseError(Malformed.BAD_TOTAL_LENGTH, f"{claim} exceeds the {present} bytes present")
    return limit, True


def _parse_ipv4(buf, off: int, limit: int, quoted: bool) -> Packet:
    if limit - off < 20:
        raise ParseError(Malformed.TRUNCATED, f"IPv4 header needs 20 bytes, have {limit - off}")
    ihl = (buf[off] & 0x0F) * 4
    if ihl < 20:
        raise ParseError(Malformed.BAD_IHL, f"IHL {ihl // 4} below 5")
    if off + ihl > limit:
        raise ParseError(Malformed.TRUNCATED, f"IPv4 header of {ihl} bytes cut short")
    total, ident, frag = _HHH.unpack_from(buf, off + 2)
    if total < ihl:
        raise ParseError(Malformed.BAD_TOTAL_LENGTH, f"total length {total} below header length {ihl}")
    end, truncated = _end(off + total, limit, quoted, f"total length {total}", limit - off)
    proto = buf[off + 9]
    src = bytes(buf[off + 12 : off + 16])
    dst = bytes(buf[off + 16 : off + 20])
    fragment = None
    if frag & 0x3FFF:
        fragment = _new(Fragment, (ident, (frag & 0x1FFF) * 8, bool(frag & 0x2000)))
    return _parse_l4(buf, 4, proto, src, dst, off, off + ihl, end, fragment, quoted, truncated)


def _parse_ipv6(buf, off: int, limit: int, quoted: bool) -> Packet:
    if limit - off < 40:
        raise ParseError(Malformed.TRUNCATED, f"IPv6 header needs 40 bytes, have {limit - off}")
    (plen,) = _H.unpack_from(buf, off + 4)
    end, truncated = _end(off + 40 + plen, limit, quoted, f"payload length {plen}", limit - off - 40)
    nh = buf[off + 6]
    src = bytes(buf[off + 8 : off + 24])
    dst = bytes(buf[off + 24 : off + 40])
    pos = off + 40
    fragment = None
    for _ in range(_MAX_EXT_HEADERS):
        if nh in _EXT_GENERIC or nh == _AH:
            if end - pos < 8:
                raise ParseError(Malformed.BAD_EXTENSION_HEADER, f"extension header {nh} at {pos} cut short")
            size = (buf[pos + 1] + 2) * 4 if nh == _AH else (buf[pos + 1] + 1) * 8
            if pos + size > end:
                raise ParseError(Malformed.BAD_EXTENSION_HEADER, f"extension header {nh} of {size} bytes overruns the packet")
            nh, pos = buf[pos], pos + size
        elif nh == _FRAG:
            if end - pos < 8:
                raise ParseError(Malformed.BAD_EXTENSION_HEADER, f"fragment header at {pos} cut short")
            (fo,) = _H.unpack_from(buf, pos + 2)
            (ident,) = _I.unpack_from(buf, pos + 4)
            if fragment is not None:
                raise ParseError(Malformed.BAD_FRAGMENT, "two fragment headers")
            fragment = _new(Fragment, (ident, fo & 0xFFF8, bool(fo & 1)))
            if not fragment.more and fragment.offset == 0:
                fragment = None  # an atomic fragment (RFC 6946) is a whole packet
            nh, pos = buf[pos], pos + 8
        else:
            break
    else:
        raise ParseError(Malformed.BAD_EXTENSION_HEADER, f"more than {_MAX_EXT_HEADERS} extension headers")
    return _parse_l4(buf, 6, nh, src, dst, off, pos, end, fragment, quoted, truncated)


def _parse_l4(buf, family, proto, src, dst, l3, l4, end, fragment, quoted, truncated) -> Packet:
    # Packets are built with every field given, in order (see Packet):
    # family proto src dst l3 l4 end sport dport tcp_flags seq ack payload_len icmp_type icmp_code
    # fragment inner truncated
    if fragment is not None and fragment.offset != 0:
        return _new(Packet, (family, proto, src, dst, l3, -1, end, 0, 0, 0, 0, 0, 0, -1, -1, fragment, None,
                             truncated))
    avail = end - l4
    cut = Malformed.BAD_FRAGMENT if fragment is not None else Malformed.TRUNCATED
    if proto == _TCP:
        if quoted:
            if avail < 8:
                raise ParseError(Malformed.TRUNCATED, "quoted TCP header needs 8 bytes")
            sport, dport = _HH.unpack_from(buf, l4)
            (seq,) = _I.unpack_from(buf, l4 + 4)
            ack = _I.unpack_from(buf, l4 + 8)[0] if avail >= 12 else 0
            flags = buf[l4 + 13] & 0x3F if avail >= 14 else 0
            return _new(Packet, (family, proto, src, dst, l3, l4, end, sport, dport, flags, seq, ack, 0, -1, -1,
                                 fragment, None, truncated))
        if avail < 20:
            raise ParseError(cut, f"TCP header needs 20 bytes, have {avail}")
        doff = (buf[l4 + 12] >> 4) * 4
        if doff < 20 or doff > avail:
            raise ParseError(Malformed.BAD_TCP_OFFSET, f"data offset {doff} with {avail} bytes present")
        sport, dport, seq, ack = _HHII.unpack_from(buf, l4)
        return _new(Packet, (family, proto, src, dst, l3, l4, end, sport, dport, buf[l4 + 13] & 0x3F, seq, ack,
                             avail - doff, -1, -1, fragment, None, truncated))
    if proto in _PORT_PROTOS:  # UDP, UDP-Lite, SCTP, DCCP: ports first
        need = 8 if (proto == _UDP or proto == _UDPLITE) and not quoted else 4
        if avail < need:
            raise ParseError(cut, f"protocol {proto} header needs {need} bytes, have {avail}")
        sport, dport = _HH.unpack_from(buf, l4)
        payload = 0
        if proto == _UDP and not quoted:
            (ulen,) = _H.unpack_from(buf, l4 + 4)
            if fragment is None and (ulen < 8 or ulen > avail):
                raise ParseError(Malformed.BAD_UDP_LENGTH, f"UDP length {ulen} with {avail} bytes present")
            payload = ulen - 8 if ulen >= 8 else 0
        return _new(Packet, (family, proto, src, dst, l3, l4, end, sport, dport, 0, 0, 0, payload, -1, -1,
                             fragment, None, truncated))
    icmp = _ICMP if family == 4 else _ICMPV6
    if proto == icmp:
        if avail < 8:
            raise ParseError(Malformed.BAD_ICMP if not quoted else Malformed.TRUNCATED, f"ICMP header needs 8 bytes, have {avail}")
        itype, code = buf[l4], buf[l4 + 1]
        (ident,) = _H.unpack_from(buf, l4 + 4)
        inner = None
        errors = ICMP4_ERRORS if family == 4 else ICMP6_ERRORS
        if itype in errors:
            if quoted:  # an error about an error is never generated (RFC 1122 3.2.2)
                return _new(Packet, (family, proto, src, dst, l3, l4, end, 0, 0, 0, 0, 0, 0, itype, code,
                                     fragment, None, truncated))
            if fragment is not None:
                raise ParseError(Malformed.BAD_ICMP, "fragmented ICMP error")
            try:
                inner = _parse_ip(buf, l4 + 8, end, True)
            except ParseError as exc:
                raise ParseError(Malformed.BAD_ICMP, f"quoted packet: {exc}") from None
            if inner.family != family:
                raise ParseError(Malformed.BAD_ICMP, f"ICMPv{family} error quotes an IPv{inner.family} packet")
            ident = 0
        return _new(Packet, (family, proto, src, dst, l3, l4, end, ident, 0, 0, 0, 0, avail - 8, itype, code,
                             fragment, inner, truncated))
    if proto == _ICMP or proto == _ICMPV6:
        raise ParseError(Malformed.UNSUPPORTED_PROTOCOL, f"ICMP protocol {proto} inside IPv{family}")
    return _new(Packet, (family, proto, src, dst, l3, l4, end, 0, 0, 0, 0, 0, avail, -1, -1, fragment, None,
                         truncated))
