"""In-place rewrite of IPv4 and IPv6 packets with incremental checksum updates (RFC 1624).

``rewrite`` changes addresses and ports (or an ICMP query's identifier) of a packet;
``rewrite_icmp_error`` translates an ICMP error and the header it quotes (RFC 5508):
the quoted packet is the one the far side saw, so it is turned back into the one the
near side sent.  Both work on the buffer ``parse_ip`` read, at the offsets it found.
``precompute`` readies one direction of a flow for the engine's fast path, which then
rewrites a packet without reading its addresses or ports.  The arithmetic is
:mod:`conntrack.checksum`'s (RFC 1624 eqn 3, ``adjust``).

IPv6 (NAT66) has no header checksum, but its pseudo-header covers ICMPv6 too (RFC 8200
8.1), so an address change updates the ICMPv6 checksum as it does TCP's and UDP's; the
same incremental update works over the 128-bit addresses' sixteen words.
"""
from __future__ import annotations

import struct

from conntrack.checksum import ADJ, adjust, fold, ones_sum, udp_adjust, word_sum
from conntrack.packet import Packet, Proto

_H = struct.Struct("!H")
_HH = struct.Struct("!HH")


def precompute(key: bytes, t: tuple, proto: int) -> tuple:
    """One direction's rewrite from the packed tuple ``key`` (``packet_key``) to ``t`` =
    (src, dst, sport, dport): (new src+dst bytes, new ports/id bytes, IP checksum delta,
    L4 checksum delta).  A delta d turns checksum c into ``~fold(~c + d)``: d is
    ``adjust``'s ``new_sum + ADJ - old_sum`` summed ahead (always positive).  An IPv6 key
    (37 bytes) gives ``()``: its flows take the general path."""
    if len(key) != 13:
        return ()
    old_src, old_dst = key[1:5], key[5:9]
    osport, odport = _HH.unpack_from(key, 9)
    src, dst, sport, dport = t
    a_old = word_sum(old_src) + word_sum(old_dst)
    a_new = word_sum(src) + word_sum(dst)
    ip_delta = a_new - a_old + ADJ
    if proto == Proto.ICMP:
        return (src + dst, _H.pack(sport), ip_delta, sport - osport + ADJ)
    return (src + dst, _HH.pack(sport, dport), ip_delta, a_new + sport + dport - a_old - osport - odport + ADJ)


def rewrite(buf: bytearray, pkt: Packet, src: bytes, dst: bytes, sport: int, dport: int) -> None:
    """Give ``pkt`` (in ``buf``) these addresses and ports (ICMP query: ``sport`` is the id)."""
    if pkt.family == 6:
        return _rewrite6(buf, pkt, src, dst, sport, dport)
    l3 = pkt.l3
    a_old = word_sum(pkt.src) + word_sum(pkt.dst)
    a_new = word_sum(src) + word_sum(dst)
    if src != pkt.src or dst != pkt.dst:
        buf[l3 + 12:l3 + 16] = src
        buf[l3 + 16:l3 + 20] = dst
        (c,) = _H.unpack_from(buf, l3 + 10)
        _H.pack_into(buf, l3 + 10, adjust(c, a_old, a_new))
    l4 = pkt.l4
    if l4 < 0:
        return  # a later fragment: no transport header here
    proto = pkt.proto
    if proto == Proto.TCP:
        (c,) = _H.unpack_from(buf, l4 + 16)
        _HH.pack_into(buf, l4, sport, dport)
        _H.pack_into(buf, l4 + 16, adjust(c, a_old + pkt.sport + pkt.dport, a_new + sport + dport))
    elif proto == Proto.UDP:
        (c,) = _H.unpack_from(buf, l4 + 6)
        _HH.pack_into(buf, l4, sport, dport)
        _H.pack_into(buf, l4 + 6, udp_adjust(c, a_old + pkt.sport + pkt.dport, a_new + sport + dport))
    elif proto == Proto.ICMP:
        if sport != pkt.sport:
            (c,) = _H.unpack_from(buf, l4 + 2)
            _H.pack_into(buf, l4 + 4, sport)
            _H.pack_into(buf, l4 + 2, adjust(c, pkt.sport, sport))


