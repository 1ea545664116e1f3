"""conntrack.packet: headers from raw bytes, built independently with scapy."""
from __future__ import annotations

import ipaddress
import struct

import pytest
from scapy.all import (
    ARP, ICMP, IP, TCP, UDP, Dot1AD, Dot1Q, Ether, ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest,
    ICMPv6ND_NS, ICMPv6PacketTooBig, IPOption_NOP, IPOption_RR, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, fragment, raw,
)

from conntrack import Fragment, ParseError, Proto, Malformed, TcpFlag, parse_frame, parse_ip
from tests.property.strategies import ah_header, link_ext_chain, quote

A4, B4, R4 = "192.0.2.1", "198.51.100.2", "203.0.113.254"
A6, B6, R6 = "2001:db8::1", "2001:db8:1::2", "2001:db8:ff::fe"


def packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def tcp4(**kw) -> bytes:
    return raw(IP(src=A4, dst=B4, **kw) / TCP(sport=40000, dport=80, flags="S", seq=7, ack=0))


# ------------------------------------------------------------------ IPv4
def test_ipv4_tcp_fields():
    b = raw(IP(src=A4, dst=B4) / TCP(sport=40000, dport=80, flags="PA", seq=123456, ack=654321) / b"hello")
    p = parse_ip(b)
    assert (p.family, p.proto, p.src, p.dst) == (4, Proto.TCP, packed(A4), packed(B4))
    assert (p.l3, p.l4, p.end) == (0, 20, len(b))
    assert (p.sport, p.dport, p.seq, p.ack) == (40000, 80, 123456, 654321)
    assert p.tcp_flags == TcpFlag.PSH | TcpFlag.ACK
    assert p.payload_len == 5 and p.length == len(b)
    assert p.fragment is None and p.inner is None and p.has_ports


def test_ipv4_tcp_options_are_skipped():
    b = raw(IP(src=A4, dst=B4) / TCP(sport=1, dport=2, flags="S",
                                     options=[("MSS", 1460), ("WScale", 7), ("SAckOK", b"")]) / b"xy")
    p = parse_ip(b)
    assert p.payload_len == 2 and p.l4 == 20


@pytest.mark.parametrize("options,ihl", [
    ([IPOption_NOP()] * 4, 24),
    ([IPOption_RR(routers=["192.0.2.9", "192.0.2.10"])], 32),
    ([IPOption_RR(routers=["0.0.0.0"] * 9)], 60),  # the largest header IPv4 allows
])
def test_ipv4_options(options, ihl):
    b = raw(IP(src=A4, dst=B4, options=options) / UDP(sport=5353, dport=53) / b"q")
    assert (b[0] & 0x0F) * 4 == ihl  # scapy agrees on the header size
    p = parse_ip(b)
    assert p.l4 == ihl and (p.sport, p.dport) == (5353, 53) and p.payload_len == 1


def test_ipv4_udp_and_icmp_echo():
    u = parse_ip(raw(IP(src=A4, dst=B4) / UDP(sport=1234, dport=53) / b"abc"))
    assert (u.proto, u.sport, u.dport, u.payload_len) == (Proto.UDP, 1234, 53, 3)
    e = parse_ip(raw(IP(src=A4, dst=B4) / ICMP(type=8, id=0x4242, seq=3) / b"ping"))
    assert (e.proto, e.icmp_type, e.icmp_code, e.sport, e.dport) == (Proto.ICMP, 8, 0, 0x4242, 0)
    assert e.is_icmp_query and not e.is_icmp_error and not e.has_ports and e.payload_len == 4
    r = parse_ip(raw(IP(src=B4, dst=A4) / ICMP(type=0, id=0x4242, seq=3)))
    assert r.is_icmp_query and r.icmp_type == 0 and r.sport == 0x4242


