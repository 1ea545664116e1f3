"""Offload without a kernel: an engine flow as the kernel entry that carries its NAT and
back (nat.offload), the ctnetlink messages (nat.netfilter.ctnetlink), and the driver's
reconciliation against a fake conntrack table (nat.netfilter.offload)."""
from __future__ import annotations

import ipaddress
import socket
import struct
import types

from hypothesis import given, strategies as st

from conntrack.flow import FlowTuple, packet_key
from conntrack.packet import parse_ip
from nat import Action, Side, offload, parse_toml
from nat.netfilter import ctnetlink
from nat.netfilter.ctnetlink import KEntry, Tuple

from .nat_support import EXT, PEER, VM, engine, ping, tcp, udp

ip = lambda s: ipaddress.IPv4Address(s).packed  # noqa: E731
VM_B = "198.18.0.3"


def _conn(e, data):
    return e.table.lookup(packet_key(parse_ip(data)))


def test_outbound_inbound_hairpin_and_icmp_decisions():
    e = engine('[[inbound]]\nproto = "tcp"\nport = 8080\nto = "198.18.0.2:80"\n')
    p = udp(VM, PEER, 5000, 53)
    assert e.process(p, Side.INTERNAL, 0.0).action == Action.ACCEPT
    d = offload.decision(_conn(e, p))
    assert (d.proto, d.src, d.dst, d.sport, d.dport) == (17, ip(VM), ip(PEER), 5000, 53)
    assert d.snat == (ip(EXT), 5000) and d.dnat is None  # the port preserved
    s = tcp(PEER, EXT, 40000, 8080)
    assert e.process(s, Side.EXTERNAL, 0.0).action == Action.ACCEPT
    d = offload.decision(_conn(e, s))
    assert d.snat is None and d.dnat == (ip(VM), 80)
    h = tcp(VM_B, EXT, 41000, 8080)
    assert e.process(h, Side.INTERNAL, 0.0).action == Action.ACCEPT
    d = offload.decision(_conn(e, h))
    assert d.snat == (ip(EXT), 41000) and d.dnat == (ip(VM), 80)
    q = ping(VM, PEER, 77)
    assert e.process(q, Side.INTERNAL, 0.0).action == Action.ACCEPT
    d = offload.decision(_conn(e, q))
    assert (d.proto, d.sport, d.dport) == (1, 77, 8) and d.snat == (ip(EXT), 77)


def test_the_hosts_own_flows_are_not_offloaded():
    e = engine()
    e.host_stack = True
    p = tcp(PEER, EXT, 40000, 22)
    a = e.process(p, Side.EXTERNAL, 0.0)
    assert a.action == Action.ACCEPT
    assert offload.decision(_conn(e, p)) is None  # nothing to translate: the kernel's own
    o = tcp(EXT, PEER, 40001, 443)
    assert e.process(o, Side.INTERNAL, 0.0).action == Action.ACCEPT
    assert offload.decision(_conn(e, o)) is None


def test_kernel_timeouts_are_roams():
    t = offload.kernel_timeouts(parse_toml('internal = ["198.18.0.0/24"]\n'))
    assert t["nf_conntrack_udp_timeout"] == t["nf_conntrack_udp_timeout_stream"] == 300
    assert t["nf_conntrack_tcp_timeout_established"] == 7440
    assert t["nf_conntrack_tcp_timeout_syn_sent"] == t["nf_conntrack_tcp_timeout_fin_wait"] == 240
    short = parse_toml('internal = ["198.18.0.0/24"]\n[timeouts]\nudp = 4\n')
    assert offload.kernel_timeouts(short)["nf_conntrack_udp_timeout"] == 4
    huge = parse_toml('internal = ["198.18.0.0/24"]\n[timeouts]\nudp = 1e9\n')
    assert offload.kernel_timeouts(huge)["nf_conntrack_udp_timeout"] == offload.KERNEL_TIMEOUT_MAX


