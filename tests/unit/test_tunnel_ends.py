"""The two tunnel ends wired in memory (aioquic style): transfer, drop, roam, migrate.

Every call on an end answers with one ``Answer``; :class:`Net` moves what the answers
send (``data`` and ``sends``) to where they go, as a driver would.
"""
from __future__ import annotations

import itertools

import pytest
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from conntrack.answer import Action, Answer
from conntrack.errors import LocalProtocolError, ParseError
from tunnel import AeadCipher, Cause, Drop, EventKind, HostEnd, LAN, ProxyEnd, SessionState, WireError, parse_key_text
from tunnel.crypto import Key, PlainCipher, seal_parts
from tunnel.stream import encode
from tunnel.wire import MAX_SEQ, Attach, MsgType, build_attach, build_header, Header, Flag, parse_header

KEY = Key(bytes(range(32)))
OTHER_KEY = Key(bytes(range(1, 33)))
VM1 = bytes.fromhex("020000000001")
VM2 = bytes.fromhex("020000000002")
PEER = bytes.fromhex("02000000aaaa")
BCAST = b"\xff" * 6
EP_A = ("192.0.2.10", 40000)
EP_A2 = ("192.0.2.99", 40001)
EP_B = ("198.51.100.20", 40000)


def counter_random():
    """Deterministic randomness for session ids / sequence starts (tests only)."""
    c = itertools.count(1)
    # n bytes, one count per 8 (nonces are 16 bytes)
    return lambda n: b"".join((next(c) * 0x01020304050607).to_bytes(8, "big") for _ in range(-(-n // 8)))[-n:]


def frame(dst: bytes, src: bytes, payload: bytes = b"x" * 46, ethertype: int = 0x0800) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big") + payload


def ipv4_frame(dst: bytes, src: bytes, src_ip: bytes, dst_ip: bytes = bytes([198, 18, 0, 1])) -> bytes:
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0]) + src_ip + dst_ip + b"\x00" * 8
    return frame(dst, src, ip + b"\x00" * 18)


class Net:
    """A proxy and any number of host ends; their answers' messages moved by hand, as a driver would."""

    def __init__(self, cipher=None, **proxy_kw) -> None:
        self.cipher = cipher or AeadCipher(KEY)
        self.proxy = ProxyEnd(self.cipher, random_bytes=counter_random(), **proxy_kw)
        self.hosts: dict[str, HostEnd] = {}
        self.endpoint: dict[str, tuple] = {}
        self.now = 0.0
        self.lan: list[bytes] = []  # frames the proxy put on the LAN
        self.tap: dict[str, list[bytes]] = {}  # frames each host wrote to its TAP
        self.captured: dict[str, list[bytes]] = {}  # every message each host sent
        self.outbox: dict[str, list[bytes]] = {}  # messages each host sent, not yet delivered
        self.proxy_out: list[tuple] = []  # (endpoint, message) the proxy sent, not yet delivered
        self.events: list = []  # every event of every answer, in order
        self.rng = counter_random()

    def add_host(self, name, endpoint, macs=(), **kw) -> HostEnd:
        kw.setdefault("random_bytes", lambda n: self.rng(n))
        h = HostEnd(self.cipher, macs, **kw)
        self.hosts[name], self.endpoint[name], self.tap[name], self.captured[name] = h, endpoint, [], []
        self.outbox[name] = []
        return h

    # -- answers, carried as a driver carries them ----------------------------------------------

    def host(self, name: str, answer: Answer) -> Answer:
        """An answer of host ``name`` to a call or a timer: its messages go to the proxy."""
        for to, m in answer.sends:
            assert to == "proxy"
            self.outbox[name].append(m)
        self.events += answer.events
        return answer

    def from_vm(self, name: str, f: bytes) -> Answer:
        """The VM behind host ``name`` sent a frame (read from its TAP)."""
        a = self.host(name, self.hosts[name].send_frame(f, self.now))
        if a.data is not None:
            self.outbox[name].append(a.data)
        return a

    def to_host(self, name: str, m: bytes) -> Answer:
        a = self.host(name, self.hosts[name].receive(m, self.now))
        if a.data is not None:
            self.tap[name].append(a.data)
        return a

    def of_proxy(self, answer: Answer) -> Answer:
        """An answer of the proxy: ``data`` and ``"lan"`` frames to the LAN, the rest to host ends."""
        if answer.data is not None:
            self.lan.append(answer.data)
        for to, m in answer.sends:
            if to == "lan":
                self.lan.append(m)
            else:
                self.proxy_out.append((to, m))
        self.events += answer.events
        return answer

    def from_lan(self, f: bytes) -> Answer:
        return self.of_proxy(self.proxy.from_lan(f, self.now))

    def to_proxy(self, m: bytes, endpoint) -> Answer:
        return self.of_proxy(self.proxy.receive(m, endpoint, self.now))

    def take_proxy_out(self) -> list[tuple]:
        out, self.proxy_out = self.proxy_out, []
        return out

    def transfer(self, rounds: int = 4, lose_from: set[str] = frozenset()) -> None:
        for _ in range(rounds):
            moved = False
            for name in self.hosts:
                out, self.outbox[name] = self.outbox[name], []
                for m in out:
                    moved = True
                    self.captured[name].append(m)
                    if name not in lose_from:
                        self.to_proxy(m, self.endpoint[name])
            for ep, m in self.take_proxy_out():
                moved = True
                for name in self.hosts:
                    if self.endpoint[name] == ep:
                        self.to_host(name, m)
            if not moved:
                return

    def expire_host(self, name: str) -> Answer:
        return self.host(name, self.hosts[name].expire(self.now))

    def advance(self, seconds: float, step: float = 0.5) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for name, h in self.hosts.items():
                d = h.next_deadline()
                if d is not None and d <= self.now:
                    self.expire_host(name)
            d = self.proxy.next_deadline()
            if d is not None and d <= self.now:
                self.of_proxy(self.proxy.expire(self.now))
            self.transfer()


def attached_pair(**kw):
    net = Net(**kw)
    a = net.add_host("a", EP_A, [VM1])
    net.host("a", a.start(net.now))
    net.transfer()
    assert a.state == SessionState.ATTACHED
    return net, a


def test_attach_names_macs_and_frames_flow_both_ways():
    net, a = attached_pair()
    assert net.proxy.macs.lookup(VM1) == a.session
    assert net.from_vm("a", frame(PEER, VM1)).action == Action.ACCEPT
    net.transfer()
    assert net.lan == [frame(PEER, VM1)]
    net.from_lan(frame(VM1, PEER, b"reply" + b"\x00" * 41))
    net.transfer()
    assert net.tap["a"] == [frame(VM1, PEER, b"reply" + b"\x00" * 41)]
    assert net.proxy.macs.lookup(PEER) == LAN
    assert not net.proxy.drops and not a.drops


def test_attach_is_retried_with_backoff_until_acked():
    net = Net()
    a = net.add_host("a", EP_A, [VM1], retry=0.5)
    net.host("a", a.start(0.0))
    net.transfer(lose_from={"a"})  # first ATTACH lost
    assert a.state == SessionState.ATTACHING
    assert a.next_deadline() == pytest.approx(0.5)
    net.host("a", a.expire(0.5))
    assert a.next_deadline() == pytest.approx(1.5)  # doubled
    net.now = 0.5
    net.transfer()
    assert a.state == SessionState.ATTACHED
    assert a.counters["attach_retries"] == 1


def test_broadcast_floods_to_lan_and_other_sessions_not_back():
    net, a = attached_pair()
    b = net.add_host("b", EP_B, [VM2])
    net.host("b", b.start(net.now))
    net.transfer()
    net.from_vm("a", frame(BCAST, VM1, ethertype=0x0806))
    net.transfer()
    assert net.lan == [frame(BCAST, VM1, ethertype=0x0806)]
    assert net.tap["b"] == [frame(BCAST, VM1, ethertype=0x0806)]
    assert net.tap["a"] == []
    net.from_lan(frame(BCAST, PEER, ethertype=0x0806))
    net.transfer()
    assert net.tap["a"] == net.tap["b"][-1:] == [frame(BCAST, PEER, ethertype=0x0806)]


def test_unicast_between_vms_on_two_hosts_and_unknown_unicast_floods():
    net, a = attached_pair()
    b = net.add_host("b", EP_B, [VM2])
    net.host("b", b.start(net.now))
    net.transfer()
    net.from_vm("a", frame(VM2, VM1))
    net.transfer()
    assert net.tap["b"] == [frame(VM2, VM1)] and net.lan == []
    unknown = bytes.fromhex("02000000beef")
    net.from_vm("a", frame(unknown, VM1))
    net.transfer()
    assert net.lan == [frame(unknown, VM1)] and net.tap["b"][-1] == frame(unknown, VM1)
    assert net.proxy.counters["unknown_unicast"] == 1


def test_hairpin_and_lan_local_frames_are_not_forwarded():
    net, a = attached_pair()
    net.from_vm("a", frame(VM1, VM1))  # destination lives behind the same session
    assert net.from_lan(frame(PEER, PEER)) == Answer(Action.DROP, Drop.NO_ROUTE)  # LAN->LAN: the bridge's job
    (hairpin,) = net.outbox["a"]
    net.transfer()
    assert net.lan == [] and net.tap["a"] == []
    assert net.proxy.drops[Drop.HAIRPIN] == 1 and net.proxy.drops[Drop.NO_ROUTE] == 1
    # The hairpinned message was authentic and fresh: a drop all the same, and a replay of it another kind.
    assert net.to_proxy(hairpin, EP_A) == Answer(Action.DROP, Drop.REPLAYED)


def test_a_lan_frame_nobody_takes_is_a_counted_drop_not_silence():
    net = Net()
    assert net.from_lan(frame(BCAST, PEER, ethertype=0x0806)) == Answer(Action.DROP, Drop.NO_SESSION)
    assert net.from_lan(frame(VM1, PEER)) == Answer(Action.DROP, Drop.NO_SESSION)  # unknown unicast, no session
    assert net.proxy.drops[Drop.NO_SESSION] == 2 and net.proxy.counters["unknown_unicast"] == 1
    assert net.proxy_out == [] and net.lan == []


def test_host_learns_vm_mac_from_first_frame_and_names_it():
    net = Net()
    a = net.add_host("a", EP_A)  # no --mac
    net.host("a", a.start(0.0))
    net.transfer()
    assert net.proxy.sessions[a.session].named == ()
    answer = net.from_vm("a", frame(BCAST, VM1))
    assert answer.action == Action.ACCEPT and parse_header(answer.data).type == MsgType.DATA
    assert [(to, parse_header(m).type) for to, m in answer.sends] == [("proxy", MsgType.ATTACH)]
    assert [e.kind for e in answer.events] == [EventKind.MAC_LEARNED]
    net.transfer()
    assert net.proxy.sessions[a.session].named == (VM1,)
    assert a.counters["macs_learned"] == 1


def test_roaming_moves_endpoint_on_authentic_traffic_and_announces():
    net, a = attached_pair()
    net.from_vm("a", ipv4_frame(PEER, VM1, bytes([198, 18, 0, 50])))
    net.transfer()
    net.lan.clear()
    net.events.clear()
    net.endpoint["a"] = EP_A2  # our address changed
    net.host("a", a.roamed(net.now))
    net.transfer()
    s = net.proxy.sessions[a.session]
    assert s.endpoint == EP_A2 and a.state == SessionState.ATTACHED
    garp = Ether(net.lan[0])
    assert garp.dst == "ff:ff:ff:ff:ff:ff" and garp[ARP].psrc == garp[ARP].pdst == "198.18.0.50"
    assert garp[ARP].hwsrc == "02:00:00:00:00:01" and garp[ARP].op == 1
    net.from_lan(frame(VM1, PEER))
    net.transfer()
    assert net.tap["a"] == [frame(VM1, PEER)]
    assert [e.kind for e in net.events].count(EventKind.ENDPOINT_CHANGED) == 1


def test_migration_to_another_host_moves_mac_when_the_vm_speaks_there_and_announces_ipv6():
    net, a = attached_pair()
    v6 = bytes.fromhex("20010db8000000000000000000000050")
    ip6 = bytes([0x60, 0, 0, 0, 0, 8, 17, 64]) + v6 + bytes.fromhex("20010db8000000000000000000000001") + b"\x00" * 8
    net.from_vm("a", frame(PEER, VM1, ip6, 0x86DD))
    net.transfer()
    net.lan.clear()
    b = net.add_host("b", EP_B, [VM1])  # the VM now runs on host B
    net.host("b", b.start(net.now))
    net.transfer()
    assert net.proxy.macs.lookup(VM1) == a.session  # a claim: the VM spoke at A just now (tunnel.presence)
    net.from_vm("b", frame(BCAST, VM1, ethertype=0x88B5))  # its first frame at B (QEMU's RARP, say)
    net.transfer()
    assert net.proxy.macs.lookup(VM1) == b.session
    net.lan.remove(frame(BCAST, VM1, ethertype=0x88B5))
    na = Ether(net.lan[0])
    assert na.dst == "33:33:00:00:00:01" and na[IPv6].src == "2001:db8::50" and na[IPv6].hlim == 255
    assert na[ICMPv6ND_NA].tgt == "2001:db8::50" and na[ICMPv6ND_NA].O == 1
    assert na[ICMPv6NDOptDstLLAddr].lladdr == "02:00:00:00:00:01"
    # checksum verified independently by scapy
    raw = bytes(na)
    na2 = Ether(raw)
    del na2[ICMPv6ND_NA].cksum
    assert Ether(bytes(na2))[ICMPv6ND_NA].cksum == na[ICMPv6ND_NA].cksum
    net.from_lan(frame(VM1, PEER))
    net.transfer()
    assert net.tap["b"] == [frame(VM1, PEER)]
    assert net.lan[0] in net.tap["a"] and frame(VM1, PEER) not in net.tap["a"]  # the announcement, not the frame


def test_a_vm_that_moved_is_told_its_lan_neighbours_and_only_it():
    """After a move the VM may have forgotten its neighbours (link down and up): the proxy tells the
    new session the bindings LAN hosts stated in their own ARP frames; a roam of the same host does not."""
    net, a = attached_pair()
    peer_ip = bytes([198, 18, 0, 10])
    arp_reply = bytes(Ether(src="02:00:00:00:aa:aa", dst="02:00:00:00:00:01")
                      / ARP(op=2, hwsrc="02:00:00:00:aa:aa", psrc="198.18.0.10", pdst="198.18.0.50"))
    net.from_lan(arp_reply)
    net.transfer()
    assert net.tap["a"] == [arp_reply] and net.proxy.lan_neighbours == {peer_ip: PEER}
    net.endpoint["a"] = EP_A2  # roaming: the VM stayed where it was, nothing to tell it
    net.host("a", a.roamed(net.now))
    net.transfer()
    assert net.tap["a"] == [arp_reply]
    b = net.add_host("b", EP_B, [VM1])  # the VM now runs on host B
    net.host("b", b.start(net.now))
    net.transfer()
    assert net.tap["b"].count(arp_reply) == 1  # sent toward A, where the VM was never heard: re-sent to B
    told = [Ether(f) for f in net.tap["b"] if f != arp_reply]
    assert len(told) == 1 and told[0][ARP].psrc == told[0][ARP].pdst == "198.18.0.10"
    assert told[0][ARP].hwsrc == told[0].src == "02:00:00:00:aa:aa"
    assert net.tap["a"] == [arp_reply] and net.proxy.counters["neighbours_told"] == 1
    assert all(Ether(f).src != "02:00:00:00:aa:aa" for f in net.lan)  # nothing said on the LAN for the peer
    net.now += 301.0  # the peer's MAC ages out of the table: its binding goes with it
    net.of_proxy(net.proxy.expire(net.now))
    assert net.proxy.lan_neighbours == {}


def test_lan_frames_cannot_take_a_named_mac():
    net, a = attached_pair()
    net.from_lan(frame(BCAST, VM1))
    assert net.proxy.macs.lookup(VM1) == a.session
    assert net.proxy.counters["lan_conflicts"] == 1


def snapshot(net: Net) -> tuple:
    p = net.proxy
    return (
        {sid: (s.endpoint, s.state, s.named, s.window.top) for sid, s in p.sessions.items()},
        dict((m, e.port) for m, e in p.macs.items()),
        {m: tuple(a) for m, a in p.addresses.items()},
    )


def test_forged_tampered_wrong_key_and_junk_change_nothing():
    net, a = attached_pair()
    good = a.send_frame(frame(PEER, VM1), net.now).data
    before = snapshot(net)
    evil = ("203.0.113.66", 666)
    stranger = HostEnd(AeadCipher(OTHER_KEY), [VM1], random_bytes=lambda n: b"\x77" * n)
    ((_, stranger_attach),) = stranger.start(0.0).sends
    forged_same_session = bytearray(good)
    forged_same_session[-1] ^= 1  # tampered tag
    header_flip = bytearray(good)
    header_flip[1] = MsgType.KEEPALIVE  # type changed: the header is associated data
    cases = [b"", b"\x01", b"junk" * 10, stranger_attach, bytes(forged_same_session), bytes(header_flip),
             good[:20], b"\x01" + good[1:], good + b"\x00" * 2000]  # version 1: before per-session keys
    for m in cases:
        answer = net.to_proxy(m, evil)
        assert answer.action == Action.DROP and answer.data is None and answer.sends == answer.events == ()
    assert snapshot(net) == before
    d = net.proxy.drops
    assert d[Drop.AUTH_FAILED] == 3 and d[Drop.TRUNCATED] == 3 and d[Drop.BAD_VERSION] == 2
    assert d[Drop.OVERSIZED] == 1
    assert sum(d.values()) == len(cases)
    assert net.lan == [] and net.proxy_out == []
    assert net.to_proxy(good, EP_A).action == Action.ACCEPT  # the real one still goes through


def test_a_forgery_far_ahead_from_the_sessions_own_endpoint_cannot_move_its_window():
    """The data path (a session's DATA from its known endpoint) must authenticate before it records the
    sequence number: a forged message far ahead, were it recorded, would make the next real one too old."""
    net, a = attached_pair()
    real = a.send_frame(frame(PEER, VM1), net.now).data
    seq = parse_header(real).seq
    forged = bytearray(real)
    forged[8:16] = (seq + 1_000_000).to_bytes(8, "big")  # the header is associated data: the tag fails
    assert net.to_proxy(bytes(forged), EP_A) == Answer(Action.DROP, Drop.AUTH_FAILED)
    assert net.proxy.sessions[a.session].window.top < seq
    assert net.to_proxy(real, EP_A).action == Action.ACCEPT and net.lan == [frame(PEER, VM1)]
    assert net.proxy.drops == {Drop.AUTH_FAILED: 1}
    # And the host end's data path, the same way round.
    back = net.from_lan(frame(VM1, PEER)).sends[0][1]
    forged = bytearray(back)
    forged[8:16] = (parse_header(back).seq + 1_000_000).to_bytes(8, "big")
    assert net.to_host("a", bytes(forged)) == Answer(Action.DROP, Drop.AUTH_FAILED)
    assert net.to_host("a", back).action == Action.ACCEPT and net.tap["a"] == [frame(VM1, PEER)]
    assert a.drops == {Drop.AUTH_FAILED: 1}


def test_replay_changes_nothing_even_from_a_new_endpoint():
    net, a = attached_pair()
    net.from_vm("a", frame(PEER, VM1))
    net.transfer()
    assert len(net.lan) == 1
    before = snapshot(net)
    evil = ("203.0.113.66", 666)
    first_attach, *rest = net.captured["a"]  # the first ATTACH (the hello) named no epoch yet
    # A hello of a live session is a replay: dropped, and answered with nothing (it once drew an EPOCH
    # to whatever source it claimed, and counted as authentic).
    answer = net.to_proxy(first_attach, evil)
    assert answer == Answer(Action.DROP, Drop.REPLAYED)
    assert net.take_proxy_out() == []
    for m in rest:
        assert net.to_proxy(m, evil).action == Action.DROP
    assert snapshot(net) == before
    assert net.proxy.drops[Drop.REPLAYED] == len(rest) + 1
    assert len(net.lan) == 1 and net.proxy_out == []


def test_replayed_proxy_messages_are_dropped_by_the_host():
    net, a = attached_pair()
    out = net.from_lan(frame(VM1, PEER)).sends
    assert net.to_host("a", out[0][1]).action == Action.ACCEPT
    assert net.to_host("a", out[0][1]) == Answer(Action.DROP, Drop.REPLAYED)
    assert a.drops[Drop.REPLAYED] == 1 and len(net.tap["a"]) == 1


def test_reflected_host_message_is_wrong_direction():
    net, a = attached_pair()
    m = a.send_frame(frame(PEER, VM1), net.now).data
    assert net.to_host("a", m) == Answer(Action.DROP, Drop.WRONG_DIRECTION)
    assert a.drops[Drop.WRONG_DIRECTION] == 1


def test_keepalives_and_proxy_silence_gives_new_session_that_supersedes_old():
    net, a = attached_pair()
    old = a.session
    net.advance(12.0)  # keepalives every 5 s are answered
    assert a.counters["keepalives"] == 2 and a.state == SessionState.ATTACHED and a.session == old
    # the proxy stops answering (say it is unreachable) for longer than dead_after
    saved = net.endpoint["a"]
    net.endpoint["a"] = ("192.0.2.200", 1)  # replies go nowhere
    for _ in range(40):
        net.now += 0.5
        net.expire_host("a") if a.next_deadline() is not None and a.next_deadline() <= net.now else None
        net.transfer(lose_from={"a"})
        net.take_proxy_out()
    assert a.session != old and a.previous == old
    net.endpoint["a"] = saved
    net.host("a", a.roamed(net.now))
    net.transfer()
    assert a.state == SessionState.ATTACHED
    assert old not in net.proxy.sessions and net.proxy.macs.lookup(VM1) == a.session


def test_proxy_expires_silent_sessions_and_forgets_their_macs():
    net, a = attached_pair(session_timeout=30.0)
    sid = a.session
    a.close(net.now)  # pretend it vanished without a word: drop its DETACH
    assert net.of_proxy(net.proxy.expire(29.0)) == Answer(Action.CONSUME, Cause.TIMER)
    assert sid in net.proxy.sessions
    answer = net.of_proxy(net.proxy.expire(30.0))
    assert sid not in net.proxy.sessions and net.proxy.macs.lookup(VM1) is None
    assert [(e.kind, e.session, e.detail) for e in answer.events] == [(EventKind.SESSION_CLOSED, sid, "host end silent")]


def test_detach_closes_and_replayed_attach_cannot_reopen():
    net, a = attached_pair()
    attach = net.captured["a"][1]  # the ATTACH that named the proxy's epoch and opened the session
    net.host("a", a.close(net.now))
    net.transfer()
    assert not net.proxy.sessions
    assert net.to_proxy(attach, ("203.0.113.66", 666)) == Answer(Action.DROP, Drop.REPLAYED)
    assert net.proxy.drops[Drop.REPLAYED] == 1 and not net.proxy.sessions


def test_attach_captured_before_a_proxy_restart_cannot_be_replayed_after_it():
    net, a = attached_pair()
    attach = net.captured["a"][1]
    restarted = ProxyEnd(net.cipher)  # new epoch, knows no closed sessions
    evil = ("203.0.113.66", 666)
    answer = restarted.receive(attach, evil, net.now)  # authentic, but names the old epoch
    assert answer.action == Action.CONSUME
    assert not restarted.sessions and restarted.macs.lookup(VM1) is None
    assert [parse_header(m).type for _, m in answer.sends] == [MsgType.EPOCH]


def test_host_starts_a_new_session_when_the_proxy_restarted_under_it():
    net, a = attached_pair()
    old = a.session
    net.proxy = ProxyEnd(net.cipher, random_bytes=lambda n: b"\x42" * n)  # restarted, unclean: no DETACH
    net.from_vm("a", frame(BCAST, VM2))  # a new MAC: ATTACH under the old session, old epoch
    net.transfer()
    assert a.session != old and a.previous == old and a.state == SessionState.ATTACHED
    assert a.proxy_epoch == net.proxy.epoch and net.proxy.macs.lookup(VM1) == a.session


def test_oversized_frames_are_counted_never_truncated():
    net, a = attached_pair()
    big = frame(PEER, VM1, b"y" * 1600)
    assert net.from_vm("a", big) == Answer(Action.DROP, Drop.OVERSIZED)
    assert a.drops[Drop.OVERSIZED] == 1 and net.outbox["a"] == []
    assert net.from_lan(frame(VM1, PEER, b"y" * 1600)) == Answer(Action.DROP, Drop.OVERSIZED)
    assert net.proxy.drops[Drop.OVERSIZED] == 1 and net.proxy_out == []
    assert net.from_vm("a", b"short") == Answer(Action.DROP, Drop.TRUNCATED) and a.drops[Drop.TRUNCATED] == 1


def test_plaintext_and_encrypted_ends_refuse_each_other():
    net = Net(cipher=PlainCipher())
    a = net.add_host("a", EP_A, [VM1])
    net.host("a", a.start(0.0))
    net.transfer()
    assert a.state == SessionState.ATTACHED  # plaintext works with plaintext
    m = net.captured["a"][:1]
    enc = ProxyEnd(AeadCipher(KEY))
    assert enc.receive(m[0], EP_A, 0.0) == Answer(Action.DROP, Drop.MODE_MISMATCH) and enc.drops[Drop.MODE_MISMATCH] == 1
    assert parse_header(m[0]).plaintext


def test_unknown_session_data_is_dropped_without_creating_one():
    net, a = attached_pair()
    fresh = ProxyEnd(AeadCipher(KEY))  # a proxy that restarted
    m = a.send_frame(frame(PEER, VM1), net.now).data
    answer = fresh.receive(m, EP_A, net.now)
    assert answer[:3] == (Action.DROP, Drop.UNKNOWN_SESSION, None) and answer.events == ()
    # ... answered with one RESET naming it, no larger than it (see the re-attach tests)
    ((to, reset),) = answer.sends
    assert to == EP_A and parse_header(reset).type == MsgType.RESET and len(reset) <= len(m)
    assert fresh.drops[Drop.UNKNOWN_SESSION] == 1 and not fresh.sessions


def test_key_text_and_repr_never_show_the_key():
    k = parse_key_text("# roam tunnel key\n" + __import__("base64").b64encode(bytes(range(32))).decode() + "\n")
    assert k == KEY
    for text in (repr(k), str(k), repr(AeadCipher(k))):
        assert bytes(range(32)).hex() not in text and "AAECAwQFBgcICQoL" not in text
    with pytest.raises(TypeError):
        __import__("pickle").dumps(k)


def test_proxy_shutdown_detaches_hosts_which_reattach_under_a_new_session():
    net, a = attached_pair()
    old = a.session
    closing = net.proxy.close(net.now)
    assert closing[:2] == (Action.CONSUME, Cause.CLOSE)
    assert not net.proxy.sessions
    # the proxy comes back (a fresh engine); the host got DETACH and is already re-attaching
    net.proxy = ProxyEnd(net.cipher, random_bytes=lambda n: b"\x43" * n)  # a new epoch
    for _, m in closing.sends:
        assert net.to_host("a", m).action == Action.CONSUME
    assert a.state == SessionState.ATTACHING and a.session != old and a.previous == old
    net.transfer()
    assert a.state == SessionState.ATTACHED and net.proxy.macs.lookup(VM1) == a.session


def test_offload_negotiated_carries_the_virtio_header_and_a_session_keeps_its_mode():
    net = Net()
    net.proxy = ProxyEnd(net.cipher, offload=True, max_frame=60000)
    a = net.add_host("a", EP_A, [VM1], offload=True, max_frame=60000)
    net.host("a", a.start(0.0))
    net.transfer()
    assert a.state == SessionState.ATTACHED
    vnet = bytes([1, 1]) + (54).to_bytes(2, "little") + (1448).to_bytes(2, "little") + bytes(4)  # a TCPv4 GSO frame
    big = vnet + frame(PEER, VM1, b"z" * 20000)
    assert net.from_vm("a", big).action == Action.ACCEPT
    net.transfer()
    assert net.lan == [big]  # header and super-frame carried whole
    assert net.proxy.macs.lookup(VM1) == a.session  # MACs read after the 10-byte header
    net.from_lan(bytes(10) + frame(VM1, PEER))
    net.transfer()
    assert net.tap["a"] == [bytes(10) + frame(VM1, PEER)]
    assert a.session_offload and net.proxy.sessions[a.session].offload
    # A host end that cannot carry offload is no longer refused: its session negotiates none
    # (tests/unit/test_tunnel_offload.py); but a message whose OFFLOAD flag differs from what its
    # session negotiated is a counted MODE_MISMATCH drop, and changes nothing.
    plain_host = net.add_host("b", EP_B, [VM2])
    net.host("b", plain_host.start(net.now))
    net.transfer()
    assert plain_host.state == SessionState.ATTACHED and not plain_host.session_offload
    flipped = seal_parts(plain_host._key, MsgType.DATA, int(Flag.OFFLOAD), plain_host.session, plain_host._seq,
                         frame(PEER, VM2))
    assert net.to_proxy(flipped, EP_B) == Answer(Action.DROP, Drop.MODE_MISMATCH)
    assert net.proxy.drops[Drop.MODE_MISMATCH] == 1 and len(net.proxy.sessions) == 2
    assert net.from_vm("a", vnet + frame(PEER, VM1, b"z" * 60001)) == Answer(Action.DROP, Drop.OVERSIZED)
    assert a.drops[Drop.OVERSIZED] == 1


# -- one answer shape, one error family ------------------------------------------------------------


def test_every_call_answers_and_every_drop_is_counted_once():
    """Engines answer every input, timer and call with an Answer; their drop counters are exactly
    the DROP answers they gave, by reason."""
    net, a = attached_pair()
    answers = [net.from_vm("a", frame(PEER, VM1)), net.from_vm("a", b"short"), net.from_lan(frame(PEER, PEER)),
               net.to_proxy(b"junk", EP_B), net.host("a", a.expire(net.now)), net.of_proxy(net.proxy.expire(net.now)),
               net.host("a", a.roamed(net.now))]
    net.transfer()
    assert all(isinstance(x, Answer) for x in answers)
    assert [x[:2] for x in answers] == [
        (Action.ACCEPT, Cause.DATA), (Action.DROP, Drop.TRUNCATED), (Action.DROP, Drop.NO_ROUTE),
        (Action.DROP, Drop.TRUNCATED), (Action.CONSUME, Cause.TIMER), (Action.CONSUME, Cause.TIMER),
        (Action.CONSUME, Cause.ROAMED)]
    assert a.drops == {Drop.TRUNCATED: 1} and net.proxy.drops == {Drop.NO_ROUTE: 1, Drop.TRUNCATED: 1}


def test_a_peers_bad_bytes_are_a_parse_error_our_misuse_a_local_error():
    with pytest.raises(ParseError) as e:
        parse_header(b"\x01")
    assert isinstance(e.value, WireError) and e.value.reason == Drop.TRUNCATED
    with pytest.raises(LocalProtocolError) as e:
        build_attach(Attach((VM1,) * 65))
    assert e.value.reason == Drop.OVERSIZED and not isinstance(e.value, ParseError)
    with pytest.raises(LocalProtocolError):
        build_header(Header(MsgType.DATA, Flag.NONE, 1, MAX_SEQ + 1))
    with pytest.raises(LocalProtocolError):
        seal_parts(PlainCipher(), MsgType.DATA, 0, 1, MAX_SEQ + 1, b"")
    with pytest.raises(LocalProtocolError) as e:
        encode(bytes(0x10000))
    assert e.value.reason == Drop.BAD_LENGTH


def test_a_session_whose_counter_ran_out_sends_nothing_more():
    net, a = attached_pair()
    a._seq = MAX_SEQ + 1
    assert net.from_vm("a", frame(PEER, VM1)) == Answer(Action.DROP, Drop.SEQ_EXHAUSTED)
    net.now += 5.0
    assert net.expire_host("a").sends == ()  # the keepalive cannot be sent either: counted, not sent
    assert a.counters["seq_exhausted"] == 1 and a.drops == {Drop.SEQ_EXHAUSTED: 1}
