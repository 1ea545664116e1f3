"""TCP tracking states against Linux nf_conntrack_proto_tcp.c, and their timeouts.

LINUX below is ``tcp_conntracks`` from net/netfilter/nf_conntrack_proto_tcp.c as in
current kernels (6.x; the machine's kernel is one), written out independently of
conntrack/tcp_states.py so that a change to either shows up here.
"""
from __future__ import annotations

import pytest
from scapy.all import IP, TCP, IPv6, raw

from conntrack import ConnTable, CtState, Direction, EventKind, TcpState, Timeouts, Why, parse_ip
from conntrack import FlowTuple, Proto
from conntrack.tcp_states import NEXT, TRANSITIONS, Segment, _classify, _row, classify, mermaid, next_state
from conntrack.timeouts import DAY

S = TcpState
sNO, sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL, sS2 = (S.NONE, S.SYN_SENT, S.SYN_RECV, S.ESTABLISHED, S.FIN_WAIT,
                                                    S.CLOSE_WAIT, S.LAST_ACK, S.TIME_WAIT, S.CLOSE, S.SYN_SENT2)
sIV, sIG = S.INVALID, S.IGNORE
COLUMNS = (sNO, sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL, sS2)

LINUX = {
    Direction.ORIGINAL: {
        #                 sNO  sSS  sSR  sES  sFW  sCW  sLA  sTW  sCL  sS2
        Segment.SYN:    (sSS, sSS, sIG, sIG, sIG, sIG, sIG, sSS, sSS, sS2),
        Segment.SYNACK: (sIV, sIV, sSR, sIV, sIV, sIV, sIV, sIV, sIV, sSR),
        Segment.FIN:    (sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV),
        Segment.ACK:    (sES, sIV, sES, sES, sCW, sCW, sTW, sTW, sCL, sIV),
        Segment.RST:    (sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL),
        Segment.NONE:   (sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV),
    },
    Direction.REPLY: {
        Segment.SYN:    (sIV, sS2, sIV, sIV, sIV, sIV, sIV, sSS, sIV, sS2),
        Segment.SYNACK: (sIV, sSR, sIG, sIG, sIG, sIG, sIG, sIG, sIG, sSR),
        Segment.FIN:    (sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV),
        Segment.ACK:    (sIV, sIG, sSR, sES, sCW, sCW, sTW, sTW, sCL, sIG),
        Segment.RST:    (sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL),
        Segment.NONE:   (sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV),
    },
}


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("segment", list(Segment))
def test_transition_row_matches_linux(direction, segment):
    ours = tuple(TRANSITIONS[direction][segment][s] for s in COLUMNS)
    assert ours == LINUX[direction][segment]


def test_table_is_complete_and_closed():
    for rows in TRANSITIONS.values():
        assert set(rows) == set(Segment)
        for row in rows.values():
            assert set(row) == set(COLUMNS)
            assert set(row.values()) <= set(COLUMNS) | {sIV, sIG}


def test_judgements_are_not_states():
    with pytest.raises(KeyError):
        next_state(Direction.ORIGINAL, Segment.ACK, S.IGNORE)


@pytest.mark.parametrize("flags,segment", [
    ("S", Segment.SYN), ("SA", Segment.SYNACK), ("F", Segment.FIN), ("FA", Segment.FIN), ("A", Segment.ACK),
    ("PA", Segment.ACK), ("R", Segment.RST), ("RA", Segment.RST), ("SR", Segment.RST), ("SF", Segment.SYN),
    ("", Segment.NONE), ("P", Segment.NONE), ("U", Segment.NONE),
])
def test_classify_in_linux_precedence(flags, segment):
    """Linux get_conntrack_index: RST, then SYN (with ACK: SYN/ACK), then FIN, then ACK."""
    bits = parse_ip(raw(IP() / TCP(flags=flags))).tcp_flags
    assert classify(bits) is segment


