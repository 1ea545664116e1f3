"""Hypothesis properties of the NAT engine (DESIGN.md: tests/property)."""
from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import ICMP, IP, TCP, UDP, raw

from nat import Action, NatEngine, parse_toml
from nat.engine import Side
from tests.unit.test_nat_support import EXT, checksums_ok

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
        for proto_num, pool in e._pools.items():
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
        assert v.action in (Action.ACCEPT, Action.DROP)
        assert (v.data is None) == (v.action == Action.DROP)
        if v.data is not None:
            assert ipaddress.ip_address(IP(v.data).src)


@SETTINGS
@given(blob=mutated() | st.binary(min_size=20, max_size=80))
def test_fast_parser_agrees_with_parse_ip(blob):
    from conntrack import ParseError, parse_ip
    from nat.fastpath import parse_common

    fast = parse_common(blob)
    if fast is None:
        return
    try:
        slow = parse_ip(blob)
    except ParseError as exc:  # the fast path must not accept what parse_ip rejects
        raise AssertionError(f"fast path accepted a packet parse_ip rejects: {exc}") from None
    assert fast == slow


def test_fast_parser_takes_the_common_packets():
    from nat.fastpath import parse_common

    assert parse_common(_valid_packets()[0]) is not None and parse_common(_valid_packets()[1]) is not None


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
