"""Run a scenario under each mode and collect what the endpoints saw."""
from __future__ import annotations

import random
from typing import Callable

from conntrack import Proto

from . import wire
from .connection import Connection
from .judge import Move, settle
from .linux import ROUTER_NEIGH
from .modes import MODE_CLASSES, EngineUnavailable, Host, Mode
from .results import ConnInfo, ModeRun, Report
from .scenario import Scenario
from .stack import RTO_MAX, Stack
from .world import Clock, Network, Site

VM_EPHEMERAL = 40000
PEER_EPHEMERAL = 50000

#: progress(mode, fraction done in 0..1) -- tools draw a bar with it
Progress = Callable[[str, float], None]


class World:
    """One mode's world for one scenario: built, run, then read."""

    def __init__(self, sc: Scenario, mode: str, *, timeline: bool = True, draws: dict[str, float] | None = None,
                 lab: bool = False, phase: float = 0.0) -> None:
        self.sc = sc
        #: each site router's reachable-time draw (the mean, 1.0, unless given: see ``NeighParams``)
        self.draws = {s.name: (draws or {}).get(s.name, 1.0) for s in sc.sites}
        self.mode_name = mode
        self.clock = clock = Clock(phase)
        self.rng = random.Random(sc.seed)
        self.net = net = Network(clock, self.rng)
        net.skb_crosses = lab
        self.sites: dict[str, Site] = {}
        for s in sc.sites:
            self.sites[s.name] = net.add_site(Site(s.name, s.prefix, s.gateway, s.latency, s.loss,
                                                   neigh=ROUTER_NEIGH.drawn(self.draws[s.name])))
            if s.proxy:
                self.sites[s.name].reserved.add(wire.addr(s.proxy))
        self.hosts: dict[str, Host] = {}
        for h in sc.hosts:
            st = Stack(f"host:{h.name}", clock, net.lose)
            self.hosts[h.name] = Host(h.name, self.sites[h.site], wire.addr(h.address), net, st)
        self.peers: dict[str, Stack] = {}
        for p in sc.peers:
            site = net.add_site(Site(f"peer:{p.name}", f"{p.address}/32", p.address, p.latency, p.loss))
            st = Stack(f"peer:{p.name}", clock, net.lose)
            st.addresses.add(wire.addr(p.address))
            st.out = (lambda s: (lambda d, t: net.send(d, t, s)))(site)
            st.observe = True
            site.holders[wire.addr(p.address)] = st.receive
            self.peers[p.name] = st
        self.vm = Stack(f"vm:{sc.vm.name}", clock, net.lose)
        cls = MODE_CLASSES.get(mode)
        if cls is None:
            raise EngineUnavailable(f"mode {mode!r}: engine not available in this build")
        self.mode: Mode = cls(sc, clock, net, self.vm, self.hosts, self.sites, self.rng)
        moves = tuple(Move(m.at, m.downtime) for m in sc.migrations)
        self.settle = settle(moves)
        self.conns: list[Connection] = [Connection(tag, c, clock, sc.duration, sc.timeout_of(c), moves)
                                        for tag, c in enumerate(sc.connections)]
        conns = self.conns
        lookup = lambda tag: conns[tag] if 0 <= tag < len(conns) else None  # noqa: E731
        for st in [self.vm, *self.peers.values(), *(h.stack for h in self.hosts.values())]:
            st.conn_of = lookup

    # -------------------------------------------------------------- setup
    def _servers(self) -> None:
        for conn in self.conns:
            c = conn.spec
            server = self.vm if c.direction == "inbound" else self.peers[c.peer]
            if c.protocol == Proto.TCP:
                server.tcp_listen(c.port, conn.timeout)
            elif c.port not in server.udp:
                local = None if server is self.vm else next(iter(server.addresses))
                server.udp_open(local, c.port, None, 0, None, client=False, session=c.session)

    @staticmethod
    def _start(world: "World", conn: Connection) -> None:
        c = conn.spec
        mode = world.mode
        if c.direction == "outbound" and world.vm.holds(world.clock.now):  # started once the VM runs again
            world.vm.defer(World._start, world, conn)
            return
        if c.direction == "outbound":
            client, local, lport = world.vm, mode.vm_address(), VM_EPHEMERAL + conn.tag % 20000
            remote, rport = wire.addr(world.sc.peer(c.peer).address), c.port
        else:
            client = world.peers[c.peer]
            local, lport = next(iter(client.addresses)), PEER_EPHEMERAL + conn.tag % 15000
            remote, rport = mode.published(c.protocol, c.port)
        if c.protocol == Proto.TCP:
            conn.sock = client.tcp_connect(local, lport, remote, rport, conn, conn.timeout,
                                           (0x01000000 * (conn.tag % 200) + 12345) & 0xFFFFFFFF)
        else:
            conn.sock = client.udp_open(local, lport, remote, rport, conn, client=True)
        Connection.tick(conn)

    @staticmethod
    def _migrate(world: "World", m) -> None:
        world.vm.pause(world.clock.now)
        world.mode.detach()
        world.clock.after(m.downtime, World._arrive, world, m)

    @staticmethod
    def _arrive(world: "World", m) -> None:
        # the VM's own server sockets are bound to "any": follow the VM's current address
        world.mode.attach(world.hosts[m.to])
        world.vm.resume()

    # -------------------------------------------------------------- run
    def run(self, progress: Callable[[float], None] | None = None) -> ModeRun:
        sc, clock = self.sc, self.clock
        self.mode.attach(self.hosts[sc.vm.host])
        self._servers()
        for conn in self.conns:
            clock.at(conn.spec.start, World._start, self, conn)
        for m in sc.migrations:
            clock.at(m.at, World._migrate, self, m)
        longest = max([sc.tcp_timeout, sc.udp_timeout] + [conn.timeout for conn in self.conns])
        # clients go on past the duration until answered after the last move (or they give up)
        end = max(sc.duration, self.settle or 0.0) + longest + RTO_MAX + 5.0
        clock.run(end, (lambda now: progress(now / end)) if progress else None)
        results = {conn.spec.id: conn.result(self.net) for conn in self.conns}
        errs = self.mode.engine_errors
        warnings = tuple(f"{self.mode_name} engine raised {n} time(s) instead of giving a verdict; first: {e}"
                         for n, e in ([(len(errs), errs[0])] if errs else []))
        return ModeRun(self.mode_name, results, None, self.net.packets, clock.events,
                       {k.name.lower(): v for k, v in sorted(self.net.drops.items())}, clock.now, warnings,
                       draws=dict(self.draws))


