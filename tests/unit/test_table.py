"""conntrack.table: capacity, early drop, expiry driven by ``now``, events, RELATED, fragments."""
from __future__ import annotations

import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6ND_NS, IPv6
from scapy.all import fragment, raw

from conntrack import (ConnTable, CtState, Direction, EventKind, FlowTuple, Proto, TcpState, Timeouts, Why, parse_frame,
                       parse_ip)
from conntrack.table import Conn
from tests.property.strategies import quote

A, B, R = "192.0.2.1", "198.51.100.2", "203.0.113.254"
A6, B6 = "2001:db8::1", "2001:db8:1::2"


def udp(sport=1000, dport=53, src=A, dst=B, payload=b""):
    return parse_ip(raw(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload))


def tcp(flags, sport=40000, dport=80, src=A, dst=B):
    return parse_ip(raw(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags)))


def kinds(table):
    return [(e.kind, e.why) for e in table.pop_events()]


def assure_udp(table, now, sport):
    table.track(udp(sport), now)
    t = table.track(udp(53, sport, src=B, dst=A), now)
    assert t.conn.assured
    return t.conn


# ------------------------------------------------------------------ UDP / ICMP basics and events
def test_udp_new_reply_and_timeouts():
    table = ConnTable()
    t = table.track(udp(payload=b"q" * 10), 5.0)
    assert (t.ctstate, t.direction, t.why) == (CtState.NEW, Direction.ORIGINAL, None)
    c = t.conn
    assert c.deadline == 5 + 30 and not c.seen_reply and not c.assured
    assert table.track(udp(), 6.0).ctstate is CtState.NEW  # still unreplied
    assert c.deadline == 36
    r = table.track(udp(53, 1000, src=B, dst=A), 7.0)
    assert (r.ctstate, r.direction, r.conn) == (CtState.ESTABLISHED, Direction.REPLY, c)
    assert c.deadline == 7 + 120 and c.seen_reply and c.assured
    assert table.track(udp(), 8.0).ctstate is CtState.ESTABLISHED
    assert (c.orig_packets, c.reply_packets, c.orig_bytes, c.reply_bytes) == (3, 1, 38 + 28 + 28, 28)


def test_events_new_update_destroy():
    table = ConnTable()
    c = table.track(udp(), 1.0).conn
    table.track(udp(53, 1000, src=B, dst=A), 2.0)
    table.expire(200.0)
    evs = table.pop_events()
    assert [(e.kind, e.now, e.assured, e.why) for e in evs] == [
        (EventKind.NEW, 1.0, False, None), (EventKind.UPDATE, 2.0, True, None),
        (EventKind.DESTROY, 200.0, True, Why.TIMEOUT)]
    assert all(e.conn is c for e in evs) and evs[0].state is None
    assert evs[0].original == FlowTuple.make(Proto.UDP, A, B, 1000, 53)
    assert evs[0].reply == FlowTuple.make(Proto.UDP, B, A, 53, 1000)
    assert table.pop_events() == []


def test_an_empty_journal_records_nothing():
    table = ConnTable()
    table.journal = frozenset()
    table.track(udp(), 1.0)
    table.expire(100)
    assert table.pop_events() == []


def test_a_journal_of_destroys_keeps_only_them():
    table = ConnTable()
    table.journal = frozenset((EventKind.DESTROY,))
    table.track(udp(), 1.0)
    table.expire(100)
    assert [e.kind for e in table.pop_events()] == [EventKind.DESTROY]


def test_icmp_echo_request_reply():
    table = ConnTable()
    req = parse_ip(raw(IP(src=A, dst=B) / ICMP(type=8, id=77, seq=1)))
    rep = parse_ip(raw(IP(src=B, dst=A) / ICMP(type=0, id=77, seq=1)))
    t = table.track(req, 1.0)
    assert t.ctstate is CtState.NEW and t.conn.deadline == 31
    r = table.track(rep, 2.0)
    assert (r.ctstate, r.direction, r.conn) == (CtState.ESTABLISHED, Direction.REPLY, t.conn)
    assert r.conn.deadline == 32
    other_id = parse_ip(raw(IP(src=B, dst=A) / ICMP(type=0, id=78, seq=1)))
    assert table.track(other_id, 3.0).why is Why.ICMP_UNMATCHED_REPLY


