"""Hypothesis properties of NAT66 (the engine's IPv6 half), as test_nat_properties.py's for IPv4."""
from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from scapy.all import TCP, UDP, raw
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6

from conntrack.answer import Action, Answer
from nat import NatEngine, Side, parse_toml
from tests.unit.nat_support import EXT, EXT6, checksums_ok6

from .strategies import mutated
from .test_nat_properties import SETTINGS

CFG = parse_toml('internal = ["198.18.0.0/24"]\nnat66 = true\ninternal6 = ["2001:db8:1::/64"]\n'
                 '[ports]\nrange = "20000-20063"\nlow_range = "900-915"\n'
                 '[[inbound]]\nproto = "tcp"\nport = 8080\nto = "[2001:db8:1::2]:80"\n')

internal_ip = st.integers(2, 2 ** 64 - 1).map(lambda i: str(ipaddress.IPv6Address((0x20010DB8_0001 << 80) | i)))
remote_ip = st.sampled_from(["2001:db8:2::9", "2001:db8:2::10", "2001:db8:abcd::7"])
port = st.integers(1, 65535)
payload = st.binary(max_size=40)


def _packet(proto, src, dst, sport, dport, data, reply=False):
    ip = IPv6(src=src, dst=dst, hlim=60)
    if proto == "tcp":
        return raw(ip / TCP(sport=sport, dport=dport, flags="SA" if reply else "S", seq=5, ack=9 if reply else 0,
                            window=100) / data)
    if proto == "udp":
        return raw(ip / UDP(sport=sport, dport=dport) / data)
    echo = ICMPv6EchoReply if reply else ICMPv6EchoRequest
    return raw(ip / echo(id=sport, seq=dport & 0xFFFF, data=data))


@SETTINGS
@given(proto=st.sampled_from(["tcp", "udp", "icmp"]), src=internal_ip, dst=remote_ip, sport=port, dport=port,
       data=payload, seed=st.integers(0, 1000))
def test_translate_then_reverse_is_identity(proto, src, dst, sport, dport, data, seed):
    e = NatEngine(CFG, EXT, seed=seed, external_ip6=EXT6)
    p = _packet(proto, src, dst, sport, dport, data)
    v = e.process(p, Side.INTERNAL, 1.0)
    assert v.action == Action.ACCEPT
    t = IPv6(v.data)
    assert t.src == EXT6 and t.dst == dst and checksums_ok6(v.data)
    if proto == "icmp":
        eport = t[ICMPv6EchoRequest].id
        answer = _packet(proto, dst, EXT6, eport, dport, data, reply=True)
        expect = _packet(proto, dst, src, sport, dport, data, reply=True)
    else:
        eport = t[TCP].sport if proto == "tcp" else t[UDP].sport
        answer = _packet(proto, dst, EXT6, dport, eport, data, reply=True)
        expect = _packet(proto, dst, src, dport, sport, data, reply=True)
    r = e.process(answer, Side.EXTERNAL, 2.0)
    assert r.action == Action.ACCEPT and r.data == expect
    # an error about the translated packet comes back as an error about the original one
    err = e.process(raw(IPv6(src=dst, dst=EXT6) / ICMPv6DestUnreach(code=1) / v.data), Side.EXTERNAL, 3.0)
    assert err.action == Action.ACCEPT and checksums_ok6(err.data)
    assert err.data[48:] == p and IPv6(err.data).dst == src


def _valid_packets():
    return [
        _packet("tcp", "2001:db8:1::2", "2001:db8:2::9", 40000, 80, b"hello"),
        _packet("udp", "2001:db8:1::2", "2001:db8:2::9", 5000, 53, b"q"),
        _packet("icmp", "2001:db8:1::2", "2001:db8:2::9", 7, 1, b"ping"),
        _packet("tcp", "2001:db8:2::9", EXT6, 3333, 8080, b""),
        raw(IPv6(src="2001:db8:2::1", dst=EXT6) / ICMPv6DestUnreach(code=1) /
            _packet("udp", EXT6, "2001:db8:2::9", 5000, 53, b"q")[:48]),
    ]


@SETTINGS
@given(data=st.lists(st.tuples(mutated(st.sampled_from(_valid_packets())) | st.binary(max_size=80).map(lambda b: b"\x60" + b),
                               st.sampled_from(list(Side))), max_size=25))
def test_any_bytes_give_a_verdict(data):
    e = NatEngine(CFG, EXT, seed=1, external_ip6=EXT6)
    for p in _valid_packets()[:3]:
        e.process(p, Side.INTERNAL, 0.0)
    for i, (blob, side) in enumerate(data):
        v = e.process(blob, side, float(i))
        assert isinstance(v, Answer) and v.sends == ()
        assert (v.data is None) == (v.action == Action.DROP)


ops = st.lists(st.tuples(st.sampled_from(["tcp", "udp", "icmp"]), st.booleans(), st.integers(2, 40),
                         st.integers(895, 925) | st.integers(19990, 20070), st.floats(0, 200)), min_size=1, max_size=80)


@SETTINGS
@given(ops=ops, seed=st.integers(0, 1000))
def test_each_familys_pools_hold_exactly_its_live_mappings(ops, seed):
    """NAT44 and NAT66 side by side, flows opening and expiring: no external endpoint is shared
    within a family, each family's pools count exactly its own live dynamic mappings, and a
    mapping no flow uses is gone."""
    from scapy.all import ICMP, IP
    from tests.unit.nat_support import checksums_ok
    e = NatEngine(CFG, EXT, seed=seed, external_ip6=EXT6)
    now = 0.0
    for proto, v6, host, sport, dt in ops:
        now += dt
        e.expire(now)
        if v6:
            p = _packet(proto, f"2001:db8:1::{host:x}", "2001:db8:2::9", sport, 53, b"")
        else:
            ip = IP(src=f"198.18.0.{host}", dst="192.0.2.9")
            p = raw(ip / (TCP(sport=sport, dport=53, flags="S") if proto == "tcp" else
                          UDP(sport=sport, dport=53) if proto == "udp" else ICMP(type=8, id=sport)))
        v = e.process(p, Side.INTERNAL, now)
        if v.action == Action.ACCEPT:
            assert checksums_ok6(v.data) if v6 else checksums_ok(v.data)
        for table in (e.mapping_table, e.mapping_table6):
            maps = table.mappings()
            ext = [(m.proto, m.external_port) for m in maps]
            assert len(ext) == len(set(ext))
            assert all(len(m.external_ip) == (4 if table is e.mapping_table else 16) for m in maps)
            # a dynamic mapping lives exactly while a flow uses it (freed into its own family's table)
            assert all(en.conns > 0 for en in table.by_external.values() if not en.mapping.static)
            for proto_num, pool in table.pools.items():
                used = set().union(*(r.used for r in (pool.high, pool.low) if r is not None))
                assert used == {m.external_port for m in maps if m.proto == proto_num and not m.static}