def test_a_kernel_entry_adopted_after_a_restart_holds_the_same_mapping():
    e = engine()
    p = udp(VM, PEER, 5000, 53)
    e.process(p, Side.INTERNAL, 0.0)
    c = _conn(e, p)
    o, r = FlowTuple.from_key(c.original), FlowTuple.from_key(c.reply)
    fresh = engine()
    a = offload.adopt(fresh, o.proto, o.src, o.dst, o.sport, o.dport, r.src, r.dst, r.sport, r.dport, 1.0, 50.0)
    assert a is not None and a.deadline == 50.0
    assert fresh.mapping_rows() == e.mapping_rows()
    back = udp(PEER, EXT, 53, 5000)
    assert fresh.process(back, Side.EXTERNAL, 2.0).data == e.process(back, Side.EXTERNAL, 2.0).data
    # the kernel's entry dies: the flow ends and the mapping is freed
    assert fresh.end_flow(a.original, 3.0)
    assert fresh.status()["mappings_live"] == 0
    assert not fresh.end_flow(a.original, 3.0)


def test_sync_takes_the_kernels_state():
    e = engine()
    s = tcp(VM, PEER, 5000, 80)
    e.process(s, Side.INTERNAL, 0.0)
    c = _conn(e, s)
    assert c.state == 1 and not c.seen_reply
    assert offload.sync(c, 0x2 | 0x4 | 0x8, 3)
    assert c.state == 3 and c.seen_reply and c.assured
    assert not offload.sync(c, 0x2 | 0x4 | 0x8, 3)