def test_icmpv6_echo_and_neighbour_discovery():
    table = ConnTable()
    t = table.track(parse_ip(raw(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=5))), 1.0)
    r = table.track(parse_ip(raw(IPv6(src=B6, dst=A6) / ICMPv6EchoReply(id=5))), 1.5)
    assert r.conn is t.conn and r.ctstate is CtState.ESTABLISHED
    ns = table.track(parse_ip(raw(IPv6(src=A6, dst=B6) / ICMPv6ND_NS(tgt=B6))), 2.0)
    assert (ns.ctstate, ns.why, ns.conn) == (CtState.UNTRACKED, Why.NOT_TRACKABLE, None)
    assert len(table) == 1


def test_generic_protocol_is_assured_once_replied():
    table = ConnTable()
    gre = parse_ip(raw(IP(src=A, dst=B, proto=47) / bytes(8)))
    back = parse_ip(raw(IP(src=B, dst=A, proto=47) / bytes(8)))
    c = table.track(gre, 1.0).conn
    assert c.deadline == 601
    assert table.track(back, 2.0).conn is c and c.assured


# ------------------------------------------------------------------ expiry driven by now
def test_get_hides_expired_entries_and_expire_removes_them():
    table = ConnTable()
    table.track(udp(), 10.0)
    t = FlowTuple.make(Proto.UDP, A, B, 1000, 53)
    assert table.get(t, 39.9) is not None and table.get(t.reversed(), 39.9) is not None
    assert table.get(t, 40.0) is None  # a deadline is the first moment the entry is gone
    assert table.get(t) is not None and len(table) == 1  # not yet expired: nothing removed it
    assert table.expire(39.99) == 0
    assert table.expire(40.0) == 1 and table.get(t) is None and len(table) == 0


def test_packet_after_timeout_starts_a_new_entry():
    table = ConnTable()
    old = table.track(udp(), 0.0).conn
    table.pop_events()
    t = table.track(udp(), 30.0)
    assert t.ctstate is CtState.NEW and t.conn is not old
    assert kinds(table) == [(EventKind.DESTROY, Why.TIMEOUT), (EventKind.NEW, None)]


def test_next_deadline_is_exact_and_expire_at_it_makes_progress():
    table = ConnTable(Timeouts().with_(udp=10, icmp=4.25))
    assert table.next_deadline() is None
    table.track(udp(1), 0.5)  # deadline 10.5
    table.track(udp(2), 0.7)  # deadline 10.7
    table.track(parse_ip(raw(IP(src=A, dst=B) / ICMP(id=1))), 1.0)  # deadline 5.25
    seen = []
    while (d := table.next_deadline()) is not None:
        assert not seen or d > seen[-1][0]
        seen.append((d, table.expire(d)))
    assert seen == [(5.25, 1), (10.5, 1), (10.7, 1)] and len(table) == 0


def test_expire_within_the_same_second():
    table = ConnTable(Timeouts().with_(udp=10))
    table.track(udp(1), 0.5)
    table.track(udp(2), 0.9)
    assert table.expire(10.7) == 1  # 10.5 is due, 10.9 is not
    assert [c.original for c in table] == [FlowTuple.make(Proto.UDP, A, B, 2, 53).key()]
    assert table.next_deadline() == pytest.approx(10.9)


def test_refreshed_entry_survives_its_first_deadline():
    table = ConnTable()
    c = table.track(udp(), 0.0).conn
    table.track(udp(), 20.0)  # refreshed: deadline 50
    assert table.expire(45) == 0 and c.deadline == 50
    assert table.expire(50) == 1


def test_shorter_timeout_is_honoured():
    """ESTABLISHED (5 days) to CLOSE (10 s): expire must not wait for the old deadline."""
    table = ConnTable()
    table.track(tcp("S"), 0)
    table.track(tcp("SA", 80, 40000, B, A), 1)
    table.track(tcp("A"), 2)
    table.track(tcp("R"), 3)
    assert table.next_deadline() <= 13
    assert table.expire(13) == 1 and len(table) == 0


