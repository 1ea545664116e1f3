"""The simulator's endpoints and routers do what Linux does: each test names the kernel function or RFC.

Two stacks wired through ``sim.world.Network`` (as tests/unit/test_sim_stack.py does), with a LAN whose
gateway resolves neighbours, so ICMP errors come from where a real network sends them.
"""
from __future__ import annotations

import errno
import random

import pytest

from conntrack import Proto, build, parse_ip
from sim import linux, wire
from sim.connection import Connection
from sim.judge import Seen
from sim.scenario import ConnSpec
from sim.stack import SockState, Stack
from sim.world import Clock, Loss, Network, Nud, Site

VM, PEER = wire.addr("203.0.113.5"), wire.addr("198.51.100.10")


class Pair:
    """The VM's stack on a LAN (its gateway resolves it), a peer on the internet; the peer is the client."""

    def __init__(self, protocol=Proto.TCP, timeout=20.0, client="peer"):
        self.clock = Clock()
        self.net = Network(self.clock, random.Random(1))
        self.lan = self.net.add_site(Site("lan", "203.0.113.0/24", latency=0.005))
        self.far = self.net.add_site(Site("far", "198.51.100.10/32", latency=0.02))
        self.sent: list[tuple[float, bytes]] = []
        self.net.tap = lambda now, data: self.sent.append((now, data))
        self.vm = self._stack("vm", VM, self.lan)
        self.peer = self._stack("peer", PEER, self.far)
        direction = "inbound" if client == "peer" else "outbound"
        spec = ConnSpec("c1", direction, protocol, "p", 443, 0.0, 1.0, 100, 300)
        self.conn = Connection(0, spec, self.clock, 60.0, timeout)
        cli, srv = (self.peer, self.vm) if client == "peer" else (self.vm, self.peer)
        caddr, saddr = (PEER, VM) if client == "peer" else (VM, PEER)
        for st in (self.vm, self.peer):
            st.conn_of = lambda tag: self.conn if tag == 0 else None
        if protocol == Proto.TCP:
            srv.tcp_listen(443, timeout)
            self.conn.sock = cli.tcp_connect(caddr, 50000, saddr, 443, self.conn, timeout, 1000)
        else:
            srv.udp_open(saddr, 443, None, 0, None, client=False)
            self.conn.sock = cli.udp_open(caddr, 50000, saddr, 443, self.conn, client=True)
        Connection.tick(self.conn)

    def _stack(self, name, address, site):
        st = Stack(name, self.clock, self.net.lose)
        st.addresses.add(address)
        st.out = lambda d, t: self.net.send(d, t, site)
        site.holders[address] = st.receive
        return st

    def run(self, until):
        self.clock.run(until)

    def leave(self):
        self.vm_receiver = self.lan.holders.pop(VM)

    def back(self):
        self.lan.holders[VM] = self.vm_receiver

    def from_peer(self, after=0.0, payload=True):
        return [t for t, d in self.sent if parse_ip(d).src == PEER and parse_ip(d).proto == Proto.TCP
                and (parse_ip(d).payload_len or not payload) and t > after]

    def icmp_to_peer(self, after=0.0):
        return [(t, parse_ip(d)) for t, d in self.sent if parse_ip(d).dst == PEER and parse_ip(d).is_icmp_error
                and t > after]

    def seen(self, kind):
        return [o for o in self.conn.seen if o.seen == kind]


# ------------------------------------------------------------------ the RTO (tcp_rtt_estimator, __tcp_set_rto)
def test_rto_is_rfc6298_with_linux_200ms_floor_on_the_variance_term():
    r = linux.Rto()
    assert r.current() == linux.TCP_TIMEOUT_INIT == 1.0  # RFC 6298 2.1: 1 s before any sample
    r.sample(0.05)  # first sample: srtt = R, rttvar = R/2 -> rto = R + max(2R, 200 ms)
    assert r.current() == pytest.approx(0.05 + 0.2)
    r.sample(0.5)
    assert r.srtt == pytest.approx(0.875 * 0.05 + 0.125 * 0.5)
    assert r.rttvar == pytest.approx(0.75 * 0.025 + 0.25 * 0.45)
    assert r.current() == pytest.approx(r.srtt + 4 * r.rttvar)