def _linux_index(flags: int) -> Segment:
    """get_conntrack_index, written out again: the precedence RST > SYN(/ACK) > FIN > ACK."""
    if flags & 0x04:
        return Segment.RST
    if flags & 0x02:
        return Segment.SYNACK if flags & 0x10 else Segment.SYN
    if flags & 0x01:
        return Segment.FIN
    return Segment.ACK if flags & 0x10 else Segment.NONE


def test_flat_table_is_the_readable_table_for_every_flag_combination():
    """NEXT (what each packet reads) says what TRANSITIONS (what people read) says, for all 64
    combinations of the six flag bits, and classification follows Linux for each of them."""
    for flags in range(64):
        assert _classify(flags) is classify(flags) is _linux_index(flags), flags
        for d in Direction:
            for i, state in enumerate(COLUMNS):
                assert NEXT[d][flags][i] == LINUX[d][_linux_index(flags)][i], (d, flags, state)


def test_a_row_of_the_readable_table_names_every_state_once():
    row = _row(*COLUMNS)
    assert list(row) == list(COLUMNS) and list(row.values()) == list(COLUMNS)
    with pytest.raises(AssertionError):
        _row(sSS, sSS)  # a row missing cells is an editing mistake, caught at import


def test_state_diagram_is_drawn_from_the_table():
    text = mermaid()
    lines = text.splitlines()
    assert lines[0] == "stateDiagram-v2"
    pairs = {(s, n) for rows in TRANSITIONS.values() for row in rows.values()
             for s, n in row.items() if n not in (sIV, sIG) and n != s}
    drawn = {tuple(line.split(":")[0].split()[::2]) for line in lines[1:]}
    assert drawn == {(s.name, n.name) for s, n in pairs} and len(lines) == 1 + len(pairs)
    assert "    SYN_SENT --> SYN_SENT2: SYN (reply)" in lines
    # an edge taken in both directions is drawn once, without a direction
    assert "    ESTABLISHED --> FIN_WAIT: FIN" in lines and "    NONE --> SYN_SENT: SYN (original)" in lines


# ------------------------------------------------------------------ through the table
CLIENT, SERVER = "192.0.2.10", "203.0.113.80"


class Tcp:
    """One TCP connection's segments, fed to a table at a given time."""

    def __init__(self, table: ConnTable, family: int = 4, sport: int = 40000, dport: int = 80) -> None:
        self.table = table
        self.family, self.sport, self.dport = family, sport, dport

    def send(self, flags: str, now: float, reply: bool = False, payload: bytes = b""):
        ip = IP if self.family == 4 else IPv6
        a, b = (CLIENT, SERVER) if self.family == 4 else ("2001:db8::10", "2001:db8:80::80")
        if reply:
            pkt = ip(src=b, dst=a) / TCP(sport=self.dport, dport=self.sport, flags=flags)
        else:
            pkt = ip(src=a, dst=b) / TCP(sport=self.sport, dport=self.dport, flags=flags)
        return self.table.track(parse_ip(raw(pkt / payload) if payload else raw(pkt)), now)

    def orig(self, flags, now, payload=b""):
        return self.send(flags, now, False, payload)

    def reply(self, flags, now, payload=b""):
        return self.send(flags, now, True, payload)


def fresh(**timeouts) -> tuple[ConnTable, Tcp]:
    table = ConnTable(Timeouts().with_(**timeouts) if timeouts else None, capacity=16)
    return table, Tcp(table)