# ------------------------------------------------------------------ capacity and early drop
def test_early_drop_evicts_an_unassured_entry():
    table = ConnTable(capacity=3)
    assure_udp(table, 1.0, 1)
    table.track(udp(2), 2.0)  # unassured
    assure_udp(table, 3.0, 3)
    table.pop_events()
    t = table.track(udp(4), 4.0)
    assert t.ctstate is CtState.NEW and len(table) == 3
    assert table.get(FlowTuple.make(Proto.UDP, A, B, 2, 53)) is None
    assert kinds(table) == [(EventKind.DESTROY, Why.EARLY_DROP), (EventKind.NEW, None)]
    assert table.stats().early_drops == 1


def test_full_table_of_assured_entries_refuses_new_flows_but_keeps_working():
    table = ConnTable(capacity=2)
    c1 = assure_udp(table, 1.0, 1)
    c2 = assure_udp(table, 1.0, 2)
    t = table.track(udp(3), 2.0)
    assert (t.ctstate, t.why, t.conn) == (CtState.INVALID, Why.TABLE_FULL, None)
    assert len(table) == 2 and table.stats().dropped_full == 1
    assert table.track(udp(1), 3.0).conn is c1 and table.track(udp(53, 2, src=B, dst=A), 3.0).conn is c2


def test_full_table_reaps_timed_out_entries_before_refusing():
    table = ConnTable(capacity=2)
    assure_udp(table, 0.0, 1)
    assure_udp(table, 0.0, 2)
    t = table.track(udp(3), 500.0)  # both assured entries timed out at 120 s; nobody called expire
    assert t.ctstate is CtState.NEW and len(table) == 1
    assert [e.why for e in table.pop_events() if e.kind is EventKind.DESTROY] == [Why.TIMEOUT] * 2


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        ConnTable(capacity=0)


# ------------------------------------------------------------------ RELATED ICMP errors
def test_icmp_error_is_related_to_the_flow_it_quotes():
    table = ConnTable()
    syn = IP(src=A, dst=B) / TCP(sport=40000, dport=80, flags="S")
    c = table.track(parse_ip(raw(syn)), 1.0).conn
    table.pop_events()
    err = parse_ip(raw(IP(src=R, dst=A) / ICMP(type=3, code=1) / quote(raw(syn))))
    t = table.track(err, 2.0)
    assert (t.ctstate, t.direction, t.conn) == (CtState.RELATED, Direction.REPLY, c)
    assert c.deadline == 121 and c.tcp_state is TcpState.SYN_SENT and table.pop_events() == []
    # an error about a reply-direction packet travels in the original direction
    reply_pkt = IP(src=B, dst=A) / TCP(sport=80, dport=40000, flags="SA")
    back = parse_ip(raw(IP(src=R, dst=B) / ICMP(type=11) / quote(raw(reply_pkt))))
    assert table.track(back, 3.0).direction is Direction.ORIGINAL


def test_icmpv6_error_related_and_unknown_flow():
    table = ConnTable()
    out = IPv6(src=A6, dst=B6) / UDP(sport=5, dport=6) / bytes(40)
    c = table.track(parse_ip(raw(out)), 1.0).conn
    err = parse_ip(raw(IPv6(src=B6, dst=A6) / ICMPv6DestUnreach(code=4) / quote(raw(out))))
    assert table.track(err, 2.0).conn is c
    unknown = IPv6(src=A6, dst=B6) / UDP(sport=7, dport=8)
    t = table.track(parse_ip(raw(IPv6(src=B6, dst=A6) / ICMPv6DestUnreach() / quote(raw(unknown)))), 2.0)
    assert (t.ctstate, t.why) == (CtState.INVALID, Why.ICMP_NO_FLOW)


def test_icmp_error_about_an_expired_flow_is_invalid():
    table = ConnTable()
    pkt = IP(src=A, dst=B) / UDP(sport=1, dport=2)
    table.track(parse_ip(raw(pkt)), 0.0)
    err = parse_ip(raw(IP(src=R, dst=A) / ICMP(type=3, code=3) / quote(raw(pkt))))
    assert table.track(err, 29.0).ctstate is CtState.RELATED
    assert table.track(err, 30.0).why is Why.ICMP_NO_FLOW


