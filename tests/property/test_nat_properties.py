"""Hypothesis properties of the NAT engine (DESIGN.md: tests/property)."""
from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import ICMP, IP, TCP, UDP, IPOption, raw

from conntrack.answer import Action, Answer
from nat import NatEngine, Side, parse_toml
from tests.unit.nat_support import EXT, checksums_ok

# small pools, so that the sequences below fill them and reuse freed ports
CFG = parse_toml('internal = ["198.18.0.0/24"]\n[ports]\nrange = "20000-20063"\nlow_range = "900-915"\n'
                 '[[inbound]]\nproto = "tcp"\nport = 8080\nto = "198.18.0.2:80"\n')

internal_ip = st.integers(2, 254).map(lambda i: f"198.18.0.{i}")
remote_ip = st.sampled_from(["192.0.2.9", "192.0.2.10", "198.51.100.7", "203.0.113.200"])
port = st.integers(1, 65535)
payload = st.binary(max_size=40)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _packet(proto, src, dst, sport, dport, data, zero_udp=False, reply=False):
    ip = IP(src=src, dst=dst, id=7, ttl=60)
    if proto == "tcp":
        return raw(ip / TCP(sport=sport, dport=dport, flags="SA" if reply else "S", seq=5, ack=9 if reply else 0,
                            window=100) / data)
    if proto == "udp":
        u = UDP(sport=sport, dport=dport)
        if zero_udp:
            u.chksum = 0
        return raw(ip / u / data)
    return raw(ip / ICMP(type=0 if reply else 8, id=sport, seq=dport) / data)


@SETTINGS
@given(proto=st.sampled_from(["tcp", "udp", "icmp"]), src=internal_ip, dst=remote_ip, sport=port, dport=port,
       data=payload, zero_udp=st.booleans(), seed=st.integers(0, 1000))
def test_translate_then_reverse_is_identity(proto, src, dst, sport, dport, data, zero_udp, seed):
    e = NatEngine(CFG, EXT, seed=seed)
    p = _packet(proto, src, dst, sport, dport, data, zero_udp)
    v = e.process(p, Side.INTERNAL, 1.0)
    assert v.action == Action.ACCEPT
    t = IP(v.data)
    assert t.src == EXT and t.dst == dst and checksums_ok(v.data)
    if proto == "udp" and zero_udp:
        assert t[UDP].chksum == 0
    # the peer answers the translated packet; reversing it must give exactly the answer to p
    if proto == "icmp":
        answer = _packet(proto, dst, EXT, t[ICMP].id, dport, data, reply=True)
        expect = _packet(proto, dst, src, sport, dport, data, reply=True)
    else:
        eport = t[TCP].sport if proto == "tcp" else t[UDP].sport
        answer = _packet(proto, dst, EXT, dport, eport, data, zero_udp, reply=True)
        expect = _packet(proto, dst, src, dport, sport, data, zero_udp, reply=True)
    r = e.process(answer, Side.EXTERNAL, 2.0)
    assert r.action == Action.ACCEPT
    assert r.data == expect


ops = st.lists(st.tuples(st.sampled_from(["tcp", "udp", "icmp"]), internal_ip, st.integers(895, 925) | st.integers(19990, 20070),
                         remote_ip, st.floats(0, 200)), min_size=1, max_size=120)


@SETTINGS
@given(ops=ops, seed=st.integers(0, 1000))
def test_no_external_endpoint_shared_by_two_live_mappings(ops, seed):
    e = NatEngine(CFG, EXT, seed=seed)
    now = 0.0
    for proto, src, sport, dst, dt in ops:
        now += dt
        e.expire(now)
        v = e.process(_packet(proto, src, dst, sport, 53, b""), Side.INTERNAL, now)
        if v.action == Action.ACCEPT:
            assert checksums_ok(v.data)
        maps = e.mappings()
        ext = [(m.proto, m.external_port) for m in maps]
        assert len(ext) == len(set(ext))
        internal = [(m.proto, m.internal_ip, m.internal_port) for m in maps if not m.static]
        assert len(internal) == len(set(internal))
        # every port the pools count as used belongs to exactly one live mapping
        for proto_num, pool in e.mapping_table.pools.items():
            used = set().union(*(r.used for r in (pool.high, pool.low) if r is not None))
            assert used == {m.external_port for m in maps if m.proto == proto_num and not m.static}