def test_first_fragment_has_ports_and_is_flagged():
    whole = IP(src=A4, dst=B4, id=0xBEEF) / UDP(sport=5000, dport=6000) / bytes(400)
    frags = [raw(f) for f in fragment(whole, fragsize=128)]
    assert len(frags) == 4
    first = parse_ip(frags[0])
    assert first.fragment == Fragment(0xBEEF, 0, True) and first.fragment.first
    assert (first.l4, first.sport, first.dport) == (20, 5000, 6000)
    for i, b in enumerate(frags[1:], 1):
        p = parse_ip(b)
        assert p.l4 == -1 and not p.has_ports
        assert p.fragment == Fragment(0xBEEF, 128 * i, i < 3)
        assert (p.src, p.dst, p.proto) == (packed(A4), packed(B4), Proto.UDP)


def test_non_first_fragment_that_looks_like_a_header_is_not_read_as_one():
    # offset 8 bytes, payload bytes that would be a valid TCP header: never parsed as ports
    b = raw(IP(src=A4, dst=B4, proto=6, frag=1, flags="MF") / raw(TCP(sport=1, dport=2)))
    p = parse_ip(b)
    assert p.l4 == -1 and (p.sport, p.dport) == (0, 0) and p.fragment.offset == 8


def test_tiny_first_tcp_fragment_is_rejected_as_bad_fragment():
    # RFC 1858: a first fragment too short to hold the TCP header
    b = raw(IP(src=A4, dst=B4, proto=6, flags="MF") / raw(TCP(sport=1, dport=2))[:8])
    with pytest.raises(ParseError) as e:
        parse_ip(b)
    assert e.value.reason is Malformed.BAD_FRAGMENT


def test_df_flag_alone_is_not_a_fragment():
    assert parse_ip(tcp4(flags="DF")).fragment is None


# ------------------------------------------------------------------ IPv6
def test_ipv6_tcp_udp_icmpv6():
    t = parse_ip(raw(IPv6(src=A6, dst=B6) / TCP(sport=1, dport=22, flags="S")))
    assert (t.family, t.proto, t.l4, t.sport, t.dport) == (6, Proto.TCP, 40, 1, 22)
    assert (t.src, t.dst) == (packed(A6), packed(B6))
    u = parse_ip(raw(IPv6(src=A6, dst=B6) / UDP(sport=546, dport=547) / (b"x" * 3)))
    assert (u.proto, u.payload_len) == (Proto.UDP, 3)
    e = parse_ip(raw(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=77, seq=1)))
    assert (e.proto, e.icmp_type, e.sport) == (Proto.ICMPV6, 128, 77) and e.is_icmp_query
    r = parse_ip(raw(IPv6(src=B6, dst=A6) / ICMPv6EchoReply(id=77, seq=1)))
    assert r.icmp_type == 129 and r.is_icmp_query
    ns = parse_ip(raw(IPv6(src=A6, dst=B6) / ICMPv6ND_NS(tgt=B6)))
    assert ns.icmp_type == 135 and not ns.is_icmp_query and not ns.is_icmp_error


def test_ipv6_extension_header_chain():
    chain = link_ext_chain([IPv6ExtHdrHopByHop(), IPv6ExtHdrRouting(addresses=[R6, B6]),
                            ah_header(), IPv6ExtHdrDestOpt()], upper=6)
    pkt = IPv6(src=A6, dst=B6)
    for h in chain:
        pkt = pkt / h
    b = raw(pkt / TCP(sport=443, dport=50000, flags="SA") / b"data")
    # sizes: 40 + hop-by-hop 8 + routing (8 + 2*16) + AH 24 + dest opts 8
    p = parse_ip(b)
    assert (p.proto, p.l4, p.sport, p.dport, p.payload_len) == (Proto.TCP, 40 + 8 + 40 + 24 + 8, 443, 50000, 4)
    assert p.fragment is None


