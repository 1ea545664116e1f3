"""Hypothesis: tunnel encapsulation round-trips; forged, mutated and replayed messages change nothing;
TCP framing reassembles at any split points; the replay window matches a simple model."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from collections import Counter

from conntrack.answer import Action, Answer
from tunnel import AeadCipher, Drop, HostEnd, ProxyEnd, SessionState, StreamDecoder, frame_stream_message
from tunnel.crypto import Key, ReplayWindow
from tunnel.wire import MsgType, parse_header

CIPHER = AeadCipher(Key(bytes(range(32))))
VM = bytes.fromhex("020000000001")
PEER = bytes.fromhex("02000000aaaa")
EP = ("192.0.2.10", 40000)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

frames = st.builds(
    lambda dst, payload: dst + VM + b"\x08\x00" + payload,
    st.sampled_from([PEER, b"\xff" * 6, bytes.fromhex("333300000001")]),
    st.binary(min_size=0, max_size=1500),
)


def to_proxy(a: Answer) -> list[bytes]:
    """The messages a host end's answer sends the proxy (a sealed frame, then or else control messages)."""
    return [m for _, m in a.sends] + ([a.data] if a.data is not None else [])


def quiet_drop(answer: Answer, message: bytes, to=None) -> bool:
    """A DROP with no frame and no event, sending nothing, or, for a message naming a session the proxy
    does not know, one RESET to where it claims to come from, never larger than it."""
    if answer.action != Action.DROP or answer.data is not None or answer.events != ():
        return False
    if answer.sends == ():
        return True
    if answer.reason != Drop.UNKNOWN_SESSION or len(answer.sends) != 1:
        return False
    ((dest, reset),) = answer.sends
    return (dest == to and parse_header(reset).type == MsgType.RESET and len(reset) <= len(message)
            and parse_header(reset).session == parse_header(message).session)


def attached():
    p = ProxyEnd(CIPHER)
    h = HostEnd(CIPHER, [VM])
    out = to_proxy(h.start(0.0))
    for _ in range(3):  # ATTACH, EPOCH, ATTACH again, ATTACH_ACK
        back = [m for a in [p.receive(m, EP, 0.0) for m in out] for _, m in a.sends]
        out = [m for a in [h.receive(m, 0.0) for m in back] for m in to_proxy(a)]
    assert h.state == SessionState.ATTACHED
    a = p.from_lan(b"\xff" * 6 + PEER + b"\x08\x00" + bytes(46), 0.0)  # the peer is on the LAN
    for _, m in a.sends:
        assert h.receive(m, 0.0).action == Action.ACCEPT
    assert not p.drops and not h.drops
    return h, p


def state_of(h: HostEnd, p: ProxyEnd):
    return (
        h.state, h.session, h._window.top, tuple(h.learned),
        {sid: (s.endpoint, s.state, s.window.top, s.named) for sid, s in p.sessions.items()},
        tuple((m, e.port) for m, e in p.macs.items()),
        {m: tuple(a) for m, a in p.addresses.items()},
    )


@SETTINGS
@given(st.lists(frames, min_size=1, max_size=8))
def test_encapsulation_round_trips_both_ways(fs):
    h, p = attached()
    msgs = []
    for f in fs:
        a = h.send_frame(f, 1.0)
        assert a.action == Action.ACCEPT and a.sends == ()
        msgs.append(a.data)
    answers = [p.receive(m, EP, 1.0) for m in msgs]
    assert all(a.action == Action.ACCEPT and a.sends == () for a in answers)
    assert [a.data for a in answers] == fs
    back = [f[6:12] + f[0:6] + f[12:] for f in fs if f[0] == 0x02]  # unicast replies to the VM
    sealed = [m for f in back for _, m in p.from_lan(f, 1.0).sends]
    opened = [h.receive(m, 1.0) for m in sealed]
    assert all(a.action == Action.ACCEPT for a in opened)
    assert [a.data for a in opened] == back


