"""Simulated connections and packets per second across migrations (`roam bench sim`).

Builds one scenario -- by default 10,000 connections (TCP and UDP, outbound and
inbound, to 50 peers) and 10 migrations between hosts on three sites -- and runs
it under each mode, printing packets simulated per wall-clock second.  Every
packet is real bytes through the real engines; the numbers are never asserted.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

from conntrack import Proto
from sim import MODES, Outcome, run_mode
from sim.scenario import ConnSpec, ForwardSpec, HostSpec, MigrationSpec, PeerSpec, Scenario, SiteSpec, VmSpec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connections", type=int, default=10000, help="connections (default %(default)s)")
    p.add_argument("--migrations", type=int, default=10, help="migrations (default %(default)s)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of traffic (default %(default)s)")
    p.add_argument("--interval", type=float, default=10.0,
                   help="seconds between a connection's requests (default %(default)s)")
    p.add_argument("--modes", default="nat,tunnel", help=f"comma-separated, from {', '.join(MODES)} "
                   "(default %(default)s)")
    p.add_argument("--seed", type=int, default=1)


def build(connections: int, migrations: int, duration: float, interval: float, seed: int) -> Scenario:
    rng = random.Random(seed)
    sites = (SiteSpec("home", "192.0.2.0/24", None, 0.008, 0.0, "192.0.2.2"),
             SiteSpec("s1", "203.0.113.0/26", None, 0.004), SiteSpec("s2", "203.0.113.64/26", None, 0.002),
             SiteSpec("s3", "203.0.113.128/26", None, 0.012))
    hosts = (HostSpec("h1a", "s1", "203.0.113.10"), HostSpec("h1b", "s1", "203.0.113.11"),
             HostSpec("h2a", "s2", "203.0.113.74"), HostSpec("h3a", "s3", "203.0.113.138"))
    peers = tuple(PeerSpec(f"p{i}", f"198.51.100.{10 + i}", rng.randint(5, 60) / 1000) for i in range(50))
    conns = []
    for i in range(connections):
        inbound = rng.random() < 0.2
        proto = Proto.TCP if rng.random() < 0.7 else Proto.UDP
        port = rng.choice((22, 443, 5000)) if inbound else rng.choice((53, 80, 443, 8443))
        conns.append(ConnSpec(f"c{i}", "inbound" if inbound else "outbound", proto, rng.choice(peers).name, port,
                              round(rng.uniform(0, duration / 4), 3), interval, rng.randint(40, 1400),
                              rng.randint(40, 1400)))
    forwards = tuple(ForwardSpec(p, port, port + 10000) for p in (Proto.TCP, Proto.UDP) for port in (22, 443, 5000))
    span = duration * 0.7
    moves = []
    at = duration / 4 + 1
    step = (span - duration / 4) / max(migrations, 1)
    for i in range(migrations):
        moves.append(MigrationSpec(round(at, 3), hosts[(i + 1) % len(hosts)].name, 0.3 + 0.1 * (i % 3)))
        at += step
    return Scenario("bench", duration, sites, hosts, peers, VmSpec("vm", "02:00:00:00:00:01", "h1a", "192.0.2.50"),
                    tuple(conns), tuple(moves), forwards, MODES, seed, 30.0, 30.0)


def run(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"roam bench sim: unknown mode(s) {', '.join(bad)}", file=sys.stderr)
        return 2
    sc = build(args.connections, args.migrations, args.duration, args.interval, args.seed)
    print(f"{len(sc.connections)} connections, {len(sc.migrations)} migrations, {sc.duration:g} s of traffic, "
          f"one request every {args.interval:g} s per connection")
    print(f"{'mode':<10} {'survived':>9} {'packets':>10} {'events':>10} {'wall s':>8} {'packets/s':>10}")
    for mode in modes:
        t0 = time.perf_counter()
        r = run_mode(sc, mode)
        wall = time.perf_counter() - t0
        if r.error:
            print(f"{mode:<10} error: {r.error}")
            continue
        alive = sum(1 for x in r.results.values() if x.outcome == Outcome.SURVIVED)
        print(f"{mode:<10} {alive:>9} {r.packets:>10} {r.events:>10} {wall:>8.2f} {r.packets / wall:>10.0f}")
    return 0