def test_icmp_error_about_an_echo_request():
    table = ConnTable()
    ping = IP(src=A, dst=B) / ICMP(type=8, id=3)
    c = table.track(parse_ip(raw(ping)), 0.0).conn
    err = parse_ip(raw(IP(src=R, dst=A) / ICMP(type=11) / quote(raw(ping))))
    assert table.track(err, 1.0).conn is c


# ------------------------------------------------------------------ fragments
def _frags(src=A, dst=B, sport=5000, dport=6000, ident=0x1234, size=400):
    whole = IP(src=src, dst=dst, id=ident) / UDP(sport=sport, dport=dport) / bytes(size)
    return [parse_ip(raw(f)) for f in fragment(whole, fragsize=128)]


def test_fragments_are_tracked_via_their_head():
    table = ConnTable()
    frags = _frags()
    head = table.track(frags[0], 1.0)
    assert head.ctstate is CtState.NEW
    for f in frags[1:]:
        t = table.track(f, 1.1)
        assert (t.ctstate, t.direction, t.conn) == (CtState.NEW, Direction.ORIGINAL, head.conn)
    assert head.conn.orig_packets == len(frags) and len(table) == 1
    assert head.conn.orig_bytes == sum(f.length for f in frags)
    # the reply, fragmented too, lands in the same entry
    back = _frags(B, A, 6000, 5000, ident=0x9999)
    for f in back:
        t = table.track(f, 1.2)
        assert (t.conn, t.direction, t.ctstate) == (head.conn, Direction.REPLY, CtState.ESTABLISHED)


def test_fragment_without_head_is_untracked():
    table = ConnTable()
    frags = _frags()
    t = table.track(frags[2], 1.0)  # arrives before its head
    assert (t.ctstate, t.why, t.conn) == (CtState.UNTRACKED, Why.FRAGMENT_WITHOUT_HEAD, None)
    table.track(frags[0], 1.0)
    other = _frags(ident=0x4321)
    assert table.track(other[1], 1.0).why is Why.FRAGMENT_WITHOUT_HEAD  # another datagram's id
    assert table.track(frags[2], 1.0).conn is not None


def test_fragment_head_is_forgotten_after_the_fragment_timeout():
    table = ConnTable(Timeouts().with_(fragment=5, udp=100))
    frags = _frags()
    table.track(frags[0], 0.0)
    assert table.track(frags[1], 4.9).conn is not None
    assert table.track(frags[2], 5.0).why is Why.FRAGMENT_WITHOUT_HEAD


def test_fragments_of_a_destroyed_entry_are_untracked():
    table = ConnTable()
    frags = _frags()
    c = table.track(frags[0], 0.0).conn
    table.remove(c, 0.5)
    assert table.track(frags[1], 1.0).why is Why.FRAGMENT_WITHOUT_HEAD


# ------------------------------------------------------------------ NAT-style reply tuples, removal
def test_explicit_reply_tuple_for_nat():
    table = ConnTable()
    nat_reply = FlowTuple.make(Proto.UDP, B, "203.0.113.1", 53, 61000)
    t = table.track(udp(), 1.0, reply=nat_reply)
    back = parse_ip(raw(IP(src=B, dst="203.0.113.1") / UDP(sport=53, dport=61000)))
    r = table.track(back, 2.0)
    assert (r.conn, r.direction) == (t.conn, Direction.REPLY)
    assert table.get(nat_reply) is t.conn
    t.conn.extra = {"mapping": 61000}
    assert table.get(nat_reply).extra == {"mapping": 61000}
    # another flow wanting the same reply tuple is refused, not merged
    clash = table.track(udp(1001), 3.0, reply=nat_reply)
    assert (clash.ctstate, clash.why, clash.conn, len(table)) == (CtState.INVALID, Why.TUPLE_TAKEN, None, 1)


def test_remove_and_flush():
    table = ConnTable()
    c = table.track(udp(1), 0.0).conn
    table.track(udp(2), 0.0)
    table.pop_events()
    table.remove(c, 1.0)
    table.remove(c, 1.0)  # twice is harmless
    assert len(table) == 1 and kinds(table) == [(EventKind.DESTROY, Why.REMOVED)]
    table.flush(2.0)
    assert len(table) == 0 and list(table) == [] and kinds(table) == [(EventKind.DESTROY, Why.REMOVED)]
    assert table.expire(1000.0) == 0  # stale wheel references to removed entries are skipped


