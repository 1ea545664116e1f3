"""A claim never beats presence, and a move loses nothing: playbooks of two host ends and a proxy.

Steps read as in :mod:`tests.unit.test_tunnel_playbook`: one input to one end, the exact answer
expected (messages by type, frames as bytes, events by kind).  ``LAST`` is the message the
previous step's answer sent to this end (for the proxy: the host end's; for a host end: the one
the proxy sent to its endpoint), ``AGAIN`` the message this end was last given (a replay).
Host ``a`` sits at ``EP_A``, host ``b`` at ``EP_B``; the VM's MAC is learned from its frames
(no ``--mac``) unless a step says otherwise.
"""
from __future__ import annotations

import itertools

from conntrack.answer import Answer
from tunnel import Cause, Drop, HostEnd, ProxyEnd
from tunnel.announce import gratuitous_arp
from tunnel.resend import Resend

from .test_tunnel_playbook import (
    AGAIN, BCAST, CIPHER, LAST, PEER, VM, A, C, D, Expect, K, M, Step, _shown, arp_from, frame,
)

EP_A = ("192.0.2.10", 40000)
EP_B = ("198.51.100.20", 40000)
VM_IP = bytes([198, 18, 0, 50])
GARP = gratuitous_arp(VM, VM_IP)  # what the proxy says on the LAN (and to other sessions) when the VM moves
FIRST = frame(BCAST, VM, ethertype=b"\x88\xb5")  # a VM's first frame at a new host (QEMU sends a RARP)


def on(end: str, method: str, *args, now: float = 0.0) -> Step:
    return Step(end, method, args, now)


