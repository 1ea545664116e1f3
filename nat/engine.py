"""The NAT engine: bytes, the side they came from and ``now`` in; an answer out.

Sans-I/O, and it never logs: every packet gets a :class:`conntrack.answer.Answer` --
``action`` (ACCEPT or DROP), ``reason`` (a :class:`NatReason`), ``data`` (the translated
packet, None when dropped) and ``events`` (:mod:`nat.events`); what no packet causes
(expiries, an address change, a reload) waits in :meth:`NatEngine.pop_events`.

Tracking is conntrack's :class:`ConnTable`: a new outbound flow gets its NAT'd reply
tuple (``track(..., reply=...)``), so later packets in both directions find their
connection by one dict lookup; the connection's ``extra`` holds a
:class:`~nat.mapping.Binding` with both rewrite targets and the mappings it keeps
alive.  When the tracker destroys a connection (timeout, RST, address change) its
mappings lose a reference, and a dynamic mapping with none left frees its port
(:class:`~nat.mapping.MappingTable`).  Persistence is :mod:`nat.snapshot`'s.

NAT66 (``config.nat66``) runs beside NAT44 in the same table (IPv6 keys are longer, so the
families never meet): its own external address and mapping table (pools, inbound
mappings), the same rules (endpoint-independent mapping, filtering, hairpinning, ICMPv6
echo by identifier, ICMPv6 errors translated).  IPv6 takes the general path.
"""
from __future__ import annotations

import ipaddress
import struct
from collections import Counter, deque

from conntrack.answer import Action, Answer
from conntrack.errors import ParseError
from conntrack.events import CtState, EventKind, Why
from conntrack.flow import KEY_SIZE, FlowTuple, packet_key
from conntrack.packet import Packet, Proto, parse_ip
from conntrack.table import ConnTable
from conntrack.timeouts import Timeouts

from . import related, snapshot
from .answers import NatReason, Side, Stage
from .config import NatConfig
from .events import AddressChanged, FlowsRestored
from .mapping import Binding, MapEntry, Mapping, MappingTable
from .reclaim import reclaim
from .rewrite import rewrite

_JOURNAL = 4096  # events no packet caused, kept until pop_events (the oldest go first, counted)
_PORTED = (Proto.TCP, Proto.UDP)
_ICMPS = (Proto.ICMP, Proto.ICMPV6)
_REQUESTS = frozenset({8, 13, 15, 17, 128, 139})  # ICMP and ICMPv6 queries that open a flow
_DROP_COUNTER = {r: "dropped_" + r.name.lower() for r in NatReason}
_DROP_WHY: dict[Why | None, NatReason] = {Why.TABLE_FULL: NatReason.TABLE_FULL, Why.TCP_INVALID: NatReason.INVALID,
             Why.ICMP_UNMATCHED_REPLY: NatReason.INVALID, Why.FRAGMENT_WITHOUT_HEAD: NatReason.FRAGMENT_WITHOUT_HEAD}
_IP4 = struct.Struct("!I")
_IPH = struct.Struct("!xxHxxHxB")  # total length, flags/fragment offset, protocol
_TCPH = struct.Struct("!HHIIB")  # ports, seq, ack, data offset
_UDPH = struct.Struct("!HHH")  # ports, length
_UDP_SUMS = struct.Struct("!H14xH")  # from offset 10: IP checksum, UDP checksum (IHL 5)
_TCP_SUMS = struct.Struct("!H24xH")  # from offset 10: IP checksum, TCP checksum (IHL 5)
_HEAD = struct.Struct("!H8s4s")  # at offset 10: IP checksum, addresses, ports
_HS = struct.Struct("!H")
_new = tuple.__new__  # Answer and Packet are NamedTuples: every field given, in order
_ACCEPT, _DROP = Action.ACCEPT, Action.DROP
_HAIRPINNED, _TRANSLATED = NatReason.HAIRPINNED, NatReason.TRANSLATED


