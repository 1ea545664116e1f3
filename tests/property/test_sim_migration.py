"""The migration properties, each proved by running the simulator over generated scenarios.

The scenarios come from ``tests.property.sim_strategies`` (no link loss unless said).  Nothing here
looks at a mode's name to decide anything: the simulator's endpoints decide, and
these tests check their verdicts against what the packets went through.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, event, example, given, settings

from sim import Scenario, Outcome, parse_scenario, run_mode
from .sim_strategies import scenarios

#: ROAM_SIM_EXAMPLES=500 for a longer hunt; the default keeps the file well under a minute
EXAMPLES = int(os.environ.get("ROAM_SIM_EXAMPLES", "25"))
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _site_of(sc, host: str) -> str:
    return sc.host(host).site


@FAST
@given(scenarios(modes=("tunnel",)))
def test_tunnel_every_connection_survives_moves_shorter_than_the_timeout(sc):
    """Downtimes are under a third of the peers' timeout: TCP's exponential back-off
    needs that margin for a retransmission to fall after the VM is back and before
    the give-up (tests/unit/test_sim_stack.py shows a downtime just under the timeout
    breaking a connection, as in real TCP)."""
    run = run_mode(sc, "tunnel")
    assert run.error is None, run.error
    for c in sc.connections:
        r = run.results[c.id]
        if not r.established and _handshake_meets_a_move(sc, c.start, r.established_at):
            # a peer's SYN that reaches the home LAN while the VM is paused: the gateway's ARP requests
            # go unanswered (the proxy floods them to host ends where the VM is not running), and
            # ICMP host unreachable in SYN_SENT is a hard error (tcp_v4_err), as in bridged mode
            assert (c.direction, r.cause.text) == ("inbound", "unreachable"), (c, r)
            event("tunnel: a handshake across a move")
            continue
        assert r.established, (c, r)
        assert r.outcome == Outcome.SURVIVED, (c, r)
        # the peer only ever saw the VM's home address
        assert {a for _, a, _ in r.peer_saw} == {sc.vm.home_address}, r.peer_saw


@FAST
@given(scenarios(modes=("nat", "nat+state"), protocols=("tcp",), directions=("outbound",)))
def test_nat_outbound_tcp_survives_exactly_when_the_peer_sees_the_same_address_and_port(sc):
    for mode in ("nat", "nat+state"):
        run = run_mode(sc, mode)
        assert run.error is None, run.error
        for c in sc.connections:
            r = run.results[c.id]
            assert r.established, (mode, c, r)
            if _handshake_meets_a_move(sc, c.start, r.established_at):
                # the SYN retransmitted from the new host opens a new connection at the peer (the
                # first one's SYN-ACK died at the old host): two addresses seen, and survival, both right
                event(f"{mode}: a handshake across a move")
                continue
            same = len({(a, p) for _, a, p in r.peer_saw}) == 1
            assert (r.outcome == Outcome.SURVIVED) == same, (mode, c, r)


#: How long a LAN gateway takes to give up resolving a neighbour that does not answer
#: (the routers' 3 probes 250 ms apart, sim.linux.ROUTER_NEIGH) plus a margin for latency.
_NEIGH_GIVE_UP = 1.0


def _handshake_meets_a_move(sc, start: float, end: float | None) -> bool:
    """Whether a connection's handshake (from its start to its establishment, or a neighbour
    resolution's time past its start) overlaps a move's downtime."""
    end = start + _NEIGH_GIVE_UP if end is None else end
    return any(m.at <= end and start <= m.at + m.downtime for m in sc.migrations)


def _mapped_inbound() -> Scenario:
    """A fixed example where an inbound connection must be established: a mapping, the VM at rest."""
    sc = parse_scenario("""