def _valid_packets():
    return [
        _packet("tcp", "198.18.0.2", "192.0.2.9", 40000, 80, b"hello"),
        _packet("udp", "198.18.0.2", "192.0.2.9", 5000, 53, b"q"),
        _packet("icmp", "198.18.0.2", "192.0.2.9", 7, 1, b"ping"),
        _packet("tcp", "192.0.2.9", EXT, 3333, 8080, b""),
        raw(IP(src="192.0.2.1", dst=EXT) / ICMP(type=3, code=1) /
            _packet("udp", EXT, "192.0.2.9", 5000, 53, b"q")[:28]),
    ]


@st.composite
def mutated(draw):
    base = bytearray(draw(st.sampled_from(_valid_packets())))
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(base) - 1))
        base[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(base)))
    return bytes(base[:cut]) + draw(st.binary(max_size=8))


@SETTINGS
@given(data=st.lists(st.tuples(st.binary(max_size=80) | mutated(), st.sampled_from(list(Side))), max_size=25))
def test_any_bytes_give_a_verdict(data):
    e = NatEngine(CFG, EXT, seed=1)
    for p in _valid_packets()[:3]:
        e.process(p, Side.INTERNAL, 0.0)
    for i, (blob, side) in enumerate(data):
        v = e.process(blob, side, float(i))
        assert isinstance(v, Answer) and v.sends == ()
        assert v.action in (Action.ACCEPT, Action.DROP)
        assert (v.data is None) == (v.action == Action.DROP)
        if v.data is not None:
            assert ipaddress.ip_address(IP(v.data).src)


@SETTINGS
@given(blob=mutated() | st.binary(min_size=20, max_size=80))
def test_common_packet_agrees_with_parse_ip(blob):
    """What the engine reads itself (a whole option-less IPv4 TCP or UDP packet, past its one
    header check) is exactly the Packet parse_ip reads."""
    from conntrack import ParseError, parse_ip
    from nat.engine import _common

    try:
        slow = parse_ip(blob)
    except ParseError:
        return
    if slow.family != 4 or slow.proto not in (6, 17) or slow.l4 != 20 or slow.fragment is not None:
        return
    assert _common(blob, slow.end, slow.proto) == slow


def test_common_packet_cases_are_generated():
    from conntrack import parse_ip
    from nat.engine import _common

    for p in _valid_packets()[:2] + _valid_packets()[3:4]:
        slow = parse_ip(p)
        assert _common(p, slow.end, slow.proto) == slow


FLOW_CFG = parse_toml('internal = ["198.18.0.0/24"]\n')  # wide pools: the flows keep their ports


class GeneralOnly(NatEngine):
    """The engine with its fast path off: every packet the general way (the reference)."""

    fast_path = False


def _flows():
    """Packets of three flows, set up both ways (TCP established and assured, UDP, UDP without
    checksums), as (packet, side) pairs a sequence is drawn from."""
    vm, peer = "198.18.0.2", "192.0.2.9"
    setup = [(_packet("tcp", vm, peer, 40000, 80, b""), Side.INTERNAL),
             (_packet("tcp", peer, EXT, 80, 40000, b"", reply=True), Side.EXTERNAL),
             (raw(IP(src=vm, dst=peer, id=7, ttl=60) / TCP(sport=40000, dport=80, flags="A", seq=6, ack=10,
                                                           window=100)), Side.INTERNAL),
             (_packet("udp", vm, peer, 5000, 53, b"q"), Side.INTERNAL),
             (_packet("udp", peer, EXT, 53, 5000, b"a", reply=True), Side.EXTERNAL),
             (_packet("udp", vm, peer, 5001, 53, b"q", zero_udp=True), Side.INTERNAL)]
    later = [(raw(IP(src=vm, dst=peer, id=11) / TCP(sport=40000, dport=80, flags="PA", seq=6, ack=10, window=100)
                  / (b"d" * 1200)), Side.INTERNAL),
             (raw(IP(src=peer, dst=EXT, id=12) / TCP(sport=80, dport=40000, flags="A", seq=10, ack=1206,
                                                     window=100)), Side.EXTERNAL),
             (raw(IP(src=peer, dst=EXT, id=13) / TCP(sport=80, dport=40000, flags="FA", seq=10, ack=1206)),
              Side.EXTERNAL),
             (raw(IP(src=vm, dst=peer, id=14) / TCP(sport=40000, dport=80, flags="R", seq=1206)), Side.INTERNAL),
             (_packet("udp", vm, peer, 5000, 53, b"x" * 1500), Side.INTERNAL),
             (_packet("udp", peer, EXT, 53, 5000, b"y" * 40, reply=True), Side.EXTERNAL),
             (_packet("udp", vm, peer, 5001, 53, b"z" * 30, zero_udp=True), Side.INTERNAL),
             (_packet("udp", vm, peer, 5000, 53, b"w"), Side.EXTERNAL)]  # the wrong side
    return setup, later


