"""Playbooks (mitmproxy's ``tutils.Playbook`` spirit): the two tunnel ends wired in memory, a script of
inputs and the exact answers expected, read top to bottom.

Each step is an input to one end; ``LAST`` stands for the message the other end's previous answer
sent, ``AGAIN`` for the message this end was last given (a replay).  An answer is compared whole (action, reason, data, sends, events), sealed messages shown by
their type, so a changed answer in any field fails the step.
"""
from __future__ import annotations

import itertools
from typing import Any, NamedTuple

from conntrack.answer import Action, Answer
from tunnel import AeadCipher, Cause, Drop, EventKind, HostEnd, ProxyEnd, SessionState
from tunnel.crypto import Key
from tunnel.wire import MsgType, parse_header

CIPHER = AeadCipher(Key(bytes(range(32))))
VM = bytes.fromhex("020000000001")
PEER = bytes.fromhex("02000000aaaa")
BCAST = b"\xff" * 6
EP = ("192.0.2.10", 40000)
EP2 = ("192.0.2.99", 40001)
LAST = object()  # the message the other end's previous answer sent
AGAIN = object()  # the message this end was last given, once more
A, D, C = Action.ACCEPT, Action.DROP, Action.CONSUME
M = MsgType
K = EventKind


def frame(dst: bytes, src: bytes, body: bytes = bytes(46), ethertype: bytes = b"\x08\x00") -> bytes:
    return dst + src + ethertype + body


def arp_from(mac: bytes, ip: bytes) -> bytes:
    """An ARP request the VM sends: the proxy learns its address from it."""
    return frame(BCAST, mac, bytes.fromhex("0001080006040001") + mac + ip + bytes(6) + bytes([198, 18, 0, 1]),
                 b"\x08\x06")


class Step(NamedTuple):
    """One input: ``end.method(*args, now)``; ``endpoint`` is where a host end's message comes from."""

    end: str  # "host" or "proxy"
    method: str
    args: tuple = ()
    now: float = 0.0


class Expect(NamedTuple):
    """An answer as the playbook shows it: messages by type, frames as bytes, events by kind."""

    action: Action
    reason: Any
    data: Any = None
    sends: tuple = ()
    events: tuple = ()


def host(method: str, *args, now: float = 0.0) -> Step:
    return Step("host", method, args, now)


def proxy(method: str, *args, now: float = 0.0) -> Step:
    return Step("proxy", method, args, now)


def _shown(b: bytes, is_message: bool):
    return MsgType(parse_header(b).type) if is_message else b


def play(h: HostEnd, p: ProxyEnd, book: list[tuple[Step, Expect]]) -> list[Expect]:
    """Run the steps in order; the answers as the playbook shows them, for one whole comparison."""
    inbox = {"host": [], "proxy": []}  # messages on their way to each end
    given = {}  # the message each end was last given
    shown = []
    for step, _ in book:
        args = tuple(inbox[step.end].pop(0) if a is LAST else given[step.end] if a is AGAIN else a
                     for a in step.args)
        if step.method == "receive":
            given[step.end] = args[0]
        end = h if step.end == "host" else p
        answer: Answer = getattr(end, step.method)(*args, step.now)
        other = "proxy" if step.end == "host" else "host"
        inbox[other].clear()  # LAST is the previous answer's message: older ones are not delivered
        sends = []
        for to, m in answer.sends:
            is_message = to != "lan"
            sends.append((to, _shown(m, is_message)))
            if is_message:
                inbox[other].append(m)
        data_is_message = step.end == "host" and step.method == "send_frame"
        if answer.data is not None and data_is_message:
            inbox[other].append(answer.data)
        shown.append(Expect(answer.action, answer.reason,
                            None if answer.data is None else _shown(answer.data, data_is_message),
                            tuple(sends), tuple(e.kind for e in answer.events)))
    return shown


