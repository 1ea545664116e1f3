"""The NAT engine: bytes, the side they came from and ``now`` in; a verdict and new bytes out.

Sans-I/O.  Tracking is conntrack's :class:`ConnTable`: a new outbound flow gets its
NAT'd reply tuple (``track(..., reply=...)``), so later packets in both directions
find their connection by one dict lookup; the connection's ``extra`` holds a
:class:`Binding` with both rewrite targets and the mappings it keeps alive.  When
the tracker destroys a connection (timeout, RST, address change) its mappings lose a
reference, and a dynamic mapping with none left frees its port.

How the two tuples map (as in Linux NAT): a packet travelling on the original tuple
O is rewritten to ``R.reversed()``, one on the reply tuple R to ``O.reversed()``.
"""
from __future__ import annotations

import ipaddress
import logging
import struct
from collections import Counter
from enum import IntEnum
from typing import NamedTuple

from conntrack.errors import ParseError
from conntrack.events import CtState, EventKind, Why
from conntrack.flow import FlowTuple, packet_key, reverse_key
from conntrack.packet import Packet, Proto, parse_ip
from conntrack.table import Conn, ConnTable
from conntrack.timeouts import Timeouts

from .config import NatConfig, PortForward
from .fastpath import parse_common
from .mapping import MapEntry, Mapping
from .ports import PortPool
from .rewrite import rewrite, rewrite_icmp_error

log = logging.getLogger("roam.nat")

SNAPSHOT_VERSION = 1


class Side(IntEnum):
    """Where a packet came from."""

    INTERNAL = 0  # from the internal network: outbound (or hairpinned)
    EXTERNAL = 1  # from the external interface: inbound


class Stage(IntEnum):
    """Which part of the translation this call does.

    FULL does it all (NFQUEUE on the external interface, offline captures).  A hairpinned
    packet in the kernel is done in two halves so that the kernel's tracker sees one
    consistent tuple between them: HAIRPIN_DST before routing (to the external address:
    the destination becomes the internal target), HAIRPIN_SRC as it leaves toward the
    inside (the source becomes the external address and port).
    """

    FULL = 0
    HAIRPIN_DST = 1
    HAIRPIN_SRC = 2


class Action(IntEnum):
    ACCEPT = 1
    DROP = 2


class Reason(IntEnum):
    """Why a packet got its verdict (counted per reason)."""

    TRANSLATED = 0
    HAIRPINNED = 1
    ICMP_ERROR_TRANSLATED = 2
    HOST_FLOW = 3  # the NAT host's own traffic from the external address: tracked, not rewritten
    NOT_OURS = 4  # a hairpin-stage packet that is no hairpin (e.g. to the host itself): passed as it is
    MALFORMED = 10  # did not parse: ParseError
    NOT_IPV4 = 11
    NO_EXTERNAL_ADDRESS = 12  # the external interface has no address (yet / any more)
    NOT_INTERNAL_SOURCE = 13  # outbound packet whose source is not in the internal network
    NOT_EXTERNAL_ADDRESS = 14  # inbound packet not addressed to the external address
    UNSUPPORTED_PROTOCOL = 15  # no ports or query id to map (GRE, ICMP other than echo/errors...)
    NO_MAPPING = 16  # inbound with no mapping and no state
    FILTERED = 17  # a mapping exists but its filtering refuses this remote endpoint
    POOL_FULL = 18
    TABLE_FULL = 19
    INVALID = 20  # the tracker calls it invalid (TCP segment that fits no state, stray reply)
    ICMP_NO_FLOW = 21  # ICMP error quoting a flow we do not know
    FRAGMENT_WITHOUT_HEAD = 22
    WRONG_SIDE = 23  # a known tuple arriving from the side it cannot come from
    HAIRPIN_DISABLED = 24
    HOST_PORT_CLASH = 25  # the host's own flow uses a port a mapping holds


class Verdict(NamedTuple):
    """What to do with a packet (immutable; a NamedTuple, as one is built per packet)."""

    action: Action
    data: bytes | None  # the packet to send on (None when dropped)
    reason: Reason


class Binding:
    """What a connection needs to be translated (kept in ``Conn.extra``)."""

    __slots__ = ("fwd", "rev", "internal", "attached", "fx", "rx", "mids")

    def __init__(self, fwd: tuple, rev: tuple, internal: int, attached: list) -> None:
        self.fwd = fwd  # (src, dst, sport, dport) for packets on the original tuple
        self.rev = rev  # ... and on the reply tuple
        self.internal = internal  # bit d set: packets in direction d come from the internal side
        self.attached = attached  # [(MapEntry, remote_ip, remote_port)]
        self.fx = self.rx = None  # precomputed rewrites (see prepare)
        self.mids: list[bytes] = []  # half-translated hairpin keys (Stage.HAIRPIN_SRC looks them up)

    def prepare(self, c: Conn) -> None:
        """Precompute each direction's new header bytes and checksum sums from the tuples."""
        self.fx = _prep(c.original, self.fwd, c.proto)
        self.rx = _prep(c.reply, self.rev, c.proto)