[scenario]
duration = 12.0
modes = ["nat", "nat+state"]
tcp_timeout = 10.0
udp_timeout = 10.0
[[site]]
name = "home"
prefix = "192.0.2.0/24"
proxy = "192.0.2.2"
[[site]]
name = "a"
prefix = "203.0.113.0/25"
[[host]]
name = "a1"
site = "a"
address = "203.0.113.10"
[vm]
host = "a1"
[[peer]]
name = "p1"
address = "198.51.100.10"
[[forward]]
port = 22
external_port = 2222
[[connection]]
id = "c1"
direction = "inbound"
peer = "p1"
port = 22
start = 1.0
[[connection]]
id = "c2"
direction = "inbound"
protocol = "udp"
peer = "p1"
port = 53
start = 1.0
[[migration]]
at = 5.0
to = "a1"
downtime_ms = 300
""", "<mapped-inbound>")
    return sc


def _host_at(sc, t: float, margin: float) -> str | None:
    """The VM's host throughout [t, t + margin], or None if a move touches that span."""
    where = sc.vm.host
    for m in sc.migrations:
        if m.at <= t + margin and m.at + m.downtime >= t:
            return None
        if m.at + m.downtime < t:
            where = m.to
    return where


@FAST
@example(_mapped_inbound())
@given(scenarios(modes=("nat", "nat+state"), directions=("inbound",)))
def test_nat_no_inbound_connection_is_established_without_an_explicit_mapping(sc):
    host_by_addr = {h.address: h.name for h in sc.hosts}
    for mode in ("nat", "nat+state"):
        run = run_mode(sc, mode)
        assert run.error is None, run.error
        established = 0
        for c in sc.connections:
            r = run.results[c.id]
            # the converse, so the property is never vacuous: with a mapping on the host the VM rests
            # on for the whole handshake (a second covers any drawn latency), it is established
            host = _host_at(sc, c.start, 1.0)
            if host is not None and any(f.protocol == c.protocol and f.port == c.port
                                        and (f.hosts is None or host in f.hosts) for f in sc.forwards):
                assert r.established, (mode, c, r, sc.forwards, sc.migrations)
            if not r.established:
                continue
            established += 1
            # where the peer reached the VM: a host's address and a port a mapping there forwards to c.port
            _, addr, port = r.peer_saw[0]
            host = host_by_addr[addr]
            assert any(f.protocol == c.protocol and f.port == c.port and f.external_port == port
                       and (f.hosts is None or host in f.hosts) for f in sc.forwards), (mode, c, r, sc.forwards)
        event(f"{mode}: {'some' if established else 'no'} inbound connection established")


@FAST
@given(scenarios(modes=("bridged",), no_return=True, bridged=("re-lease",)))
def test_bridged_survives_exactly_when_the_moves_stay_on_the_same_lan(sc):
    run = run_mode(sc, "bridged")
    assert run.error is None, run.error
    for c in sc.connections:
        r = run.results[c.id]
        if _handshake_meets_a_move(sc, c.start, r.established_at):
            # a SYN that reaches the LAN while the VM is paused: the gateway's neighbour resolution
            # can fail, and ICMP host unreachable in SYN_SENT is a hard error (tcp_v4_err)
            event("bridged: a handshake across a move")
            continue
        where = sc.vm.host
        left_lan = False
        for m in sc.migrations:
            if m.at + m.downtime >= c.start and _site_of(sc, m.to) != _site_of(sc, where):
                left_lan = True
            where = m.to
        assert (r.outcome == Outcome.SURVIVED) == (not left_lan), (c, r, sc.migrations)


@settings(max_examples=max(EXAMPLES // 2, 5), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(modes=("host-only",), loss=True))
def test_host_only_no_outside_connection_is_ever_established(sc):
    run = run_mode(sc, "host-only")
    assert run.error is None, run.error
    for c in sc.connections:
        r = run.results[c.id]
        assert not r.established and r.outcome == Outcome.BROKEN, (c, r)
        assert r.peer_saw == (), (c, r)  # nothing of the VM's ever reached a peer
