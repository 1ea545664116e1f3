"""Hypothesis strategies that generate migration scenarios (for the simulator's property tests).

Here, under tests, because the ``sim`` package does not depend on hypothesis.

    from hypothesis import given
    from sim import run_mode
    from tests.property.sim_strategies import scenarios

    @given(scenarios(modes=("tunnel",)))
    def test_mine(sc):
        run = run_mode(sc, "tunnel")
        ...

Scenarios are small (a few sites, hosts, peers and connections; up to a few moves)
so that each runs in milliseconds.  Generated moves are spaced so that a connection
can recover between them; ``max_downtime_fraction`` bounds each downtime as a
fraction of the peers' timeout.  ``sim.scenario_toml.to_toml`` writes one as a file.

:func:`campaign_scenarios` draws the cases users meet, for the differential campaign
(tests/netns/test_campaign.py): long outages near the give-up time, moves away and back,
moves within one LAN, bridged keep and re-lease, inbound connections in every mode, UDP
sessions and plain request/response, idle connections (and link loss, off for the lab,
which does not reproduce it); short and small, so the lab plays each in seconds.
"""
from __future__ import annotations

from hypothesis import strategies as st

from conntrack import Proto

from sim.results import MODES
from sim.scenario import ConnSpec, ForwardSpec, HostSpec, MigrationSpec, PeerSpec, Scenario, SiteSpec, VmSpec

HOME = SiteSpec("home", "192.0.2.0/24", None, 0.008, 0.0, "192.0.2.2")
REMOTE_SITES = (
    SiteSpec("s1", "203.0.113.0/26", None, 0.004),
    SiteSpec("s2", "203.0.113.64/26", None, 0.002),
    SiteSpec("s3", "203.0.113.128/26", None, 0.012),
)
#: hosts per remote site (two on s1 and s2, so same-LAN moves happen)
HOSTS = {
    "s1": (HostSpec("h1a", "s1", "203.0.113.10"), HostSpec("h1b", "s1", "203.0.113.11")),
    "s2": (HostSpec("h2a", "s2", "203.0.113.74"), HostSpec("h2b", "s2", "203.0.113.75")),
    "s3": (HostSpec("h3a", "s3", "203.0.113.138"),),
}
PEER_ADDRESSES = ("198.51.100.10", "198.51.100.11", "198.51.100.12")
PORTS = (22, 53, 80, 443, 5000)


@st.composite
def scenarios(draw, modes: tuple[str, ...] = MODES, max_connections: int = 4, max_migrations: int = 3,
              max_downtime_fraction: float = 1 / 3, loss: bool = False, no_return: bool = False,
              bridged: tuple[str, ...] = ("re-lease", "keep"), protocols: tuple[str, ...] = ("tcp", "udp"),
              directions: tuple[str, ...] = ("outbound", "inbound")) -> Scenario:
    """A random small scenario.

    ``no_return``: the VM never goes back to a LAN it left.  ``loss``: links may drop
    packets (at most 2 %).  Everything else is drawn.
    """
    n_sites = draw(st.integers(1, len(REMOTE_SITES)))
    sites = REMOTE_SITES[:n_sites]
    hosts = tuple(h for s in sites for h in HOSTS[s.name][: draw(st.integers(1, len(HOSTS[s.name])))])
    if loss:
        sites = tuple(SiteSpec(s.name, s.prefix, s.gateway, s.latency, draw(st.sampled_from((0.0, 0.01, 0.02))))
                      for s in sites)
    timeout = float(draw(st.sampled_from((10, 15))))
    peers = tuple(PeerSpec(f"p{i + 1}", a, draw(st.integers(2, 40)) / 1000)
                  for i, a in enumerate(PEER_ADDRESSES[: draw(st.integers(1, len(PEER_ADDRESSES)))]))
    start_host = draw(st.sampled_from(hosts))
    vm = VmSpec("vm", "02:00:00:00:00:01", start_host.name, "192.0.2.50", bridged=draw(st.sampled_from(bridged)))

    # moves, spaced so that a connection has time to recover between them
    migrations = []
    t = draw(st.integers(3, 8)) + draw(st.sampled_from((0.0, 0.25, 0.5)))
    where = start_host
    left: set[str] = set()
    for _ in range(draw(st.integers(0, max_migrations))):
        choices = [h for h in hosts if not (no_return and h.site in left and h.site != where.site)]
        to = draw(st.sampled_from(choices))
        down = draw(st.integers(50, int(timeout * 1000 * max_downtime_fraction))) / 1000
        migrations.append(MigrationSpec(float(t), to.name, down))
        if to.site != where.site:
            left.add(where.site)
        where = to
        t = t + down + 2 * down + draw(st.integers(3, 8))
    duration = float(max(t + 4, 12))

    conns = []
    servers: dict[tuple, bool] = {}  # (server side, proto, port) -> session: one UDP server per port
    for i in range(draw(st.integers(1, max_connections))):
        direction = draw(st.sampled_from(directions))
        proto = draw(st.sampled_from(protocols))
        peer = draw(st.sampled_from(peers)).name
        port = draw(st.sampled_from(PORTS))
        session = proto == "udp" and draw(st.booleans())
        key = ("vm" if direction == "inbound" else peer, proto, port)
        session = servers.setdefault(key, session) if proto == "udp" else False
        conns.append(ConnSpec(
            f"c{i + 1}", direction, Proto.TCP if proto == "tcp" else Proto.UDP, peer, port,
            float(draw(st.integers(0, int(duration) - 4))) + draw(st.sampled_from((0.0, 0.5))),
            draw(st.sampled_from((0.5, 1.0, 2.0))), draw(st.integers(1, 1400)), draw(st.integers(1, 1400)),
            session))
    forwards = []
    for proto, port in sorted({(c.protocol, c.port) for c in conns if c.direction == "inbound"}):
        if draw(st.booleans()):
            on = draw(st.lists(st.sampled_from([h.name for h in hosts]), unique=True, max_size=len(hosts)))
            forwards.append(ForwardSpec(proto, port, draw(st.sampled_from((port, port + 10000))),
                                        None if not on or len(on) == len(hosts) else tuple(sorted(on))))
    return Scenario(name="generated", duration=duration, sites=(HOME, *sites), hosts=hosts, peers=peers, vm=vm,
                    connections=tuple(conns), migrations=tuple(migrations), forwards=tuple(forwards),
                    modes=tuple(modes), seed=draw(st.integers(0, 2**16)), tcp_timeout=timeout, udp_timeout=timeout)