def test_back_off_doubles_up_to_tcp_rto_max_and_syn_timeouts_start_linear():
    r = linux.Rto()
    for n in range(1, 5):  # tcp_retransmit_timer with sysctl_tcp_syn_linear_timeouts = 4
        r.back_off(syn_sent=True, retransmits=n)
        assert r.current() == 1.0
    r.back_off(syn_sent=True, retransmits=5)
    assert r.current() == 2.0
    for n in range(20):
        r.back_off(syn_sent=False, retransmits=6 + n)
    assert r.current() == linux.TCP_RTO_MAX == 120.0


def test_the_last_timer_is_clamped_to_the_user_timeout():
    # tcp_clamp_rto_to_user_timeout: 6.4 s of back-off, but only 1.5 s left of a 10 s user timeout
    assert linux.clamp_to_user_timeout(6.4, first_sent=2.0, user_timeout=10.0, now=10.5) == pytest.approx(1.5)
    assert linux.clamp_to_user_timeout(6.4, first_sent=2.0, user_timeout=10.0, now=13.0) == 0.001  # "ASAP"


def test_a_silent_peer_gives_up_at_the_user_timeout_exactly():
    p = Pair(client="vm", timeout=10.0)
    p.run(2.2)
    del p.far.holders[PEER]  # a /32 link: no router says anything
    p.run(40.0)
    times = [t for t, d in p.sent if parse_ip(d).src == VM and parse_ip(d).payload_len and t > 2.2]
    assert p.conn.broken_state == SockState.TIMED_OUT
    # retransmits_timed_out counts from retrans_stamp: the first RTO retransmission (times[2]; times[1] is
    # the tail loss probe, which does not set it), as measured on Linux 6.18 (tests/scenarios/)
    # ... once the kernel's timer wheel runs the clamped timer: never early, at most one granularity late
    assert times[2] + 10.0 <= p.conn.broken_at <= times[2] + 10.0 + 0.256
    assert times[-1] < times[2] + 10.0


def test_a_tail_loss_probe_goes_first_and_the_rto_backs_off_from_it():
    """``tcp_schedule_loss_probe`` / ``tcp_send_loss_probe`` (RFC 8985 7): one segment in flight, lost:
    a probe min(2 srtt + 200 ms, RTO) after it, then the RTO re-armed from the probe, doubling after.
    Measured on Linux 6.18 with a sub-ms RTT: T, +0.21, +0.42, +0.85, +1.68, +3.35."""
    assert linux.loss_probe_timeout(0.0003, 0.2003) == pytest.approx(0.2003)  # capped by the RTO
    assert linux.loss_probe_timeout(0.01, 0.5) == pytest.approx(0.22)
    assert linux.loss_probe_timeout(0.0, 1.0) == linux.TCP_TIMEOUT_INIT  # no RTT sample yet
    p = Pair(client="vm", timeout=60.0)
    p.run(2.2)
    sock = p.conn.sock
    del p.far.holders[PEER]
    p.run(8.0)
    times = [t for t, d in p.sent if parse_ip(d).src == VM and parse_ip(d).payload_len and t > 2.2]
    rto = sock.rtt.base()
    pto = linux.loss_probe_timeout(sock.rtt.srtt, rto)
    gaps = [b - a for a, b in zip(times, times[1:])]
    # as the kernel's timer wheel runs each (sim.linux.timer_fires): never early, at most a granularity late
    for gap, want in zip(gaps[:4], [pto, rto, 2 * rto, 4 * rto]):
        assert want - 1e-9 <= gap <= want + 0.032 + 0.004
    assert sock.retransmits == len(times) - 2  # the probe is no retransmission (icsk_retransmits)