@SETTINGS
@given(st.binary(max_size=2000))
def test_any_bytes_are_a_counted_drop_and_change_nothing(junk):
    h, p = attached()
    before = state_of(h, p)
    pa = p.receive(junk, ("203.0.113.9", 9), 1.0)
    ha = h.receive(junk, 1.0)
    assert quiet_drop(pa, junk, ("203.0.113.9", 9))  # nothing sent (a RESET at most), no event
    assert ha == Answer(Action.DROP, ha.reason)  # nothing sent, no event
    assert state_of(h, p) == before
    assert p.drops == {pa.reason: 1} and h.drops == {ha.reason: 1}


@st.composite
def mutations(draw):
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    return kind, draw(st.integers(0, 10_000)), draw(st.integers(1, 255)), draw(st.binary(min_size=1, max_size=64))


def mutate(m: bytes, how) -> bytes:
    kind, pos, xor, blob = how
    pos %= len(m)
    if kind == "flip":
        return m[:pos] + bytes([m[pos] ^ xor]) + m[pos + 1:]
    if kind == "truncate":
        return m[:pos]
    if kind == "extend":
        return m + blob
    return m[:pos] + blob + m[pos + len(blob):]


@SETTINGS
@given(frames, mutations())
def test_mutated_messages_are_rejected_and_change_nothing(f, how):
    h, p = attached()
    m = h.send_frame(f, 1.0).data
    bad = mutate(m, how)
    if bad == m:
        return
    before = state_of(h, p)
    answer = p.receive(bad, ("203.0.113.9", 9), 1.0)
    assert quiet_drop(answer, bad, ("203.0.113.9", 9))  # no frame, nothing sent (a RESET at most), no event
    assert state_of(h, p) == before
    reason = next(iter(p.drops))
    assert reason == answer.reason
    assert reason in (Drop.AUTH_FAILED, Drop.TRUNCATED, Drop.OVERSIZED, Drop.BAD_VERSION, Drop.BAD_TYPE,
                      Drop.BAD_FLAGS, Drop.WRONG_DIRECTION, Drop.UNKNOWN_SESSION, Drop.REPLAYED, Drop.MODE_MISMATCH)
    assert p.receive(m, EP, 1.0).action == Action.ACCEPT  # the genuine message still passes afterwards


@SETTINGS
@given(st.lists(frames, min_size=1, max_size=6), st.lists(st.integers(0, 100), min_size=1, max_size=30))
def test_replays_in_any_order_deliver_each_frame_at_most_once(fs, picks):
    h, p = attached()
    msgs = [h.send_frame(f, 1.0).data for f in fs]
    order = [msgs[i % len(msgs)] for i in picks] + msgs
    answers = [p.receive(m, ("203.0.113.9", i), 1.0) for i, m in enumerate(order)]
    delivered = [a.data for a in answers if a.data is not None]
    assert sorted(delivered) == sorted(fs)  # every frame exactly once, whatever the order
    assert p.drops[Drop.REPLAYED] == len(order) - len(msgs)


@SETTINGS
@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=10), st.data())
def test_stream_reassembly_at_random_split_points(msgs, data):
    stream = b"".join(frame_stream_message(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    d = StreamDecoder()
    got, prev = [], 0
    for c in cuts + [len(stream)]:
        got += d.feed(stream[prev:c])
        prev = c
    assert got == msgs and d.pending == 0


@SETTINGS
@given(st.lists(st.integers(0, 3000), max_size=200), st.integers(2, 6))
def test_replay_window_matches_model(seqs, blocks):
    w = ReplayWindow(blocks)
    seen: set[int] = set()
    top = -1
    for s in seqs:
        expect = s not in seen and (s > top or s + w.size > top)
        assert w.update(s) == expect
        if expect:
            seen.add(s)
            top = max(top, s)


VM_B = bytes.fromhex("020000000002")
ops = st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(0, 1), st.binary(min_size=0, max_size=200), st.booleans()),
    st.tuples(st.just("lan"), st.sampled_from([VM, VM_B, b"\xff" * 6, bytes.fromhex("02000000beef")]),
              st.binary(max_size=100)),
    st.tuples(st.just("junk"), st.binary(max_size=120)),
    st.tuples(st.just("replay"), st.integers(0, 10_000), st.integers(0, 3)),
    st.tuples(st.just("mutate"), st.integers(0, 10_000), mutations()),
    st.tuples(st.just("time"), st.floats(0.0, 40.0)),
    st.tuples(st.just("roam"), st.integers(0, 1)),
), max_size=40)