def _prep(key: bytes, t: tuple, proto: int) -> tuple:
    """One direction's rewrite, precomputed: (new src+dst bytes, new ports/id bytes, IP checksum
    delta, L4 checksum delta); a delta d turns checksum c into ~fold(~c + d) (RFC 1624 eqn 3,
    see ``checksum.adjust``: d = new_sum - old_sum + 0x1FFFE0, always positive)."""
    old_src, old_dst = key[1:5], key[5:9]
    osport, odport = struct.unpack_from("!HH", key, 9)
    src, dst, sport, dport = t
    a_old = _w2(old_src) + _w2(old_dst)
    a_new = _w2(src) + _w2(dst)
    ip_delta = a_new - a_old + _ADJ
    if proto == Proto.ICMP:
        return (src + dst, struct.pack("!H", sport), ip_delta, sport - osport + _ADJ)
    return (src + dst, struct.pack("!HH", sport, dport), ip_delta,
            a_new + sport + dport - a_old - osport - odport + _ADJ)


def _w2(b: bytes) -> int:
    return (b[0] << 8 | b[1]) + (b[2] << 8 | b[3])


_ADJ = 0x1FFFE0  # 32 * 0xFFFF: the complemented old words, padded (see checksum.adjust)


def _apply(buf: bytearray, proto: int, l4: int, x: tuple) -> None:
    """Rewrite a whole IPv4 packet at offset 0 with precomputed values (``process`` inlines
    the same for option-less TCP and UDP).

    The same arithmetic as ``checksum.adjust`` with the sums folded in ahead: two folds
    suffice, as ~c + delta < 2**23."""
    addrs, ports, ip_delta, l4_delta = x
    buf[12:20] = addrs
    s = (~(buf[10] << 8 | buf[11]) & 0xFFFF) + ip_delta
    s = (s & 0xFFFF) + (s >> 16)
    s = ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF
    buf[10] = s >> 8
    buf[11] = s & 0xFF
    if proto == 6:
        buf[l4:l4 + 4] = ports
        o = l4 + 16
    elif proto == 17:
        buf[l4:l4 + 4] = ports
        o = l4 + 6
        if not (buf[o] or buf[o + 1]):
            return  # no UDP checksum (RFC 768): stays zero
    else:
        buf[l4 + 4:l4 + 6] = ports
        o = l4 + 2
    s = (~(buf[o] << 8 | buf[o + 1]) & 0xFFFF) + l4_delta
    s = (s & 0xFFFF) + (s >> 16)
    s = ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF
    if proto == 17 and not s:
        s = 0xFFFF  # a computed zero is sent as all ones
    buf[o] = s >> 8
    buf[o + 1] = s & 0xFF


_PORTED = (Proto.TCP, Proto.UDP)
_DROP_COUNTER = {r: "dropped_" + r.name.lower() for r in Reason}
_DROP_WHY = {Why.TABLE_FULL: Reason.TABLE_FULL, Why.TCP_INVALID: Reason.INVALID,
             Why.ICMP_UNMATCHED_REPLY: Reason.INVALID, Why.FRAGMENT_WITHOUT_HEAD: Reason.FRAGMENT_WITHOUT_HEAD}
_IP4 = struct.Struct("!I")
_IPH = struct.Struct("!xxHxxHxB")  # total length, flags/fragment offset, protocol
_new = tuple.__new__
_UDP_SUMS = struct.Struct("!H14xH")  # from offset 10: IP checksum, UDP checksum (IHL 5)
_TCP_SUMS = struct.Struct("!H24xH")  # from offset 10: IP checksum, TCP checksum (IHL 5)
_HEAD = struct.Struct("!H8s4s")  # at offset 10: IP checksum, addresses, ports
_HS = struct.Struct("!H")
_ACCEPT, _HAIRPINNED, _TRANSLATED = Action.ACCEPT, Reason.HAIRPINNED, Reason.TRANSLATED


def nat_timeouts(cfg: NatConfig) -> Timeouts:
    """The tracker's timeouts from the NAT's lifetimes (RFC minimums by default)."""
    tr = cfg.tcp_transitory
    return Timeouts(syn_sent=tr, syn_recv=tr, established=cfg.tcp_established, fin_wait=tr, close_wait=tr,
                    last_ack=tr, time_wait=cfg.tcp_time_wait, close=10, syn_sent2=tr, udp=cfg.udp_timeout,
                    udp_stream=cfg.udp_timeout, icmp=cfg.icmp_timeout)


