"""Properties of the connection tracker (hypothesis).

* any bytes give a Packet or the one ParseError (parse_ip, parse_frame), and tracking
  whatever parses gives a verdict, never another exception;
* tuple reversal is an involution;
* the table never exceeds its capacity;
* no entry outlives its timeout, and expire removes exactly the entries that are due;
* a packet and its reply land in the same entry.
"""
from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conntrack import ConnTable, CtState, Direction, FlowTuple, Packet, ParseError, Proto, Timeouts, Tracked
from conntrack import parse_frame, parse_ip
from conntrack.events import Why

from .strategies import (
    ethernet_frames, icmp_errors, ip_packets, ipv4_fragments, ipv4_packets, ipv6_packets, mutated,
    packet_and_reply, traffic,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEQ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Short timeouts so that generated gaps (up to 50 s) make entries expire mid-sequence.
SHORT = Timeouts().with_(syn_sent=12, syn_recv=6, established=40.5, fin_wait=12, close_wait=6, last_ack=3,
                         time_wait=12, close=1, syn_sent2=12, udp=3, udp_stream=12, icmp=3, generic=60,
                         fragment=3)


def _check_packet(p: Packet, buf: bytes, base: int = 0) -> None:
    """What a successful parse promises its users (the NAT rewrites at these offsets)."""
    assert p.family in (4, 6) and len(p.src) == len(p.dst) == (4 if p.family == 4 else 16)
    assert base <= p.l3 and p.end <= len(buf)
    assert p.l4 == -1 or p.l3 < p.l4 <= p.end
    if p.l4 == -1:
        assert p.fragment is not None and p.fragment.offset > 0
    assert 0 <= p.sport <= 0xFFFF and 0 <= p.dport <= 0xFFFF and p.payload_len >= 0
    if p.inner is not None:
        assert p.is_icmp and p.inner.family == p.family and p.l4 < p.inner.l3 <= p.inner.end <= p.end
        _check_packet(p.inner, buf, p.l4)


def _parse_and_track(buf: bytes, frame: bool) -> None:
    try:
        if frame:
            f = parse_frame(buf)
            assert f.l3 >= 14 and len(f.vlans) <= 4
            p = f.packet
        else:
            p = parse_ip(buf)
    except ParseError as exc:
        assert exc.reason is not None and str(exc)
        return
    if p is None:
        return
    _check_packet(p, buf)
    table = ConnTable(capacity=4)
    t = table.track(p, 1.0)
    assert isinstance(t, Tracked) and isinstance(t.ctstate, CtState)
    t2 = table.track(p, 2.0)  # the same packet again: an existing entry's path
    assert isinstance(t2, Tracked)
    table.expire(10**7)
    assert len(table) == 0


# ------------------------------------------------------------------ any bytes
@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_parse_ip(buf):
    _parse_and_track(buf, frame=False)


@FUZZ
@given(st.sampled_from([0x45, 0x46, 0x4F, 0x60]).flatmap(
    lambda first: st.binary(min_size=19, max_size=120).map(lambda rest: bytes([first]) + rest)))
def test_random_bytes_that_start_like_ip(buf):
    _parse_and_track(buf, frame=False)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_parse_frame(buf):
    _parse_and_track(buf, frame=True)


@FUZZ
@given(mutated(st.one_of(ip_packets(), icmp_errors(full_quote=False))))
def test_mutated_packets(buf):
    _parse_and_track(buf, frame=False)


@FUZZ
@given(mutated(ethernet_frames()))
def test_mutated_frames(buf):
    _parse_and_track(buf, frame=True)


@SEQ
@given(st.lists(st.one_of(ip_packets(), mutated(ip_packets())), min_size=2, max_size=4),
       st.lists(st.integers(0, 300), min_size=1, max_size=4))
def test_spliced_packets(parts, cuts):
    """Pieces of several packets glued together (a stream split at random points)."""
    buf = b"".join(p[: cuts[i % len(cuts)]] for i, p in enumerate(parts))
    _parse_and_track(buf, frame=False)


@SEQ
@given(ip_packets())
def test_valid_packets_parse_whole_and_with_trailing_bytes(buf):
    p = parse_ip(buf)
    _check_packet(p, buf)
    assert p.end == len(buf)
    assert parse_ip(buf + b"\x00" * 11) == p


@SEQ
@given(ethernet_frames())
def test_valid_frames_parse(buf):
    f = parse_frame(buf)
    assert f.packet is not None
    _check_packet(f.packet, buf, f.l3)


@SEQ
@given(ipv4_fragments())
def test_fragments_first_has_ports_rest_have_none(frags):
    ps = [parse_ip(b) for b in frags]
    assert ps[0].fragment.first and ps[0].l4 > 0 and ps[0].fragment.more
    assert all(p.l4 == -1 and not p.fragment.first for p in ps[1:])
    assert not ps[-1].fragment.more and len({p.fragment.ident for p in ps}) == 1


# ------------------------------------------------------------------ tuples
def _addr(family):
    bits = 32 if family == 4 else 128
    return st.integers(0, 2**bits - 1).map(lambda n: ipaddress.ip_address(n if family == 4 else
                                                                         ipaddress.IPv6Address(n)).packed)


@st.composite
def tuples(draw):
    fam = draw(st.sampled_from((4, 6)))
    proto = draw(st.sampled_from([Proto.TCP, Proto.UDP, Proto.ICMP, Proto.ICMPV6, Proto.GRE, Proto.SCTP]))
    dport = draw(st.one_of(st.integers(0, 65535), st.sampled_from([0, 8, 13, 14, 128, 129, 139, 140])))
    return FlowTuple(proto, draw(_addr(fam)), draw(_addr(fam)), draw(st.integers(0, 65535)), dport)


@settings(max_examples=500, deadline=None)
@given(tuples())
def test_tuple_reversal_is_an_involution(t):
    assert t.reversed().reversed() == t
    assert FlowTuple.from_key(t.key()) == t
    assert (t.reversed().src, t.reversed().dst) == (t.dst, t.src)


@SEQ
@given(packet_and_reply())
def test_packet_keys_of_a_packet_and_its_reply_are_reverses(pair):
    from conntrack.flow import packet_key, reverse_key
    k1, k2 = (packet_key(parse_ip(b)) for b in pair)
    assert reverse_key(k1) == k2 and reverse_key(k2) == k1


# ------------------------------------------------------------------ the table over time
def _max_timeout(table: ConnTable, c) -> float:
    t = table.timeouts
    if c.proto == Proto.TCP:
        return t.tcp(c.tcp_state)
    if c.proto in (Proto.UDP, Proto.UDPLITE):
        return t.udp_stream if c.assured else t.udp
    if c.proto in (Proto.ICMP, Proto.ICMPV6):
        return t.icmp
    return t.generic


def _run(table: ConnTable, steps, expire_every: int | None, on_track=None):
    now = 1000.0
    last_seen: dict[int, float] = {}
    for i, (gap, buf) in enumerate(steps):
        now += gap
        t = table.track(parse_ip(buf), now)
        if t.conn is not None:
            last_seen[id(t.conn)] = now
        if on_track is not None:
            on_track(t, now)
        assert len(table) <= table.capacity
        assert len(list(table)) == len(table)
        if expire_every and i % expire_every == 0:
            _expire_exactly(table, now)
        for c in table:
            if id(c) in last_seen:  # nothing lives longer than its timeout after its last packet
                assert c.deadline <= last_seen[id(c)] + _max_timeout(table, c)
    return now


def _expire_exactly(table: ConnTable, now: float) -> None:
    before = list(table)
    due = [c for c in before if c.deadline <= now]
    for c in due:  # already invisible to lookups that pass the time
        o, r = c.tuples()
        assert table.get(o, now) is None and table.get(r, now) is None
    nd = table.next_deadline()
    if due:
        assert nd is not None and nd <= min(c.deadline for c in due)  # never late
    assert table.expire(now) == len(due)
    after = list(table)
    assert after == [c for c in before if c.deadline > now]
    for c in after:
        o, r = c.tuples()
        assert table.get(o, now) is c and table.get(r, now) is c
    if after:
        nd = table.next_deadline()
        assert nd is not None and now < nd <= min(c.deadline for c in after)


@SEQ
@given(traffic(), st.integers(1, 6), st.sampled_from([1, 2, 3, None]))
def test_table_never_exceeds_capacity(steps, capacity, expire_every):
    table = ConnTable(SHORT, capacity=capacity)
    _run(table, steps, expire_every)
    assert len(table) <= capacity


@SEQ
@given(traffic(), st.sampled_from([1, 2, 5]), st.floats(0, 100, allow_nan=False))
def test_no_entry_outlives_its_timeout(steps, expire_every, tail):
    table = ConnTable(SHORT, capacity=64)
    now = _run(table, steps, expire_every)
    _expire_exactly(table, now + tail)
    # walking the clock by next_deadline empties the table in finitely many steps
    for _ in range(4 * len(steps) + 10):
        nd = table.next_deadline()
        if nd is None:
            break
        _expire_exactly(table, nd)
    assert len(table) == 0 and table.next_deadline() is None


@SEQ
@given(traffic(max_steps=20), packet_and_reply(pool=True), st.floats(0, 5, allow_nan=False))
def test_packet_and_reply_land_in_the_same_entry(steps, pair, gap):
    table = ConnTable(SHORT, capacity=64)
    now = _run(table, steps, expire_every=3) + gap
    first = table.track(parse_ip(pair[0]), now)
    if first.conn is None or first.why is Why.RESET or first.conn not in list(table):
        return  # refused or closed by this very packet: nothing to land in
    second = table.track(parse_ip(pair[1]), now)
    assert second.conn is first.conn
    if not _self_flow(pair[0]):
        assert {first.direction, second.direction} == {Direction.ORIGINAL, Direction.REPLY}


@SEQ
@given(packet_and_reply())
def test_packet_and_reply_in_an_empty_table(pair):
    table = ConnTable()
    first = table.track(parse_ip(pair[0]), 0.0)
    second = table.track(parse_ip(pair[1]), 0.5)
    assert first.ctstate is CtState.NEW and first.direction is Direction.ORIGINAL
    assert second.conn is first.conn and len(table) == 1
    if not _self_flow(pair[0]):
        assert second.direction is Direction.REPLY and second.ctstate is CtState.ESTABLISHED


def _self_flow(buf: bytes) -> bool:
    """A flow from an address and port to themselves: its tuple is its own reverse, so the
    two directions cannot be told apart (in Linux either); only "same entry" is promised."""
    from conntrack.flow import packet_key, reverse_key
    k = packet_key(parse_ip(buf))
    return k == reverse_key(k)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(ipv4_packets(pool=True), ipv6_packets(pool=True)), min_size=1, max_size=30),
       st.integers(1, 3))
def test_tiny_tables_under_pressure(pkts, capacity):
    table = ConnTable(SHORT, capacity=capacity)
    for i, b in enumerate(pkts):
        table.track(parse_ip(b), float(i))
        assert len(table) <= capacity and len(table._by_key) <= 2 * capacity


def _general(buf: bytes):
    """The general parser, without parse_ip's inline common case."""
    from conntrack.packet import _parse_ip

    try:
        return _parse_ip(buf, 0, len(buf), False)
    except ParseError as exc:
        return exc.reason


def _inline(buf: bytes):
    try:
        return parse_ip(buf)
    except ParseError as exc:
        return exc.reason


@FUZZ
@given(st.one_of(ipv4_packets(), mutated(ipv4_packets()), st.binary(min_size=20, max_size=80).map(lambda b: b"\x45" + b)))
def test_inline_parse_agrees_with_the_general_parser(buf):
    """parse_ip reads option-less IPv4 TCP/UDP inline for speed: same answer as the general path."""
    assert _inline(buf) == _general(buf)