def test_iteration_yields_each_entry_once_in_creation_order():
    table = ConnTable()
    conns = [table.track(udp(p), float(p)).conn for p in (3, 1, 2)]
    table.track(udp(53, 1, src=B, dst=A), 5.0)
    assert list(table) == conns and len(table) == 3


def test_fragments_of_a_timed_out_entry_are_untracked():
    """The head is remembered 30 s, but the entry it points to timed out after 5 s."""
    table = ConnTable(Timeouts().with_(udp=5, fragment=30))
    frags = _frags()
    table.track(frags[0], 0.0)
    assert table.track(frags[1], 4.0).conn is not None
    t = table.track(frags[2], 9.5)
    assert (t.conn, t.why) == (None, Why.FRAGMENT_WITHOUT_HEAD)


def test_reply_tuple_held_by_a_timed_out_entry_is_free():
    table = ConnTable()
    nat_reply = FlowTuple.make(Proto.UDP, B, "203.0.113.1", 53, 61000)
    old = table.track(udp(), 0.0, reply=nat_reply).conn
    table.pop_events()
    t = table.track(udp(1001), 31.0, reply=nat_reply)  # nobody called expire since 30 s
    assert t.ctstate is CtState.NEW and t.conn is not old and table.get(nat_reply) is t.conn
    assert kinds(table) == [(EventKind.DESTROY, Why.TIMEOUT), (EventKind.NEW, None)]


def test_remove_flush_and_early_drop_stamp_the_time():
    table = ConnTable(capacity=3)
    a, b = table.track(udp(1), 0.0).conn, table.track(udp(2), 0.0).conn
    table.track(udp(3), 0.0)
    table.pop_events()
    table.remove(a, 1.5)
    table.track(udp(4), 2.0)
    table.track(udp(5), 2.5)  # full: the oldest unassured entry (b) makes room
    table.flush(3.5)
    destroys = [(e.why, e.now) for e in table.pop_events() if e.kind is EventKind.DESTROY]
    assert destroys == [(Why.REMOVED, 1.5), (Why.EARLY_DROP, 2.5)] + [(Why.REMOVED, 3.5)] * 3
    assert table.stats().early_drops == 1 and b not in list(table)


def test_stats_count_what_happened():
    table = ConnTable(Timeouts().with_(udp=10), capacity=8)
    assure_udp(table, 0.0, 1)
    table.track(udp(2), 0.0)
    table.track(tcp("F"), 0.0)  # a FIN opens nothing: invalid
    unknown = IP(src=A, dst=B) / UDP(sport=7, dport=8)
    table.track(parse_ip(raw(IP(src=R, dst=A) / ICMP(type=3, code=3) / quote(raw(unknown)))), 0.0)  # no flow
    table.track(tcp("S"), 0.0)
    table.track(tcp("F"), 0.0)  # FIN answering nothing in SYN_SENT: invalid, on the entry
    table.expire(10.0)
    st = table.stats()
    assert (st.entries, st.capacity, st.new, st.invalid, st.expired, st.dropped_full, st.early_drops) == (
        2, 8, 3, 3, 1, 0, 0)


def test_timeout_left():
    table = ConnTable()
    c = table.track(udp(), 10.0).conn
    assert table.timeout_left(c, 12.5) == 27.5 and table.timeout_left(c, 40.0) == 0.0
    assert table.timeout_left(c, 99.0) == 0.0


def test_early_drop_looks_at_a_bounded_number_of_entries():
    """When full, a new flow costs a bounded scan: the 64 oldest entries (Linux: 8 per bucket)."""
    table = ConnTable(capacity=65)
    for port in range(1, 65):
        assure_udp(table, 0.0, port)
    table.track(udp(100), 0.0)  # unassured, but the 65th
    assert table.track(udp(101), 1.0).why is Why.TABLE_FULL
    table = ConnTable(capacity=64)
    for port in range(1, 64):
        assure_udp(table, 0.0, port)
    table.track(udp(100), 0.0)  # unassured and the 64th: in reach
    assert table.track(udp(101), 1.0).ctstate is CtState.NEW
    assert table.track(udp(102), 2.0).ctstate is CtState.NEW  # and now udp(101) makes room
    assert table.stats().early_drops == 2 and len(table) == 64


