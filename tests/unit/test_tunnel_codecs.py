"""Tunnel codecs, replay window, state table and TCP framing, each tested whole and cut."""
from __future__ import annotations

import pytest

from tunnel.crypto import AeadCipher, Key, ReplayWindow, nonce_for, open_message, seal_message
from tunnel.session import TRANSITIONS, SessionEvent, SessionState, SessionStateError, diagram, transition
from tunnel.stream import StreamDecoder, encode
from tunnel.wire import (
    HEADER_LEN, MAX_MACS, Attach, Drop, Flag, Header, MsgType, WireError, build_attach, build_header,
    build_epoch, parse_attach, parse_epoch, parse_header,
)

CIPHER = AeadCipher(Key(bytes(32)))


def test_header_round_trip_and_every_cut_is_truncated():
    h = Header(MsgType.DATA, Flag.FROM_PROXY, 0xDEADBEEF, 12345)
    b = build_header(h)
    assert len(b) == HEADER_LEN and parse_header(b) == h
    for n in range(HEADER_LEN):
        with pytest.raises(WireError) as e:
            parse_header(b[:n])
        assert e.value.reason == Drop.TRUNCATED


@pytest.mark.parametrize("offset,value,reason", [
    (0, 1, Drop.BAD_VERSION), (0, 3, Drop.BAD_VERSION), (1, 0, Drop.BAD_TYPE),  # 1: before per-session keys (1, 99, Drop.BAD_TYPE),
    (2, 0x80, Drop.BAD_FLAGS), (3, 1, Drop.BAD_FLAGS), (8, 0x01, Drop.BAD_FLAGS),
])
def test_header_field_errors(offset, value, reason):
    b = bytearray(build_header(Header(MsgType.DATA, Flag.NONE, 1, 2)))
    b[offset] = value
    with pytest.raises(WireError) as e:
        parse_header(bytes(b))
    assert e.value.reason == reason


def test_attach_round_trip_and_errors():
    a = Attach((b"\x02" + bytes(5), b"\x02" * 6), previous=7, epoch=0x1122334455667788)
    assert parse_attach(build_attach(a)) == a
    b = build_attach(a)
    for bad in (b[:4], b[:-1], b + b"\x00", b[:4] + bytes([MAX_MACS + 1])):
        with pytest.raises(WireError) as e:
            parse_attach(bad)
        assert e.value.reason == Drop.BAD_PAYLOAD
    with pytest.raises(WireError):
        parse_attach(build_attach(Attach((b"\x01" * 6,))))  # multicast


def test_epoch_round_trip_and_errors():
    assert parse_epoch(build_epoch(5)) == 5
    for bad in (build_epoch(5)[:7], build_epoch(5) + b"\x00", build_epoch(0)):
        with pytest.raises(WireError) as e:
            parse_epoch(bad)
        assert e.value.reason == Drop.BAD_PAYLOAD


def test_seal_open_and_nonce_depends_on_direction_session_sequence():
    h = Header(MsgType.DATA, Flag.NONE, 5, 9)
    m = seal_message(CIPHER, h, b"hello")
    assert open_message(CIPHER, m, 100) == (h, b"hello")
    nonces = {nonce_for(Header(MsgType.DATA, f, s, q)) for f in (Flag.NONE, Flag.FROM_PROXY) for s in (1, 2) for q in (1, 2)}
    assert len(nonces) == 8
    assert b"hello" not in m


def test_replay_window():
    w = ReplayWindow(blocks=4)  # window of 192
    assert w.update(1000) and not w.update(1000)
    assert w.update(999) and w.update(1001) and not w.update(999)
    assert w.check(1001 - 191) and not w.check(1001 - 192)  # top is 1001: 192 back is too old
    assert w.update(5000)  # big jump clears the ring
    assert not w.check(1001) and w.check(4999) and not w.check(5000)
    assert w.update(4900) and not w.update(4900)
    assert not w.check(-1) and not w.check(1 << 56)


def test_replay_window_slides_block_by_block():
    w = ReplayWindow(blocks=3)  # window 128
    seen = set()
    for seq in range(0, 1000, 3):
        assert w.update(seq)
        seen.add(seq)
        for back in range(max(0, seq - 127), seq + 1):
            assert w.check(back) == (back not in seen)