# ------------------------------------------------------------------ routers: ip_error, neighbour resolution
def test_gateway_keeps_a_fresh_entry_then_probes_then_answers_host_unreachable():
    """neigh_timer_handler: REACHABLE for the reachable time, then DELAY, 3 unicast probes, FAILED;
    the next packet starts INCOMPLETE, 3 broadcast probes retrans_time apart, then ICMP host
    unreachable for what it held (arp_error_report -> ipv4_link_failure)."""
    p = Pair()
    p.run(3.0)
    n = p.lan.neighbours[VM]
    assert n.state in (Nud.REACHABLE, Nud.DELAY, Nud.STALE)
    p.leave()
    p.run(30.0)
    icmps = p.icmp_to_peer(3.0)
    assert icmps and all((m.icmp_type, m.icmp_code) == (3, 1) for _, m in icmps)
    assert all(m.inner.src == PEER and m.inner.dst == VM for _, m in icmps)
    # no error before the old entry was given up: at least delay + 3 probes + 3 probes after leaving
    r = linux.ROUTER_NEIGH
    assert icmps[0][0] - 3.0 >= r.delay_first_probe + 3 * r.retrans


def test_incomplete_entry_fails_after_three_probes_retrans_time_apart():
    clock = Clock()
    net = Network(clock, random.Random(1))
    lan = net.add_site(Site("lan", "203.0.113.0/24", latency=0.005, neigh=linux.LINUX_NEIGH))
    far = net.add_site(Site("far", "198.51.100.10/32", latency=0.02))
    got = []
    far.holders[PEER] = lambda d, t: got.append((clock.now, parse_ip(d)))
    net.send(build.udp(PEER, VM, 1, 2, b"x"), 0, far)
    clock.run(10.0)
    # Linux's defaults: retrans_time 1 s, 3 probes -> host unreachable 3 s after the packet reached the
    # gateway, each 1 s timer run by the kernel's wheel 4-36 ms late (sim.linux.timer_fires)
    assert [(m.icmp_type, m.icmp_code) for _, m in got] == [(3, 1)]
    assert 0.025 + 3.0 + 0.025 < got[0][0] <= 0.025 + 3 * 1.036 + 0.025


def _held_lan():
    """A gateway resolving VM, whose holder takes frames but answers no probe (``Site.silent``)."""
    clock = Clock()
    net = Network(clock, random.Random(1))
    lan = net.add_site(Site("lan", "203.0.113.0/24", latency=0.005, neigh=linux.LINUX_NEIGH))
    far = net.add_site(Site("far", "198.51.100.10/32", latency=0.02))
    got, icmp = [], []
    lan.holders[VM] = lambda d, t: got.append((clock.now, t))
    far.holders[PEER] = lambda d, t: icmp.append(clock.now)
    lan.silent.add(VM)
    return clock, net, lan, far, got, icmp


def test_a_silent_holder_answers_no_probe_and_its_packets_wait_then_fail():
    """A paused VM whose MAC lives behind a port that stays (the tunnel proxy's): the gateway's ARP
    requests go unanswered, so what it holds meets host unreachable, as for a machine that left."""
    clock, net, lan, far, got, icmp = _held_lan()
    net.send(build.udp(PEER, VM, 1, 2, b"x"), 0, far)
    clock.run(10.0)
    assert got == [] and len(icmp) == 1 and lan.neighbours[VM].state == Nud.FAILED


