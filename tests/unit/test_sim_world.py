"""The event clock and the network: time order, routing by address, losses with reasons."""
from __future__ import annotations

import random

import pytest

from conntrack import build, parse_ip
from sim import wire
from sim.world import Clock, Loss, Network, Site


def test_clock_runs_events_in_time_order_and_stops_at_until():
    c = Clock()
    seen = []
    for t in (3.0, 1.0, 2.0, 2.0, 9.0):
        c.at(t, lambda a, b: seen.append((c.now, a)), t)
    c.run(5.0)
    assert [s[0] for s in seen] == [1.0, 2.0, 2.0, 3.0]
    assert c.now == 5.0 and c.next_time() == 9.0


def test_clock_never_schedules_into_the_past():
    c = Clock()
    c.run(4.0)
    seen = []
    c.at(1.0, lambda a, b: seen.append(c.now))
    c.run(10.0)
    assert seen == [4.0]


def _net():
    clock = Clock()
    net = Network(clock, random.Random(1))
    lan = net.add_site(Site("lan", "203.0.113.0/24", latency=0.005))
    small = net.add_site(Site("small", "203.0.113.128/25", latency=0.001))
    peer = net.add_site(Site("peer", "198.51.100.10/32", latency=0.02))
    return clock, net, lan, small, peer


def test_longest_prefix_wins():
    _, net, lan, small, _ = _net()
    assert net.route(wire.addr("203.0.113.200")) is small
    assert net.route(wire.addr("203.0.113.5")) is lan
    assert net.route(wire.addr("198.18.0.1")) is None


def test_packet_is_delivered_to_the_holder_after_both_latencies():
    clock, net, lan, _, peer = _net()
    got = []
    peer.holders[wire.addr("198.51.100.10")] = lambda d, t: got.append((clock.now, d, t))
    pkt = build.udp(wire.addr("203.0.113.5"), wire.addr("198.51.100.10"), 1, 2, bytes(3))
    net.send(pkt, 7, lan)
    clock.run(1.0)
    assert got == [(0.025, pkt, 7)]


def test_unroutable_and_unheld_addresses_are_lost_with_their_reason():
    clock, net, lan, _, peer = _net()
    back: list = []
    peer.holders[wire.addr("198.51.100.10")] = lambda data, tag: back.append((clock.now, parse_ip(data)))
    net.send(build.udp(wire.addr("198.51.100.10"), wire.addr("198.18.0.9"), 1, 2), 1, peer)
    net.send(build.udp(wire.addr("198.51.100.10"), wire.addr("203.0.113.77"), 1, 2), 2, peer)
    clock.run(1.0)
    assert net.last_loss == {1: Loss.NO_ROUTE, 2: Loss.NO_HOLDER}
    assert net.losses == {}  # a router's verdict reaches endpoints as ICMP, not as bookkeeping
    assert net.drops[Loss.NO_ROUTE] == net.drops[Loss.NO_HOLDER] == 1
    # and the routers said so: net unreachable at once (ip_error), host unreachable once the LAN
    # gateway's three ARP probes went unanswered (0.25 s apart, as the lab's routers: sim.linux.ROUTER_NEIGH;
    # the kernel's timer wheel runs each 250 ms timer 256-284 ms later: sim.linux.timer_fires)
    assert [(p.icmp_type, p.icmp_code) for _, p in back] == [(3, 0), (3, 1)]
    assert back[0][0] == pytest.approx(0.0002)
    assert 0.025 + 3 * 0.256 + 0.025 - 1e-9 <= back[1][0] <= 0.025 + 3 * 0.284 + 0.025


def test_link_loss_is_seeded_and_counted():
    def run(seed):
        clock = Clock()
        net = Network(clock, random.Random(seed))
        a = net.add_site(Site("a", "203.0.113.0/25", loss=0.3))
        b = net.add_site(Site("b", "203.0.113.128/25"))
        got = []
        b.holders[wire.addr("203.0.113.130")] = lambda d, t: got.append(t)
        for i in range(200):
            net.send(build.udp(wire.addr("203.0.113.1"), wire.addr("203.0.113.130"), 1, 2), i, a)
        clock.run(1.0)
        return got, net.drops[Loss.LINK]

    got, lost = run(5)
    assert run(5) == (got, lost)
    assert len(got) + lost == 200 and 30 < lost < 90


def test_dhcp_gives_a_client_its_address_again():
    s = Site("lan", "203.0.113.0/26")
    a = s.lease(b"\x02\0\0\0\0\x01")
    b = s.lease(b"\x02\0\0\0\0\x02")
    assert a != b and s.lease(b"\x02\0\0\0\0\x01") == a
    assert s.covers(a) == 26 and a != s.gateway
