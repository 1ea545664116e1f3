"""Packets that follow a known flow without being on its tuple (Linux's RELATED): non-first
fragments and ICMP/ICMPv6 errors, translated as the flow is (RFC 5508 REQ-3/4, RFC 4787 REQ-14).

Kept apart from :mod:`nat.engine` (which calls them with itself): both answer through the
engine's ``_drop``/``_accept``, counting as it does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from conntrack.answer import Answer
from conntrack.flow import FlowTuple, packet_key, reverse_key
from conntrack.packet import Packet, Proto
from conntrack.table import Conn

from .answers import NatReason, Side
from .mapping import Binding
from .rewrite import rewrite, rewrite_icmp_error

if TYPE_CHECKING:
    from .engine import NatEngine

_TRACKED = (Proto.TCP, Proto.UDP, Proto.ICMP, Proto.ICMPV6)
_ICMPS = (Proto.ICMP, Proto.ICMPV6)


def fragment(eng: "NatEngine", buf: bytearray, pkt: Packet, side: Side, now: float) -> Answer:
    """A later fragment: the addresses of the flow its head opened (the tracker knows it)."""
    tr = eng.table.track(pkt, now)
    c = tr.conn
    if c is None or c.extra is None:
        return eng._drop(NatReason.FRAGMENT_WITHOUT_HEAD)
    b: Binding = c.extra
    d = tr.direction
    if bool(b.internal >> d & 1) != (side == Side.INTERNAL):
        return eng._drop(NatReason.WRONG_SIDE)
    t = b.rev if d else b.fwd
    rewrite(buf, pkt, t[0], t[1], 0, 0)
    return eng._accept(buf, NatReason.TRANSLATED, side)


def icmp_error(eng: "NatEngine", buf: bytearray, pkt: Packet, side: Side, now: float) -> Answer:
    """An ICMP error quoting a packet of a known flow: the quote becomes the packet as its
    sender sent it, the outer addresses follow the flow's."""
    inner = pkt.inner
    assert inner is not None  # only an ICMP error (it quotes a packet) comes here
    ik = packet_key(inner) if inner.l4 >= 0 and inner.proto in _TRACKED else None
    if ik is None or len(ik) not in (13, 37):
        return eng._drop(NatReason.ICMP_NO_FLOW)
    rk = reverse_key(ik)
    c: Conn | None = eng.table.lookup(rk)
    if c is None or c.deadline <= now or c.extra is None:
        return eng._drop(NatReason.ICMP_NO_FLOW)
    b: Binding = c.extra
    d = 0 if rk == c.original else 1
    if bool(b.internal >> d & 1) != (side == Side.INTERNAL):
        return eng._drop(NatReason.WRONG_SIDE)
    x = FlowTuple.from_key(rk)
    y = FlowTuple.from_key(c.reply if d == 0 else c.original)
    ext = eng.external_ip if pkt.family == 4 else eng.external_ip6
    if pkt.src == x.src:
        outer_src = y.dst
    elif side == Side.INTERNAL and b.internal != 3 and ext is not None:  # (never None here)
        outer_src = ext  # an internal router's address must not leave
    else:
        outer_src = pkt.src
    outer_dst = y.src if pkt.dst == x.dst else pkt.dst
    # the quoted packet becomes the tuple Y as its sender sent it (ICMP: sport is the id)
    rewrite_icmp_error(buf, pkt, outer_src, outer_dst, y.src, y.dst, y.sport,
                       y.dport if inner.proto not in _ICMPS else inner.dport)
    eng.counters["icmp_errors_translated"] += 1
    return eng._accept(buf, NatReason.ICMP_ERROR_TRANSLATED, side)