def ends():
    c = itertools.count(1)
    rnd = lambda n: b"".join((next(c) * 0x0102030405060708).to_bytes(8, "big")  # noqa: E731 - deterministic
                             for _ in range(-(-n // 8)))[-n:]
    return HostEnd(CIPHER, [VM], retry=0.5), ProxyEnd(CIPHER, random_bytes=rnd)


def test_host_playbook_attach_traffic_retry_and_loss_of_the_proxy():
    h, p = ends()
    book = [
        # input                                       answer expected
        (host("start"),                               Expect(C, Cause.START, sends=(("proxy", M.ATTACH),),
                                                             events=(K.ATTACHING,))),
        (host("send_frame", frame(PEER, VM)),         Expect(D, Drop.NOT_ATTACHED)),  # no session key before EPOCH
        (host("expire", now=0.4),                     Expect(C, Cause.TIMER)),  # not due yet
        (host("expire", now=0.5),                     Expect(C, Cause.TIMER, sends=(("proxy", M.ATTACH),))),  # retry
        (proxy("receive", LAST, EP, now=0.5),         Expect(C, Cause.CHALLENGE, sends=((EP, M.EPOCH),))),
        (host("receive", LAST, now=0.5),              Expect(C, Cause.CONTROL, sends=(("proxy", M.ATTACH),))),
        (host("send_frame", frame(PEER, VM), now=0.5), Expect(A, Cause.DATA, M.DATA)),  # sealed while attaching
        (proxy("receive", LAST, EP, now=0.5),         Expect(D, Drop.UNKNOWN_SESSION, sends=((EP, M.RESET),))),
        (host("receive", LAST, now=0.5),              Expect(D, Drop.STALE)),  # not acked yet: not a lost session
        (host("expire", now=2.5),                     Expect(C, Cause.TIMER, sends=(("proxy", M.ATTACH),))),  # retry
        (proxy("receive", LAST, EP, now=2.5),         Expect(C, Cause.CONTROL, sends=((EP, M.ATTACH_ACK),),
                                                             events=(K.SESSION_OPENED, K.MAC_MOVED))),
        (host("receive", LAST, now=2.5),              Expect(C, Cause.CONTROL, events=(K.ATTACHED,))),
        (host("receive", b"junk" * 5, now=2.6),       Expect(D, Drop.BAD_VERSION)),
        (host("send_frame", b"short", now=2.6),       Expect(D, Drop.TRUNCATED)),
        (host("send_frame", frame(PEER, VM), now=3),  Expect(A, Cause.DATA, M.DATA)),
        (proxy("receive", LAST, EP, now=3),           Expect(A, Cause.DATA, frame(PEER, VM))),
        (proxy("from_lan", frame(VM, PEER), now=3),   Expect(A, Cause.DATA, sends=((EP, M.DATA),))),
        (host("receive", LAST, now=3),                Expect(A, Cause.DATA, frame(VM, PEER))),
        (host("expire", now=7.5),                     Expect(C, Cause.TIMER, sends=(("proxy", M.KEEPALIVE),))),
        (proxy("receive", LAST, EP, now=7.5),         Expect(C, Cause.CONTROL, sends=((EP, M.KEEPALIVE_ACK),))),
        (host("receive", LAST, now=7.5),              Expect(C, Cause.CONTROL)),
        # The proxy goes silent: 15 s after it was last heard the host end gives the session up and attaches anew.
        (host("expire", now=22.5),                    Expect(C, Cause.TIMER, sends=(("proxy", M.ATTACH),),
                                                             events=(K.SESSION_CLOSED, K.NEW_SESSION_ID,
                                                                     K.ATTACHING))),
        (proxy("receive", LAST, EP, now=22.5),        Expect(C, Cause.CHALLENGE, sends=((EP, M.EPOCH),))),
        (host("receive", LAST, now=22.5),             Expect(C, Cause.CONTROL, sends=(("proxy", M.ATTACH),))),
        (proxy("receive", LAST, EP, now=22.5),        Expect(C, Cause.CONTROL, sends=((EP, M.ATTACH_ACK),),
                                                             events=(K.SESSION_OPENED, K.SESSION_CLOSED,
                                                                     K.MAC_MOVED))),
        (host("receive", LAST, now=22.5),             Expect(C, Cause.CONTROL, events=(K.ATTACHED,))),
        (host("close", now=23),                       Expect(C, Cause.CLOSE, sends=(("proxy", M.DETACH),),
                                                             events=(K.SESSION_CLOSED,))),
        (proxy("receive", LAST, EP, now=23),          Expect(C, Cause.CONTROL, events=(K.SESSION_CLOSED,))),
        (host("send_frame", frame(PEER, VM), now=24), Expect(D, Drop.NOT_ATTACHED)),
    ]
    assert play(h, p, book) == [expect for _, expect in book]
    assert h.state == SessionState.CLOSED and not p.sessions


def test_proxy_playbook_roaming_announcements_replays_and_expiry():
    h, p = ends()
    ip = bytes([198, 18, 0, 50])
    book = [
        (host("start"),                               Expect(C, Cause.START, sends=(("proxy", M.ATTACH),),
                                                             events=(K.ATTACHING,))),
        (proxy("receive", LAST, EP),                  Expect(C, Cause.CHALLENGE, sends=((EP, M.EPOCH),))),
        (host("receive", LAST),                       Expect(C, Cause.CONTROL, sends=(("proxy", M.ATTACH),))),
        (proxy("receive", LAST, EP),                  Expect(C, Cause.CONTROL, sends=((EP, M.ATTACH_ACK),),
                                                             events=(K.SESSION_OPENED, K.MAC_MOVED))),
        (host("receive", LAST),                       Expect(C, Cause.CONTROL, events=(K.ATTACHED,))),
        (proxy("from_lan", frame(BCAST, PEER)),       Expect(A, Cause.DATA, sends=((EP, M.DATA),))),  # flooded
        (host("send_frame", arp_from(VM, ip)),        Expect(A, Cause.DATA, M.DATA)),
        (proxy("receive", LAST, EP),                  Expect(A, Cause.DATA, arp_from(VM, ip))),  # to the LAN
        (proxy("from_lan", frame(PEER, PEER)),        Expect(D, Drop.NO_ROUTE)),  # LAN to LAN: not ours
        (proxy("receive", b"\x02\x63" + bytes(38), EP), Expect(D, Drop.BAD_TYPE)),  # type 99
        # The host end's address changes: the ATTACH from the new endpoint moves the session there,
        # and the proxy announces the VM's address on the LAN (gratuitous ARP).
        (host("roamed", now=2),                       Expect(C, Cause.ROAMED, sends=(("proxy", M.ATTACH),),
                                                             events=(K.ATTACHING,))),
        (proxy("receive", LAST, EP2, now=2),          Expect(C, Cause.CONTROL,
                                                             sends=(("lan", bytes.fromhex("ffffffffffff") + VM
                                                                     + bytes.fromhex("08060001080006040001")
                                                                     + VM + ip + bytes(6) + ip),
                                                                    (EP2, M.ATTACH_ACK)),
                                                             events=(K.ENDPOINT_CHANGED, K.ANNOUNCED))),
        (host("receive", LAST, now=2),                Expect(C, Cause.CONTROL, events=(K.ATTACHED,))),
        (proxy("from_lan", frame(VM, PEER), now=2),   Expect(A, Cause.DATA, sends=((EP2, M.DATA),))),
        (host("receive", LAST, now=2),                Expect(A, Cause.DATA, frame(VM, PEER))),
        (host("receive", AGAIN, now=2),               Expect(D, Drop.REPLAYED)),
        (host("send_frame", frame(PEER, VM), now=2),  Expect(A, Cause.DATA, M.DATA)),
        (proxy("receive", LAST, EP2, now=2),          Expect(A, Cause.DATA, frame(PEER, VM))),
        (proxy("receive", AGAIN, EP, now=2),          Expect(D, Drop.REPLAYED)),  # from anywhere: still a replay
        # Silence: the session expires a minute after it was last heard, and its MACs go with it.
        (proxy("expire", now=61.9),                   Expect(C, Cause.TIMER)),
        (proxy("expire", now=62),                     Expect(C, Cause.TIMER, events=(K.SESSION_CLOSED,))),
        (proxy("from_lan", frame(VM, PEER), now=62),  Expect(D, Drop.NO_SESSION)),
    ]
    assert play(h, p, book) == [expect for _, expect in book]
    assert not p.sessions and p.macs.lookup(VM) is None