def test_normal_open_and_close_walks_linux_states_with_their_timeouts():
    table, c = fresh()
    steps = [
        ("orig", "S", sSS, 120, CtState.NEW),
        ("reply", "SA", sSR, 60, CtState.ESTABLISHED),
        ("orig", "A", sES, 5 * DAY, CtState.ESTABLISHED),
        ("orig", "PA", sES, 5 * DAY, CtState.ESTABLISHED),
        ("reply", "A", sES, 5 * DAY, CtState.ESTABLISHED),
        ("orig", "FA", sFW, 120, CtState.ESTABLISHED),
        ("reply", "A", sCW, 60, CtState.ESTABLISHED),
        ("reply", "FA", sLA, 30, CtState.ESTABLISHED),
        ("orig", "A", sTW, 120, CtState.ESTABLISHED),
    ]
    now = 100.0
    for who, flags, state, timeout, ctstate in steps:
        now += 1
        t = getattr(c, who)(flags, now)
        assert t.ctstate is ctstate, (who, flags)
        assert t.direction is (Direction.ORIGINAL if who == "orig" else Direction.REPLY)
        assert t.conn.tcp_state is state, (who, flags)
        assert t.conn.deadline == now + timeout, (who, flags)
    assert len(table) == 1


def test_assured_after_the_three_way_handshake_not_before():
    table, c = fresh()
    conn = c.orig("S", 1).conn
    c.reply("SA", 2)
    assert not conn.assured and conn.seen_reply
    table.pop_events()
    c.orig("A", 3)
    assert conn.assured
    (ev,) = table.pop_events()
    assert (ev.kind, ev.state, ev.assured) == (EventKind.UPDATE, sES, True)


def test_simultaneous_open_goes_through_syn_sent2():
    table, c = fresh()
    conn = c.orig("S", 1).conn
    assert c.reply("S", 2).conn.tcp_state is sS2
    assert conn.deadline == 2 + 120
    assert c.orig("SA", 3).conn.tcp_state is sSR  # SYN/ACK sent to SYN2
    assert c.reply("SA", 4).conn.tcp_state is sSR
    c.orig("A", 5)
    assert conn.tcp_state is sES and conn.assured


def test_rst_closes_an_established_connection_for_ten_seconds():
    table, c = fresh()
    c.orig("S", 1), c.reply("SA", 2), c.orig("A", 3)
    t = c.reply("R", 4)
    assert t.conn.tcp_state is sCL and t.conn.deadline == 14 and len(table) == 1
    assert table.expire(13.9) == 0 and table.expire(14) == 1 and len(table) == 0


def test_rst_before_any_reply_kills_the_entry_at_once():
    table, c = fresh()
    c.orig("S", 1)
    table.pop_events()
    t = c.reply("RA", 2)  # port closed: the server answers the SYN with RST
    assert t.ctstate is CtState.ESTABLISHED and t.direction is Direction.REPLY
    assert len(table) == 0
    (ev,) = table.pop_events()
    assert (ev.kind, ev.why) == (EventKind.DESTROY, Why.RESET)
    # the client aborting its own attempt does the same
    table2, c2 = fresh()
    c2.orig("S", 1)
    assert c2.orig("R", 2).ctstate is CtState.NEW and len(table2) == 0


def test_syn_in_time_wait_reopens():
    table, c = fresh()
    for who, flags in [("orig", "S"), ("reply", "SA"), ("orig", "A"), ("orig", "FA"), ("reply", "FA"),
                       ("orig", "A")]:
        getattr(c, who)(flags, 1)
    old = c.orig("A", 2).conn
    assert old.tcp_state is sTW
    table.pop_events()
    t = c.orig("S", 3)
    assert t.ctstate is CtState.NEW and t.conn is not old and t.conn.tcp_state is sSS
    assert t.conn.deadline == 3 + 120 and not t.conn.assured
    kinds = [(e.kind, e.why) for e in table.pop_events()]
    assert kinds == [(EventKind.DESTROY, Why.REOPEN), (EventKind.NEW, None)]


def test_reply_syn_in_time_wait_reopens_with_roles_switched():
    table, c = fresh()
    for who, flags in [("orig", "S"), ("reply", "SA"), ("orig", "A"), ("orig", "FA"), ("reply", "FA"),
                       ("orig", "A")]:
        getattr(c, who)(flags, 1)
    t = c.reply("S", 2)  # the former server now connects to the former client
    assert t.ctstate is CtState.NEW and t.direction is Direction.ORIGINAL and t.conn.tcp_state is sSS
    o, r = t.conn.tuples()
    assert (o.src_text, o.sport, r.src_text, r.sport) == (SERVER, 80, CLIENT, 40000)