def test_ipv6_fragment_header_first_and_later():
    first = raw(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(id=0xCAFE, m=1, offset=0)
                / UDP(sport=1, dport=2) / bytes(64))
    p = parse_ip(first)
    assert p.fragment == Fragment(0xCAFE, 0, True) and p.l4 == 56 and (p.sport, p.dport) == (1, 2)
    later = raw(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(id=0xCAFE, m=0, offset=9, nh=17) / bytes(32))
    q = parse_ip(later)
    assert q.fragment == Fragment(0xCAFE, 72, False) and q.l4 == -1 and q.proto == Proto.UDP


def test_ipv6_atomic_fragment_is_a_whole_packet():
    b = raw(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(id=1, m=0, offset=0) / TCP(sport=5, dport=6))
    p = parse_ip(b)
    assert p.fragment is None and p.l4 == 48 and p.sport == 5


def test_ipv6_two_fragment_headers():
    b = raw(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(id=1, m=1) / IPv6ExtHdrFragment(id=2, m=1) / UDP())
    with pytest.raises(ParseError) as e:
        parse_ip(b)
    assert e.value.reason is Malformed.BAD_FRAGMENT


def test_ipv6_extension_header_longer_than_packet():
    b = bytearray(raw(IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt() / UDP(sport=1, dport=2)))
    b[41] = 9  # hdr ext len: 80 bytes, packet has 16 after the fixed header
    with pytest.raises(ParseError) as e:
        parse_ip(bytes(b))
    assert e.value.reason is Malformed.BAD_EXTENSION_HEADER
    assert str(e.value) == "bad_extension_header: extension header 60 of 80 bytes overruns the packet"


def test_ipv6_endless_extension_chain():
    pkt = IPv6(src=A6, dst=B6)
    for _ in range(17):
        pkt = pkt / IPv6ExtHdrDestOpt()
    with pytest.raises(ParseError) as e:
        parse_ip(raw(pkt / UDP()))
    assert e.value.reason is Malformed.BAD_EXTENSION_HEADER


def test_ipv6_no_next_header():
    p = parse_ip(raw(IPv6(src=A6, dst=B6, nh=59)))
    assert p.proto == Proto.NONE and p.l4 == 40 and p.payload_len == 0


# ------------------------------------------------------------------ ICMP errors
def test_icmp_error_with_router_style_quote():
    offending = raw(IP(src=A4, dst=B4, ttl=1) / UDP(sport=33434, dport=33435) / bytes(32))
    b = raw(IP(src=R4, dst=A4) / ICMP(type=11, code=0) / quote(offending))
    p = parse_ip(b)
    assert p.is_icmp_error and (p.icmp_type, p.icmp_code, p.sport) == (11, 0, 0)
    inner = p.inner
    assert (inner.src, inner.dst, inner.proto) == (packed(A4), packed(B4), Proto.UDP)
    assert (inner.sport, inner.dport) == (33434, 33435)
    assert inner.truncated  # the quote stops 32 bytes short of the total length
    assert inner.l3 == 28 and inner.l4 == 48 and inner.end == len(b)


def test_icmp_error_quoting_tcp_header_and_eight_bytes():
    offending = raw(IP(src=A4, dst=B4) / TCP(sport=40000, dport=443, flags="S", seq=0xDEADBEEF))
    p = parse_ip(raw(IP(src=R4, dst=A4) / ICMP(type=3, code=4) / quote(offending)))
    assert (p.inner.sport, p.inner.dport, p.inner.seq, p.inner.tcp_flags) == (40000, 443, 0xDEADBEEF, 0)


def test_icmp_error_with_whole_quote():
    offending = raw(IP(src=A4, dst=B4) / TCP(sport=1, dport=2, flags="SA", ack=99))
    p = parse_ip(raw(IP(src=R4, dst=A4) / ICMP(type=3, code=3) / offending))
    assert not p.inner.truncated and p.inner.tcp_flags == TcpFlag.SYN | TcpFlag.ACK and p.inner.ack == 99


