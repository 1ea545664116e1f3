"""conntrack.build, the one packet builder: byte for byte what an independent builder (scapy)
makes of the same fields, its defaults included, and the checks that go with building."""
from __future__ import annotations

import ipaddress

from scapy.all import ICMP, IP, TCP, UDP, raw

from conntrack import build

A, B = "192.0.2.1", "198.51.100.2"
SA, SB = ipaddress.ip_address(A).packed, ipaddress.ip_address(B).packed


def ip(**kw):
    """scapy's IPv4 header with build's defaults: id 0, TTL 64, DF."""
    return IP(src=A, dst=B, **{"id": 0, "ttl": 64, "flags": "DF", **kw})


def test_defaults_are_id_0_ttl_64_df_no_options():
    assert build.ipv4(SA, SB, 47, b"gre!") == raw(ip(proto=47) / b"gre!")
    assert build.tcp(SA, SB, 1, 2, 3, 4, 0x02) == raw(ip() / TCP(sport=1, dport=2, seq=3, ack=4, flags="S",
                                                                 window=65535))
    assert build.udp(SA, SB, 5, 6) == raw(ip() / UDP(sport=5, dport=6))
    assert build.tcp_segment(SA, SB, 1, 2, 3, 4, 0x10) == raw(ip() / TCP(sport=1, dport=2, seq=3, ack=4, flags="A",
                                                                         window=65535))[20:]
    assert build.udp_datagram(SA, SB, 5, 6) == raw(ip() / UDP(sport=5, dport=6))[20:]


def test_every_field_given_lands_where_scapy_puts_it():
    assert build.tcp(SA, SB, 40000, 443, 0x1_0000_0005, 9, 0x18, b"data", ident=0x1_2345, window=1000, ttl=3) == raw(
        IP(src=A, dst=B, id=0x2345, ttl=3, flags="DF") / TCP(sport=40000, dport=443, seq=5, ack=9, flags="PA",
                                                             window=1000) / b"data")
    assert build.udp(SA, SB, 5, 6, b"x" * 3, ident=0x1234, ttl=9) == raw(
        IP(src=A, dst=B, id=0x1234, ttl=9, flags="DF") / UDP(sport=5, dport=6) / (b"x" * 3))
    no_sum = build.udp(SA, SB, 5, 6, b"q", checksum=False)
    assert no_sum == raw(ip() / UDP(sport=5, dport=6, chksum=0) / b"q") and no_sum[26:28] == b"\0\0"
    assert build.ipv4(SA, SB, 6, b"", ident=7, frag=0, options=b"\x01\x01\x01\x00") == raw(
        IP(src=A, dst=B, id=7, ttl=64, proto=6, options=b"\x01\x01\x01\x00"))


def test_icmp_messages():
    echo = build.icmp(SA, SB, 8, 0, rest=0x0102_0304, body=b"ping")
    assert echo == raw(IP(src=A, dst=B, id=0, ttl=64, flags=0) / ICMP(type=8, code=0, id=0x0102, seq=0x0304) / b"ping")
    assert build.icmp(SA, SB, 3, 4, rest=1400, ident=5, ttl=7) == raw(
        IP(src=A, dst=B, id=5, ttl=7) / ICMP(type=3, code=4, nexthopmtu=1400))
    assert build.icmp_message(11, 0) == raw(ICMP(type=11, code=0))
    # an error's rest-of-header is zero unless given (time exceeded: "unused")
    assert build.icmp(SA, SB, 11, 0, body=b"head") == raw(IP(src=A, dst=B, id=0, ttl=64, flags=0) / ICMP(type=11)
                                                        / b"head")
    assert build.verify(echo)


def test_verify_checks_the_header_and_each_protocols_checksum():
    tcp, udp = build.tcp(SA, SB, 1, 2, 0, 0, 0x02), build.udp(SA, SB, 1, 2, b"abc")
    icmp = build.icmp(SA, SB, 8, 0, body=b"x")
    for good in (tcp, udp, icmp, build.udp(SA, SB, 1, 2, b"abc", checksum=False), build.ipv4(SA, SB, 47, b"\1\2")):
        assert build.verify(good) and build.verify(good + bytes(6))  # link padding is not the packet's
    for pkt, at in ((tcp, 30), (udp, 29), (icmp, 28), (tcp, 8)):  # a payload/header byte changed
        bad = bytearray(pkt)
        bad[at] ^= 0x40
        assert not build.verify(bytes(bad)), at
    # a TCP segment whose bytes at UDP's checksum offset are zero is still checked
    seq0 = bytearray(build.tcp(SA, SB, 1, 2, 0, 0, 0x02))
    seq0[36] ^= 1
    assert seq0[26:28] == b"\0\0" and not build.verify(bytes(seq0))


def test_fill_l4_checksum_completes_tcp_and_udp_and_leaves_the_rest():
    payload = bytes(range(256)) * 2  # over 255 bytes: both bytes of the total length matter
    for pkt, at in ((build.tcp(SA, SB, 1, 2, 3, 4, 0x18, payload), 36), (build.udp(SA, SB, 1, 2, payload), 26)):
        buf = bytearray(pkt)
        buf[at:at + 2] = b"\xde\xad"
        build.fill_l4_checksum(buf)
        assert bytes(buf) == pkt
        padded = bytearray(pkt) + bytes(4)
        padded[at:at + 2] = b"\0\0"
        build.fill_l4_checksum(padded)
        assert bytes(padded) == pkt + bytes(4)
    untouched = [
        bytearray(build.icmp(SA, SB, 8, 0, body=bytes(8))),  # ICMP: no pseudo-header checksum to fill
        bytearray(build.ipv4(SA, SB, 47, bytes(16))),  # another protocol
        bytearray(build.tcp(SA, SB, 1, 2, 3, 4, 0x02))[:19],  # shorter than an IPv4 header
        bytearray(b"\x45" + bytes(7)), bytearray(),
        bytearray(build.tcp(SA, SB, 1, 2, 3, 4, 0x02, bytes(40)))[:60],  # cut short of its total length
        bytearray(build.ipv4(SA, SB, 6, bytes(16))),  # a TCP header cut before its checksum
        bytearray(build.ipv4(SA, SB, 17, bytes(6), frag=0x2000)),  # a first fragment
        bytearray(b"\x60" + bytes(59)),  # IPv6
    ]
    for buf in untouched:
        before = bytes(buf)
        build.fill_l4_checksum(buf)
        assert bytes(buf) == before
