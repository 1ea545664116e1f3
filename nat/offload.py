"""Offload, the sans-I/O half: an engine flow as the kernel conntrack entry that carries its
NAT, a kernel entry back as an engine flow, roam's lifetimes as the kernel's timeouts.

The engine decides (mapping, filtering, hairpinning); the kernel then translates every
later packet of the flow.  The engine's mapping table stays the one truth: an offloaded
flow stays in the engine's table (its deadline held while the kernel has the entry), so
its mapping lives on; when the kernel's entry dies the driver ends the flow here
(:meth:`nat.NatEngine.end_flow`) and the mapping is freed as for any flow.
"""
from __future__ import annotations

from typing import NamedTuple

from conntrack.flow import FlowTuple
from conntrack.table import Conn

from .config import NatConfig
from .mapping import Binding

#: The most the kernel's jiffies-based timeout sysctls hold (INT_MAX jiffies at HZ 1000).
KERNEL_TIMEOUT_MAX = 2_000_000


class Decision(NamedTuple):
    """What the kernel needs: the original tuple (proto, src, dst, sport, dport; ICMP: id,
    type) and where the NAT rewrites its source and destination (None: unchanged)."""

    proto: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    snat: tuple | None
    dnat: tuple | None


def decision(c: Conn) -> Decision | None:
    """The kernel entry for engine flow ``c``; None when there is nothing to translate (the
    host's own flows: the kernel tracks those itself) or ``c`` is dead."""
    b: Binding | None = c.extra
    if b is None or b.fx is None:
        return None
    o = FlowTuple.from_key(c.original)
    src, dst, sport, dport = b.fwd
    if o.proto == 1 or o.proto == 58:
        snat = (src, sport) if (src, sport) != (o.src, o.sport) else None
        dnat = None
    else:
        snat = (src, sport) if (src, sport) != (o.src, o.sport) else None
        dnat = (dst, dport) if (dst, dport) != (o.dst, o.dport) else None
    if snat is None and dnat is None:
        return None
    return Decision(o.proto, o.src, o.dst, o.sport, o.dport, snat, dnat)


def kernel_timeouts(cfg: NatConfig) -> dict[str, int]:
    """roam's lifetimes as the namespace's conntrack sysctls (net.netfilter.*): the kernel's
    defaults differ (UDP 30 s unreplied / 120 s, TCP established 5 days)."""
    def s(v: float) -> int:
        return max(1, min(KERNEL_TIMEOUT_MAX, int(round(v))))
    tr = s(cfg.tcp_transitory)
    return {"nf_conntrack_udp_timeout": s(cfg.udp_timeout), "nf_conntrack_udp_timeout_stream": s(cfg.udp_timeout),
            "nf_conntrack_tcp_timeout_established": s(cfg.tcp_established),
            "nf_conntrack_tcp_timeout_syn_sent": tr, "nf_conntrack_tcp_timeout_syn_recv": tr,
            "nf_conntrack_tcp_timeout_fin_wait": tr, "nf_conntrack_tcp_timeout_close_wait": tr,
            "nf_conntrack_tcp_timeout_last_ack": tr, "nf_conntrack_tcp_timeout_time_wait": s(cfg.tcp_time_wait),
            "nf_conntrack_icmp_timeout": s(cfg.icmp_timeout), "nf_conntrack_icmpv6_timeout": s(cfg.icmp_timeout)}


def initial_timeout(cfg: NatConfig, proto: int) -> int:
    """The lifetime a fresh entry starts with (the kernel refreshes it per packet from the sysctls)."""
    t = {6: cfg.tcp_transitory, 17: cfg.udp_timeout}.get(proto, cfg.icmp_timeout)
    return max(1, min(KERNEL_TIMEOUT_MAX, int(round(t))))


def sync(c: Conn, status: int, tcp_state: int) -> bool:
    """The kernel's view of an offloaded flow (its IPS_* status bits, TCP state) into the
    engine's entry, so snapshots and status tell how the flow really is.  True if it moved."""
    from conntrack.table import ASSURED, SEEN_REPLY

    before = (c.state, c.status)
    if c.original[0] == 6 and tcp_state:
        c.state = tcp_state
    c.status = c.status | (SEEN_REPLY if status & 2 else 0) | (ASSURED if status & 4 else 0)
    return (c.state, c.status) != before


def hold(c: Conn, until: float) -> None:
    """Keep an offloaded flow alive in the engine until ``until`` (the kernel times it, not the
    engine: the driver holds it while the kernel has its entry).  A later deadline needs no
    re-filing: ``ConnTable.expire`` files an entry found early again."""
    if c.deadline < until:
        c.deadline = until


def adopt(engine, proto: int, osrc: bytes, odst: bytes, osport: int, odport: int,
          rsrc: bytes, rdst: bytes, rsport: int, rdport: int, now: float, until: float) -> Conn | None:
    """A kernel entry of an earlier run (found at start) as an engine flow, so its mapping is
    held and freed with it: the original tuple and the reply tuple as the kernel has them
    (after its NAT).  None if it is not one of the NAT's (another address) or its port is
    taken by now."""
    v4 = len(osrc) == 4
    ext = engine.external_ip if v4 else engine.external_ip6
    maps = engine.mapping_table if v4 else engine.mapping_table6
    icmp = proto == 1 or proto == 58
    if ext is None:
        return None
    ok, rk = FlowTuple(proto, osrc, odst, osport, odport).key(), FlowTuple(proto, rsrc, rdst, rsport, rdport).key()
    t = engine.table
    if t.lookup(ok) is not None or t.lookup(rk) is not None or len(t) >= t.capacity:
        return None  # (before any mapping is claimed: one claimed for nothing would stay)
    if rdst == ext and odst != ext:  # outbound: source NAT
        entry = maps.claim(proto, osrc, osport, rdport, False)
        if entry is None:
            return None
        att = [(entry, odst, odport)]
        internal = 1
    elif odst == ext and not icmp:  # inbound mapping (source untouched) or hairpin
        target = maps.inbound(proto, odport)
        if target is None:
            return None
        att = [(target, osrc, osport)]
        internal = 2
        if engine.is_internal(osrc):  # hairpin: both halves
            out = maps.claim(proto, osrc, osport, rdport, False) if rdst == ext else None
            if out is None:
                return None
            att = [(out, rsrc, rsport), (target, ext, rdport)]
            internal = 3
    else:
        return None
    c = Conn(ok, rk, proto, 3 if proto == 6 else 0, now)
    c.deadline = until
    rr = FlowTuple(proto, rsrc, rdst, rsport, rdport).reversed()  # where packets on the original tuple go
    c.extra = Binding((rr.src, rr.dst, rr.sport, rr.dport), (odst, osrc, odport, osport), internal, att)
    c.extra.prepare(c)
    t.adopt(c)
    for e, rip, rport in att:
        e.attach(rip, rport)
    return c