class NatEngine:
    """A NAT44 with endpoint-independent mappings, configurable filtering and hairpinning."""

    def __init__(self, config: NatConfig, external_ip: str | None = None, seed: int | None = None) -> None:
        self.config = config
        self._seed = seed
        self._nets = [(int(n.network_address), int(n.netmask)) for n in config.networks()]
        self.table = ConnTable(nat_timeouts(config), capacity=config.capacity)
        self.counters: Counter[str] = Counter()
        self.parse_errors: Counter[str] = Counter()
        self.external_ip: bytes | None = None
        self._by_internal: dict[tuple, MapEntry] = {}
        self._by_external: dict[tuple, MapEntry] = {}
        self._pools: dict[int, PortPool] = {}
        self._mid: dict[bytes, tuple] = {}  # half-translated hairpin tuple key -> (Binding, direction)
        self._set_address(external_ip or config.external_ip)

    # ------------------------------------------------------------------ setup
    def _set_address(self, ip: str | None) -> None:
        self.external_ip = ipaddress.IPv4Address(ip).packed if ip else None
        cfg = self.config
        self._by_internal.clear()
        self._by_external.clear()
        self._pools = {
            Proto.TCP: PortPool(cfg.port_range, cfg.low_port_range, self._reserved(Proto.TCP), self._seed),
            Proto.UDP: PortPool(cfg.port_range, cfg.low_port_range, self._reserved(Proto.UDP), self._seed),
            Proto.ICMP: PortPool(cfg.icmp_id_range, None, frozenset(), self._seed),
        }
        if self.external_ip is not None:
            for f in cfg.forwards:
                self._add_static(f)

    def _reserved(self, proto: int) -> frozenset[int]:
        return frozenset(f.external_port for f in self.config.forwards if f.proto == proto)

    def _add_static(self, f: PortForward) -> MapEntry:
        m = Mapping(f.proto, ipaddress.IPv4Address(f.internal_ip).packed, f.internal_port,
                    self.external_ip, f.external_port, static=True)
        e = MapEntry(m)
        self._by_external[(f.proto, f.external_port)] = e
        self._by_internal.setdefault((f.proto, m.internal_ip, f.internal_port), e)
        return e

    def is_internal(self, ip: bytes) -> bool:
        (v,) = _IP4.unpack(ip)
        for net, mask in self._nets:
            if v & mask == net:
                return True
        return False

    # ------------------------------------------------------------------ time
    def next_deadline(self) -> float | None:
        return self.table.next_deadline()

    def expire(self, now: float) -> int:
        n = self.table.expire(now)
        self._drain()
        return n

    # ------------------------------------------------------------------ the packet path
    def process(self, data: bytes | bytearray, side: Side, now: float, stage: Stage = Stage.FULL) -> Verdict:
        """Translate one IP packet that arrived from ``side``. Never raises on bad input."""
        deadline = self.table.next_deadline()
        if deadline is not None and deadline <= now:  # a flow's end frees its port before we map
            self.expire(now)
        # The common packet first, without building a Packet: a whole option-less IPv4 TCP or
        # UDP packet of a live, known flow (the checks are parse_ip's, so anything it would
        # refuse or read differently goes the general way below, as does every other case).
        if not stage and len(data) >= 28 and data[0] == 0x45 and self.external_ip is not None:
            total, frag, proto = _IPH.unpack_from(data, 0)
            if not frag & 0x3FFF and 28 <= total <= len(data):
                flags = -1
                if proto == 17:
                    ulen = data[24] << 8 | data[25]
                    if 8 <= ulen <= total - 20:
                        flags = 0
                elif proto == 6 and total >= 40 and 20 <= (data[32] >> 4) * 4 <= total - 20:
                    flags = data[33] & 0x3F
                if flags >= 0:
                    table = self.table
                    if type(data) is bytes:
                        key = data[9:10] + data[12:24]  # = packet_key(): proto, addresses, ports
                    else:
                        key = bytes(data[9:10]) + bytes(data[12:24])
                    c = table.lookup(key, now)
                    if c is not None:
                        b = c.extra
                        d = 0 if key == c.original else 1
                        if b is not None and table.track_conn(c, d, flags, total, now):
                            if table.has_events:
                                self._drain()
                            if bool(b.internal >> d & 1) != (side == 0):
                                return self._drop(Reason.WRONG_SIDE)
                            # the rewrite, as _apply does it, with both checksums read in one call and
                            # the header written in one more (two folds suffice: ~c + delta < 2**23)
                            addrs, ports, ip_delta, l4_delta = b.rx if d else b.fx
                            ipc, l4c = (_UDP_SUMS if proto == 17 else _TCP_SUMS).unpack_from(data, 10)
                            x = (~ipc & 0xFFFF) + ip_delta
                            x = (x & 0xFFFF) + (x >> 16)
                            ipc = ~((x & 0xFFFF) + (x >> 16)) & 0xFFFF
                            if l4c or proto == 6:  # a zero UDP checksum is none (RFC 768): stays zero
                                x = (~l4c & 0xFFFF) + l4_delta
                                x = (x & 0xFFFF) + (x >> 16)
                                l4c = ~((x & 0xFFFF) + (x >> 16)) & 0xFFFF or (0 if proto == 6 else 0xFFFF)
                            buf = bytearray(data) if total == len(data) else bytearray(data[:total])
                            _HEAD.pack_into(buf, 10, ipc, addrs, ports)
                            _HS.pack_into(buf, 26 if proto == 17 else 36, l4c)
                            if side == 0:
                                self.counters["translated_out"] += 1
                            else:
                                self.counters["translated_in"] += 1
                            return _new(Verdict, (_ACCEPT, bytes(buf), _HAIRPINNED if b.internal == 3 else _TRANSLATED))
        pkt = parse_common(data)
        if pkt is None:
            try:
                pkt = parse_ip(data)
            except ParseError as exc:
                self.parse_errors[exc.reason.name.lower()] += 1
                return self._drop(Reason.MALFORMED)
        if pkt.family != 4:
            return self._drop(Reason.NOT_IPV4)
        if self.external_ip is None:
            return self._drop(Reason.NO_EXTERNAL_ADDRESS)
        buf = bytearray(data[:pkt.end]) if pkt.end < len(data) else bytearray(data)
        if stage != Stage.FULL:
            hp = self._hairpin_stage(buf, pkt, stage)
            if hp is not None:
                return hp
        if pkt.inner is not None:
            return self._icmp_error(buf, pkt, side, now)
        if pkt.l4 < 0:
            return self._fragment(buf, pkt, side, now)
        proto = pkt.proto
        if proto not in _PORTED and not (proto == Proto.ICMP and pkt.is_icmp_query):
            return self._drop(Reason.UNSUPPORTED_PROTOCOL)
        key = packet_key(pkt)
        c = self.table.lookup(key)  # one lookup; the tracker checks it again in track()
        if c is not None and c.deadline <= now:
            self.table.remove(c, now, Why.TIMEOUT)
            self._drain()
            c = None
        if c is None:
            if side == Side.INTERNAL:
                return self._new_outbound(buf, pkt, now, stage)
            return self._new_inbound(buf, pkt, now)
        tr = self.table.track(pkt, now)
        if tr.ctstate == CtState.INVALID or tr.conn is None or tr.conn.extra is None:
            self._drain()
            return self._drop(_DROP_WHY.get(tr.why, Reason.INVALID))
        b: Binding = tr.conn.extra  # taken before _drain: an RST may have just ended the flow
        if self.table.has_events:
            self._drain()
        d = tr.direction
        if bool(b.internal >> d & 1) != (side == Side.INTERNAL):
            return self._drop(Reason.WRONG_SIDE)
        if stage == Stage.HAIRPIN_DST:
            return self._half(buf, pkt, b, d)
        if pkt.l3 == 0:
            _apply(buf, proto, pkt.l4, b.rx if d else b.fx)
        else:
            rewrite(buf, pkt, *(b.rev if d else b.fwd))
        return self._accept(buf, Reason.HAIRPINNED if b.internal == 3 else Reason.TRANSLATED, side)

    # ------------------------------------------------------------------ new flows
    def _hairpin_stage(self, buf: bytearray, pkt: Packet, stage: Stage) -> Verdict | None:
        """Pass what is no hairpin; finish a half-translated one. None: go on with HAIRPIN_DST."""
        if pkt.l4 < 0 or pkt.inner is not None or pkt.proto not in _PORTED:
            return self._pass(buf)
        if stage == Stage.HAIRPIN_SRC:
            hit = self._mid.get(packet_key(pkt))
            if hit is None or hit[0].fx is None:
                return self._pass(buf)
            b, d = hit
            rewrite(buf, pkt, *(b.rev if d else b.fwd))
            return self._accept(buf, Reason.HAIRPINNED, Side.INTERNAL)
        if pkt.dst != self.external_ip:
            return self._pass(buf)
        return None

    def _half(self, buf: bytearray, pkt: Packet, b: Binding, d: int) -> Verdict:
        """Stage.HAIRPIN_DST: rewrite the destination only and remember the half-way tuple."""
        if b.internal != 3:
            return self._drop(Reason.WRONG_SIDE)
        t = b.rev if d else b.fwd
        rewrite(buf, pkt, pkt.src, t[1], pkt.sport, t[3])
        k = struct.pack("!B4s4sHH", pkt.proto, pkt.src, t[1], pkt.sport, t[3])
        if k not in self._mid:
            self._mid[k] = (b, d)
            b.mids.append(k)
        self.counters["hairpin_half"] += 1
        return Verdict(Action.ACCEPT, bytes(buf), Reason.HAIRPINNED)

    def _pass(self, buf: bytearray) -> Verdict:
        self.counters["passed_not_ours"] += 1
        return Verdict(Action.ACCEPT, bytes(buf), Reason.NOT_OURS)

    def _new_outbound(self, buf: bytearray, pkt: Packet, now: float, stage: Stage = Stage.FULL) -> Verdict:
        src, sport, dst, dport, proto = pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.proto
        if proto == Proto.ICMP and pkt.icmp_type not in (8, 13, 15, 17):
            return self._drop(Reason.INVALID)  # a reply (or other query answer) with no request
        ext = self.external_ip
        if src == ext:
            return self._new_host_flow(buf, pkt, now)
        if not self.is_internal(src):
            return self._drop(Reason.NOT_INTERNAL_SOURCE)
        entry = self._outbound_entry(proto, src, sport)
        if entry is None:
            self.counters["pool_full"] += 1
            n = self.counters["pool_full"]
            if n & (n - 1) == 0:  # 1, 2, 4, 8...: a log line without a flood
                log.warning("port pool for %s full: new flow from %s:%d dropped (%d so far)",
                            Proto(proto).name, ipaddress.IPv4Address(src), sport, n)
            return self._drop(Reason.POOL_FULL)
        eport = entry.mapping.external_port
        attached = [(entry, dst, dport)]
        internal = 1
        new_dst, new_dport = dst, dport
        if dst == ext:
            if not self.config.hairpinning:
                self._release_if_unused(entry)
                return self._drop(Reason.HAIRPIN_DISABLED)
            target = self._inbound_entry(proto, dport, ext, eport)
            if not isinstance(target, MapEntry):
                self._release_if_unused(entry)
                if stage == Stage.HAIRPIN_DST:
                    return self._pass(buf)  # to the host itself, not through a mapping
                return self._drop(target)
            new_dst, new_dport = target.mapping.internal_ip, target.mapping.internal_port
            attached = [(entry, new_dst, new_dport), (target, ext, eport)]
            internal = 3
        if proto == Proto.ICMP:
            fwd = (ext, new_dst, eport, 0)
            rev = (dst, src, sport, 0)
            reply = FlowTuple(proto, ext, new_dst, eport, pkt.icmp_type).reversed()
        else:
            fwd = (ext, new_dst, eport, new_dport)
            rev = (dst, src, dport, sport)
            reply = FlowTuple(proto, new_dst, ext, new_dport, eport)
        return self._open(buf, pkt, now, reply, Binding(fwd, rev, internal, attached), Side.INTERNAL, stage)

    def _new_host_flow(self, buf: bytearray, pkt: Packet, now: float) -> Verdict:
        """The host's own flow from the external address: its port is held like a mapping's,
        so no VM gets it and the answers come in (the plugin queues all external traffic)."""
        src, sport, dst, dport, proto = pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.proto
        entry = self._by_internal.get((proto, src, sport))
        if entry is None:
            if (proto, sport) in self._by_external:
                return self._drop(Reason.HOST_PORT_CLASH)
            self._pools[proto].take(sport)  # a no-op for ports outside the pool
            entry = MapEntry(Mapping(proto, src, sport, src, sport))
            self._by_internal[(proto, src, sport)] = entry
            self._by_external[(proto, sport)] = entry
        if proto == Proto.ICMP:
            b = Binding((src, dst, sport, 0), (dst, src, sport, 0), 1, [(entry, dst, dport)])
        else:
            b = Binding((src, dst, sport, dport), (dst, src, dport, sport), 1, [(entry, dst, dport)])
        v = self._open(buf, pkt, now, None, b, Side.INTERNAL)
        return Verdict(v.action, v.data, Reason.HOST_FLOW) if v.action == Action.ACCEPT else v

    def _new_inbound(self, buf: bytearray, pkt: Packet, now: float) -> Verdict:
        src, sport, dst, dport, proto = pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.proto
        if dst != self.external_ip:
            return self._drop(Reason.NOT_EXTERNAL_ADDRESS)
        if proto == Proto.ICMP:
            return self._drop(Reason.NO_MAPPING)  # no inbound ICMP query mappings
        target = self._inbound_entry(proto, dport, src, sport)
        if not isinstance(target, MapEntry):
            return self._drop(target)
        ip, port = target.mapping.internal_ip, target.mapping.internal_port
        b = Binding((src, ip, sport, port), (dst, src, dport, sport), 2, [(target, src, sport)])
        return self._open(buf, pkt, now, FlowTuple(proto, ip, src, port, sport), b, Side.EXTERNAL)

    def _open(self, buf, pkt, now, reply: FlowTuple | None, b: Binding, side: Side,
              stage: Stage = Stage.FULL) -> Verdict:
        tr = self.table.track(pkt, now, reply=reply)
        if tr.conn is None or tr.ctstate == CtState.INVALID:
            self._drain()
            for e, _, _ in b.attached:
                self._release_if_unused(e)
            return self._drop(_DROP_WHY.get(tr.why, Reason.INVALID))
        c = tr.conn
        c.extra = b
        b.prepare(c)
        for e, rip, rport in b.attached:
            e.attach(rip, rport)
        self._drain()  # e.g. an RST that opened and closed it at once
        self.counters["flows_opened"] += 1
        if stage == Stage.HAIRPIN_DST:
            return self._half(buf, pkt, b, 0)
        rewrite(buf, pkt, *b.fwd)
        return self._accept(buf, Reason.HAIRPINNED if b.internal == 3 else Reason.TRANSLATED, side)

    def _outbound_entry(self, proto: int, ip: bytes, port: int) -> MapEntry | None:
        e = self._by_internal.get((proto, ip, port))
        if e is not None:
            return e
        eport = self._pools[proto].allocate(port)
        if eport is None:
            return None
        e = MapEntry(Mapping(proto, ip, port, self.external_ip, eport))
        self._by_internal[(proto, ip, port)] = e
        self._by_external[(proto, eport)] = e
        self.counters["mappings_created"] += 1
        return e

    def _inbound_entry(self, proto: int, eport: int, rip: bytes, rport: int) -> MapEntry | Reason:
        e = self._by_external.get((proto, eport))
        if e is None:
            return Reason.NO_MAPPING
        if not e.admits(self.config.filtering, rip, rport):
            return Reason.FILTERED
        return e

    def _release_if_unused(self, e: MapEntry) -> None:
        m = e.mapping
        if e.conns > 0 or m.static:
            return
        if self._by_internal.get((m.proto, m.internal_ip, m.internal_port)) is e:
            del self._by_internal[(m.proto, m.internal_ip, m.internal_port)]
        if self._by_external.get((m.proto, m.external_port)) is e:
            del self._by_external[(m.proto, m.external_port)]
            if m.external_ip == self.external_ip:
                self._pools[m.proto].free(m.external_port)
        self.counters["mappings_freed"] += 1

    def _drain(self) -> None:
        for ev in self.table.pop_events():
            if ev.kind == EventKind.DESTROY and ev.conn is not None:
                b = ev.conn.extra
                if b is None:
                    continue
                ev.conn.extra = None
                b.fx = None  # marks it dead for half-way lookups
                for k in b.mids:
                    self._mid.pop(k, None)
                for e, rip, rport in b.attached:
                    e.detach(rip, rport)
                    self._release_if_unused(e)

    # ------------------------------------------------------------------ fragments, ICMP errors
    def _fragment(self, buf: bytearray, pkt: Packet, side: Side, now: float) -> Verdict:
        tr = self.table.track(pkt, now)
        c = tr.conn
        if c is None or c.extra is None:
            return self._drop(Reason.FRAGMENT_WITHOUT_HEAD)
        b: Binding = c.extra
        d = tr.direction
        if bool(b.internal >> d & 1) != (side == Side.INTERNAL):
            return self._drop(Reason.WRONG_SIDE)
        t = b.rev if d else b.fwd
        rewrite(buf, pkt, t[0], t[1], 0, 0)
        return self._accept(buf, Reason.TRANSLATED, side)

    def _icmp_error(self, buf: bytearray, pkt: Packet, side: Side, now: float) -> Verdict:
        inner = pkt.inner
        ik = packet_key(inner) if inner.l4 >= 0 and inner.proto in (Proto.TCP, Proto.UDP, Proto.ICMP) else None
        if ik is None or len(ik) != 13:
            return self._drop(Reason.ICMP_NO_FLOW)
        rk = reverse_key(ik)
        c: Conn | None = self.table.lookup(rk)
        if c is None or c.deadline <= now or c.extra is None:
            return self._drop(Reason.ICMP_NO_FLOW)
        b: Binding = c.extra
        d = 0 if rk == c.original else 1
        if bool(b.internal >> d & 1) != (side == Side.INTERNAL):
            return self._drop(Reason.WRONG_SIDE)
        x = FlowTuple.from_key(rk)
        y = FlowTuple.from_key(c.reply if d == 0 else c.original)
        if pkt.src == x.src:
            outer_src = y.dst
        elif side == Side.INTERNAL and b.internal != 3:
            outer_src = self.external_ip  # an internal router's address must not leave
        else:
            outer_src = pkt.src
        outer_dst = y.src if pkt.dst == x.dst else pkt.dst
        # the quoted packet becomes the tuple Y as its sender sent it (ICMP: sport is the id)
        rewrite_icmp_error(buf, pkt, outer_src, outer_dst, y.src, y.dst, y.sport,
                           y.dport if inner.proto != Proto.ICMP else inner.dport)
        self.counters["icmp_errors_translated"] += 1
        return self._accept(buf, Reason.ICMP_ERROR_TRANSLATED, side)

    # ------------------------------------------------------------------ verdicts
    def _drop(self, reason: Reason) -> Verdict:
        self.counters[_DROP_COUNTER[reason]] += 1
        return _new(Verdict, (Action.DROP, None, reason))

    def _accept(self, buf: bytearray, reason: Reason, side: Side) -> Verdict:
        self.counters["translated_out" if side == Side.INTERNAL else "translated_in"] += 1
        return _new(Verdict, (_ACCEPT, bytes(buf), reason))

    # ------------------------------------------------------------------ control
    def set_external_address(self, ip: str | None, now: float) -> int:
        """The external address changed (or vanished: None). Kills every mapping on the old one."""
        new = ipaddress.IPv4Address(ip).packed if ip else None
        if new == self.external_ip:
            return 0
        killed = 0
        for c in list(self.table):
            self.table.remove(c, now, Why.REMOVED)
            killed += 1
        self._drain()
        self._set_address(ip)
        self.counters["address_changes"] += 1
        self.counters["flows_killed_by_address_change"] += killed
        return killed

    def reload(self, config: NatConfig, now: float) -> list[str]:
        """Take new inbound mappings, timeouts and filtering; established flows keep going.

        Port ranges and the internal networks are fixed for the engine's life (restart to
        change them). Returns notes for the log.
        """
        notes = []
        old = {(f.proto, f.external_port): f for f in self.config.forwards}
        new = {(f.proto, f.external_port): f for f in config.forwards}
        if config.port_range != self.config.port_range or config.internal != self.config.internal:
            notes.append("port ranges and internal networks change only on restart")
            config = config.with_(port_range=self.config.port_range, low_port_range=self.config.low_port_range,
                                  internal=self.config.internal, icmp_id_range=self.config.icmp_id_range)
        keep = []
        for key, f in new.items():
            if key in old and old[key] == f:
                keep.append(f)
                continue
            busy = self._by_external.get(key)
            if busy is not None and not busy.mapping.static and busy.conns > 0:
                notes.append(f"{Proto(f.proto).name} port {f.external_port} is in use by a dynamic mapping: "
                             "inbound mapping not added")
                continue
            keep.append(f)
        self.config = config.with_(forwards=tuple(keep))
        self.table.timeouts = nat_timeouts(self.config)
        if self.external_ip is not None:
            for key, f in old.items():
                if key not in new or new[key] != f:
                    e = self._by_external.get(key)
                    if e is not None and e.mapping.static:
                        del self._by_external[key]
                        ik = (e.mapping.proto, e.mapping.internal_ip, e.mapping.internal_port)
                        if self._by_internal.get(ik) is e:
                            del self._by_internal[ik]
            for f in keep:
                if (f.proto, f.external_port) not in old or old[(f.proto, f.external_port)] != f:
                    self._pools[f.proto].take(f.external_port)  # keep it from dynamic use
                    self._add_static(f)
        notes.append(f"reloaded: {len(keep)} inbound mappings")
        return notes

    # ------------------------------------------------------------------ status
    def mappings(self) -> list[Mapping]:
        seen, out = set(), []
        for e in list(self._by_external.values()) + list(self._by_internal.values()):
            if id(e) not in seen:
                seen.add(id(e))
                out.append(e.mapping)
        return out

    def mapping_rows(self, limit: int = 200) -> list[dict]:
        """Live mappings as plain data (for the status file), at most ``limit``."""
        rows = []
        for m in self.mappings()[:limit]:
            e = self._by_external.get((m.proto, m.external_port))
            rows.append({"proto": Proto(m.proto).name.lower(), "internal": f"{_ip(m.internal_ip)}:{m.internal_port}",
                         "external": f"{_ip(m.external_ip)}:{m.external_port}", "static": m.static,
                         "flows": e.conns if e is not None else 0})
        return rows

    def status(self) -> dict:
        pools = {Proto(p).name.lower(): {"used": u.used, "size": u.size}
                 for p, u in ((p, pool.use()) for p, pool in self._pools.items())}
        dyn = sum(1 for m in self.mappings() if not m.static)
        return {
            "external_ip": str(ipaddress.IPv4Address(self.external_ip)) if self.external_ip else None,
            "flows": len(self.table),
            "mappings_live": dyn,
            "inbound_mappings": len(self.config.forwards),
            "pools": pools,
            "counters": dict(sorted(self.counters.items())),
            "parse_errors": dict(sorted(self.parse_errors.items())),
        }

    # ------------------------------------------------------------------ snapshot / restore
    def snapshot(self, now: float) -> dict:
        """Mappings and flows as JSON-ready data (times relative to ``now``)."""
        entries: dict[int, int] = {}
        maps = []
        conns = []
        for c in self.table:
            b: Binding | None = c.extra
            if b is None or c.deadline <= now:
                continue
            att = []
            for e, rip, rport in b.attached:
                if id(e) not in entries:
                    entries[id(e)] = len(maps)
                    m = e.mapping
                    maps.append({"proto": m.proto, "internal_ip": _ip(m.internal_ip), "internal_port": m.internal_port,
                                 "external_port": m.external_port, "static": m.static})
                att.append([entries[id(e)], _ip(rip), rport])
            conns.append({"original": c.original.hex(), "reply": c.reply.hex(), "proto": c.proto,
                          "state": c.state, "status": c.status, "ttl": round(c.deadline - now, 3),
                          "fwd": _tup(b.fwd), "rev": _tup(b.rev), "internal": b.internal, "attached": att})
        return {"version": SNAPSHOT_VERSION, "kind": "roam-nat-snapshot",
                "external_ip": str(ipaddress.IPv4Address(self.external_ip)) if self.external_ip else None,
                "mappings": maps, "flows": conns}

    def restore(self, snap: dict, now: float, rebind: bool = False) -> int:
        """Load a snapshot into a fresh engine; returns the flows restored.

        Nothing is restored if the snapshot was taken on another external address: those
        mappings are dead (as after an address change) -- unless ``rebind``, which moves
        every mapping and flow to this engine's external address, ports unchanged (what
        carrying a NAT's state to another host would need; peers still see a new address).
        """
        if not isinstance(snap, dict) or snap.get("kind") != "roam-nat-snapshot":
            raise ValueError("not a roam NAT snapshot")
        if snap.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {snap.get('version')!r}, this roam reads {SNAPSHOT_VERSION}")
        if self.external_ip is None or snap.get("external_ip") is None:
            return 0
        if snap["external_ip"] != _ip(self.external_ip):
            if not rebind:
                return 0
            snap = _rebound(snap, _packed(snap["external_ip"]), self.external_ip)
        entries: list[MapEntry | None] = []
        for m in snap["mappings"]:
            proto, iip, iport, eport = int(m["proto"]), _packed(m["internal_ip"]), int(m["internal_port"]), int(m["external_port"])
            e = self._by_external.get((proto, eport))
            if e is not None and (e.mapping.internal_ip, e.mapping.internal_port) == (iip, iport):
                entries.append(e)
            elif e is None and not m.get("static") and self._pools[proto].take(eport):
                e = MapEntry(Mapping(proto, iip, iport, self.external_ip, eport))
                self._by_external[(proto, eport)] = e
                self._by_internal.setdefault((proto, iip, iport), e)
                entries.append(e)
            else:
                entries.append(None)  # gone from the config, or its port is taken now
        n = 0
        t = self.table
        for f in snap["flows"]:
            att = [(entries[i], _packed(ip), int(p)) for i, ip, p in f["attached"]]
            okey, rkey = bytes.fromhex(f["original"]), bytes.fromhex(f["reply"])
            if (any(e is None for e, _, _ in att) or t.lookup(okey) is not None or t.lookup(rkey) is not None
                    or len(t) >= t.capacity):
                continue
            c = Conn(okey, rkey, int(f["proto"]), int(f["state"]), now)
            c.status = int(f["status"])
            c.deadline = now + max(0.0, float(f["ttl"]))
            c.extra = Binding(_untup(f["fwd"]), _untup(f["rev"]), int(f["internal"]), att)
            c.extra.prepare(c)
            t.adopt(c)
            for e, rip, rport in att:
                e.attach(rip, rport)
            n += 1
        for e in entries:
            if e is not None:
                self._release_if_unused(e)
        self.counters["flows_restored"] += n
        return n


def _rebound(snap: dict, old: bytes, new: bytes) -> dict:
    """The snapshot as if taken on external address ``new`` (every ``old`` becomes ``new``)."""
    def key(hexkey: str) -> str:
        b = bytes.fromhex(hexkey)
        src, dst = b[1:5], b[5:9]
        return (b[:1] + (new if src == old else src) + (new if dst == old else dst) + b[9:]).hex()

    def tup(t: list) -> list:
        o, n = _ip(old), _ip(new)
        return [n if t[0] == o else t[0], n if t[1] == o else t[1], t[2], t[3]]

    flows = [dict(f, original=key(f["original"]), reply=key(f["reply"]), fwd=tup(f["fwd"]), rev=tup(f["rev"]))
             for f in snap["flows"]]
    return dict(snap, external_ip=_ip(new), flows=flows)


def _ip(b: bytes) -> str:
    return str(ipaddress.IPv4Address(b))


def _packed(s: str) -> bytes:
    return ipaddress.IPv4Address(s).packed


def _tup(t: tuple) -> list:
    return [_ip(t[0]), _ip(t[1]), t[2], t[3]]


def _untup(v: list) -> tuple:
    return (_packed(v[0]), _packed(v[1]), int(v[2]), int(v[3]))