def test_icmp_error_quoting_echo_request():
    offending = raw(IP(src=A4, dst=B4) / ICMP(type=8, id=9, seq=1) / b"abcdefgh")
    p = parse_ip(raw(IP(src=R4, dst=A4) / ICMP(type=3, code=1) / quote(offending)))
    assert p.inner.is_icmp_query and p.inner.sport == 9 and p.inner.icmp_type == 8


def test_icmpv6_errors_quote_packets():
    offending = raw(IPv6(src=A6, dst=B6) / TCP(sport=1000, dport=80) / bytes(1400))
    p = parse_ip(raw(IPv6(src=R6, dst=A6) / ICMPv6PacketTooBig(mtu=1280) / quote(offending)))
    assert (p.icmp_type, p.inner.family, p.inner.sport, p.inner.dport) == (2, 6, 1000, 80)
    q = parse_ip(raw(IPv6(src=R6, dst=A6) / ICMPv6DestUnreach(code=4) / offending[:48]))
    assert q.inner.truncated and q.inner.proto == Proto.TCP


def test_icmp_error_quoting_garbage_is_bad_icmp():
    with pytest.raises(ParseError) as e:
        parse_ip(raw(IP(src=R4, dst=A4) / ICMP(type=3, code=1) / b"\x45\x00\x00"))
    assert e.value.reason is Malformed.BAD_ICMP
    assert str(e.value).startswith("bad_icmp: quoted packet: truncated")


def test_icmpv4_error_quoting_ipv6_is_bad_icmp():
    offending = raw(IPv6(src=A6, dst=B6) / UDP())
    with pytest.raises(ParseError) as e:
        parse_ip(raw(IP(src=R4, dst=A4) / ICMP(type=3, code=1) / offending))
    assert e.value.reason is Malformed.BAD_ICMP


def test_error_quoting_an_error_has_no_inner_of_its_own():
    inner_err = raw(IP(src=B4, dst=A4) / ICMP(type=3, code=3) / quote(tcp4()))
    p = parse_ip(raw(IP(src=R4, dst=B4) / ICMP(type=11) / inner_err))
    assert p.inner.icmp_type == 3 and p.inner.inner is None


# ------------------------------------------------------------------ Ethernet
def test_frame_without_vlan():
    ip = raw(IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / b"pay")
    b = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x0800) / ip)
    f = parse_frame(b)
    assert f.src == bytes.fromhex("020000000001") and f.dst == bytes.fromhex("020000000002")
    assert (f.ethertype, f.vlans, f.l3) == (0x0800, (), 14)
    assert (f.packet.l3, f.packet.l4, f.packet.sport) == (14, 34, 1)


def test_frame_with_one_8021q_tag():
    b = raw(Ether() / Dot1Q(vlan=100, prio=5) / IPv6(src=A6, dst=B6) / TCP(sport=3, dport=4))
    f = parse_frame(b)
    assert (f.ethertype, f.vlans, f.l3, f.packet.family, f.packet.l4) == (0x86DD, (100,), 18, 6, 58)


def test_frame_with_qinq_8021ad():
    b = raw(Ether() / Dot1AD(vlan=200) / Dot1Q(vlan=300) / IP(src=A4, dst=B4) / ICMP(id=5))
    f = parse_frame(b)
    assert (f.vlans, f.l3, f.packet.l3, f.packet.sport) == ((200, 300), 22, 22, 5)


def test_frame_old_qinq_ethertype_9100():
    b = raw(Ether(type=0x9100) / Dot1Q(vlan=7) / IP(src=A4, dst=B4) / UDP())
    f = parse_frame(b)
    assert (f.vlans, f.l3, f.packet.proto) == ((7,), 18, Proto.UDP)


def test_arp_frame_has_no_packet():
    f = parse_frame(raw(Ether() / ARP(psrc=A4, pdst=B4)))
    assert f.ethertype == 0x0806 and f.packet is None and f.l3 == 14