def three(**proxy_kw) -> dict:
    c = itertools.count(1)
    rnd = lambda n: b"".join((next(c) * 0x0102030405060708).to_bytes(8, "big")  # noqa: E731 - deterministic
                             for _ in range(-(-n // 8)))[-n:]
    return {"a": HostEnd(CIPHER, retry=0.5, random_bytes=rnd), "b": HostEnd(CIPHER, retry=0.5, random_bytes=rnd),
            "proxy": ProxyEnd(CIPHER, random_bytes=rnd, **proxy_kw)}


def play(ends: dict, book: list[tuple[Step, Expect]]) -> list[Expect]:
    where = {EP_A: "a", EP_B: "b"}
    inbox: dict[str, list] = {name: [] for name in ends}
    given: dict[str, bytes] = {}
    shown = []
    for step, _ in book:
        args = tuple(inbox[step.end].pop(0) if a is LAST else given[step.end] if a is AGAIN else a
                     for a in step.args)
        if step.method == "receive":
            given[step.end] = args[0]
        answer: Answer = getattr(ends[step.end], step.method)(*args, step.now)
        for box in inbox.values():
            box.clear()  # LAST is the previous answer's message: older ones are not delivered
        sends = []
        for to, m in answer.sends:
            is_message = to != "lan"
            sends.append((to, _shown(m, is_message)))
            if is_message:
                inbox["proxy" if step.end != "proxy" else where[to]].append(m)
        data_is_message = step.end != "proxy" and step.method == "send_frame"
        if answer.data is not None and data_is_message:
            inbox["proxy"].append(answer.data)
        shown.append(Expect(answer.action, answer.reason,
                            None if answer.data is None else _shown(answer.data, data_is_message),
                            tuple(sends), tuple(e.kind for e in answer.events)))
    return shown


def attach(end: str, ep, now: float = 0.0) -> list:
    """A host end attaching with nothing to name yet: hello, EPOCH, ATTACH, ACK."""
    return [
        (on(end, "start", now=now),              Expect(C, Cause.START, sends=(("proxy", M.ATTACH),),
                                                        events=(K.ATTACHING,))),
        (on("proxy", "receive", LAST, ep, now=now), Expect(C, Cause.CHALLENGE, sends=((ep, M.EPOCH),))),
        (on(end, "receive", LAST, now=now),      Expect(C, Cause.CONTROL, sends=(("proxy", M.ATTACH),))),
        (on("proxy", "receive", LAST, ep, now=now), Expect(C, Cause.CONTROL, sends=((ep, M.ATTACH_ACK),),
                                                        events=(K.SESSION_OPENED,))),
        (on(end, "receive", LAST, now=now),      Expect(C, Cause.CONTROL, events=(K.ATTACHED,))),
    ]


def vm_speaks_at_a(now: float = 0.0) -> list:
    """The VM's first frames on host A: learned there (an ATTACH naming it), heard at the proxy."""
    return [
        (on("a", "send_frame", arp_from(VM, VM_IP), now=now), Expect(A, Cause.DATA, M.DATA,
                                                                     sends=(("proxy", M.ATTACH),),
                                                                     events=(K.MAC_LEARNED,))),
        (on("proxy", "receive", LAST, EP_A, now=now), Expect(C, Cause.CONTROL, sends=((EP_A, M.ATTACH_ACK),),
                                                             events=(K.MAC_MOVED,))),
        (on("a", "send_frame", arp_from(VM, VM_IP), now=now), Expect(A, Cause.DATA, M.DATA)),
        (on("proxy", "receive", LAST, EP_A, now=now), Expect(A, Cause.DATA, arp_from(VM, VM_IP),
                                                             sends=((EP_B, M.DATA),))),  # flooded to B
    ]


def test_a_claim_never_pulls_a_speaking_vm_and_its_first_frame_elsewhere_moves_it():
    ends = three()
    p, b = ends["proxy"], ends["b"]
    book = [
        *attach("a", EP_A), *attach("b", EP_B),
        *vm_speaks_at_a(now=1),
        # Host B is told the VM is coming (a hook) while it still runs on A: the claim waits.
        (on("b", "serve", VM, now=2),                Expect(C, Cause.MACS, sends=(("proxy", M.ATTACH),),
                                                            events=(K.MAC_LEARNED,))),
        (on("proxy", "receive", LAST, EP_B, now=2),  Expect(C, Cause.CONTROL, sends=((EP_B, M.ATTACH_ACK),),
                                                            events=(K.MAC_KEPT,))),
        (on("proxy", "from_lan", frame(VM, PEER), now=2), Expect(A, Cause.DATA, sends=((EP_A, M.DATA),))),
        # Long after the presence window, A still names it (its VM is there): still kept.
        (on("b", "roamed", now=30),                  Expect(C, Cause.ROAMED, sends=(("proxy", M.ATTACH),),
                                                            events=(K.ATTACHING,))),
        (on("proxy", "receive", LAST, EP_B, now=30), Expect(C, Cause.CONTROL, sends=((EP_B, M.ATTACH_ACK),),
                                                            events=(K.MAC_KEPT,))),
        (on("proxy", "from_lan", frame(VM, PEER), now=30), Expect(A, Cause.DATA, sends=((EP_A, M.DATA),))),
        # The VM resumes on B: its first frame there moves it, announced on the LAN and to A; what was sent
        # toward A since the VM was last heard there (the two frames above, within the last second: one) is
        # sent again to B.
        (on("b", "send_frame", FIRST, now=30.5),     Expect(A, Cause.DATA, M.DATA)),
        (on("proxy", "receive", LAST, EP_B, now=30.5), Expect(A, Cause.DATA, FIRST,
                                                              sends=((EP_B, M.DATA), ("lan", GARP),
                                                                     (EP_A, M.DATA), (EP_A, M.DATA)),
                                                              events=(K.MAC_MOVED, K.ANNOUNCED))),
        (on("proxy", "from_lan", frame(VM, PEER), now=30.6), Expect(A, Cause.DATA, sends=((EP_B, M.DATA),))),
        (on("b", "receive", LAST, now=30.6),         Expect(A, Cause.DATA, frame(VM, PEER))),
    ]
    assert play(ends, book) == [expect for _, expect in book]
    assert p.counters["claims_deferred"] == 2 and p.counters["presence_moves"] == 1
    assert p.counters["resent_frames"] == 1 and p.status(31)["counters"]["resent_frames"] == 1
    assert b.macs == (VM,)


def test_host_end_forgets_a_vm_seen_elsewhere_and_the_proxy_does_not_take_it_back():
    ends = three()
    a = ends["a"]
    book = [
        *attach("a", EP_A), *attach("b", EP_B),
        *vm_speaks_at_a(now=1),
        (on("b", "send_frame", FIRST, now=2),        Expect(A, Cause.DATA, M.DATA, sends=(("proxy", M.ATTACH),),
                                                            events=(K.MAC_LEARNED,))),
        (on("proxy", "receive", LAST, EP_B, now=2),  Expect(C, Cause.CONTROL, sends=((EP_B, M.ATTACH_ACK),),
                                                            events=(K.MAC_KEPT,))),  # a claim: it spoke at A
        (on("b", "send_frame", FIRST, now=2),        Expect(A, Cause.DATA, M.DATA)),
        (on("proxy", "receive", LAST, EP_B, now=2),  Expect(A, Cause.DATA, FIRST,
                                                            sends=(("lan", GARP), (EP_A, M.DATA),
                                                                   (EP_A, M.DATA)),
                                                            events=(K.MAC_MOVED, K.ANNOUNCED))),
        # A hears the announcement: a frame from its VM's MAC through the tunnel: forgotten, said at once.
        (on("a", "receive", LAST, now=2),            Expect(A, Cause.DATA, GARP,
                                                            sends=(("proxy", M.ATTACH),),
                                                            events=(K.MAC_FORGOTTEN,))),
        (on("proxy", "receive", LAST, EP_A, now=2),  Expect(C, Cause.CONTROL, sends=((EP_A, M.ATTACH_ACK),))),
    ]
    assert play(ends, book) == [expect for _, expect in book]
    assert a.macs == () and a.counters["macs_seen_elsewhere"] == 1
    assert ends["proxy"].macs.lookup(VM) == ends["b"].session


def test_withdrawal_and_death_hand_the_mac_to_the_claimant_at_once():
    ends = three()
    p, a, b = ends["proxy"], ends["a"], ends["b"]
    book = [
        *attach("a", EP_A), *attach("b", EP_B),
        *vm_speaks_at_a(now=1),
        (on("b", "serve", VM, now=1),                Expect(C, Cause.MACS, sends=(("proxy", M.ATTACH),),
                                                            events=(K.MAC_LEARNED,))),
        (on("proxy", "receive", LAST, EP_B, now=1),  Expect(C, Cause.CONTROL, sends=((EP_B, M.ATTACH_ACK),),
                                                            events=(K.MAC_KEPT,))),
        (on("proxy", "from_lan", frame(VM, PEER), now=1.2), Expect(A, Cause.DATA, sends=((EP_A, M.DATA),))),
        # The VM's TAP left A's bridge: A names it no more, and the proxy gives it to B, which names it,
        # with the frame sent toward A since it was last heard there.
        (on("a", "forget", [VM], now=1.3),           Expect(C, Cause.MACS, sends=(("proxy", M.ATTACH),),
                                                            events=(K.MAC_FORGOTTEN,))),
        (on("proxy", "receive", LAST, EP_A, now=1.3), Expect(C, Cause.CONTROL,
                                                             sends=((EP_B, M.DATA), ("lan", GARP),
                                                                    (EP_A, M.DATA), (EP_A, M.ATTACH_ACK)),
                                                             events=(K.MAC_MOVED, K.ANNOUNCED))),
        (on("proxy", "from_lan", frame(VM, PEER), now=1.4), Expect(A, Cause.DATA, sends=((EP_B, M.DATA),))),
        # B detaches (its VM gone too): nobody names it, nowhere to send: flooded to whoever is left.
        (on("b", "close", now=2),                    Expect(C, Cause.CLOSE, sends=(("proxy", M.DETACH),),
                                                            events=(K.SESSION_CLOSED,))),
        (on("proxy", "receive", LAST, EP_B, now=2),  Expect(C, Cause.CONTROL, events=(K.SESSION_CLOSED,))),
        (on("proxy", "from_lan", frame(VM, PEER), now=2), Expect(A, Cause.DATA, sends=((EP_A, M.DATA),))),
    ]
    assert play(ends, book) == [expect for _, expect in book]
    assert p.macs.lookup(VM) is None and p.counters["claim_moves"] == 2 and p.counters["macs_released"] == 1
    assert p.counters["resent_frames"] == 1 and a.macs == () and b.state.name == "CLOSED"


def test_a_session_that_dies_hands_its_macs_to_a_claimant():
    ends = three(session_timeout=10)
    p = ends["proxy"]
    book = [
        *attach("a", EP_A), *attach("b", EP_B, now=0.5),
        *vm_speaks_at_a(now=1),
        (on("b", "serve", VM, now=5),                Expect(C, Cause.MACS, sends=(("proxy", M.ATTACH),),
                                                            events=(K.MAC_LEARNED,))),
        (on("proxy", "receive", LAST, EP_B, now=5),  Expect(C, Cause.CONTROL, sends=((EP_B, M.ATTACH_ACK),),
                                                            events=(K.MAC_KEPT,))),
        (on("proxy", "expire", now=11),              Expect(C, Cause.TIMER, sends=(("lan", GARP),),
                                                            events=(K.SESSION_CLOSED, K.MAC_MOVED, K.ANNOUNCED))),
    ]
    assert play(ends, book) == [expect for _, expect in book]
    assert p.macs.lookup(VM) == ends["b"].session


def test_flapping_is_bounded_and_counted():
    """Frames from the old host still on their way after the VM spoke at the new one do not take it
    back; past the hold, presence moves it again (at most once per hold)."""
    ends = three(flap_hold=0.5)
    p = ends["proxy"]
    book = [
        *attach("a", EP_A), *attach("b", EP_B),
        *vm_speaks_at_a(now=1),
        (on("b", "send_frame", FIRST, now=2),        Expect(A, Cause.DATA, M.DATA, sends=(("proxy", M.ATTACH),),
                                                            events=(K.MAC_LEARNED,))),
        (on("proxy", "receive", LAST, EP_B, now=2),  Expect(C, Cause.CONTROL, sends=((EP_B, M.ATTACH_ACK),),
                                                            events=(K.MAC_KEPT,))),
        (on("b", "send_frame", frame(PEER, VM), now=2), Expect(A, Cause.DATA, M.DATA)),
        (on("proxy", "receive", LAST, EP_B, now=2),  Expect(A, Cause.DATA, frame(PEER, VM),
                                                            sends=(("lan", GARP), (EP_A, M.DATA), (EP_A, M.DATA)),
                                                            events=(K.MAC_MOVED, K.ANNOUNCED))),
        (on("a", "send_frame", frame(PEER, VM), now=2.1), Expect(A, Cause.DATA, M.DATA)),  # late, from A
        (on("proxy", "receive", LAST, EP_A, now=2.1), Expect(A, Cause.DATA, frame(PEER, VM),
                                                             sends=((EP_B, M.DATA),))),  # forwarded; kept at B
        (on("proxy", "from_lan", frame(VM, PEER), now=2.1), Expect(A, Cause.DATA, sends=((EP_B, M.DATA),))),
        (on("a", "send_frame", frame(PEER, VM), now=2.6), Expect(A, Cause.DATA, M.DATA)),  # past the hold
        (on("proxy", "receive", LAST, EP_A, now=2.6), Expect(A, Cause.DATA, frame(PEER, VM),
                                                             sends=((EP_A, M.DATA), ("lan", GARP), (EP_B, M.DATA)),
                                                             events=(K.MAC_MOVED, K.ANNOUNCED))),
        (on("a", "send_frame", frame(PEER, VM), now=2.7), Expect(A, Cause.DATA, M.DATA)),
        (on("proxy", "receive", LAST, EP_A, now=2.7), Expect(A, Cause.DATA, frame(PEER, VM))),
    ]
    assert play(ends, book) == [expect for _, expect in book]
    assert p.counters["mac_flaps"] == 1 and p.counters["presence_moves"] == 2
    assert p.counters["resent_frames"] == 1  # the LAN's frame sent toward B after it last spoke there


def test_unauthenticated_or_replayed_frames_move_nothing():
    ends = three()
    p, a, b = ends["proxy"], ends["a"], ends["b"]
    play(ends, [*attach("a", EP_A), *attach("b", EP_B), *vm_speaks_at_a(now=1)])
    old = a.send_frame(frame(PEER, VM), 1).data
    assert p.receive(old, EP_A, 1).data == frame(PEER, VM)
    (_, claim), = b.serve(VM, 3).sends
    assert [e.kind for e in p.receive(claim, EP_B, 3).events] == [K.MAC_KEPT]
    assert p.receive(b.send_frame(FIRST, 3).data, EP_B, 3).data == FIRST  # the VM now speaks at B
    assert p.macs.lookup(VM) == b.session
    assert p.receive(old, EP_A, 4) == Answer(D, Drop.REPLAYED)  # past the flap hold: only authenticity stops it
    forged = bytearray(a.send_frame(frame(PEER, VM), 4).data)
    forged[-1] ^= 1
    assert p.receive(bytes(forged), EP_A, 4) == Answer(D, Drop.AUTH_FAILED)
    assert p.receive(bytes(forged), EP_B, 4) == Answer(D, Drop.AUTH_FAILED)
    assert p.macs.lookup(VM) == b.session and p.counters["presence_moves"] == 1


def test_two_claims_and_no_frame_yet_the_newest_wins_until_the_vm_speaks():
    ends = three()
    p, a, b = ends["proxy"], ends["a"], ends["b"]
    play(ends, [*attach("a", EP_A), *attach("b", EP_B)])
    (_, claim_a), = a.serve(VM, 1).sends
    (_, claim_b), = b.serve(VM, 2).sends
    p.receive(claim_a, EP_A, 1)
    p.receive(claim_b, EP_B, 2)
    assert p.macs.lookup(VM) == b.session  # neither heard: the newest claim
    assert p.receive(a.send_frame(frame(PEER, VM), 3).data, EP_A, 3).action == A
    assert p.macs.lookup(VM) == a.session  # it speaks at A
    (_, again), = b.roamed(40).sends  # B attaches again much later, still naming it: A's VM stays
    assert [e.kind for e in p.receive(again, EP_B, 40).events] == [K.MAC_KEPT]
    assert p.macs.lookup(VM) == a.session


def test_resend_keeps_what_was_sent_since_the_vm_last_spoke_and_no_more_than_its_bounds():
    never = float("-inf")
    r = Resend(window=1.0, max_frames=3, max_bytes=250, budget=350)
    f1, f2, f3, f4 = (bytes([i]) * 100 for i in range(1, 5))
    r.keep(VM, f1, 1.0, heard=0.5)
    r.keep(VM, f2, 2.0, heard=1.9)  # the VM spoke at 1.9: f1 (sent at 1.0) reached it
    assert r.take(VM, since=1.85, now=2.1) == [f2] and r.size == 0 and len(r) == 0
    r.keep(VM, f1, 3.0, heard=never)
    assert r.take(VM, since=never, now=4.5) == []  # past the window
    for t, f in ((5.0, f1), (5.1, f2), (5.2, f3)):
        r.keep(VM, f, t, heard=never)
    assert r.take(VM, since=never, now=5.3) == [f2, f3] and r.counters["resend_evicted"] == 1  # 250 bytes
    r.max_bytes = 1000
    for t, f in ((6.0, f1), (6.1, f2), (6.2, f3), (6.3, f4)):
        r.keep(VM, f, t, heard=never)
    assert r.counters["resend_evicted"] == 2 and len(r) == 3  # 3 frames at most
    r.keep(PEER, f1, 6.4, heard=never)  # 350 bytes for all MACs: this one is not kept
    assert r.counters["resend_not_kept"] == 1 and r.size == 300
    r.expire(7.35)  # its newest frame is more than a window old
    assert r.size == 0 and r.take(VM, never, 7.4) == []


def test_host_end_serves_and_forgets_on_request_and_never_learns_the_hosts_own_macs():
    import pytest
    ends = three()
    a = ends["a"]
    play(ends, attach("a", EP_A))
    bridge = bytes.fromhex("0200000000bb")
    a.local_macs.add(bridge)  # the driver says: the bridge's own
    assert a.send_frame(frame(BCAST, bridge), 1).sends == () and a.macs == ()
    assert [e.kind for e in a.serve(VM, 2).events] == [K.MAC_LEARNED] and a.macs == (VM,)
    assert a.serve(VM, 2) == Answer(C, Cause.MACS)  # already served: nothing to say
    assert a.forget([PEER], 3) == Answer(C, Cause.MACS)  # never served: nothing to say
    gone = a.forget([VM], 3)
    assert [(to, M(int(m[1]))) for to, m in gone.sends] == [("proxy", M.ATTACH)] and a.macs == ()
    with pytest.raises(ValueError, match="not a unicast MAC"):
        a.serve(BCAST, 4)
    assert a.counters["macs_served"] == 1 and a.counters["macs_forgotten"] == 1


def test_past_max_macs_an_attach_names_the_vms_heard_most_recently():
    """An ATTACH names at most MAX_MACS: past that, those that spoke least recently go unnamed, never a VM that
    just spoke (which the proxy would then release, flooding its frames to every host)."""
    from tunnel.wire import MAX_MACS

    end = HostEnd(CIPHER, [bytes([2, 0, 0, 0, 0xFF, 0xFF])])
    vms = [bytes([2, 0, 0, 0, i >> 8, i & 0xFF]) for i in range(MAX_MACS + 6)]
    for t, mac in enumerate(vms):
        end.send_frame(frame(BCAST, mac), float(t))
    named = end.macs
    assert len(named) == MAX_MACS and named[0] == bytes([2, 0, 0, 0, 0xFF, 0xFF])  # the given one first
    assert named[1:] == tuple(vms[-(MAX_MACS - 1):])  # the newest
    end.send_frame(frame(BCAST, vms[0]), 100.0)  # the oldest speaks again: it is named, the next oldest is not
    assert vms[0] in end.macs and vms[len(vms) - MAX_MACS + 1] not in end.macs