def run_mode(sc: Scenario, mode: str, progress: Callable[[float], None] | None = None,
             tap: Callable[[float, bytes], None] | None = None, draws: dict[str, float] | None = None,
             lab: bool = False, phase: float = 0.0) -> ModeRun:
    """One mode; a mode whose engine cannot run comes back with ``error`` set, never a verdict.

    ``tap(now, packet)`` sees every IPv4 packet handed to the network (e.g. to write a pcap).
    ``draws``: site name -> the router's reachable-time draw (a lab run's, to replay it exactly).
    ``lab``: play the lab's network's one kernel quirk that a real network lacks (``ConfirmingSegment``).
    ``phase``: where time zero falls in the kernel's timer wheel (``sim.linux.timer_fires``).
    """
    try:
        world = World(sc, mode, draws=draws, lab=lab, phase=phase)
    except EngineUnavailable as exc:
        return ModeRun(mode, {}, str(exc))
    world.net.tap = tap
    return world.run(progress)


def replay(sc: Scenario, modes: tuple[str, ...] | None = None, progress: Progress | None = None,
           taps: Callable[[str], Callable[[float, bytes], None] | None] | None = None) -> Report:
    """Every mode of the scenario (or ``modes``), one after the other; ``taps(mode)`` gives a tap."""
    runs = []
    for mode in modes or sc.modes:
        cb = (lambda m: (lambda frac: progress(m, frac)))(mode) if progress else None
        runs.append(run_mode(sc, mode, cb, taps(mode) if taps else None))
        if progress:
            progress(mode, 1.0)
    conns = tuple(ConnInfo(c.id, c.protocol_name, c.direction, c.peer, c.port, c.start) for c in sc.connections)
    migs = tuple((m.at, m.to, m.downtime, sc.host(m.to).site) for m in sc.migrations)
    return Report(sc.name, conns, migs, tuple(runs), sc.duration)
