"""Fast by default: offload negotiated in ATTACH/EPOCH, and UDP segments (cut, reassembled, bounded).

The ends are wired in memory as the drivers wire them: a message longer than the end's
``segment_size`` is a buffer of segments laid end to end (what one UDP GSO send makes),
and each segment reaches the other end as a datagram of its own.
"""
from __future__ import annotations

import itertools
import struct

import pytest

from conntrack import build
from conntrack.answer import Action, Answer
from tests.unit.test_tunnel_playbook import A, C, EP, K, M, PEER, VM, Expect, frame, host, play, proxy
from tunnel import AeadCipher, Cause, Drop, EventKind, HostEnd, ProxyEnd, SessionState, proves_peer
from tunnel.crypto import Key
from tunnel.segment import (
    MAX_PENDING, MIN_SEGMENT_SIZE, REORDER_SPAN, SEGMENT_HEAD, Budget, Reassembly, datagrams, run, split,
)
from tunnel.vnet import NO_OFFLOAD, strip
from tunnel.wire import HEADER_LEN, Flag, MsgType, WireError, parse_header
from conntrack.checksum import fold, pseudo_sum
from conntrack.errors import LocalProtocolError

CIPHER = AeadCipher(Key(bytes(range(32))))
SEG = 1472
BIG = 60000