def test_syn_in_close_reopens():
    table, c = fresh()
    c.orig("S", 1), c.reply("SA", 2), c.orig("A", 3), c.orig("R", 4)
    t = c.orig("S", 5)
    assert t.ctstate is CtState.NEW and t.conn.tcp_state is sSS and len(table) == 1


@pytest.mark.parametrize("flags", ["A", "SA", "F", "FA", "", "P"])
def test_invalid_first_segments_create_nothing(flags):
    table, c = fresh()
    t = c.orig(flags, 1)
    if flags == "A":  # Linux picks up an established connection from an ACK (nf_conntrack_tcp_loose)
        assert t.ctstate is CtState.NEW and t.conn.tcp_state is sES and t.conn.deadline == 1 + 5 * DAY
        return
    assert (t.ctstate, t.why, t.conn, len(table)) == (CtState.INVALID, Why.TCP_INVALID, None, 0)


def test_invalid_segment_changes_nothing():
    table, c = fresh()
    conn = c.orig("S", 1).conn
    t = c.orig("F", 2)  # FIN before the SYN/ACK: sSS -> sIV
    assert (t.ctstate, t.why, t.conn) == (CtState.INVALID, Why.TCP_INVALID, conn)
    assert conn.tcp_state is sSS and conn.deadline == 121 and conn.orig_packets == 1


def test_ignored_segment_keeps_state_and_timeout():
    table, c = fresh()
    c.orig("S", 1), c.reply("SA", 2)
    conn = c.orig("A", 3).conn
    t = c.orig("S", 10)  # SYN in ESTABLISHED: ignored
    assert t.ctstate is CtState.ESTABLISHED and t.conn is conn
    assert conn.tcp_state is sES and conn.deadline == 3 + 5 * DAY and conn.orig_packets == 3


def test_ignored_reply_still_counts_as_a_reply():
    table, c = fresh()
    conn = c.orig("S", 1).conn
    t = c.reply("A", 2)  # a half-open connection's ACK: sSS -> sIG
    assert t.ctstate is CtState.ESTABLISHED and t.direction is Direction.REPLY
    assert conn.tcp_state is sSS and conn.seen_reply and conn.deadline == 121
    assert (conn.orig_packets, conn.reply_packets) == (1, 1)


def test_client_synack_in_established_is_invalid():
    table, c = fresh()
    c.orig("S", 1), c.reply("SA", 2), c.orig("A", 3)
    assert c.orig("SA", 4).ctstate is CtState.INVALID


def test_invalid_reply_segment_is_reported_in_its_direction_and_counted():
    table, c = fresh()
    conn = c.orig("S", 1).conn
    t = c.reply("F", 2)  # FIN answering a SYN: sSS -> sIV
    assert (t.ctstate, t.why, t.direction, t.conn) == (CtState.INVALID, Why.TCP_INVALID, Direction.REPLY, conn)
    c.reply("F", 3)
    assert table.stats().invalid == 2 and not conn.seen_reply and conn.reply_packets == 0


def test_ignored_segment_before_any_reply_is_still_new():
    table, c = fresh()
    conn = c.orig("A", 1).conn  # picked up mid-stream: sES, nothing seen from the server yet
    t = c.orig("S", 2)  # SYN in ESTABLISHED: ignored
    assert (t.ctstate, t.conn, conn.tcp_state, conn.orig_packets) == (CtState.NEW, conn, sES, 2)


