"""The simulator's packets: built by conntrack.build as the simulated stacks build them, parsed by conntrack,
verified independently by scapy; and sim.wire's text <-> bytes helpers."""
from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP

from conntrack import Proto, TcpFlag, build, parse_frame, parse_ip
from sim import wire

A, B = wire.addr("198.18.0.10"), wire.addr("198.51.100.10")
ACK, PSH, SYN = TcpFlag.ACK, TcpFlag.PSH, TcpFlag.SYN


@pytest.mark.parametrize("length", [0, 1, 99, 1400])
def test_tcp_segment_parses_and_checksums_verify_in_scapy(length):
    data = build.tcp(A, B, 40000, 443, 0xFFFFFFF0, 77, ACK | PSH, wire.zeros(length), ident=5)
    p = parse_ip(data)
    assert (p.proto, p.src, p.dst, p.sport, p.dport) == (Proto.TCP, A, B, 40000, 443)
    assert (p.seq, p.ack, p.tcp_flags, p.payload_len) == (0xFFFFFFF0, 77, ACK | PSH, length)
    assert build.verify(data)
    s = IP(data)
    ip_sum, tcp_sum = s[IP].chksum, s[TCP].chksum
    del s[IP].chksum, s[TCP].chksum
    again = IP(bytes(s))
    assert (again[IP].chksum, again[TCP].chksum) == (ip_sum, tcp_sum)


def test_udp_datagram_with_payload_parses_and_verifies():
    data = build.udp(A, B, 5353, 53, b"Hello")
    p = parse_ip(data)
    assert (p.proto, p.sport, p.dport, p.payload_len) == (Proto.UDP, 5353, 53, 5)
    assert bytes(data[p.l4 + 8:p.end]) == b"Hello"
    s = IP(data)
    udp_sum = s[UDP].chksum
    del s[UDP].chksum
    assert IP(bytes(s))[UDP].chksum == udp_sum


def test_a_flipped_bit_fails_verification():
    data = bytearray(build.tcp(A, B, 1, 2, 3, 4, SYN))
    data[-1] ^= 1
    assert not build.verify(bytes(data))


def test_ether_frame_and_mac_round_trip():
    m = wire.mac("02:00:00:00:00:01")
    assert wire.mac_text(m) == "02:00:00:00:00:01"
    f = parse_frame(build.ether(b"\xff" * 6, m, build.udp(A, B, 1, 2, bytes(3))))
    assert f.src == m and f.packet.proto == Proto.UDP
    with pytest.raises(ValueError):
        wire.mac("02:00")


def test_zero_payloads_stop_at_the_mss_and_addresses_round_trip():
    assert wire.zeros(5) == bytes(5) and len(wire.zeros(wire.MSS + 10)) == wire.MSS
    assert wire.text(wire.addr("203.0.113.7")) == "203.0.113.7"