def rng():
    c = itertools.count(1)
    return lambda n: b"".join((next(c) * 0x0102030405060708).to_bytes(8, "big") for _ in range(-(-n // 8)))[-n:]


def gso_frame(dst: bytes, src: bytes, size: int) -> bytes:
    """A TCPv4 GSO super-frame as an offloading TAP hands it over: virtio-net header, then the frame."""
    vnet = bytes([1, 1]) + (54).to_bytes(2, "little") + (1448).to_bytes(2, "little") + (34).to_bytes(2, "little") \
        + (16).to_bytes(2, "little")
    return vnet + frame(dst, src, bytes(i & 0xFF for i in range(size)))


def attached(host_offload=True, proxy_offload=True, seg=SEG):
    h = HostEnd(CIPHER, [VM], offload=host_offload, max_frame=65000, segment_size=seg, random_bytes=rng())
    p = ProxyEnd(CIPHER, offload=proxy_offload, max_frame=65000, segment_size=seg, random_bytes=rng())
    msgs = [m for _, m in h.start(0.0).sends]
    events = []
    for _ in range(3):
        back = []
        for m in msgs:
            a = p.receive(m, EP, 0.0)
            events += a.events
            back += [m for _, m in a.sends]
        msgs = []
        for m in back:
            a = h.receive(m, 0.0)
            events += a.events
            msgs += [m for _, m in a.sends]
    assert h.state == SessionState.ATTACHED
    return h, p, events


def deliver_to_proxy(p, buf, drop=()):
    answers = [p.receive(bytes(d), EP, 1.0) for i, d in enumerate(datagrams(buf, SEG)) if i not in drop]
    return answers


def deliver_to_host(h, buf, drop=()):
    return [h.receive(bytes(d), 1.0) for i, d in enumerate(datagrams(buf, SEG)) if i not in drop]


# -- negotiation ------------------------------------------------------------------------------------


def test_both_capable_negotiate_offload_in_the_handshake_and_super_frames_cross_whole():
    h, p, events = attached()
    s = p.sessions[h.session]
    assert h.session_offload and s.offload and h.tap_offload and p.tap_offload
    assert [e.detail for e in events if e.kind == EventKind.OFFLOAD] == ["on", "on"]  # proxy's, host's
    assert h.status(1.0)["offload"] is True and p.status(1.0)["sessions"][0]["offload"] is True
    big = gso_frame(PEER, VM, BIG)
    out = h.send_frame(big, 1.0)
    assert out.action == Action.ACCEPT and len(out.data) > SEG
    answers = deliver_to_proxy(p, out.data)
    assert [a[:2] for a in answers[:-1]] == [(Action.CONSUME, Cause.SEGMENT)] * (len(answers) - 1)
    assert answers[-1].data == big  # header and super-frame carried whole, opened once
    back = p.from_lan(gso_frame(VM, PEER, BIG), 1.0)
    ((_, buf),) = back.sends
    assert deliver_to_host(h, buf)[-1].data == gso_frame(VM, PEER, BIG)


def test_negotiation_playbook_both_capable():
    h = HostEnd(CIPHER, [VM], offload=True, random_bytes=rng())
    p = ProxyEnd(CIPHER, offload=True, random_bytes=rng())
    book = [
        (host("start"),                 Expect(C, Cause.START, sends=(("proxy", M.ATTACH),), events=(K.ATTACHING,))),
        (proxy("receive", "LAST", EP),  Expect(C, Cause.CHALLENGE, sends=((EP, M.EPOCH),))),
        (host("receive", "LAST"),       Expect(C, Cause.CONTROL, sends=(("proxy", M.ATTACH),), events=(K.OFFLOAD,))),
        (proxy("receive", "LAST", EP),  Expect(C, Cause.CONTROL, sends=((EP, M.ATTACH_ACK),),
                                               events=(K.SESSION_OPENED, K.OFFLOAD, K.MAC_MOVED))),
        (host("receive", "LAST"),       Expect(C, Cause.CONTROL, events=(K.ATTACHED,))),
        (host("send_frame", NO_OFFLOAD + frame(PEER, VM)), Expect(A, Cause.DATA, M.DATA)),
        (proxy("receive", "LAST", EP),  Expect(A, Cause.DATA, NO_OFFLOAD + frame(PEER, VM))),  # header kept
    ]
    flags = _play_with_flags(h, p, book)
    assert flags == [Flag.OFFLOAD, Flag.OFFLOAD | Flag.FROM_PROXY, Flag.OFFLOAD, Flag.OFFLOAD | Flag.FROM_PROXY,
                     Flag.OFFLOAD]


@pytest.mark.parametrize("host_can,proxy_can", [(True, False), (False, True), (False, False)])
def test_negotiation_playbook_one_end_cannot_and_frames_are_plain_on_the_wire(host_can, proxy_can):
    h = HostEnd(CIPHER, [VM], offload=host_can, random_bytes=rng())
    p = ProxyEnd(CIPHER, offload=proxy_can, random_bytes=rng())
    hv = NO_OFFLOAD if host_can else b""
    pv = NO_OFFLOAD if proxy_can else b""
    book = [
        (host("start"),                 Expect(C, Cause.START, sends=(("proxy", M.ATTACH),), events=(K.ATTACHING,))),
        (proxy("receive", "LAST", EP),  Expect(C, Cause.CHALLENGE, sends=((EP, M.EPOCH),))),
        (host("receive", "LAST"),       Expect(C, Cause.CONTROL, sends=(("proxy", M.ATTACH),),
                                               events=(K.OFFLOAD,) if host_can else ())),
        (proxy("receive", "LAST", EP),  Expect(C, Cause.CONTROL, sends=((EP, M.ATTACH_ACK),),
                                               events=(K.SESSION_OPENED,) + ((K.OFFLOAD,) if proxy_can else ())
                                               + (K.MAC_MOVED,))),
        (host("receive", "LAST"),       Expect(C, Cause.CONTROL, events=(K.ATTACHED,))),
        (host("send_frame", hv + frame(PEER, VM)), Expect(A, Cause.DATA, M.DATA)),
        (proxy("receive", "LAST", EP),  Expect(A, Cause.DATA, pv + frame(PEER, VM))),
        (proxy("from_lan", pv + frame(VM, PEER)), Expect(A, Cause.DATA, sends=((EP, M.DATA),))),
        (host("receive", "LAST"),       Expect(A, Cause.DATA, hv + frame(VM, PEER))),
    ]
    flags = _play_with_flags(h, p, book)
    hello_flag = Flag.OFFLOAD if host_can else Flag.NONE
    assert flags[0] == hello_flag and all(not f & Flag.OFFLOAD for f in flags[1:])  # nothing after says offload
    assert not h.session_offload and not p.sessions[h.session].offload
    assert not h.tap_offload and not p.tap_offload  # the kernel segments before the TAPs
    assert h.status(0.0)["offload"] is False and h.status(0.0)["offload_capable"] is host_can


def _play_with_flags(h, p, book):
    """Run a playbook (``"LAST"`` as the playbook's LAST); the flags of every message sent, in order."""
    from tests.unit import test_tunnel_playbook as pb
    sent = []
    wrapped = []
    for step, expect in book:
        wrapped.append((step._replace(args=tuple(pb.LAST if a == "LAST" else a for a in step.args)), expect))
    for end in (h, p):
        for name in ("start", "receive", "send_frame", "from_lan"):
            if hasattr(end, name):
                orig = getattr(end, name)

                def spy(*args, _orig=orig, _end=end):
                    a = _orig(*args)
                    for to, m in a.sends:
                        if to != "lan":
                            sent.append(parse_header(m).flags)
                    if a.data is not None and _end is h and _orig.__name__ == "send_frame":
                        sent.append(parse_header(a.data).flags)
                    return a
                setattr(end, name, spy)
    assert play(h, p, wrapped) == [e for _, e in wrapped]
    return [f & ~Flag.PLAINTEXT for f in sent]


def test_a_session_without_offload_completes_partial_checksums_and_drops_gso_frames_counted():
    h, p, _ = attached(host_offload=True, proxy_offload=False)
    assert not h.session_offload
    udp = build.udp(bytes([198, 18, 0, 50]), bytes([198, 18, 0, 1]), 4000, 53, b"hello, partial checksum")
    good = build.ether(PEER, VM, udp)
    partial = bytearray(good)
    l4 = 14 + 20
    psum = fold(pseudo_sum(bytes(good[26:30]), bytes(good[30:34]), 17, len(good) - l4))  # what the kernel leaves
    struct.pack_into("!H", partial, l4 + 6, psum)
    vnet = bytes([1, 0, 0, 0, 0, 0]) + l4.to_bytes(2, "little") + (6).to_bytes(2, "little")
    assert strip(vnet + bytes(partial)) == good
    out = h.send_frame(vnet + bytes(partial), 1.0)
    assert p.receive(out.data, EP, 1.0).data == good  # the proxy (no offload) gets the finished frame
    assert h.send_frame(gso_frame(PEER, VM, 3000), 1.0) == Answer(Action.DROP, Drop.NEEDS_OFFLOAD)
    assert h.drops[Drop.NEEDS_OFFLOAD] == 1
    # and at a capable proxy, a LAN super-frame for a session without offload: dropped, counted
    h2, p2, _ = attached(host_offload=False, proxy_offload=True)
    assert p2.from_lan(gso_frame(VM, PEER, 3000), 1.0) == Answer(Action.DROP, Drop.NEEDS_OFFLOAD)
    assert p2.drops[Drop.NEEDS_OFFLOAD] == 1 and not p2.tap_offload


# -- segments ---------------------------------------------------------------------------------------


def test_split_lays_segments_end_to_end_each_fitting_and_they_reassemble():
    message = bytes(HEADER_LEN) + bytes(i & 0xFF for i in range(BIG))
    buf = split(message, SEG)
    ds = datagrams(buf, SEG)
    assert all(len(d) == SEG for d in ds[:-1]) and 0 < len(ds[-1]) <= SEG
    assert len(ds) == -(-(len(message) - HEADER_LEN) // (SEG - SEGMENT_HEAD))
    assert all(d[1] == MsgType.SEGMENT and d[HEADER_LEN + 1] == len(ds) for d in ds)
    r = Reassembly(Budget(1 << 20), 70000)
    got = [r.add(d, 7) for d in reversed(ds)]  # any order
    assert got[:-1] == [None] * (len(ds) - 1) and got[-1] == message[HEADER_LEN:]
    assert r.held == 0 and not r.pending and r.budget.left == 1 << 20
    small = Reassembly(Budget(1 << 20), 1600)  # a plain end's largest message, cut at the smallest size
    pieces = datagrams(split(bytes(HEADER_LEN) + bytes(1600 - HEADER_LEN), MIN_SEGMENT_SIZE), MIN_SEGMENT_SIZE)
    assert [small.add(d, 1) for d in pieces][-1] == bytes(1600 - HEADER_LEN)
    too_many = bytearray(pieces[0])
    too_many[HEADER_LEN + 1] = 5  # 5 segments of at least 530 bytes: more than 1600 bytes
    with pytest.raises(WireError) as e:
        small.add(bytes(too_many), 2)
    assert e.value.reason == Drop.OVERSIZED and not small.pending
    with pytest.raises(LocalProtocolError):
        split(message, MIN_SEGMENT_SIZE - 1)
    with pytest.raises(LocalProtocolError):
        split(bytes(HEADER_LEN + 256 * (MIN_SEGMENT_SIZE - SEGMENT_HEAD)), MIN_SEGMENT_SIZE)  # 256 segments


def test_a_lost_segment_loses_its_super_frame_counted_and_the_next_ones_go_on():
    h, p, _ = attached()
    lost = h.send_frame(gso_frame(PEER, VM, BIG), 1.0).data
    assert all(a.reason == Cause.SEGMENT for a in deliver_to_proxy(p, lost, drop={3}))
    delivered = []
    for i in range(REORDER_SPAN + 2):
        f = gso_frame(PEER, VM, BIG - i)
        delivered.append(deliver_to_proxy(p, h.send_frame(f, 1.0).data)[-1].data == f)
    assert all(delivered)
    st = p.status(1.0)
    assert st["superframes_lost"] == 1 and st["sessions"][0]["counters"]["rx_frames"] == REORDER_SPAN + 2
    assert not p.sessions[h.session].reassembly.pending and p._budget.left == 16 << 20  # every byte given back


def test_forged_tampered_and_replayed_segments_change_nothing():
    h, p, _ = attached()
    f = gso_frame(PEER, VM, BIG)
    buf = h.send_frame(f, 1.0).data
    ds = [bytes(d) for d in datagrams(buf, SEG)]
    held = p.receive(ds[0], EP, 1.0)
    assert held == Answer(Action.CONSUME, Cause.SEGMENT) and not proves_peer(held)  # proves nothing yet
    assert p.receive(ds[0], EP, 1.0) == Answer(Action.DROP, Drop.REPLAYED)  # the same segment again
    bad_count = bytearray(ds[1])
    bad_count[HEADER_LEN + 1] = 2
    assert p.receive(bytes(bad_count), EP, 1.0) == Answer(Action.DROP, Drop.BAD_PAYLOAD)
    bad_index = bytearray(ds[1])
    bad_index[HEADER_LEN] = 200
    assert p.receive(bytes(bad_index), EP, 1.0) == Answer(Action.DROP, Drop.BAD_PAYLOAD)
    flipped = bytearray(ds[1])
    flipped[2] ^= int(Flag.OFFLOAD)
    assert p.receive(bytes(flipped), EP, 1.0) == Answer(Action.DROP, Drop.MODE_MISMATCH)
    tampered = bytearray(ds[1])
    tampered[-1] ^= 1
    answers = [p.receive(tampered if i == 1 else d, EP, 1.0) for i, d in enumerate(ds) if i]
    assert answers[-1] == Answer(Action.DROP, Drop.AUTH_FAILED)  # whole, then found forged: nothing carried
    window_top = p.sessions[h.session].window.top
    # The genuine segments once more: the sequence number was never recorded, so the message now opens...
    answers = [p.receive(d, EP, 1.0) for d in ds]
    assert answers[-1].data == f and p.sessions[h.session].window.top > window_top
    # ...and only once: replayed whole afterwards, every segment is a REPLAYED drop, nothing held.
    assert {p.receive(d, EP, 1.0) for d in ds} == {Answer(Action.DROP, Drop.REPLAYED)}
    assert not p.sessions[h.session].reassembly.pending
    # Segments of another session or from the LAN's side of nowhere: unknown, no state made
    other = bytearray(ds[0])
    other[4:8] = (h.session ^ 1).to_bytes(4, "big")
    assert p.receive(bytes(other), EP, 1.0).reason == Drop.UNKNOWN_SESSION


def test_forged_segments_cannot_exhaust_reassembly():
    h, p, _ = attached()
    s = p.sessions[h.session]
    seg = bytearray(split(bytes(HEADER_LEN) + bytes(3000), SEG)[:SEG])
    seg[:HEADER_LEN] = struct.pack("!BBBBIQ", 2, MsgType.SEGMENT, int(Flag.OFFLOAD), 0, h.session, 0)
    for seq in range(10, 10 + 50 * MAX_PENDING):  # fresh sequence numbers, never completed
        struct.pack_into("!Q", seg, 8, seq)
        assert p.receive(bytes(seg), EP, 1.0) == Answer(Action.CONSUME, Cause.SEGMENT)
        assert len(s.reassembly.pending) <= MAX_PENDING
    assert s.reassembly.held <= MAX_PENDING * p.max_message
    # the forgeries took slots, never the session: a genuine super-frame still crosses
    f = gso_frame(PEER, VM, BIG)
    h._seq = 10 + 50 * MAX_PENDING
    assert deliver_to_proxy(p, h.send_frame(f, 1.0).data)[-1].data == f
    # a budget shared by sessions is never overdrawn: the oldest messages go first, then refusal
    r1, r2 = Reassembly(b := Budget(4000), 70000), None
    r2 = Reassembly(b, 70000)
    piece = bytes(HEADER_LEN) + bytes([0, 3]) + bytes(1500)
    assert r1.add(piece, 1) is None and r2.add(piece, 1) is None and b.left == 1000
    assert r2.add(piece, 2) is None and r1.pending == {1: r1.pending[1]} and b.left == 1000 - 0  # r2's oldest went
    assert r2.lost == 1
    with pytest.raises(WireError) as e:
        r1.add(bytes(HEADER_LEN) + bytes([1, 3]) + bytes(2000), 1)
    assert e.value.reason == Drop.OVERSIZED and b.left >= 0
    r1.clear()
    r2.clear()
    assert b.left == 4000 and r1.lost == 1 and r2.lost == 2


def test_a_spent_shared_budget_still_lets_each_session_put_one_message_together():
    """Segments forged under other sessions' clear-text ids only fail when their message is opened; until
    then they may spend the proxy's shared budget.  Each session's reserve of one message keeps its own
    super-frames crossing (without it, every one of them would be an OVERSIZED drop)."""
    h, p, _ = attached()
    p._budget.left = 0  # spent by other sessions' forgeries
    for k in range(3):
        f = gso_frame(PEER, VM, BIG - k)
        assert deliver_to_proxy(p, h.send_frame(f, 1.0).data)[-1].data == f
    assert p._budget.left == 0 and p.sessions[h.session].reassembly.held == 0
    # two sessions sharing a spent budget: forgeries under one hold at most its reserve, the other's
    # message still comes together
    b = Budget(0)
    r1, r2 = Reassembly(b, 70000, reserve=70000), Reassembly(b, 70000, reserve=70000)
    piece = bytes(HEADER_LEN) + bytes([0, 60]) + bytes(1400)
    for seq in range(1, 200):
        try:
            r1.add(piece, seq)
        except WireError as e:
            assert e.reason == Drop.OVERSIZED
    assert r1.held <= 70000 and b.left == 0
    last = bytes(HEADER_LEN) + bytes([1, 2]) + bytes(100)
    assert r2.add(bytes(HEADER_LEN) + bytes([0, 2]) + bytes(1400), 7) is None
    assert r2.add(last, 7) == bytes(1500)
    assert r2.held == 0 and b.left == 0
    r1.clear()
    assert b.left == 0 and r1.held == 0


def test_segments_at_the_host_end_a_restart_of_the_proxy_and_plain_frames_uncut():
    h, p, _ = attached()
    small = h.send_frame(NO_OFFLOAD + frame(PEER, VM), 1.0).data
    assert small[1] == MsgType.DATA and len(small) <= SEG  # fits: not cut
    buf = p.from_lan(gso_frame(VM, PEER, BIG), 1.0).sends[0][1]
    answers = deliver_to_host(h, buf, drop={0})
    assert all(a == Answer(Action.CONSUME, Cause.SEGMENT) for a in answers)
    assert h.status(1.0)["superframes_lost"] == 0
    h.roamed(1.0)  # same session: held segments stay
    # a session lost (the proxy restarted): whatever was held is given up and counted
    h._lose_session(2.0, "test")
    assert h.status(2.0)["superframes_lost"] == 1 and not h.session_offload
    tcp = HostEnd(CIPHER, [VM], offload=True, segment_size=0)  # over TCP (and in the simulator): never cut
    assert tcp.segment_size == 0


def test_a_gro_read_holding_one_whole_message_opens_at_once_anything_else_goes_segment_by_segment():
    h, p, _ = attached()
    f = gso_frame(PEER, VM, BIG)
    buf = h.send_frame(f, 1.0).data
    assert p.receive_whole(buf, SEG, EP, 1.0).data == f
    assert p.receive_whole(buf, SEG, EP, 1.0) is None  # replayed: not fresh, so the slow way...
    assert {p.receive(bytes(d), EP, 1.0) for d in datagrams(buf, SEG)} == {Answer(Action.DROP, Drop.REPLAYED)}
    buf2 = h.send_frame(f, 1.0).data
    for bad in (buf2[:SEG * 3] + buf2[SEG * 4:], buf2[SEG:SEG * 2] + buf2[:SEG]):  # a segment missing, out of order
        assert p.receive_whole(bad, SEG, EP, 1.0) is None
    # What two GSO sends carry (a message above 65507 bytes takes two): two runs, held then whole.
    cut = SEG * 30
    held = p.receive_whole(buf2[:cut], SEG, EP, 1.0)
    assert held == Answer(Action.CONSUME, Cause.SEGMENT) and not proves_peer(held)
    assert p.receive_whole(buf2[:cut], SEG, EP, 1.0) == Answer(Action.DROP, Drop.REPLAYED)  # the same run again
    assert p.receive_whole(buf2[cut:], SEG, EP, 1.0).data == f
    buf2 = h.send_frame(f, 1.0).data
    assert p.receive(bytes(buf2[:SEG]), EP, 1.0).reason == Cause.SEGMENT  # one by one, then a run: the same
    assert p.receive_whole(buf2[SEG:], SEG, EP, 1.0).data == f
    assert not p.sessions[h.session].reassembly.pending
    buf2 = h.send_frame(f, 1.0).data
    other_ep = ("192.0.2.99", 1)
    assert p.receive_whole(buf2, SEG, other_ep, 1.0) is None  # from elsewhere: the long way, which moves it
    assert p.receive_whole(buf2, SEG - 1, EP, 1.0) is None  # not this stride
    forged = bytearray(buf2)
    forged[-1] ^= 1
    assert p.receive_whole(bytes(forged), SEG, EP, 1.0) == Answer(Action.DROP, Drop.AUTH_FAILED)
    assert p.receive_whole(buf2, SEG, EP, 1.0).data == f  # the forgery recorded nothing
    back = p.from_lan(gso_frame(VM, PEER, BIG), 1.0).sends[0][1]
    assert h.receive_whole(back, SEG, 1.0).data == gso_frame(VM, PEER, BIG)
    assert h.receive_whole(back, SEG, 1.0) is None


# -- the drivers' datagram I/O (loopback only) --------------------------------------------------------


def _read_all(d) -> list[bytes]:
    out = []
    while True:
        try:
            data, _, size = d.receive()
        except BlockingIOError:
            return out
        out += [bytes(x) for x in datagrams(data, size)] if size and len(data) > size else [data]


def test_datagram_io_sends_segments_with_udp_gso_and_reads_them_back_whole_or_one_by_one():
    import socket as so

    from tunnel.io.transport import Datagrams
    message = bytes(HEADER_LEN) + bytes(i & 0xFF for i in range(70000))  # two GSO sends' worth
    buf = split(message, SEG)
    want = [bytes(d) for d in datagrams(buf, SEG)]
    rx, tx = so.socket(so.AF_INET, so.SOCK_DGRAM), so.socket(so.AF_INET, so.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(so.SOL_SOCKET, so.SO_RCVBUF, 1 << 21)
        r, t = Datagrams(rx), Datagrams(tx)
        rx.setblocking(False)
        assert t.send(buf, SEG, rx.getsockname()) == len(want)
        got = _read_all(r)
        assert got == want  # every datagram as cut, in order, none larger than the segment size
        assert Reassembly(Budget(1 << 20), 80000).add_run(5, *run(buf[:SEG * 40], SEG)) is None
    finally:
        rx.close()
        tx.close()
    a, b = so.socketpair(so.AF_UNIX, so.SOCK_DGRAM)  # no GSO here: one datagram per send
    try:
        b.setblocking(False)
        pa, pb = Datagrams(a), Datagrams(b)
        assert not pa.gso and not pb.gro
        assert pa.send(buf, SEG, None) == len(want)
        assert _read_all(pb) == want
    finally:
        a.close()
        b.close()