def test_8023_length_field_is_not_ethernet_ii():
    b = raw(Ether(dst="01:80:c2:00:00:00", type=0x0026) / bytes(46))
    with pytest.raises(ParseError) as e:
        parse_frame(b)
    assert e.value.reason is Malformed.BAD_ETHERTYPE
    assert "802.3 length field 0x0026" in str(e.value)  # the user reading a capture is told why


def test_0600_is_the_first_ethertype_not_a_length():
    """IEEE 802.3: a type/length field of 0x0600 or more is an EtherType (here XNS, not IP)."""
    f = parse_frame(raw(Ether(type=0x0600) / bytes(46)))
    assert (f.ethertype, f.packet, f.l3) == (0x0600, None, 14)


def test_too_many_vlan_tags():
    b = raw(Ether() / Dot1Q(type=0x8100) / Dot1Q(type=0x8100) / Dot1Q(type=0x8100) / Dot1Q(type=0x8100)
            / Dot1Q(type=0x0800) / IP() / UDP())
    with pytest.raises(ParseError) as e:
        parse_frame(b)
    assert e.value.reason is Malformed.BAD_VLAN
    assert "more than 4 VLAN tags" in str(e.value)


def test_ethertype_and_ip_version_disagree():
    b = raw(Ether(type=0x86DD)) + raw(IP(src=A4, dst=B4) / UDP())
    with pytest.raises(ParseError) as e:
        parse_frame(b)
    assert e.value.reason is Malformed.BAD_IP_VERSION
    assert "IPv4 under ethertype 0x86dd" in str(e.value)


def test_ethernet_padding_is_not_part_of_the_packet():
    ip = raw(IP(src=A4, dst=B4) / TCP(sport=1, dport=2, flags="A"))  # 40 bytes: frame is padded to 60
    b = raw(Ether(type=0x0800) / ip)
    b = b + bytes(60 - len(b))
    f = parse_frame(b)
    assert len(b) == 60 and f.packet.end == 14 + 40 and f.packet.payload_len == 0


# ------------------------------------------------------------------ readers: whole and with trailing data
SAMPLES = {
    "ipv4-tcp-options": raw(IP(src=A4, dst=B4, options=[IPOption_RR(routers=[R4])])
                            / TCP(sport=1, dport=2, flags="S", options=[("MSS", 1400)])),
    "ipv4-udp": raw(IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / b"payload"),
    "ipv4-icmp-echo": raw(IP(src=A4, dst=B4) / ICMP(id=3) / (b"x" * 10)),
    "ipv4-icmp-error": raw(IP(src=R4, dst=A4) / ICMP(type=3, code=3)
                           / quote(raw(IP(src=A4, dst=B4) / UDP(sport=9, dport=10) / bytes(20)))),
    "ipv6-ext-tcp": raw(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
                        / TCP(sport=1, dport=2, flags="A") / b"hi"),
    "ipv6-udp": raw(IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2) / b"z"),
    "ipv6-frag-udp": raw(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(id=1, m=1) / UDP(sport=1, dport=2) / bytes(16)),
    "ipv6-icmp-error": raw(IPv6(src=R6, dst=A6) / ICMPv6DestUnreach()
                           / quote(raw(IPv6(src=A6, dst=B6) / TCP(sport=5, dport=6)))),
}


@pytest.mark.parametrize("name", SAMPLES)
def test_reader_whole_and_with_trailing_data(name):
    b = SAMPLES[name]
    whole = parse_ip(b)
    assert whole.end == len(b)
    trailing = parse_ip(b + b"\xff" * 17)
    assert trailing == whole  # same fields, same offsets: the tail is ignored
    at_offset = parse_ip(b"\x00" * 5 + b, 5)
    assert (at_offset.l3, at_offset.end, at_offset.sport) == (5, whole.end + 5, whole.sport)


def test_memoryview_and_bytearray_give_the_same_packet():
    b = SAMPLES["ipv6-ext-tcp"]
    assert parse_ip(memoryview(b)) == parse_ip(bytearray(b)) == parse_ip(b)