def rewrite_icmp_error(buf: bytearray, pkt: Packet, outer_src: bytes, outer_dst: bytes,
                       inner_src: bytes, inner_dst: bytes, inner_sport: int, inner_dport: int) -> None:
    """Translate an ICMP error: the outer addresses, and the quoted packet's addresses and ports.

    The quoted transport checksum is updated when the quote holds it; the ICMP checksum
    is updated over everything that changed inside the message.
    """
    if pkt.family == 6:
        return _rewrite_icmp_error6(buf, pkt, outer_src, outer_dst, inner_src, inner_dst, inner_sport, inner_dport)
    inner = pkt.inner
    assert inner is not None
    start, end = pkt.l4 + 8, pkt.end
    old_sum = ones_sum(buf[start:end])
    il3, il4 = inner.l3, inner.l4
    a_old = word_sum(inner.src) + word_sum(inner.dst)
    a_new = word_sum(inner_src) + word_sum(inner_dst)
    buf[il3 + 12:il3 + 16] = inner_src
    buf[il3 + 16:il3 + 20] = inner_dst
    (c,) = _H.unpack_from(buf, il3 + 10)
    _H.pack_into(buf, il3 + 10, adjust(c, a_old, a_new))
    if il4 >= 0:
        p_old, p_new = inner.sport + inner.dport, inner_sport + inner_dport
        if inner.proto == Proto.TCP:
            _HH.pack_into(buf, il4, inner_sport, inner_dport)
            if inner.end >= il4 + 18:
                (c,) = _H.unpack_from(buf, il4 + 16)
                _H.pack_into(buf, il4 + 16, adjust(c, a_old + p_old, a_new + p_new))
        elif inner.proto == Proto.UDP:
            _HH.pack_into(buf, il4, inner_sport, inner_dport)
            if inner.end >= il4 + 8:
                (c,) = _H.unpack_from(buf, il4 + 6)
                _H.pack_into(buf, il4 + 6, udp_adjust(c, a_old + p_old, a_new + p_new))
        elif inner.proto == Proto.ICMP and inner.end >= il4 + 8:
            (c,) = _H.unpack_from(buf, il4 + 2)
            _H.pack_into(buf, il4 + 4, inner_sport)
            _H.pack_into(buf, il4 + 2, adjust(c, inner.sport, inner_sport))
    new_sum = ones_sum(buf[start:end])
    (c,) = _H.unpack_from(buf, pkt.l4 + 2)
    _H.pack_into(buf, pkt.l4 + 2, adjust(c, fold(old_sum), fold(new_sum)))
    l3 = pkt.l3
    if outer_src != pkt.src or outer_dst != pkt.dst:
        buf[l3 + 12:l3 + 16] = outer_src
        buf[l3 + 16:l3 + 20] = outer_dst
        (c,) = _H.unpack_from(buf, l3 + 10)
        _H.pack_into(buf, l3 + 10, adjust(c, word_sum(pkt.src) + word_sum(pkt.dst),
                                          word_sum(outer_src) + word_sum(outer_dst)))


def _rewrite6(buf: bytearray, pkt: Packet, src: bytes, dst: bytes, sport: int, dport: int) -> None:
    """:func:`rewrite` for IPv6: addresses at 8 and 24, no header checksum, ICMPv6's checksum
    covers the pseudo-header."""
    l3 = pkt.l3
    a_old = word_sum(pkt.src) + word_sum(pkt.dst)
    a_new = word_sum(src) + word_sum(dst)
    buf[l3 + 8:l3 + 24] = src
    buf[l3 + 24:l3 + 40] = dst
    l4 = pkt.l4
    if l4 < 0:
        return  # a later fragment: the first one's transport checksum covers the addresses
    _l4_6(buf, pkt.proto, l4, pkt.end, a_old, a_new, pkt.sport, pkt.dport, sport, dport)


def _l4_6(buf: bytearray, proto: int, l4: int, end: int, a_old: int, a_new: int, osport: int, odport: int,
          sport: int, dport: int) -> None:
    """Ports (ICMPv6: the id in ``sport``) and the transport checksum of an IPv6 packet or quote
    (``a_old``/``a_new``: the addresses' word sums; a quote may stop before its checksum)."""
    old, new = a_old + osport + odport, a_new + sport + dport
    if proto == Proto.TCP:
        _HH.pack_into(buf, l4, sport, dport)
        if end >= l4 + 18:
            (c,) = _H.unpack_from(buf, l4 + 16)
            _H.pack_into(buf, l4 + 16, adjust(c, old, new))
    elif proto == Proto.UDP:
        _HH.pack_into(buf, l4, sport, dport)
        if end >= l4 + 8:
            (c,) = _H.unpack_from(buf, l4 + 6)
            _H.pack_into(buf, l4 + 6, udp_adjust(c, old, new))
    elif proto == Proto.ICMPV6 and end >= l4 + 8:
        (c,) = _H.unpack_from(buf, l4 + 2)
        _H.pack_into(buf, l4 + 4, sport)
        _H.pack_into(buf, l4 + 2, adjust(c, a_old + osport, a_new + sport))


def _rewrite_icmp_error6(buf: bytearray, pkt: Packet, outer_src: bytes, outer_dst: bytes,
                         inner_src: bytes, inner_dst: bytes, inner_sport: int, inner_dport: int) -> None:
    """:func:`rewrite_icmp_error` for ICMPv6 (RFC 4443 errors, types 1-4): its checksum covers
    the outer pseudo-header and the whole message, quote included."""
    inner = pkt.inner
    assert inner is not None
    start, end = pkt.l4 + 8, pkt.end
    old_sum = ones_sum(buf[start:end]) + word_sum(pkt.src) + word_sum(pkt.dst)
    il3 = inner.l3
    a_old = word_sum(inner.src) + word_sum(inner.dst)
    a_new = word_sum(inner_src) + word_sum(inner_dst)
    buf[il3 + 8:il3 + 24] = inner_src
    buf[il3 + 24:il3 + 40] = inner_dst
    if inner.l4 >= 0:
        _l4_6(buf, inner.proto, inner.l4, inner.end, a_old, a_new, inner.sport, inner.dport, inner_sport,
              inner_dport)
    l3 = pkt.l3
    buf[l3 + 8:l3 + 24] = outer_src
    buf[l3 + 24:l3 + 40] = outer_dst
    new_sum = ones_sum(buf[start:end]) + word_sum(outer_src) + word_sum(outer_dst)
    (c,) = _H.unpack_from(buf, pkt.l4 + 2)
    _H.pack_into(buf, pkt.l4 + 2, adjust(c, fold(old_sum), fold(new_sum)))