def test_fragment_heads_are_bounded_oldest_forgotten_first():
    table = ConnTable(fragment_capacity=1)
    first, second = _frags(sport=1, ident=1), _frags(sport=2, ident=2)
    table.track(first[0], 0.0)
    table.track(second[0], 0.0)
    assert table.track(first[1], 0.0).why is Why.FRAGMENT_WITHOUT_HEAD
    assert table.track(second[1], 0.0).conn is not None


def test_fragment_at_its_entrys_deadline_is_untracked():
    table = ConnTable(Timeouts().with_(udp=5, fragment=30))
    frags = _frags()
    table.track(frags[0], 0.0)
    assert table.track(frags[1], 4.99).conn is not None
    assert table.track(frags[2], 5.0).why is Why.FRAGMENT_WITHOUT_HEAD


def test_bytes_counted_are_ip_lengths_whatever_the_link_header():
    """Packets parsed from Ethernet frames (the IP header 14 bytes in) count the same bytes."""
    def framed(pkt):
        return [parse_frame(raw(Ether() / f)).packet for f in pkt]

    table = ConnTable()
    frags = framed(fragment(IP(src=A, dst=B, id=7) / UDP(sport=5, dport=6) / bytes(300), fragsize=128))
    back = framed(fragment(IP(src=B, dst=A, id=8) / UDP(sport=6, dport=5) / bytes(300), fragsize=128))
    for f in frags + back:
        c = table.track(f, 1.0).conn
    assert (c.orig_packets, c.reply_packets) == (len(frags), len(back))
    assert (c.orig_bytes, c.reply_bytes) == (sum(f.length for f in frags), sum(f.length for f in back))
    assert frags[0].l3 == 14
    syn, ack_back, rst = framed([IP(src=A, dst=B) / TCP(sport=9, dport=80, flags="S"),
                                 IP(src=B, dst=A) / TCP(sport=80, dport=9, flags="A") / bytes(5),  # ignored
                                 IP(src=A, dst=B) / TCP(sport=9, dport=80, flags="R")])  # RST before a reply
    t = table.track(syn, 2.0).conn
    table.track(ack_back, 2.0)
    table2 = ConnTable()
    t2 = table2.track(syn, 2.0).conn
    table2.track(rst, 2.0)
    assert (t.orig_bytes, t.reply_bytes) == (40, 45) and (t2.orig_bytes, len(table2)) == (80, 0)


def test_adopt_takes_a_restored_entry_silently_and_refuses_clashes_and_a_full_table():
    src = ConnTable()
    c = assure_udp(src, 0.0, 1)
    src.remove(c, 1.0)  # a snapshot's entry, no longer in its old table
    table = ConnTable(capacity=2)
    table.adopt(c)
    assert list(table) == [c] and table.get(FlowTuple.make(Proto.UDP, B, A, 53, 1)) is c
    assert table.pop_events() == [] and table.stats().entries == 1
    assert table.track(udp(1), 2.0).ctstate is CtState.ESTABLISHED  # alive again, not dead
    assert table.expire(2.0 + 120) == 1 and len(table) == 0  # and filed for expiry
    table.adopt(c)
    k = FlowTuple.make(Proto.UDP, A, B, 1, 53).key()
    free = FlowTuple.make(Proto.UDP, B, "203.0.113.1", 53, 9).key()
    for clash in (Conn(k, free, 17, 0, 0.0), Conn(free, k, 17, 0, 0.0)):  # one tuple taken is enough
        with pytest.raises(ValueError, match="^a tuple of this connection is already tracked$"):
            table.adopt(clash)
    table.adopt(Conn(FlowTuple.make(Proto.UDP, A, B, 2, 53).key(), FlowTuple.make(Proto.UDP, B, A, 53, 2).key(),
                     17, 0, 50.0))
    assert len(table) == 2
    with pytest.raises(ValueError, match="^table full$"):
        table.adopt(Conn(free, FlowTuple.make(Proto.UDP, A, B, 3, 53).key(), 17, 0, 50.0))
    assert len(table) == 2