def nat_timeouts(cfg: NatConfig) -> Timeouts:
    """The tracker's timeouts from the NAT's lifetimes (RFC minimums by default)."""
    tr = cfg.tcp_transitory
    return Timeouts(syn_sent=tr, syn_recv=tr, established=cfg.tcp_established, fin_wait=tr, close_wait=tr,
                    last_ack=tr, time_wait=cfg.tcp_time_wait, close=10, syn_sent2=tr, udp=cfg.udp_timeout,
                    udp_stream=cfg.udp_timeout, icmp=cfg.icmp_timeout)


def _common(data, total: int, proto: int) -> Packet:
    """The Packet ``parse_ip`` reads from a packet that passed ``process``'s header check (a
    whole option-less IPv4 TCP or UDP packet), read without checking it again."""
    if proto == 6:
        sport, dport, seq, ack, off = _TCPH.unpack_from(data, 20)
        return _new(Packet, (4, 6, bytes(data[12:16]), bytes(data[16:20]), 0, 20, total, sport, dport,
                             data[33] & 0x3F, seq, ack, total - 20 - (off >> 4) * 4, -1, -1, None, None, False))
    sport, dport, ulen = _UDPH.unpack_from(data, 20)
    return _new(Packet, (4, 17, bytes(data[12:16]), bytes(data[16:20]), 0, 20, total, sport, dport, 0, 0, 0,
                         ulen - 8, -1, -1, None, None, False))