def _acking_ct():
    """A CtSocket whose kernel acknowledges every request; the requests it sent."""
    sent: list[bytes] = []

    class Sock:
        def send(self, b):
            sent.append(bytes(b))

        def recv_into(self, buf):
            seq = struct.unpack_from("=I", sent[-1], 8)[0]
            msg = struct.pack("=IHHII", 36, ctnetlink.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", 0) + b"\0" * 16
            buf[:len(msg)] = msg
            return len(msg)

    ct = object.__new__(ctnetlink.CtSocket)
    ct.sock, ct._seq, ct._buf = Sock(), 0, bytearray(1 << 16)
    return ct, sent


def test_create_message_carries_tuples_nat_and_mark():
    ct, sent = _acking_ct()
    o = Tuple(17, ip(VM), ip(PEER), 5000, 53)
    assert ct.create(o, 300, 0x20000000, snat=(ip(EXT), 5001)) == 0
    m = sent[0]
    assert struct.unpack_from("=H", m, 4)[0] == ctnetlink.MSG_NEW
    parsed = ctnetlink.parse_entry(m, 0, len(m))
    assert parsed.original == o and parsed.reply == ctnetlink.inverse(o)  # the kernel derives the NAT'd reply
    assert parsed.mark == 0x20000000
    assert ip(EXT) in m and struct.pack("!H", 5001) in m


@given(st.sampled_from((6, 17)), st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
       st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.sampled_from((ctnetlink.CTA_TUPLE_ORIG,
                                                                         ctnetlink.CTA_TUPLE_REPLY)))
def test_packed_ipv4_tuples_and_nat_ranges_are_the_nested_builds_bytes(proto, src, dst, sport, dport, kind):
    t = Tuple(proto, src, dst, sport, dport)
    assert ctnetlink._tuple(kind, t) == ctnetlink._tuple_nested(kind, t)
    assert ctnetlink._nat(ctnetlink.CTA_NAT_SRC, src, sport) == ctnetlink._nat_nested(ctnetlink.CTA_NAT_SRC, src, sport)


def test_a_tcp_create_carries_its_state_and_liberal_flags_whatever_came_before():
    ct, sent = _acking_ct()
    o = Tuple(6, ip(VM), ip(PEER), 5000, 80)
    ct.create(Tuple(17, ip(VM), ip(PEER), 5000, 53), 300, 0x20000000)  # (a cached middle of another shape)
    ct.create(o, 7440, 0x20000000, snat=(ip(EXT), 5000), tcp_state=3)
    parsed = ctnetlink.parse_entry(sent[1], 0, len(sent[1]))
    assert parsed.original == o and parsed.tcp_state == 3 and parsed.timeout == 7440 and parsed.mark == 0x20000000
    assert struct.pack("BB", 8, 8) in sent[1]  # IP_CT_TCP_FLAG_BE_LIBERAL both ways


class FakeCt:
    """The kernel's conntrack table as the driver sees it."""

    def __init__(self):
        self.entries: dict[Tuple, KEntry] = {}
        self.deleted = []

    def create(self, original, timeout, mark, snat=None, dnat=None, **kw):
        src, sport = snat or (original.src, original.sport)
        dst, dport = dnat or (original.dst, original.dport)
        self.entries[original] = KEntry(original, ctnetlink.inverse(Tuple(original.proto, src, dst, sport, dport)),
                                        mark, 1, 0, 0x8, 0)
        return 0

    def get(self, original):
        return self.entries.get(original)

    def delete(self, original):
        self.deleted.append(original)
        return 0 if self.entries.pop(original, None) else 2

    def dump(self, mark, mask):
        return [e for e in self.entries.values() if e.mark & mask == mark]

    def flush(self, mark, mask):
        self.entries.clear()
        return 0


def _offloader(e):
    from nat.netfilter.offload import Offloader

    o = object.__new__(Offloader)
    o.engine, o.cfg, o.ct, o.flows, o.changes, o._gen, o._born = e, e.config, FakeCt(), {}, 0, 0, {}
    o.ct_dump, o._replaced = o.ct, {}
    o.events, o._lost_seen = types.SimpleNamespace(lost=0, read=lambda limit=0: []), 0  # (the kernel's DESTROY events: none)
    o._last = o._next = 0.0
    o.kernel_packets, o._dead_packets = [0, 0], [0, 0]
    o.counters = {"offloaded": 0, "offload_failed": 0, "offload_ended": 0, "adopted": 0}
    e.ended = []
    return o


def test_reconciliation_holds_ends_and_adopts():
    e = engine()
    off = _offloader(e)
    flows = [udp(VM, PEER, 5000 + i, 53) for i in range(3)]
    for p in flows:
        assert e.process(p, Side.INTERNAL, 0.0).action == Action.ACCEPT
        assert off.install(p, 0.0)
    assert len(off.ct.entries) == 3 and len(off.flows) == 3
    # far past the engine's own UDP lifetime: held while the kernel has the entries
    for now in range(5, 400, 5):
        off.reconcile(float(now))
        e.expire(float(now))
    assert len(e.table) == 3 and e.status()["mappings_live"] == 3
    # an entry gone without an event (lost): the next reconciliation ends its flow
    del off.ct.entries[next(iter(off.ct.entries))]
    off.reconcile(400.0)
    assert len(e.table) == 2 and e.status()["mappings_live"] == 2 and off.counters["offload_ended"] == 1
    # the engine ends a flow (here: the address went): the kernel entry follows at once
    k = next(iter(off.flows))
    e.end_flow(k, 401.0)
    off.sweep()
    assert len(off.ct.entries) == 1 and off.ct.deleted and k not in off.flows
    off.reconcile(401.0)
    assert len(off.ct.entries) == 1
    # a restart: a fresh engine adopts what the kernel still has
    e2 = engine()
    off2 = _offloader(e2)
    off2.ct = off2.ct_dump = off.ct
    off2.reconcile(402.0, adopt=True)
    assert off2.counters["adopted"] == 1 and len(e2.table) == 1 and e2.status()["mappings_live"] == 1
    # ... what it cannot take (another external address now) leaves the kernel
    e3 = engine(ext="203.0.113.77")
    off3 = _offloader(e3)
    off3.ct.entries = dict(off.ct.entries)
    off3.reconcile(403.0, adopt=True)
    assert off.ct.entries and off3.counters["adopted"] == 0 and not off3.ct.entries and len(e3.table) == 0
    # a flow installed while a dump was under way is not judged by that dump
    fetched = off.fetch(402.0)
    late = udp(VM, PEER, 6000, 53)
    e.process(late, Side.INTERNAL, 402.0)
    assert off.install(late, 402.0)
    off.reconcile(402.0, fetched=(fetched[0], [x for x in fetched[1]]))
    assert _conn(e, late) is not None and len(off.flows) == 2
    off.reconcile(403.0)  # the next one sees it in the kernel
    assert len(off.flows) == 2
    # without offloading, the engine alone would have ended them all long ago
    e4 = engine()
    for p in flows:
        e4.process(p, Side.INTERNAL, 0.0)
    e4.expire(400.0)
    assert len(e4.table) == 0


class KernelCt(FakeCt):
    """FakeCt with the kernel's clash rule: no two entries share a tuple (either direction)."""

    def _holder(self, t):
        return next((k for k, v in self.entries.items() if t in (v.original, v.reply)), None)

    def create(self, original, timeout, mark, snat=None, dnat=None, tcp_state=0, **kw):
        src, sport = snat or (original.src, original.sport)
        dst, dport = dnat or (original.dst, original.dport)
        reply = ctnetlink.inverse(Tuple(original.proto, src, dst, sport, dport))
        if self._holder(original) or self._holder(reply):
            return 17  # EEXIST
        self.entries[original] = KEntry(original, reply, mark, 1, 0, 0x8, tcp_state)
        return 0

    def get(self, t):
        k = self._holder(t)
        return self.entries[k] if k else None

    def delete(self, t):
        self.deleted.append(t)
        k = self._holder(t)
        return 0 if k and self.entries.pop(k) else 2


class PendingEvents:
    """The kernel's DESTROY events not read yet: a stand-in, as the race's instant (an entry reaped
    between a read and the SYN that reopens its tuple) cannot be staged in the kernel at will."""

    def __init__(self):
        self.lost, self.pending = 0, []

    def read(self, limit=0):
        out, self.pending = self.pending, []
        return out


def _reaped(off, data):
    """The kernel removed the flow's expired entry (a dump or a read does) and queued its DESTROY."""
    f = FlowTuple.from_key(packet_key(parse_ip(data)))
    off.events.pending.append(off.ct.entries.pop(Tuple(f.proto, f.src, f.dst, f.sport, f.dport)))


def _offloaded_then_reaped(data):
    """An engine and its offloader with the packet's flow offloaded at 0, its entry since reaped."""
    e = engine()
    off = _offloader(e)
    off.events = PendingEvents()
    e.process(data, Side.INTERNAL, 0.0)
    assert off.install(data, 0.0)
    _reaped(off, data)
    return e, off


def test_a_dumps_pending_destroys_do_not_end_the_flow_reopened_after_it():
    p = udp(VM, PEER, 5000, 53)
    e, off = _offloaded_then_reaped(p)
    off.reconcile(10.0)  # the dump misses it; its DESTROY is read first, and ends the flow
    assert not off.flows and off.counters["offload_ended"] == 1
    assert e.process(p, Side.INTERNAL, 10.1).action == Action.ACCEPT and off.install(p, 10.1)  # the VM again
    off.on_events(10.2)  # (read late, the old DESTROY would end this new flow: its mapping freed, its entry on)
    assert len(off.flows) == 1 and _conn(e, p) is not None and e.status()["mappings_live"] == 1


def test_a_syn_whose_entry_a_read_reaped_opens_a_flow_that_the_old_destroy_leaves_alone():
    syn = tcp(VM, PEER, 40000, 443)
    e, off = _offloaded_then_reaped(syn)  # expired in the kernel; the refresh's GET reaps it
    assert not off.refresh(syn, 300.0)
    assert e.process(syn, Side.INTERNAL, 300.0).action == Action.ACCEPT and off.install(syn, 300.0)
    off.on_events(300.1)
    assert len(off.flows) == 1 and len(off.ct.entries) == 1 and _conn(e, syn) is not None


def test_lost_events_bring_the_reconciliation_forward_but_never_dump_after_dump():
    o = _offloader(engine())
    o.reconcile(100.0)
    o.flows.update({bytes([6]) + bytes(12 - len(str(i))) + str(i).encode(): None for i in range(5000)})
    assert not o.due(101.0) and o.due(101.0, asked=True)  # (a snapshot asked for: at once)
    o.events.lost += 1  # ENOBUFS: a DESTROY the engine never heard of
    assert o.overrun and not o.due(101.0)  # not sooner than RECONCILE after the last dump ...
    assert o.due(102.0)  # ... but then, though 5,000 flows put the next round 20 s away
    o.fetch(102.0)
    assert not o.overrun and not o.due(110.0) and o.due(122.0)


def test_a_flow_first_seen_mid_stream_replaces_the_kernels_own_entries_established():
    """A migrated VM's connection: its first packet here is mid-stream, so the kernel made its
    own (unNATed) entries, for it and for a reply that came before roam's: both give way, and
    roam's entry is ESTABLISHED (as SYN_SENT its next segment would be INVALID)."""
    e = engine()
    off = _offloader(e)
    off.ct = off.ct_dump = KernelCt()
    p = tcp(VM, PEER, 43210, 7300, flags="A", payload=b"first")
    a = e.process(p, Side.INTERNAL, 0.0)
    assert a.action == Action.ACCEPT
    out, back = Tuple(6, ip(VM), ip(PEER), 43210, 7300), Tuple(6, ip(PEER), ip(EXT), 7300, 43210)
    off.ct.create(out, 60, 0)  # the kernel's own, for the forwarded packet
    off.ct.create(back, 60, 0)  # ... and for the peer's answer, queued before roam's entry existed
    assert off.install(p, 0.0) and off.counters["offloaded"] == 1
    mine = off.ct.entries[out]
    assert mine.mark == 0x20000000 and mine.reply == back and mine.tcp_state == 3
    assert list(off.ct.entries) == [out] and not off._replaced  # their DESTROY events are not roam's


# ----------------------------------------------------------------------------- NAT66
def test_ipv6_entries_round_trip_through_the_messages():
    from .nat_support import EXT6, PEER6, VM6
    ip6 = lambda s: ipaddress.IPv6Address(s).packed  # noqa: E731
    ct, sent = _acking_ct()
    for o, nat in ((Tuple(6, ip6(VM6), ip6(PEER6), 40000, 443), (ip6(EXT6), 40000)),
                   (Tuple(58, ip6(VM6), ip6(PEER6), 77, 128), (ip6(EXT6), 78))):
        assert ct.create(o, 60, 0x20000000, snat=nat) == 0
        m = sent[-1]
        assert m[16] == socket.AF_INET6  # the request's family
        parsed = ctnetlink.parse_entry(m, 0, len(m))
        assert parsed.original == o and parsed.reply == ctnetlink.inverse(o) and parsed.mark == 0x20000000
        assert ip6(EXT6) in m
    assert ctnetlink.inverse(Tuple(58, b"a" * 16, b"b" * 16, 77, 128)).dport == 129  # echo reply


def test_ipv6_decisions_adoption_and_a_flush_that_spares_the_other_family():
    from .nat_support import EXT6, PEER6, VM6, engine6, ping6, udp6
    ip6 = lambda s: ipaddress.IPv6Address(s).packed  # noqa: E731
    e = engine6()
    off = _offloader(e)
    p6, q6, p4 = udp6(VM6, PEER6, 5000, 53), ping6(VM6, PEER6, 77), udp(VM, PEER, 5000, 53)
    for p in (p6, q6, p4):
        assert e.process(p, Side.INTERNAL, 0.0).action == Action.ACCEPT
        assert off.install(p, 0.0)
    d = offload.decision(_conn(e, q6))
    assert (d.proto, d.sport, d.dport, d.snat, d.dnat) == (58, 77, 128, (ip6(EXT6), 77), None)
    assert len(off.ct.entries) == 3
    # a restart adopts the IPv6 entries too
    e2 = engine6()
    off2 = _offloader(e2)
    off2.ct = off2.ct_dump = off.ct
    off2.reconcile(1.0, adopt=True)
    assert off2.counters["adopted"] == 3 and e2.status()["pools6"]["udp"]["used"] == 1
    # the kernel's flush by mark takes every family (FakeCt's too): with IPv4 entries there, the
    # IPv6 ones go one by one
    assert off.flush(6) == 2 and len(off.ct.entries) == 1 and len(next(iter(off.ct.entries)).src) == 4
    assert off.flush(4) == 1 and not off.ct.entries