#: What the campaign's move patterns mean: away (to another LAN), back (to where it came from),
#: same-lan (another host of the same site), stay (a move to its own host: a pause).
MOVE_KINDS = ("away", "back", "same-lan", "stay")


@st.composite
def campaign_scenarios(draw, modes: tuple[str, ...] = MODES, loss: bool = False, max_connections: int = 3,
                       timeouts: tuple[float, ...] = (3.0, 4.0, 5.0)) -> Scenario:
    """A short scenario drawn towards the cases users meet (see the module docstring).

    Two sites with two hosts each (so same-LAN moves exist) and the home site; one or two
    moves, each of a drawn kind (``MOVE_KINDS``), with downtimes from 50 ms to just under the
    timeout (long outages near the give-up time); connections of both directions and
    protocols, UDP session servers or plain request/response, intervals up to the timeout
    (idle connections); a port forward for every inbound port on some or all hosts.
    """
    sites = REMOTE_SITES[:2]
    hosts = (*HOSTS["s1"], *HOSTS["s2"])
    if loss:
        sites = tuple(SiteSpec(s.name, s.prefix, s.gateway, s.latency, draw(st.sampled_from((0.0, 0.02))))
                      for s in sites)
    timeout = draw(st.sampled_from(timeouts))
    peers = tuple(PeerSpec(f"p{i + 1}", a, draw(st.integers(2, 30)) / 1000)
                  for i, a in enumerate(PEER_ADDRESSES[: draw(st.integers(1, 2))]))
    start = draw(st.sampled_from(hosts))
    vm = VmSpec("vm", "02:00:00:00:00:01", start.name, "192.0.2.50", bridged=draw(st.sampled_from(("re-lease", "keep"))))
    by_site = {s.name: [h for h in hosts if h.site == s.name] for s in sites}
    migrations, where, came_from = [], start, None
    t = draw(st.sampled_from((2.0, 2.5, 3.0)))
    for n in range(draw(st.integers(1, 2))):
        if n and migrations[-1].downtime > 2.0:
            break  # one long outage per scenario keeps it short
        kind = draw(st.sampled_from(MOVE_KINDS))
        if kind == "back" and came_from is not None:
            to = came_from
        elif kind == "same-lan":
            to = next(h for h in by_site[where.site] if h != where)
        elif kind == "stay":
            to = where
        else:
            to = draw(st.sampled_from([h for h in hosts if h.site != where.site]))
        long = draw(st.booleans())
        down = (draw(st.integers(int(timeout * 600), int(timeout * 950))) if long
                else draw(st.integers(50, 1500))) / 1000
        migrations.append(MigrationSpec(t, to.name, down))
        came_from, where = where, to
        t = round(t + down + draw(st.sampled_from((1.5, 2.0))), 3)
    duration = float(max(t + 1, 6))
    conns, servers = [], {}
    for i in range(draw(st.integers(1, max_connections))):
        direction = draw(st.sampled_from(("outbound", "inbound")))
        proto = draw(st.sampled_from(("tcp", "udp")))
        peer = draw(st.sampled_from(peers)).name
        port = draw(st.sampled_from(PORTS))
        key = ("vm" if direction == "inbound" else peer, proto, port)
        session = servers.setdefault(key, draw(st.booleans())) if proto == "udp" else False
        interval = draw(st.sampled_from((0.5, 1.0, round(timeout * 0.8, 1))))  # the last: an idle connection
        conns.append(ConnSpec(f"c{i + 1}", direction, Proto.TCP if proto == "tcp" else Proto.UDP, peer, port,
                              draw(st.sampled_from((0.0, 0.5, 1.0))), interval, draw(st.integers(16, 400)),
                              draw(st.integers(16, 400)), session))
    forwards = []
    for proto, port in sorted({(c.protocol, c.port) for c in conns if c.direction == "inbound"}):
        on = draw(st.sampled_from((None, (start.name,), tuple(sorted({start.name, where.name})))))
        forwards.append(ForwardSpec(proto, port, draw(st.sampled_from((port, port + 10000))), on))
    return Scenario(name="campaign", duration=duration, sites=(HOME, *sites), hosts=hosts, peers=peers, vm=vm,
                    connections=tuple(conns), migrations=tuple(migrations), forwards=tuple(forwards),
                    modes=tuple(modes), seed=draw(st.integers(0, 2**16)), tcp_timeout=timeout, udp_timeout=timeout)