class NatEngine:
    """A NAT44 with endpoint-independent mappings, configurable filtering and hairpinning."""

    #: Whether ``process`` may translate known flows without building a Packet (off only to
    #: hold the fast path to the general one in the property tests).
    fast_path = True

    def __init__(self, config: NatConfig, external_ip: str | None = None, seed: int | None = None,
                 host_stack: bool = False, external_ip6: str | None = None) -> None:
        #: Whether a host's own network stack stands behind the external address (the plugin):
        #: then inbound traffic that no mapping claims is the host's (its sshd, its pings) and
        #: goes to it as under MASQUERADE, tracked so that no VM gets its port meanwhile.
        #: Without one (offline captures, the simulator) such traffic is dropped (NO_MAPPING).
        self.host_stack = host_stack
        self._reclaim_quiet = float("-inf")
        self._nets = [(int(n.network_address), int(n.netmask)) for n in config.networks()]
        self._nets6 = [(int(n.network_address), int(n.netmask)) for n in config.networks6()]
        self.nat66 = config.nat66
        self.table = ConnTable(nat_timeouts(config), capacity=config.capacity)
        self.table.journal = frozenset((EventKind.DESTROY,))  # (the one kind _drain reads)
        self.counters: Counter[str] = Counter()
        self.parse_errors: Counter[str] = Counter()
        self._events: list = []  # events of the input being handled (taken into its answer)
        self._journal: deque = deque(maxlen=_JOURNAL)
        ip = external_ip or config.external_ip
        self.mapping_table = MappingTable(config, _packed(ip), seed, self.counters, self._events)
        ip6 = (external_ip6 or config.external_ip6) if self.nat66 else None
        self.mapping_table6 = MappingTable(config, _packed(ip6, 6), seed, self.counters, self._events, 6)
        self.external_ip6 = self.mapping_table6.external_ip
        self._mid: dict[bytes, tuple] = {}  # half-translated hairpin tuple key -> (Binding, direction)
        self.ended: list | None = None  # a list: keys of ended flows, for a driver mirroring them (offload)
        self._set_address(self.mapping_table.external_ip)

    def _set_address(self, ext: bytes | None) -> None:
        self.external_ip = ext
        self._hot = ext if self.fast_path else None  # the fast path runs while this is set

    @property
    def config(self) -> NatConfig:
        return self.mapping_table.config

    def is_internal(self, ip: bytes) -> bool:
        if len(ip) == 16:
            v6 = int.from_bytes(ip, "big")
            return any(v6 & mask == net for net, mask in self._nets6)
        (v,) = _IP4.unpack(ip)
        for net, mask in self._nets:
            if v & mask == net:
                return True
        return False

    # ------------------------------------------------------------------ time, events
    def next_deadline(self) -> float | None:
        return self.table.next_deadline()

    def expire(self, now: float) -> int:
        n = self.table.expire(now)
        self._drain()
        self._to_journal()
        return n

    def end_flow(self, key: bytes, now: float, why: Why = Why.TIMEOUT) -> bool:
        """End the flow holding ``key`` (its kernel entry died: offload), mappings let go; False: none."""
        c = self.table.lookup(key)
        if c is not None:
            self.table.remove(c, now, why)
            self._drain()
            self._to_journal()
        return c is not None

    def pop_events(self) -> tuple:
        """The events no packet caused (expiries, address changes, reloads, restores), oldest
        first; at most the last 4096 are kept (``counters["events_lost"]`` counts the rest)."""
        ev = tuple(self._journal)
        self._journal.clear()
        return ev

    def _to_journal(self) -> None:
        ev = self._events
        if ev:
            lost = len(self._journal) + len(ev) - _JOURNAL
            if lost > 0:
                self.counters["events_lost"] += lost
            self._journal.extend(ev)
            ev.clear()

    def _take(self) -> tuple:
        ev = self._events
        if not ev:
            return ()
        out = tuple(ev)
        ev.clear()
        return out

    # ------------------------------------------------------------------ the packet path
    def process(self, data: bytes | bytearray, side: Side, now: float, stage: Stage = Stage.FULL) -> Answer:
        """Translate one IP packet that arrived from ``side``. Never raises on bad input."""
        deadline = self.table.next_deadline()
        if deadline is not None and deadline <= now:  # a flow's end frees its port before we map
            self.expire(now)
        # The one header check: a whole option-less IPv4 TCP or UDP packet (parse_ip's own
        # tests for its common case).  A live, known flow's packet is translated right here,
        # without a Packet; any other such packet is read into one without checking it again;
        # everything else is parse_ip's.
        if not stage and self._hot is not None and len(data) >= 28 and data[0] == 0x45:
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
                        if b is not None and b.internal >> d & 1 == side:  # bit d set: from the inside
                            return self._drop(NatReason.WRONG_SIDE)  # before any state change
                        if b is not None and table.track_conn(c, d, flags, total, now):
                            # (no event to drain: track_conn journals UPDATEs only, and this table keeps
                            # DESTROYs only)
                            # The rewrite with the deltas Binding.prepare summed ahead: RFC 1624 eqn 3
                            # as conntrack.checksum.adjust (the reference) does it, inline as a call
                            # costs ~25 ns more per checksum (measured: 2.5% of this path); two folds
                            # suffice as ~c + delta < 2**23.
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
                            return _new(Answer, (_ACCEPT, _HAIRPINNED if b.internal == 3 else _TRANSLATED,
                                                 bytes(buf), (), ()))
                    return self._general(data, _common(data, total, proto), side, now, stage)
        try:
            pkt = parse_ip(data)
        except ParseError as exc:
            self.parse_errors[exc.reason.name.lower()] += 1
            return self._drop(NatReason.MALFORMED)
        if pkt.family != 4:
            return self._v6(data, pkt, side, now, stage)
        if self.external_ip is None:
            return self._drop(NatReason.NO_EXTERNAL_ADDRESS)
        return self._general(data, pkt, side, now, stage)

    def _v6(self, data, pkt: Packet, side: Side, now: float, stage: Stage) -> Answer:
        """An IPv6 packet: NAT66 if on.  Link-scoped traffic never crosses the NAT: link-local and
        link-local multicast addresses (RFC 4291) and neighbour discovery (hop limit 255, RFC 4861:
        the host's own, even between global addresses) are passed as they are -- but not ND from
        outside to an internal address, which is nobody's on that link (forwarded, it would have
        reached a VM untranslated, to be dropped there for its hop limit)."""
        if not self.nat66:
            return self._drop(NatReason.NOT_IPV4)
        src, dst = pkt.src, pkt.dst
        nd = pkt.proto == 58 and 133 <= pkt.icmp_type <= 137 and data[pkt.l3 + 7] == 255
        if nd and side == Side.EXTERNAL and self.is_internal(dst):
            return self._drop(NatReason.NOT_EXTERNAL_ADDRESS)
        if (nd or src[0] == 0xFE and src[1] & 0xC0 == 0x80 or dst[0] == 0xFE and dst[1] & 0xC0 == 0x80
                or dst[0] == 0xFF and dst[1] & 0x0F <= 2):
            return self._pass(bytearray(data[:pkt.end]))
        if self.external_ip6 is None:
            return self._drop(NatReason.NO_EXTERNAL_ADDRESS)
        return self._general(data, pkt, side, now, stage)

    def _ext(self, family: int) -> bytes | None:
        return self.external_ip if family == 4 else self.external_ip6

    def table_of(self, e: MapEntry) -> MappingTable:
        """The mapping table an entry lives in (its external address's family)."""
        return self.mapping_table if len(e.mapping.external_ip) == 4 else self.mapping_table6

    def _maps(self, family: int) -> MappingTable:
        return self.mapping_table if family == 4 else self.mapping_table6

    def _general(self, data, pkt: Packet, side: Side, now: float, stage: Stage) -> Answer:
        """Every packet the fast path does not finish: new flows, TCP state changes, ICMP,
        fragments, IP options, hairpin halves."""
        buf = bytearray(data[:pkt.end]) if pkt.end < len(data) else bytearray(data)
        if stage != Stage.FULL:
            hp = self._hairpin_stage(buf, pkt, stage)
            if hp is not None:
                return hp
        if pkt.inner is not None:
            return related.icmp_error(self, buf, pkt, side, now)
        if pkt.l4 < 0:
            return related.fragment(self, buf, pkt, side, now)
        proto = pkt.proto
        if proto not in _PORTED and not pkt.is_icmp_query:
            return self._drop(NatReason.UNSUPPORTED_PROTOCOL)
        key = packet_key(pkt)  # never None for a whole TCP, UDP or ICMP query packet (checked above)
        c = self.table.lookup(key) if key is not None else None  # one lookup; track() checks it again
        if c is not None and c.deadline <= now:
            self.table.remove(c, now, Why.TIMEOUT)
            self._drain()
            c = None
        if c is None:
            if side == Side.INTERNAL:
                return self._new_outbound(buf, pkt, now, stage)
            return self._new_inbound(buf, pkt, now)
        b = c.extra
        if b is not None and bool(b.internal >> (0 if key == c.original else 1) & 1) != (side == Side.INTERNAL):
            return self._drop(NatReason.WRONG_SIDE)  # before the tracker sees it: no state change
        tr = self.table.track(pkt, now)
        if tr.conn is not c and tr.conn is not None and tr.ctstate != CtState.INVALID:  # a SYN reopened it
            self.table.remove(tr.conn, now, Why.REOPEN)  # (RFC 1122, as Linux): a new flow, mapped anew
            self._drain()
            return self._new_outbound(buf, pkt, now, stage) if side == Side.INTERNAL else self._new_inbound(buf, pkt, now)
        if tr.ctstate == CtState.INVALID or tr.conn is None or tr.conn.extra is None:
            self._drain()
            return self._drop(_DROP_WHY.get(tr.why, NatReason.INVALID))
        b = tr.conn.extra  # taken before _drain: an RST may have just ended the flow
        if self.table.has_events:
            self._drain()
        d = tr.direction
        if bool(b.internal >> d & 1) != (side == Side.INTERNAL):  # a reopened tuple: a new entry
            return self._drop(NatReason.WRONG_SIDE)
        if stage == Stage.HAIRPIN_DST:
            return self._half(buf, pkt, b, d)
        rewrite(buf, pkt, *(b.rev if d else b.fwd))
        return self._accept(buf, NatReason.HAIRPINNED if b.internal == 3 else NatReason.TRANSLATED, side)

    # ------------------------------------------------------------------ hairpin halves
    def _hairpin_stage(self, buf: bytearray, pkt: Packet, stage: Stage) -> Answer | None:
        """Pass what is no hairpin; finish a half-translated one. None: go on with HAIRPIN_DST."""
        if pkt.l4 < 0 or pkt.inner is not None or pkt.proto not in _PORTED:
            return self._pass(buf)
        if stage == Stage.HAIRPIN_SRC:
            hit = self._mid.get(key) if (key := packet_key(pkt)) is not None else None
            if hit is None or hit[0].fx is None:
                return self._pass(buf)
            b, d = hit
            rewrite(buf, pkt, *(b.rev if d else b.fwd))
            return self._accept(buf, NatReason.HAIRPINNED, Side.INTERNAL)
        if pkt.dst != self._ext(pkt.family):
            return self._pass(buf)
        return None

    def _half(self, buf: bytearray, pkt: Packet, b: Binding, d: int) -> Answer:
        """Stage.HAIRPIN_DST: rewrite the destination only and remember the half-way tuple."""
        if b.internal != 3:
            return self._drop(NatReason.WRONG_SIDE)
        t = b.rev if d else b.fwd
        rewrite(buf, pkt, pkt.src, t[1], pkt.sport, t[3])
        k = FlowTuple(pkt.proto, pkt.src, t[1], pkt.sport, t[3]).key()
        if k not in self._mid:
            self._mid[k] = (b, d)
            b.mids.append(k)
        self.counters["hairpin_half"] += 1
        return Answer(_ACCEPT, NatReason.HAIRPINNED, bytes(buf), (), self._take())

    def _pass(self, buf: bytearray) -> Answer:
        self.counters["passed_not_ours"] += 1
        return Answer(_ACCEPT, NatReason.NOT_OURS, bytes(buf), (), self._take())

    # ------------------------------------------------------------------ new flows
    def _new_outbound(self, buf: bytearray, pkt: Packet, now: float, stage: Stage = Stage.FULL) -> Answer:
        src, sport, dst, dport, proto = pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.proto
        if proto in _ICMPS and pkt.icmp_type not in _REQUESTS:
            return self._drop(NatReason.INVALID)  # a reply (or other query answer) with no request
        ext = self._ext(pkt.family)
        assert ext is not None  # process() drops every packet while there is no external address
        if src == ext:
            return self._new_host_flow(buf, pkt, now)
        if not self.is_internal(src):
            return self._drop(NatReason.NOT_INTERNAL_SOURCE)
        maps = self._maps(pkt.family)
        entry = maps.outbound(proto, src, sport, lambda rng: reclaim(self, proto, rng, now, ext))
        if entry is None:
            return self._drop(NatReason.POOL_FULL)
        eport = entry.mapping.external_port
        attached = [(entry, dst, dport)]
        internal = 1
        new_dst, new_dport = dst, dport
        if dst == ext:
            if not self.config.hairpinning:
                maps.release_if_unused(entry)
                return self._drop(NatReason.HAIRPIN_DISABLED)
            target = self._inbound_entry(maps, proto, dport, ext, eport)
            if not isinstance(target, MapEntry):
                maps.release_if_unused(entry)
                if stage == Stage.HAIRPIN_DST:
                    return self._pass(buf)  # to the host itself, not through a mapping
                return self._drop(target)
            new_dst, new_dport = target.mapping.internal_ip, target.mapping.internal_port
            attached = [(entry, new_dst, new_dport), (target, ext, eport)]
            internal = 3
        if proto in _ICMPS:
            fwd = (ext, new_dst, eport, 0)
            rev = (dst, src, sport, 0)
            reply = FlowTuple(proto, ext, new_dst, eport, pkt.icmp_type).reversed()
        else:
            fwd = (ext, new_dst, eport, new_dport)
            rev = (dst, src, dport, sport)
            reply = FlowTuple(proto, new_dst, ext, new_dport, eport)
        return self._open(buf, pkt, now, reply, Binding(fwd, rev, internal, attached), Side.INTERNAL, stage)

    def _new_host_flow(self, buf: bytearray, pkt: Packet, now: float) -> Answer:
        """The host's own flow from the external address: its port is held like a mapping's,
        so no VM gets it and the answers come in (the plugin queues all external traffic)."""
        src, sport, dst, dport, proto = pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.proto
        entry = self._maps(pkt.family).host(proto, src, sport)
        if entry is None:
            return self._drop(NatReason.HOST_PORT_CLASH)
        if proto in _ICMPS:
            b = Binding((src, dst, sport, 0), (dst, src, sport, 0), 1, [(entry, dst, dport)])
        else:
            b = Binding((src, dst, sport, dport), (dst, src, dport, sport), 1, [(entry, dst, dport)])
        a = self._open(buf, pkt, now, None, b, Side.INTERNAL)
        return a._replace(reason=NatReason.HOST_FLOW) if a.action == _ACCEPT else a

    def _new_inbound(self, buf: bytearray, pkt: Packet, now: float) -> Answer:
        src, sport, dst, dport, proto = pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.proto
        if dst != self._ext(pkt.family):
            return self._drop(NatReason.NOT_EXTERNAL_ADDRESS)
        if proto in _ICMPS:
            if self.host_stack and pkt.icmp_type in _REQUESTS:
                return self._new_host_inbound(buf, pkt, now)  # a ping of the host itself
            return self._drop(NatReason.NO_MAPPING)  # no inbound ICMP query mappings
        target = self._inbound_entry(self._maps(pkt.family), proto, dport, src, sport)
        if target is NatReason.NO_MAPPING and self.host_stack:
            return self._new_host_inbound(buf, pkt, now)
        if not isinstance(target, MapEntry):
            return self._drop(target)
        ip, port = target.mapping.internal_ip, target.mapping.internal_port
        b = Binding((src, ip, sport, port), (dst, src, dport, sport), 2, [(target, src, sport)])
        return self._open(buf, pkt, now, FlowTuple(proto, ip, src, port, sport), b, Side.EXTERNAL)

    def _new_host_inbound(self, buf: bytearray, pkt: Packet, now: float) -> Answer:
        """Inbound traffic no mapping claims, for the host itself (``host_stack``): passed as it
        is, tracked so its answers go out and its port is held like a mapping's meanwhile."""
        src, sport, dst, dport, proto = pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.proto
        icmp = proto in _ICMPS
        entry = self._maps(pkt.family).host(proto, dst, sport if icmp else dport)
        if entry is None:
            return self._drop(NatReason.HOST_PORT_CLASH)
        if icmp:
            b = Binding((src, dst, sport, 0), (dst, src, sport, 0), 2, [(entry, src, sport)])
        else:
            b = Binding((src, dst, sport, dport), (dst, src, dport, sport), 2, [(entry, src, sport)])
        a = self._open(buf, pkt, now, None, b, Side.EXTERNAL)
        if a.action != _ACCEPT:
            return a
        self.counters["host_flows_in"] += 1
        return a._replace(reason=NatReason.HOST_FLOW)

    def _inbound_entry(self, maps: MappingTable, proto: int, eport: int, rip: bytes,
                       rport: int) -> MapEntry | NatReason:
        e = maps.inbound(proto, eport)
        if e is None:
            return NatReason.NO_MAPPING
        if not e.admits(self.config.filtering, rip, rport):
            return NatReason.FILTERED
        return e

    def _open(self, buf, pkt, now, reply: FlowTuple | None, b: Binding, side: Side,
              stage: Stage = Stage.FULL) -> Answer:
        tr = self.table.track(pkt, now, reply=reply)
        if tr.conn is None or tr.ctstate == CtState.INVALID:
            self._drain()
            for e, _, _ in b.attached:
                self.table_of(e).release_if_unused(e)
            return self._drop(_DROP_WHY.get(tr.why, NatReason.INVALID))
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
        return self._accept(buf, NatReason.HAIRPINNED if b.internal == 3 else NatReason.TRANSLATED, side)

    def _drain(self) -> None:
        """Let go of the mappings of every connection the tracker destroyed."""
        for ev in self.table.pop_events():
            if ev.kind == EventKind.DESTROY and ev.conn is not None:
                b = ev.conn.extra
                if b is None:
                    continue
                ev.conn.extra = None
                b.fx = None  # marks it dead for half-way lookups
                if self.ended is not None:
                    self.ended.append(ev.conn.original)
                for k in b.mids:
                    self._mid.pop(k, None)
                for e, rip, rport in b.attached:
                    e.detach(rip, rport)
                    self.table_of(e).release_if_unused(e)

    # ------------------------------------------------------------------ answers
    def _drop(self, reason: NatReason) -> Answer:
        self.counters[_DROP_COUNTER[reason]] += 1
        return _new(Answer, (_DROP, reason, None, (), self._take()))

    def _accept(self, buf: bytearray, reason: NatReason, side: Side) -> Answer:
        self.counters["translated_out" if side == Side.INTERNAL else "translated_in"] += 1
        return _new(Answer, (_ACCEPT, reason, bytes(buf), (), self._take()))

    # ------------------------------------------------------------------ control
    def set_external_address(self, ip: str | None, now: float, family: int = 4) -> int:
        """The external address of ``family`` changed (or vanished: None). Kills every mapping
        on the old one (the other family's flows go on); returns the flows killed."""
        if family == 6 and not self.nat66:
            return 0
        new = _packed(ip, family)
        old = self._ext(family)
        if new == old:
            return 0
        killed = 0
        size = KEY_SIZE[family]
        for c in list(self.table):
            if len(c.original) == size:
                self.table.remove(c, now, Why.REMOVED)
                killed += 1
        self._drain()
        self._maps(family).reset(new)
        if family == 4:
            self._set_address(new)
        else:
            self.external_ip6 = new
        self.counters["address_changes"] += 1
        self.counters["flows_killed_by_address_change"] += killed
        self._events.append(AddressChanged(_text(old), _text(new), killed))
        self._to_journal()
        return killed

    def reload(self, config: NatConfig, now: float) -> None:
        """Take new inbound mappings, timeouts and filtering; established flows keep going.

        Port ranges and the internal networks are fixed for the engine's life (restart to
        change them). What was taken and what was not is told in events (``pop_events``).
        """
        cfg = self.mapping_table6.reload(self.mapping_table.reload(config, tell=False))
        self.mapping_table.config = cfg
        self.table.timeouts = nat_timeouts(cfg)
        self._to_journal()

    def snapshot(self, now: float) -> dict:
        """Mappings and flows as JSON-ready data (times relative to ``now``): :func:`nat.snapshot.take`."""
        return snapshot.take(self, now)

    def restore(self, snap: dict, now: float, rebind: bool = False) -> int:
        """Load a snapshot into a fresh engine; returns the flows restored (see
        :func:`nat.snapshot.restore`: nothing from another external address unless ``rebind``)."""
        n = snapshot.restore(self, snap, now, rebind)
        self.counters["flows_restored"] += n
        self._events.append(FlowsRestored(n, rebind and snap.get("external_ip") != _text(self.external_ip)))
        self._to_journal()
        return n

    # ------------------------------------------------------------------ status
    def mappings(self) -> list[Mapping]:
        return self.mapping_table.mappings() + self.mapping_table6.mappings()

    def mapping_rows(self, limit: int = 200) -> list[dict]:
        """Live mappings as plain data (for the status file), at most ``limit``."""
        return (self.mapping_table.rows(limit) + self.mapping_table6.rows(limit))[:limit]

    def address_text(self, family: int = 4) -> str | None:
        """The external address of ``family`` as text (status() has it too, but counts every mapping)."""
        return _text(self._ext(family))

    def status(self) -> dict:
        return {
            "external_ip": _text(self.external_ip), "flows": len(self.table),
            "mappings_live": sum(not m.static for t in (self.mapping_table, self.mapping_table6) for m in t.each()),
            "inbound_mappings": len(self.config.forwards), "pools": self.mapping_table.pool_use(),
            **({"external_ip6": _text(self.external_ip6), "pools6": self.mapping_table6.pool_use()}
               if self.nat66 else {}),
            "counters": dict(sorted(self.counters.items())),
            "parse_errors": dict(sorted(self.parse_errors.items())),
        }


def _packed(ip: str | None, family: int = 4) -> bytes | None:
    """An address of ``family`` as bytes (a ValueError for the other family's)."""
    return (ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address)(ip).packed if ip else None


def _text(ip: bytes | None) -> str | None:
    return str(ipaddress.ip_address(ip)) if ip is not None else None