def test_gratuitous_arp_sends_what_a_resolving_entry_held():
    """arp_process with arp_accept off: a gratuitous ARP updates an entry the gateway has (neigh_update
    to NUD_STALE with override), and an INCOMPLETE entry sends its queue at once, which makes it DELAY
    (neigh_resolve_output); none is made for an address the gateway never asked about."""
    clock, net, lan, far, got, icmp = _held_lan()
    other = wire.addr("203.0.113.6")
    lan.holders[other] = lambda d, t: got.append((clock.now, t))
    net.gratuitous(lan, other)
    assert other not in lan.neighbours
    net.send(build.udp(PEER, VM, 1, 2, b"x"), 7, far)
    net.send(build.udp(PEER, VM, 1, 2, b"y"), 8, far)
    clock.run(1.5)  # the entry is INCOMPLETE, its probes unanswered: both packets wait
    assert got == [] and lan.neighbours[VM].state == Nud.INCOMPLETE
    lan.silent.discard(VM)
    net.gratuitous(lan, VM)
    n = lan.neighbours[VM]
    assert [t for _, t in got] == [7, 8] and n.state == Nud.DELAY
    clock.run(10.0)  # DELAY's timer (5 s, run by the wheel), then a unicast probe it answers
    assert n.state == Nud.REACHABLE and icmp == []


def test_gratuitous_arp_leaves_a_valid_entry_with_the_same_address_alone():
    clock, net, lan, far, got, icmp = _held_lan()
    lan.silent.discard(VM)
    net.send(build.udp(PEER, VM, 1, 2, b"x"), 0, far)
    clock.run(0.1)
    n = lan.neighbours[VM]
    assert n.state == Nud.REACHABLE
    net.gratuitous(lan, VM)
    assert n.state == Nud.REACHABLE


def test_no_route_is_answered_with_net_unreachable_and_a_syn_sent_connect_fails_at_once():
    """ip_error sends ICMP net unreachable; tcp_v4_err in SYN_SENT: the connect fails (tcp_done)."""
    clock = Clock()
    net = Network(clock, random.Random(1))
    far = net.add_site(Site("far", "198.51.100.10/32", latency=0.02))
    st = Stack("peer", clock, net.lose)
    st.addresses.add(PEER)
    st.out = lambda d, t: net.send(d, t, far)
    far.holders[PEER] = st.receive
    spec = ConnSpec("c1", "inbound", Proto.TCP, "p", 22, 0.0)
    conn = Connection(0, spec, clock, 10.0, 10.0)
    st.conn_of = lambda tag: conn
    conn.sock = st.tcp_connect(PEER, 50000, wire.addr("198.18.1.10"), 22, conn, 10.0, 1)
    clock.run(5.0)
    assert conn.broken_state == SockState.FAILED and conn.broken_at < 0.01
    assert [o.seen for o in conn.seen] == [Seen.UNREACHABLE, Seen.GAVE_UP]


# ------------------------------------------------------------------ TCP's reaction (tcp_v4_err, RFC 6069)
def test_established_connection_survives_host_unreachable_as_a_soft_error_rfc1122_4_2_3_9():
    p = Pair(timeout=20.0)
    p.run(3.0)
    p.leave()
    p.run(12.0)
    assert p.conn.sock.state == SockState.ESTABLISHED and p.conn.broken_at is None
    assert p.seen(Seen.UNREACHABLE)  # read by the application (IP_RECVERR), not its end
    p.back()
    p.run(40.0)
    assert p.conn.broken_at is None
    assert p.conn.result(p.net).outcome.text == "survived"


