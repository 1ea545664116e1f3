"""conntrack.flow: tuples, packed keys, reversal, ICMP query keys."""
from __future__ import annotations

import pytest
from scapy.all import ICMP, IP, TCP, UDP, ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6ND_NS, IPv6, fragment, raw

from conntrack import FlowTuple, Proto, packet_key, parse_ip
from conntrack.flow import reverse_key

A4, B4 = "192.0.2.1", "198.51.100.2"
A6, B6 = "2001:db8::1", "2001:db8:1::2"


def key_of(b: bytes) -> FlowTuple:
    k = packet_key(parse_ip(b))
    assert k is not None
    return FlowTuple.from_key(k)


def test_make_and_text():
    t = FlowTuple.make(Proto.TCP, A4, B4, 40000, 80)
    assert (t.proto, t.sport, t.dport, t.family, t.src_text, t.dst_text) == (6, 40000, 80, 4, A4, B4)
    assert FlowTuple.make(Proto.UDP, A6, B6, 1, 2).family == 6


def test_key_sizes_and_round_trip():
    t4 = FlowTuple.make(Proto.TCP, A4, B4, 1, 2)
    t6 = FlowTuple.make(Proto.UDP, A6, B6, 65535, 0)
    assert len(t4.key()) == 13 and len(t6.key()) == 37
    assert FlowTuple.from_key(t4.key()) == t4 and FlowTuple.from_key(t6.key()) == t6


def test_tcp_reversal_swaps_addresses_and_ports():
    t = FlowTuple.make(Proto.TCP, A4, B4, 40000, 80)
    assert t.reversed() == FlowTuple.make(Proto.TCP, B4, A4, 80, 40000)
    assert t.reversed().reversed() == t
    assert reverse_key(t.key()) == t.reversed().key()


def test_packet_key_matches_tuple():
    assert key_of(raw(IP(src=A4, dst=B4) / TCP(sport=5, dport=6))) == FlowTuple.make(Proto.TCP, A4, B4, 5, 6)
    assert key_of(raw(IPv6(src=A6, dst=B6) / UDP(sport=7, dport=8))) == FlowTuple.make(Proto.UDP, A6, B6, 7, 8)


def test_a_packet_and_its_reply_have_reversed_keys():
    req = key_of(raw(IP(src=A4, dst=B4) / UDP(sport=5353, dport=53)))
    rep = key_of(raw(IP(src=B4, dst=A4) / UDP(sport=53, dport=5353)))
    assert req.reversed() == rep and rep.reversed() == req


@pytest.mark.parametrize("req_type,rep_type", [(8, 0), (13, 14), (15, 16), (17, 18)])
def test_icmp_query_keyed_by_id_and_type(req_type, rep_type):
    req = key_of(raw(IP(src=A4, dst=B4) / ICMP(type=req_type, id=0x1234, seq=1)))
    rep = key_of(raw(IP(src=B4, dst=A4) / ICMP(type=rep_type, id=0x1234, seq=1)))
    assert req == FlowTuple.make(Proto.ICMP, A4, B4, 0x1234, req_type)
    assert rep == FlowTuple.make(Proto.ICMP, B4, A4, 0x1234, rep_type)
    assert req.reversed() == rep and rep.reversed() == req  # request and reply map onto each other


def test_icmp_sequence_number_does_not_change_the_key():
    a = key_of(raw(IP(src=A4, dst=B4) / ICMP(type=8, id=9, seq=1)))
    b = key_of(raw(IP(src=A4, dst=B4) / ICMP(type=8, id=9, seq=2)))
    c = key_of(raw(IP(src=A4, dst=B4) / ICMP(type=8, id=10, seq=1)))
    assert a == b and a != c


def test_icmpv6_echo_keys():
    req = key_of(raw(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=42)))
    rep = key_of(raw(IPv6(src=B6, dst=A6) / ICMPv6EchoReply(id=42)))
    assert req == FlowTuple.make(Proto.ICMPV6, A6, B6, 42, 128)
    assert req.reversed() == rep and rep.reversed() == req


def test_non_query_icmp_has_no_key():
    assert packet_key(parse_ip(raw(IPv6(src=A6, dst=B6) / ICMPv6ND_NS(tgt=B6)))) is None
    assert packet_key(parse_ip(raw(IP(src=A4, dst=B4) / ICMP(type=9)))) is None  # router advertisement
    err = raw(IP(src=B4, dst=A4) / ICMP(type=3, code=3) / raw(IP(src=A4, dst=B4) / UDP())[:28])
    assert packet_key(parse_ip(err)) is None  # errors are RELATED, never a flow of their own


def test_non_first_fragment_has_no_key_and_generic_protocol_has_portless_key():
    frags = fragment(IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / bytes(300), fragsize=128)
    assert packet_key(parse_ip(raw(frags[0]))) == FlowTuple.make(Proto.UDP, A4, B4, 1, 2).key()
    assert packet_key(parse_ip(raw(frags[1]))) is None
    gre = key_of(raw(IP(src=A4, dst=B4, proto=47) / bytes(8)))
    assert gre == FlowTuple.make(Proto.GRE, A4, B4, 0, 0)
    assert gre.reversed() == FlowTuple.make(Proto.GRE, B4, A4, 0, 0)


def test_unpaired_icmp_type_reverses_to_itself_and_stays_an_involution():
    t = FlowTuple.make(Proto.ICMP, A4, B4, 3, 200)
    assert t.reversed() == FlowTuple.make(Proto.ICMP, B4, A4, 3, 200)
    assert t.reversed().reversed() == t


def test_fast_reversal_of_unpaired_icmp_types_agrees():
    """``reverse_key`` (the table's, on packed keys) reverses as ``FlowTuple.reversed`` does."""
    for t in (FlowTuple.make(Proto.ICMP, A4, B4, 3, 200), FlowTuple.make(Proto.ICMPV6, A6, B6, 3, 200)):
        assert reverse_key(t.key()) == t.reversed().key() == FlowTuple(t.proto, t.dst, t.src, 3, 200).key()


def test_portless_tuple_by_default():
    """A generic protocol's tuple has no ports: ``make`` without them gives zeros, as its key does."""
    assert FlowTuple.make(Proto.GRE, A4, B4) == FlowTuple.make(Proto.GRE, A4, B4, 0, 0)


def test_tuples_are_frozen_values():
    t = FlowTuple.make(Proto.TCP, A4, B4, 1, 2)
    with pytest.raises(AttributeError):
        t.sport = 3  # type: ignore[misc]
    assert {t, FlowTuple.make(Proto.TCP, A4, B4, 1, 2)} == {t}