def test_state_table_total_and_missing_transitions_are_errors():
    assert transition(SessionState.IDLE, SessionEvent.START) == SessionState.ATTACHING
    assert transition(SessionState.ATTACHED, SessionEvent.ROAMED) == SessionState.ATTACHING
    assert set(TRANSITIONS) == set(SessionState)
    with pytest.raises(SessionStateError):
        transition(SessionState.CLOSED, SessionEvent.PEER_HEARD)
    with pytest.raises(SessionStateError):
        transition(SessionState.IDLE, SessionEvent.KEEPALIVE_TIMER)
    assert "ATTACHED --ROAMED--> ATTACHING" in diagram()


def test_stream_decoder_byte_by_byte_whole_and_trailing():
    msgs = [b"a", b"bb" * 100, bytes(range(256)) * 10]
    stream = b"".join(encode(m) for m in msgs)
    d = StreamDecoder()
    assert d.feed(stream) == msgs and d.pending == 0
    d = StreamDecoder()
    got = []
    for i in range(len(stream)):
        got += d.feed(stream[i:i + 1])
    assert got == msgs
    d = StreamDecoder()
    assert d.feed(stream + b"\x00") == msgs and d.pending == 1


def test_stream_decoder_bad_length_after_good_messages():
    d = StreamDecoder(max_len=100)
    stream = encode(b"ok") + b"\x00\x00" + b"junk"
    assert d.feed(stream) == [b"ok"]
    with pytest.raises(WireError) as e:
        d.feed(b"")
    assert e.value.reason == Drop.BAD_LENGTH
    with pytest.raises(WireError):
        StreamDecoder(max_len=100).feed(b"\x00\x65" + b"x" * 101)


def test_neighbour_binding_reads_what_a_lan_host_states_about_itself():
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr, IPv6
    from scapy.layers.l2 import ARP, Ether

    from tunnel.announce import neighbour_binding

    mac = "02:00:00:00:aa:aa"
    raw_mac = bytes.fromhex("02000000aaaa")
    reply = bytes(Ether(src=mac, dst="02:00:00:00:00:50") / ARP(op=2, hwsrc=mac, psrc="198.18.0.10", pdst="198.18.0.50"))
    assert neighbour_binding(reply) == (bytes([198, 18, 0, 10]), raw_mac)
    request = bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=mac, psrc="198.18.0.10"))
    assert neighbour_binding(request) == (bytes([198, 18, 0, 10]), raw_mac)
    na = bytes(Ether(src=mac) / IPv6(src="fe80::1", dst="ff02::1", hlim=255) / ICMPv6ND_NA(tgt="2001:db8::10")
               / ICMPv6NDOptDstLLAddr(lladdr=mac))
    assert neighbour_binding(na) == (bytes.fromhex("20010db8000000000000000000000010"), raw_mac)
    ns = bytes(Ether(src=mac) / IPv6(src="2001:db8::10", dst="ff02::1:ff00:50", hlim=255) / ICMPv6ND_NS(tgt="2001:db8::50"))
    assert neighbour_binding(ns) == (bytes.fromhex("20010db8000000000000000000000010"), raw_mac)
    # Not about the sender itself, or no neighbour frame at all: nothing learned.
    proxied = bytes(Ether(src=mac) / ARP(op=1, hwsrc="02:00:00:00:00:01", psrc="198.18.0.10"))
    probe = bytes(Ether(src=mac) / ARP(op=1, hwsrc=mac, psrc="0.0.0.0", pdst="198.18.0.10"))
    dad = bytes(Ether(src=mac) / IPv6(src="::", dst="ff02::1:ff00:10", hlim=255) / ICMPv6ND_NS(tgt="2001:db8::10"))
    routed_hlim = bytes(Ether(src=mac) / IPv6(src="fe80::1", dst="ff02::1", hlim=64) / ICMPv6ND_NA(tgt="2001:db8::10"))
    for f in (proxied, probe, dad, routed_hlim, reply[:41], b"", bytes(100)):
        assert neighbour_binding(f) is None
    for n in range(len(reply)):  # every cut: an answer or None, never an exception
        assert neighbour_binding(reply[:n]) in (None, (bytes([198, 18, 0, 10]), raw_mac))