@st.composite
def flow_sequences(draw):
    """Later packets of the flows: whole, fragmented (every fragment, in order), with IP
    options, mutated or cut, with random bytes in between."""
    from scapy.all import fragment

    _, later = _flows()
    seq = []
    for _ in range(draw(st.integers(1, 12))):
        pkt, side = draw(st.sampled_from(later))
        how = draw(st.sampled_from(["whole", "fragments", "options", "mutated", "random"]))
        if how == "fragments":
            size = draw(st.sampled_from([8, 16, 24, 48, 512]))
            seq.extend((raw(f), side) for f in fragment(IP(pkt), fragsize=size))
        elif how == "options":
            p = IP(pkt)
            p.options = [IPOption(b"\x01\x01\x01\x00")]
            del p.ihl, p.len, p.chksum
            seq.append((raw(p), side))
        elif how == "mutated":
            b = bytearray(pkt)
            for _ in range(draw(st.integers(1, 3))):
                b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
            seq.append((bytes(b[:draw(st.integers(0, len(b)))]), side))
        elif how == "random":
            seq.append((draw(st.binary(max_size=60)), side))
        else:
            seq.append((pkt, side))
    return seq


@SETTINGS
@given(seq=flow_sequences())
def test_fast_path_agrees_with_the_general_path(seq):
    """Any sequence of later packets gets the same answers, and leaves the same state, whether
    the fast path takes what it can or the general path takes everything."""
    fast, general = NatEngine(FLOW_CFG, EXT, seed=4), GeneralOnly(FLOW_CFG, EXT, seed=4)
    setup, _ = _flows()
    for e in (fast, general):
        for pkt, side in setup:
            assert e.process(pkt, side, 0.0).action == Action.ACCEPT
    for i, (pkt, side) in enumerate(seq):
        now = 1.0 + i
        assert fast.process(pkt, side, now) == general.process(pkt, side, now)
    assert fast.status() == general.status() and fast.snapshot(100.0) == general.snapshot(100.0)


def test_general_only_engine_is_the_general_path():
    """The fast path takes an established flow's packet, the reference does not (else the
    property above compares the general path with itself)."""
    setup, later = _flows()
    general_calls = []
    for cls in (NatEngine, GeneralOnly):
        class Spy(cls):
            def _general(self, *args):
                general_calls.append(cls)
                return super()._general(*args)

        e = Spy(FLOW_CFG, EXT, seed=4)
        for pkt, side in setup:
            assert e.process(pkt, side, 0.0).action == Action.ACCEPT
        del general_calls[:]
        for pkt, side in later[:2]:
            assert e.process(pkt, side, 1.0).action == Action.ACCEPT
        assert general_calls == ([] if cls is NatEngine else [GeneralOnly, GeneralOnly])


@SETTINGS
@given(proto=st.sampled_from(["tcp", "udp", "icmp"]), src=internal_ip, dst=remote_ip, sport=port, dport=port,
       data=payload, quote=st.sampled_from([28, 36, 48, 576]), icmp_type=st.sampled_from([(3, 1), (3, 4), (11, 0), (12, 0)]))
def test_icmp_error_quote_is_translated_back(proto, src, dst, sport, dport, data, quote, icmp_type):
    """An error about a translated packet reaches the sender quoting exactly what it sent (RFC 5508)."""
    e = NatEngine(CFG, EXT, seed=3)
    p = _packet(proto, src, dst, sport, dport, data)
    sent = e.process(p, Side.INTERNAL, 1.0).data
    router = "198.51.100.1"
    err = raw(IP(src=router, dst=EXT, id=9) / ICMP(type=icmp_type[0], code=icmp_type[1]) / sent[:quote])
    v = e.process(err, Side.EXTERNAL, 2.0)
    assert v.action == Action.ACCEPT
    expect = raw(IP(src=router, dst=src, id=9) / ICMP(type=icmp_type[0], code=icmp_type[1]) / p[:quote])
    assert v.data == expect