@SETTINGS
@given(ops)
def test_interleaved_traffic_forgeries_and_replays_keep_the_invariants(script):
    """Two host ends and a LAN under any interleaving of traffic, forgeries, replays, roaming and
    time: the LAN only ever sees frames a host end really sent (each at most once) or the proxy's
    own announcements; the MAC table points only at live sessions or the LAN."""
    p = ProxyEnd(CIPHER, session_timeout=30.0)
    hosts = [HostEnd(CIPHER, [VM], keepalive=5.0, dead_after=15.0), HostEnd(CIPHER, [VM_B], keepalive=5.0, dead_after=15.0)]
    eps = [("192.0.2.10", 1000), ("198.51.100.20", 2000)]
    now = 0.0
    sent: list[bytes] = []  # frames host ends sent (the only legitimate LAN frames besides announcements)
    captured: list[tuple[int, bytes]] = []
    on_lan: list[bytes] = []
    outbox: list[list[bytes]] = [[], []]  # what each host end sent, not yet delivered
    proxy_out: list[tuple] = []
    drops = {"host": Counter(), "proxy": Counter()}  # DROP answers by reason, to compare with the counters

    def host(i: int, a: Answer) -> Answer:
        outbox[i].extend(m for _, m in a.sends)
        if a.action == Action.DROP:
            drops["host"][a.reason] += 1
        return a

    def proxy(a: Answer) -> Answer:
        if a.data is not None:
            on_lan.append(a.data)
        for to, m in a.sends:
            (on_lan.append(m) if to == "lan" else proxy_out.append((to, m)))
        if a.action == Action.DROP:
            drops["proxy"][a.reason] += 1
        return a

    def pump():
        for _ in range(4):
            for i in range(len(hosts)):
                out, outbox[i] = outbox[i], []
                for m in out:
                    captured.append((i, m))
                    proxy(p.receive(m, eps[i], now))
            out, proxy_out[:] = list(proxy_out), []
            for ep, m in out:
                for i, h in enumerate(hosts):
                    if eps[i] == ep:
                        host(i, h.receive(m, now))

    for i, h in enumerate(hosts):
        host(i, h.start(now))
    pump()
    for op in script:
        kind = op[0]
        if kind == "send":
            _, i, body, bcast = op
            src = (VM, VM_B)[i]
            f = (b"\xff" * 6 if bcast else PEER) + src + b"\x08\x00" + body
            a = host(i, hosts[i].send_frame(f, now))
            if a.action == Action.ACCEPT:
                sent.append(f)
                outbox[i].append(a.data)
        elif kind == "lan":
            _, dst, body = op
            proxy(p.from_lan(dst + PEER + b"\x08\x00" + body, now))
        elif kind == "junk":
            proxy(p.receive(op[1], ("203.0.113.9", 9), now))
        elif kind == "replay" and captured:
            _, k, times = op
            for _ in range(times):
                proxy(p.receive(captured[k % len(captured)][1], ("203.0.113.9", 9), now))
        elif kind == "mutate" and captured:
            _, k, how = op
            m = captured[k % len(captured)][1]
            bad = mutate(m, how)
            if bad != m:
                proxy(p.receive(bad, ("203.0.113.9", 9), now))
        elif kind == "time":
            now += op[1]
            for i, h in enumerate(hosts):
                host(i, h.expire(now))
            proxy(p.expire(now))
        elif kind == "roam":
            i = op[1]
            eps[i] = (eps[i][0], eps[i][1] + 1)
            host(i, hosts[i].roamed(now))
        pump()
        live = set(p.sessions)
        assert all(e.port == 0 or e.port in live for _, e in p.macs.items())
    # Each end's drop counters are exactly the DROP answers it gave: nobody needs to diff them.
    assert drops["proxy"] == p.drops and drops["host"] == hosts[0].drops + hosts[1].drops
    legit = list(sent)
    for f in on_lan:
        if f in legit:
            legit.remove(f)  # each sent frame delivered at most once
        else:
            assert f[12:14] in (b"\x08\x06", b"\x86\xdd") and f[6:12] in (VM, VM_B), f  # an announcement
