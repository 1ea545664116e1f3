"""nat.netfilter.queue without a kernel: message encoding/decoding; and the checksum fill
(conntrack.build.fill_l4_checksum) the plugin applies to queued CHECKSUM_PARTIAL packets.

The real netlink path (bind, GSO flag, verdicts) is checked in tests/netns/test_nat_gso.py;
here an AF_UNIX datagram pair stands in for the netlink socket only to see the bytes.
"""
from __future__ import annotations

import socket
import struct

from hypothesis import given, settings, strategies as st
from scapy.all import IP, TCP, UDP, raw

from conntrack.build import fill_l4_checksum
from nat.netfilter import queue as nq
from nat.netfilter.netlink import attr_spans


def _client(sock):
    q = object.__new__(nq.NfQueue)  # no kernel here: skip the netlink bind in __init__
    q.queue, q.gso, q.overruns, q._seq, q.sock, q.batch = 3, True, 0, 0, sock, False
    q._pending, q._pending_len = [], 0
    q._buf = bytearray(nq._RECV_SIZE)
    return q


def _packet_msg(pid, hook, payload, info, indev=2):
    body = struct.pack("!BBH", 0, 0, 3)
    body += nq._attr(nq.NFQA_PACKET_HDR, struct.pack("!IHB", pid, 0x0800, hook))
    body += nq._attr(nq.NFQA_IFINDEX_INDEV, struct.pack("!I", indev))
    body += nq._attr(nq.NFQA_SKB_INFO, struct.pack("!I", info))
    body += nq._attr(nq.NFQA_PAYLOAD, payload)
    return struct.pack("=IHHII", 16 + len(body), nq.MSG_PACKET, 0, 0, 0) + body


def test_receive_decodes_two_packets_in_one_datagram():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        big = bytes(range(256)) * 200 + b"xyz"  # 51203 bytes: beyond NetfilterQueue's 4016
        a.send(_packet_msg(7, 0, big, nq.NFQA_SKB_GSO | nq.NFQA_SKB_CSUMNOTREADY) + _packet_msg(8, 4, b"abcd", 0))
        got = _client(b).receive()
    assert [(p.id, p.hook, p.indev, p.skbinfo) for p in got] == [(7, 0, 2, 3), (8, 4, 2, 0)]
    assert got[0].payload == big and got[1].payload == b"abcd"


@given(st.binary(min_size=0, max_size=3000), st.integers(0, 2**32 - 1), st.booleans())
@settings(max_examples=50, deadline=None)
def test_verdict_encoding(payload, pid, accept):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        _client(a).verdict(pid, nq.NF_ACCEPT if accept else nq.NF_DROP, payload)
        msg = b.recv(70000)
    length, kind, flags, _, _ = struct.unpack_from("=IHHII", msg)
    assert length == len(msg) and length % 4 == 0 and kind == (3 << 8 | 1) and flags & nq.NLM_F_REQUEST
    assert struct.unpack_from("!BBH", msg, 16) == (0, 0, 3)
    attrs = attr_spans(msg, 20, length)
    off, _ = attrs[nq.NFQA_VERDICT_HDR]
    assert struct.unpack_from("!II", msg, off) == (1 if accept else 0, pid)
    off, end = attrs[nq.NFQA_PAYLOAD]
    assert msg[off:end] == payload


def _pseudo_only(pkt, at):
    """The packet as the kernel queues a CHECKSUM_PARTIAL one: field = folded pseudo-header sum."""
    buf = bytearray(raw(pkt))
    ihl = (buf[0] & 15) * 4
    s = sum(struct.unpack("!4H", buf[12:20])) + buf[9] + (len(buf) - ihl)
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", buf, ihl + at, s)
    return buf


@given(st.binary(min_size=0, max_size=2000), st.sampled_from(["tcp", "udp"]))
@settings(max_examples=60, deadline=None)
def test_fill_matches_scapy(data, proto):
    l4 = TCP(sport=40000, dport=80, seq=1, ack=2, flags="PA") if proto == "tcp" else UDP(sport=5353, dport=53)
    pkt = IP(src="198.18.0.2", dst="203.0.113.2") / l4 / data
    want = raw(pkt)  # scapy computes complete checksums
    buf = _pseudo_only(pkt, 16 if proto == "tcp" else 6)
    fill_l4_checksum(buf)
    assert bytes(buf) == want


def test_fill_leaves_other_protocols_and_fragments():
    frag = bytearray(raw(IP(src="198.18.0.2", dst="203.0.113.2", flags="MF") / UDP() / (b"x" * 20)))
    frag[26:28] = b"\x12\x34"
    before = bytes(frag)
    fill_l4_checksum(frag)
    assert bytes(frag) == before


def test_batched_verdicts_go_out_in_one_datagram():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        q = _client(a)
        q.batch = True
        q.verdict(1, nq.NF_ACCEPT)
        q.verdict(2, nq.NF_ACCEPT, b"abcde")
        q.verdict(3, nq.NF_DROP)
        b.setblocking(False)
        try:
            b.recv(100)
            raise AssertionError("a verdict left before flush()")
        except BlockingIOError:
            pass
        q.flush()
        msg = b.recv(70000)
    seen, off = [], 0
    while off < len(msg):
        length = struct.unpack_from("=I", msg, off)[0]
        attrs = attr_spans(msg, off + 20, off + length)
        v, pid = struct.unpack_from("!II", msg, attrs[nq.NFQA_VERDICT_HDR][0])
        p = attrs.get(nq.NFQA_PAYLOAD)
        seen.append((pid, v, msg[p[0]:p[1]] if p else None))
        off += length
    assert seen == [(1, 1, None), (2, 1, b"abcde"), (3, 0, None)]


@given(st.binary(min_size=0, max_size=2000), st.sampled_from(["tcp", "udp"]))
@settings(max_examples=60, deadline=None)
def test_fill_matches_scapy_ipv6(data, proto):
    """NAT66: a CHECKSUM_PARTIAL IPv6 packet (a VM's, over veth) gets a complete checksum too."""
    from scapy.layers.inet6 import IPv6
    l4 = TCP(sport=40000, dport=80, seq=1, ack=2, flags="PA") if proto == "tcp" else UDP(sport=5353, dport=53)
    pkt = IPv6(src="2001:db8:1::2", dst="2001:db8:2::9") / l4 / data
    want = raw(pkt)
    buf = bytearray(want)
    at = 40 + (16 if proto == "tcp" else 6)
    buf[at:at + 2] = b"\x12\x34"  # whatever the field held
    fill_l4_checksum(buf)
    assert bytes(buf) == want