# ------------------------------------------------------------------ truncation at every offset
def _ip_cut_reason(b: bytes, n: int, base: int = 0) -> tuple[Malformed, str]:
    """The reason (and message start) parse_ip must give for ``b`` cut to ``n`` bytes."""
    have = n - base
    if have <= 0:
        return Malformed.TRUNCATED, "truncated: empty IP packet"
    if b[base] >> 4 == 4:
        ihl = (b[base] & 0x0F) * 4
        if have < 20:
            return Malformed.TRUNCATED, f"truncated: IPv4 header needs 20 bytes, have {have}"
        if have < ihl:
            return Malformed.TRUNCATED, f"truncated: IPv4 header of {ihl} bytes cut short"
        total = struct.unpack_from("!H", b, base + 2)[0]
        return Malformed.BAD_TOTAL_LENGTH, f"bad_total_length: total length {total} exceeds the {have} bytes present"
    if have < 40:
        return Malformed.TRUNCATED, f"truncated: IPv6 header needs 40 bytes, have {have}"
    plen = struct.unpack_from("!H", b, base + 4)[0]
    return Malformed.BAD_TOTAL_LENGTH, f"bad_total_length: payload length {plen} exceeds the {have - 40} bytes present"


@pytest.mark.parametrize("name", SAMPLES)
def test_truncated_packet_every_offset(name):
    b = SAMPLES[name]
    for n in range(len(b)):
        reason, text = _ip_cut_reason(b, n)
        with pytest.raises(ParseError) as e:
            parse_ip(b[:n])
        assert (e.value.reason, str(e.value)) == (reason, text), f"cut at {n}"


FRAMES = {
    "plain": raw(Ether() / IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / b"abc"),
    "dot1q": raw(Ether() / Dot1Q(vlan=5) / IPv6(src=A6, dst=B6) / TCP(sport=1, dport=2)),
    "qinq": raw(Ether() / Dot1AD(vlan=5) / Dot1Q(vlan=6) / IP(src=A4, dst=B4) / ICMP()),
}


@pytest.mark.parametrize("name", FRAMES)
def test_truncated_frame_every_offset(name):
    b = FRAMES[name]
    l3 = parse_frame(b).l3
    for n in range(len(b)):
        with pytest.raises(ParseError) as e:
            parse_frame(b[:n])
        if n < 14:
            expected = (Malformed.TRUNCATED, f"truncated: ethernet header needs 14 bytes, have {n}")
        elif n < l3:
            tag = 14 + (n - 14) // 4 * 4
            expected = (Malformed.TRUNCATED, f"truncated: VLAN tag at {tag} cut short")
        else:
            expected = _ip_cut_reason(b, n, l3)
        assert (e.value.reason, str(e.value)) == expected, f"cut at {n}"
    # and whole, and padded with trailing bytes
    assert parse_frame(b + bytes(30)).packet == parse_frame(b).packet


def _with_length(b: bytes, n: int) -> bytes:
    """``b`` cut to ``n`` bytes with the IP length field made to agree (a consistent short packet)."""
    cut = bytearray(b[:n])
    if cut[0] >> 4 == 4:
        struct.pack_into("!H", cut, 2, n)
    else:
        struct.pack_into("!H", cut, 4, n - 40)
    return bytes(cut)