def test_host_unreachable_reverts_one_back_off_step_tcp_ld_rto_revert():
    """RFC 6069: each ICMP unreachable for the oldest outstanding segment undoes one doubling, so the
    retransmissions stay close together while the router answers, instead of backing off."""
    p = Pair(timeout=60.0)
    p.run(3.0)
    p.leave()
    p.run(40.0)
    times = p.from_peer(3.0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    # without the revert the gaps double each time (2**k * rto), past 10 s within 7 retransmissions
    assert len(times) > 12 and max(gaps) < 5.0
    assert p.conn.broken_at is None


def test_revert_retransmits_at_once_when_the_reverted_timeout_has_already_run():
    p = Pair(client="vm", timeout=60.0)
    p.run(3.0)
    sock = p.conn.sock
    del p.far.holders[PEER]  # silent: no router answers, so the back-off grows undisturbed
    p.run(9.0)
    backoff, sent = sock.rtt.backoff, sock.out_sent
    assert backoff >= 2 and sock.retransmits >= 2
    quoted = build.tcp(VM, PEER, sock.lport, sock.rport, sock.snd_una, sock.rcv_nxt, 0x18, bytes(100))
    mine = lambda: [t for t, d in p.sent if parse_ip(d).src == VM and parse_ip(d).payload_len]  # noqa: E731
    # one step back is half the current timeout; past it since the last retransmission: retransmit now
    p.clock.run(sent + sock.rtt.base() * (1 << (backoff - 1)) + 0.01)
    before = len(mine())
    p.vm.receive(build.icmp(wire.addr("203.0.113.1"), VM, 3, 1, 0, quoted[:48]), -1)
    assert sock.rtt.backoff == backoff  # reverted (-1), then backed off again by the retransmission (+1)
    assert len(mine()) == before + 1 and sock.out_sent == pytest.approx(p.clock.now)
    # a second one, right away: the reverted timeout has not run since that retransmission: re-armed, no send
    p.vm.receive(build.icmp(wire.addr("203.0.113.1"), VM, 3, 1, 0, quoted[:48]), -1)
    assert sock.rtt.backoff == backoff - 1 and len(mine()) == before + 1


def test_icmp_out_of_window_is_ignored():
    p = Pair(timeout=60.0)
    p.run(3.0)
    sock = p.conn.sock
    quoted = build.tcp(PEER, VM, sock.lport, sock.rport, (sock.snd_una - 5000) & 0xFFFFFFFF, 0, 0x18, b"")
    n = len(p.conn.seen)
    p.peer.receive(build.icmp(p.lan.gateway, PEER, 3, 1, 0, quoted[:48]), -1)
    assert len(p.conn.seen) == n


def test_port_unreachable_is_a_hard_error_in_syn_sent():
    p = Pair(client="vm")
    sock = p.conn.sock
    quoted = build.tcp(VM, PEER, sock.lport, sock.rport, sock.snd_una, 0, 0x02, b"")
    p.vm.receive(build.icmp(PEER, VM, 3, 3, 0, quoted[:48]), -1)  # before any answer: SYN_SENT
    assert p.conn.broken_state == SockState.RESET  # ECONNREFUSED: as a refused connect
    assert [o.seen for o in p.conn.seen] == [Seen.RESET]


# ------------------------------------------------------------------ UDP (__udp4_lib_rcv, __udp4_lib_err)
def test_udp_to_a_closed_port_gets_port_unreachable_rate_limited():
    p = Pair(Proto.UDP, client="vm")
    p.run(0.5)
    p.peer.udp.clear()  # the server closed its socket
    p.run(30.0)
    unreach = [(t, parse_ip(d)) for t, d in p.sent if parse_ip(d).is_icmp_error and parse_ip(d).dst == VM]
    assert unreach and all((m.icmp_type, m.icmp_code) == (3, 3) for _, m in unreach)
    # icmpv4_xrlim_allow: a burst of 6, then one a second (the client sends one a second: all answered)
    assert len(unreach) >= 15
    sock = p.conn.sock
    assert set(sock.errors) == {errno.ECONNREFUSED}  # read on the next call; the client goes on
    assert not p.seen(Seen.UNREACHABLE) and p.conn.broken_state == SockState.TIMED_OUT


def test_icmp_rate_limit_token_bucket():
    lim = linux.IcmpLimiter()
    assert [lim.allow(PEER, 0.0) for _ in range(8)] == [True] * 6 + [False] * 2
    assert lim.allow(PEER, 1.0) and not lim.allow(PEER, 1.5)
    assert lim.allow(VM, 1.5)  # per destination


def test_udp_client_reads_host_unreachable_as_an_observation():
    p = Pair(Proto.UDP, client="peer", timeout=8.0)
    p.run(2.0)
    p.leave()
    p.run(30.0)
    assert errno.EHOSTUNREACH in p.conn.sock.errors
    assert p.seen(Seen.UNREACHABLE)
    assert p.conn.result(p.net).cause.text == "unreachable"
    assert p.net.drops[Loss.NO_HOLDER] > 0
