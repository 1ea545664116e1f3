"""The endpoint model whose observations the judge reads: handshake, data, RST, back-off, give-up, UDP sessions."""
from __future__ import annotations

import random

import pytest

from conntrack import Proto, TcpFlag, build, parse_ip
from sim import wire
from sim.connection import Connection
from sim.judge import Move
from sim.scenario import ConnSpec
from sim.stack import RST, SockState, Stack, TRANSITIONS
from sim.world import Clock, Loss, Network, Site

VM, PEER = wire.addr("203.0.113.5"), wire.addr("198.51.100.10")


class Pair:
    """A client stack on a LAN and a server stack on the internet, wired through a Network."""

    def __init__(self, protocol=Proto.TCP, timeout=10.0, session=False, moves=()):
        self.clock = Clock()
        self.net = Network(self.clock, random.Random(1))
        self.lan = self.net.add_site(Site("lan", "203.0.113.0/24", latency=0.005))
        self.far = self.net.add_site(Site("far", "198.51.100.10/32", latency=0.02))
        self.sent: list[tuple[float, bytes]] = []
        self.net.tap = lambda now, data: self.sent.append((now, data))
        self.client = self._stack("client", VM, self.lan)
        self.server = self._stack("server", PEER, self.far)
        self.server.observe = True
        spec = ConnSpec("c1", "outbound", protocol, "p", 443, 0.0, 1.0, 100, 300, session)
        self.conn = Connection(0, spec, self.clock, 20.0, timeout, moves)
        for st in (self.client, self.server):
            st.conn_of = lambda tag: self.conn if tag == 0 else None
        if protocol == Proto.TCP:
            self.server.tcp_listen(443, timeout)
            self.conn.sock = self.client.tcp_connect(VM, 40000, PEER, 443, self.conn, timeout, 1000)
        else:
            self.server.udp_open(PEER, 443, None, 0, None, client=False, session=session)
            self.conn.sock = self.client.udp_open(VM, 40000, PEER, 443, self.conn, client=True)
        Connection.tick(self.conn)

    def _stack(self, name, address, site):
        st = Stack(name, self.clock, self.net.lose)
        st.addresses.add(address)
        st.out = lambda d, t: self.net.send(d, t, site)
        site.holders[address] = st.receive
        return st

    def run(self, until):
        self.clock.run(until)


def test_state_table_has_every_live_state_and_terminal_states_have_no_way_out():
    assert set(TRANSITIONS) == set(SockState)
    assert TRANSITIONS[SockState.RESET] == {} and TRANSITIONS[SockState.TIMED_OUT] == {}


def test_handshake_then_requests_are_answered():
    p = Pair()
    p.run(5.5)
    f = p.conn
    assert f.sock.state == SockState.ESTABLISHED
    assert f.established_at == pytest.approx(0.050, abs=1e-6)  # SYN + SYN-ACK over a 25 ms path
    res = f.result(p.net)
    assert f.broken_at is None and len(res.runs) == 1
    flags = [parse_ip(d).tcp_flags for _, d in p.sent[:3]]
    assert flags == [TcpFlag.SYN, TcpFlag.SYN | TcpFlag.ACK, TcpFlag.ACK]
    assert all(build.verify(d) for _, d in p.sent)
    assert res.peer_saw == ((pytest.approx(0.025), "203.0.113.5", 40000),)


def test_segment_for_an_unknown_connection_gets_a_reset_that_kills_the_client():
    p = Pair()
    p.run(2.2)
    p.server.tcp.clear()  # the peer forgot the connection (as a new host's peer would never know it)
    p.run(4.0)
    f = p.conn
    assert f.broken_at is not None and f.broken_state == SockState.RESET and f.broken_client
    rst = [parse_ip(d) for _, d in p.sent if parse_ip(d).tcp_flags & RST]
    assert len(rst) == 1 and rst[0].src == PEER


def test_unanswered_segment_backs_off_exponentially_and_gives_up_on_time():
    p = Pair(timeout=10.0)
    p.run(2.2)
    del p.far.holders[PEER]  # the peer's address is gone
    p.run(40.0)
    f = p.conn
    assert f.broken_state == SockState.TIMED_OUT
    times = [t for t, d in p.sent if parse_ip(d).src == VM and parse_ip(d).payload_len and t > 2.2]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) >= 4
    # gaps[0]: the tail loss probe (no back-off); the RTO doubles from the probe on, and the user timeout
    # counts from the first RTO retransmission, times[2] (Linux's retrans_stamp: tests/unit/test_sim_linux_tcp.py)
    # each as the kernel's timer wheel runs it: the RTO doubled, then rounded up to the wheel's granularity
    assert all(2 * a - 0.032 <= b <= 2 * a + 0.256 for a, b in zip(gaps[1:], gaps[2:]))
    assert times[2] + 10.0 <= f.broken_at <= times[2] + 10.0 + 0.256
    assert p.net.last_loss[0] == Loss.NO_HOLDER
    # the peer's /32 link stays up: no router says anything, so the client only knows it timed out
    # (an ICMP host unreachable from a LAN's gateway makes it "unreachable": tests/unit/test_sim_linux_icmp.py)
    assert 0 not in p.net.losses
    assert f.result(p.net).cause.text == "timed out"


def test_a_lost_segment_is_retransmitted_and_the_stall_measured():
    p = Pair(moves=(Move(3.0, 1.0),))  # the peer unreachable from 3 s to 4 s
    p.run(3.0)
    holder = p.far.holders.pop(PEER)
    p.clock.at(4.0, lambda a, b: p.far.holders.__setitem__(PEER, holder))
    p.run(12.0)
    f = p.conn
    assert f.broken_at is None
    res = f.result(p.net)
    assert 1.0 < res.interruption_ms / 1000 < 4.0
    assert res.outcome.text == "survived" and len(res.runs) == 2


def test_udp_requests_are_answered_and_silence_times_out():
    p = Pair(Proto.UDP, timeout=5.0)
    p.run(3.5)
    assert p.conn.established_at is not None and p.conn.broken_at is None
    del p.far.holders[PEER]
    p.run(30.0)
    assert p.conn.broken_state == SockState.TIMED_OUT
    assert p.conn.broken_at == pytest.approx(4.0 + 5.0, abs=1e-6)


def test_session_server_ignores_a_new_source_mid_session_but_takes_a_new_hello():
    p = Pair(Proto.UDP, timeout=5.0, session=True)
    p.run(2.5)
    # the client's source changes (as behind a new NAT): its next datagrams say "D", not hello
    p.client.addresses = {wire.addr("203.0.113.6")}
    p.lan.holders[wire.addr("203.0.113.6")] = p.client.receive
    p.conn.sock.local = wire.addr("203.0.113.6")
    p.run(20.0)
    assert p.conn.broken_state == SockState.TIMED_OUT
    assert p.net.drops[Loss.NO_SOCKET] > 0
    first = [parse_ip(d) for _, d in p.sent if parse_ip(d).src == VM][0]
    assert p.sent[0][1][first.l4 + 8] == ord("H")