def test_consistent_short_packets_give_the_layer_reason():
    """Cut inside an upper-layer header with the IP length agreeing: that layer's reason."""
    ext = raw(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=[R6]) / UDP())
    frag = SAMPLES["ipv6-frag-udp"]
    cases = [
        # (sample, cuts from, cuts up to (exclusive), reason for every cut in between)
        (raw(IP(src=A4, dst=B4, options=[IPOption_NOP()] * 4) / TCP(sport=1, dport=2)), 24, 44, Malformed.TRUNCATED),
        (raw(IPv6(src=A6, dst=B6) / TCP(sport=1, dport=2)), 40, 60, Malformed.TRUNCATED),
        (raw(IP(src=A4, dst=B4) / UDP(sport=1, dport=2)), 20, 28, Malformed.TRUNCATED),
        (raw(IP(src=A4, dst=B4) / ICMP(id=1)), 20, 28, Malformed.BAD_ICMP),
        (raw(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=1)), 40, 48, Malformed.BAD_ICMP),
        # an ICMP error up to the quoted ports (the quote needs no more: RFC 792 quotes 8 bytes)
        (SAMPLES["ipv4-icmp-error"], 20, 20 + 8 + 20 + 4, Malformed.BAD_ICMP),
        (SAMPLES["ipv6-icmp-error"], 40, 40 + 8 + 40 + 8, Malformed.BAD_ICMP),
        (ext, 40, 40 + 8 + 24, Malformed.BAD_EXTENSION_HEADER),
        (ext, 40 + 8 + 24, len(ext), Malformed.TRUNCATED),
        (frag, 40, 48, Malformed.BAD_EXTENSION_HEADER),
        (frag, 48, 56, Malformed.BAD_FRAGMENT),  # a first fragment too short for its UDP header
    ]
    for b, lo, hi, reason in cases:
        for n in range(lo, hi):
            with pytest.raises(ParseError) as e:
                parse_ip(_with_length(b, n))
            assert e.value.reason is reason, f"{b.hex()} cut at {n}: {e.value}"
        if reason is not Malformed.BAD_EXTENSION_HEADER:  # (after the chain comes the next layer)
            parse_ip(_with_length(b, hi))  # one byte more and the header is whole


def test_consistent_short_udp_payload_is_bad_udp_length():
    b = raw(IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / b"12345678")
    with pytest.raises(ParseError) as e:
        parse_ip(_with_length(b, 30))
    assert str(e.value) == "bad_udp_length: UDP length 16 with 10 bytes present"


def test_tcp_data_offset_beyond_packet():
    b = bytearray(raw(IP(src=A4, dst=B4) / TCP(sport=1, dport=2)))
    b[32] = 0xF0  # data offset 60 bytes, 20 present
    with pytest.raises(ParseError) as e:
        parse_ip(bytes(b))
    assert str(e.value) == "bad_tcp_offset: data offset 60 with 20 bytes present"
    b[32] = 0x40  # below the minimum
    with pytest.raises(ParseError) as e:
        parse_ip(bytes(b))
    assert e.value.reason is Malformed.BAD_TCP_OFFSET


@pytest.mark.parametrize("mutate,reason", [
    (lambda b: b.__setitem__(0, 0x75), Malformed.BAD_IP_VERSION),
    (lambda b: b.__setitem__(0, 0x44), Malformed.BAD_IHL),
    (lambda b: struct.pack_into("!H", b, 2, 19), Malformed.BAD_TOTAL_LENGTH),
])
def test_bad_ipv4_header_fields(mutate, reason):
    b = bytearray(tcp4())
    mutate(b)
    with pytest.raises(ParseError) as e:
        parse_ip(bytes(b))
    assert e.value.reason is reason


def test_icmpv6_inside_ipv4_is_unsupported():
    b = raw(IP(src=A4, dst=B4, proto=58) / bytes(8))
    with pytest.raises(ParseError) as e:
        parse_ip(b)
    assert e.value.reason is Malformed.UNSUPPORTED_PROTOCOL


def test_parse_error_is_a_value_error_with_reason():
    with pytest.raises(ValueError):
        parse_ip(b"")
    err = ParseError(Malformed.BAD_ICMP, "why")
    assert err.reason is Malformed.BAD_ICMP and err.detail == "why" and str(err) == "bad_icmp: why"
    assert str(ParseError(Malformed.TRUNCATED)) == "truncated"


def test_generic_protocol_has_no_ports_but_a_payload():
    p = parse_ip(raw(IP(src=A4, dst=B4, proto=47) / bytes(12)))  # GRE
    assert (p.proto, p.l4, p.payload_len, p.has_ports) == (Proto.GRE, 20, 12, False)