def test_reply_synack_in_time_wait_is_ignored_not_a_reopening():
    table, c = fresh()
    for who, flags in [("orig", "S"), ("reply", "SA"), ("orig", "A"), ("orig", "FA"), ("reply", "FA"),
                       ("orig", "A")]:
        conn = getattr(c, who)(flags, 1).conn
    assert conn.tcp_state is sTW
    table.pop_events()
    t = c.reply("SA", 2)  # a late retransmitted SYN/ACK: sTW -> sIG
    assert (t.ctstate, t.conn, conn.tcp_state, len(table)) == (CtState.ESTABLISHED, conn, sTW, 1)
    assert table.pop_events() == [] and conn.reply_packets == 3


def test_reopening_keeps_the_nat_reply_tuple_and_reports_when():
    """A NAT gave the first connection its reply tuple; the SYN that reopens the tuple in
    TIME_WAIT gets the same one (the mapping stays), and the old entry's end is stamped."""
    table = ConnTable()
    nat = FlowTuple.make(Proto.TCP, SERVER, "203.0.113.1", 80, 61000)

    def orig(flags, now, reply=None):
        return table.track(parse_ip(raw(IP(src=CLIENT, dst=SERVER) / TCP(sport=40000, dport=80, flags=flags))),
                           now, reply)

    def back(flags, now):
        return table.track(parse_ip(raw(IP(src=SERVER, dst="203.0.113.1") / TCP(sport=80, dport=61000,
                                                                               flags=flags))), now)

    old = orig("S", 1, nat).conn
    back("SA", 1), orig("A", 1), orig("FA", 1), back("FA", 1)
    assert orig("A", 1).conn.tcp_state is sTW
    table.pop_events()
    t = orig("S", 3)
    assert t.ctstate is CtState.NEW and t.conn is not old and t.conn.tuples()[1] == nat
    assert back("SA", 4).conn is t.conn
    assert [(e.kind, e.why, e.now) for e in table.pop_events()][:2] == [
        (EventKind.DESTROY, Why.REOPEN, 3), (EventKind.NEW, None, 3)]


def test_ipv6_connection_uses_the_same_table():
    table = ConnTable(capacity=4)
    c = Tcp(table, family=6)
    c.orig("S", 1), c.reply("SA", 2)
    conn = c.orig("A", 3).conn
    assert conn.tcp_state is sES and conn.assured and conn.tuples()[0].family == 6


# ------------------------------------------------------------------ timeouts
def test_default_timeouts_are_linux_defaults():
    t = Timeouts()
    expected = {sSS: 120, sSR: 60, sES: 5 * 86400, sFW: 120, sCW: 60, sLA: 30, sTW: 120, sCL: 10, sS2: 120}
    assert {s: t.tcp(s) for s in expected} == expected
    assert (t.udp, t.udp_stream, t.icmp) == (30, 120, 30)


def test_timeouts_are_configurable():
    t = Timeouts().with_(established=3600, time_wait=1, udp=5)
    assert (t.tcp(sES), t.tcp(sTW), t.udp, t.tcp(sSS)) == (3600, 1, 5, 120)
    table, c = fresh(established=3600, syn_sent=7)
    assert c.orig("S", 10).conn.deadline == 17
    c.reply("SA", 11)
    assert c.orig("A", 12).conn.deadline == 12 + 3600


def test_bad_timeout_names_and_values():
    with pytest.raises(ValueError, match="unknown timeout.*establised"):
        Timeouts().with_(establised=1)
    with pytest.raises(ValueError, match="non-negative"):
        Timeouts().with_(udp=-1)
    # every offending name is listed, and the known ones shown, separated for reading
    with pytest.raises(ValueError, match=r"unknown timeout\(s\): tcp, udb; known: close, close_wait, "):
        Timeouts().with_(udb=1, tcp=2)
    with pytest.raises(ValueError, match=r"non-negative numbers: icmp, udp$"):
        Timeouts().with_(icmp=-1, udp="30")


def test_a_zero_timeout_is_allowed():
    """nat.conf's ``timeout 0`` is honoured: zero is a timeout (gone at once), not an error."""
    assert Timeouts().with_(udp=0).udp == 0
