"""The discrete-event world: a clock the simulator owns, and a network routing real bytes.

* :class:`Clock` is a heap of timed callbacks; simulated time only moves when the
  next event is taken.  Nothing here reads the wall clock.
* :class:`Network` routes an IPv4 packet by its destination address: the longest
  site prefix that covers it, then whoever currently *holds* the address on that
  site's LAN.  Its routers do what Linux routers do (``sim.linux``): a packet no prefix
  covers is answered with ICMP net unreachable (``ip_error``); a site's gateway finds the
  address's holder with neighbour resolution (``neigh_timer_handler``'s states and timers),
  keeps sending to a machine that left until its entry goes stale and its probes fail,
  and answers the packets it held while resolving with ICMP host unreachable
  (``arp_error_report`` -> ``ipv4_link_failure``).  Every loss is counted with a
  :class:`Loss` reason; only the ones an endpoint or a component reports are kept per
  connection for the judge.
* Packets travel as ``(bytes, tag)``: the bytes are the real datagram the engines
  read and rewrite; the tag is the simulator's own bookkeeping (which scenario
  connection a packet belongs to), used only to explain *why* a connection that
  timed out was lost.  Routing never looks at the tag.
"""
from __future__ import annotations

import heapq
import ipaddress
import random
from collections import Counter
from enum import IntEnum
from typing import Callable

from conntrack import ParseError, Proto, build, parse_ip

from .linux import HZ, ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, ICMP_NET_UNREACH, ROUTER_NEIGH, ConfirmingSegment, NeighParams, timer_fires

#: ``neigh_timer_handler`` never arms its timer sooner than HZ/100 ahead.
TIMER_MIN = (HZ // 100) / HZ

Receiver = Callable[[bytes, int], None]


class Loss(IntEnum):
    """Where and why a packet was lost."""

    NO_ROUTE = 1  # no route to the destination (no site's prefix covers it; a VM's stack without a gateway)
    NO_HOLDER = 2  # routed to a LAN where nobody holds the address (any more)
    ADDRESS_GONE = 3  # the sender's source address is no longer configured
    NO_MAPPING = 4  # a NAT had no mapping for an inbound packet
    NAT_DROP = 5  # a NAT dropped it for another reason
    VM_DOWN = 6  # the VM was paused for its migration
    LINK = 7  # random loss on a link
    TUNNEL_DROP = 8  # a tunnel end dropped it
    NO_SOCKET = 10  # no socket or application took it
    PARSE = 11  # bytes that do not parse as a packet
    VM_ABSENT = 12  # translated for a VM that is no longer on this host
    ENGINE_ERROR = 13  # an engine raised instead of giving a verdict (a bug, reported)
    OFF_LINK = 14  # sent to the MAC of a gateway that is not on the sender's LAN (a VM that kept its address)


#: Losses that make a timed-out connection "unreachable" rather than plain "timed out".
UNREACHABLE_LOSSES = frozenset({Loss.NO_ROUTE, Loss.NO_HOLDER, Loss.ADDRESS_GONE})
#: The losses kept per connection for the judge (``Network.losses``): those its endpoints or a
#: component can report in every backend -- the sender's own address gone (its socket says so),
#: a NAT's own drop reason.  A router's verdict reaches the endpoints as the ICMP error it sends,
#: which their stacks read; other losses (downtime, link loss, a packet to a machine that left
#: while its old entry is still fresh) are silent, in the lab as here.
REPORTED_LOSSES = frozenset({Loss.ADDRESS_GONE, Loss.NO_MAPPING})

#: Linux quotes up to 576 bytes of IP in an ICMP error (``icmp_send``): the offending packet's head.
ICMP_QUOTE = 576 - 20 - 8


def icmp_unreachable(src: bytes, data: bytes, code: int) -> bytes | None:
    """ICMP destination unreachable from ``src`` about packet ``data``, to its sender; None where
    ``icmp_send`` stays silent (an ICMP error about an ICMP error, a non-first fragment, bad bytes)."""
    try:
        pkt = parse_ip(data)
    except ParseError:
        return None
    if pkt.family != 4 or pkt.l4 < 0 or pkt.is_icmp_error:
        return None
    return build.icmp(src, pkt.src, ICMP_DEST_UNREACH, code, 0, bytes(data[:ICMP_QUOTE]))


class Clock:
    """Simulated time: a heap of ``(time, seq, fn, a, b)``; ``fn(a, b)`` runs at ``time``."""

    __slots__ = ("now", "_heap", "_seq", "events", "phase")

    def __init__(self, phase: float = 0.0) -> None:
        self.now = 0.0
        self.phase = phase  # where time zero falls in the kernel's timer wheel (``sim.linux.timer_fires``)
        self._heap: list = []
        self._seq = 0
        self.events = 0

    def at(self, when: float, fn: Callable, a=None, b=None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when if when > self.now else self.now, self._seq, fn, a, b))

    def after(self, delay: float, fn: Callable, a=None, b=None) -> None:
        self.at(self.now + delay, fn, a, b)

    def timer(self, expires: float, fn: Callable, a=None, b=None) -> None:
        """A kernel ``timer_list`` due at ``expires``: it runs when the timer wheel runs it."""
        self.at(timer_fires(self.now, expires, self.phase), fn, a, b)

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def run(self, until: float, progress: Callable[[float], None] | None = None, every: int = 50000) -> None:
        """Run every event due at or before ``until``; ``progress(now)`` every ``every`` events."""
        heap, pop = self._heap, heapq.heappop
        n = 0
        while heap and heap[0][0] <= until:
            when, _, fn, a, b = pop(heap)
            self.now = when
            fn(a, b)
            n += 1
            if progress is not None and n % every == 0:
                progress(when)
        self.events += n
        if self.now < until:
            self.now = until


class Nud(IntEnum):
    """A neighbour entry's state (include/net/neighbour.h NUD_*)."""

    NONE = 0
    INCOMPLETE = 1  # resolving: packets wait in its queue
    REACHABLE = 2  # confirmed within the reachable time: packets go to its link-layer address
    STALE = 3  # not confirmed lately: still used, the next packet starts a check
    DELAY = 4  # used while stale: a check starts after delay_first_probe
    PROBE = 5  # unicast probes to the old link-layer address; packets still go there
    FAILED = 6  # resolution failed: the next packet starts over


class Neighbour:
    """One address in a gateway's neighbour table; ``lladdr`` is the receiver that answered (its MAC)."""

    __slots__ = ("state", "lladdr", "confirmed", "used", "probes", "queue", "gen")

    def __init__(self) -> None:
        self.state = Nud.NONE
        self.lladdr: Receiver | None = None
        self.confirmed = self.used = -1e9
        self.probes = 0
        self.queue: list[tuple[bytes, int]] = []
        self.gen = 0


class Site:
    """A LAN with a prefix routed to it; ``holders`` maps each address present to its receiver.

    ``neigh``: the gateway's neighbour parameters (None: a point-to-point link to one machine, as a
    peer's /32, where nothing is resolved and a machine that stops answering is just silent).
    """

    __slots__ = ("name", "prefix", "net", "mask", "gateway", "latency", "loss", "lan_latency",
                 "holders", "silent", "_leases", "_next_lease", "reserved", "neigh", "neighbours")

    def __init__(self, name: str, prefix: str, gateway: str | None = None, latency: float = 0.005,
                 loss: float = 0.0, lan_latency: float = 0.0002, neigh: NeighParams | None = ROUTER_NEIGH) -> None:
        net = ipaddress.IPv4Network(prefix)
        self.name = name
        self.prefix = net
        self.net = int(net.network_address)
        self.mask = int(net.netmask)
        hosts = net.num_addresses
        default_gw = net.network_address + (1 if hosts > 2 else 0)
        self.gateway = ipaddress.IPv4Address(gateway).packed if gateway else default_gw.packed
        self.latency = latency  # one way, from the LAN to the internet core
        self.loss = loss
        self.lan_latency = lan_latency
        self.holders: dict[bytes, Receiver] = {}
        #: addresses whose holder still takes frames but answers no neighbour probe: a paused VM whose MAC
        #: lives behind a port that stays (the tunnel proxy's), so the gateway's probes go unanswered
        self.silent: set[bytes] = set()
        self._leases: dict[bytes, bytes] = {}  # MAC -> leased address (DHCP remembers clients)
        self._next_lease = 100
        self.reserved: set[bytes] = {self.gateway}
        self.neigh = neigh if net.prefixlen < 32 else None
        self.neighbours: dict[bytes, Neighbour] = {}

    def covers(self, packed: bytes) -> int:
        """The prefix length if this site's prefix covers the address, else -1."""
        return self.prefix.prefixlen if (int.from_bytes(packed, "big") & self.mask) == self.net else -1

    def lease(self, mac: bytes) -> bytes:
        """A DHCP lease for ``mac``: the same address again for a client it has seen."""
        got = self._leases.get(mac)
        if got is not None:
            return got
        size = self.prefix.num_addresses
        for _ in range(size):
            off = self._next_lease % size
            self._next_lease += 1
            if off in (0, size - 1) and size > 2:
                continue
            cand = (self.prefix.network_address + off).packed
            if cand not in self.reserved and cand not in self._leases.values():
                self._leases[mac] = cand
                return cand
        raise RuntimeError(f"site {self.name}: address pool exhausted")


def _neigh(site: Site) -> NeighParams:
    """The gateway's neighbour parameters: only a LAN resolves neighbours (a peer's /32 has none)."""
    assert site.neigh is not None, site.name
    return site.neigh


class Network:
    """The internet core plus every site's LAN."""

    def __init__(self, clock: Clock, rng: random.Random) -> None:
        self.clock = clock
        self.rng = rng
        self.sites: list[Site] = []
        self._route_cache: dict[bytes, Site | None] = {}
        self.losses: dict[int, Loss] = {}  # tag -> the last loss reported for it (REPORTED_LOSSES)
        self.lost_at: dict[int, float] = {}  # tag -> when that was
        self.last_loss: dict[int, Loss] = {}  # tag -> the last loss of any kind (bookkeeping, tests)
        self.drops: Counter[Loss] = Counter()
        self.packets = 0  # packets handed to the network
        self.tap: Callable[[float, bytes], None] | None = None  # e.g. a pcap writer
        #: the lab's network: namespaces joined by veths pass the sender's skb itself to every router, so
        #: a segment's pending neighbour confirmation confirms the routers' entries too (``ConfirmingSegment``)
        self.skb_crosses = False

    def add_site(self, site: Site) -> Site:
        self.sites.append(site)
        self._route_cache.clear()
        return site

    def route(self, dst: bytes) -> Site | None:
        """Longest-prefix match of ``dst`` over the sites' prefixes."""
        try:
            return self._route_cache[dst]
        except KeyError:
            pass
        best, best_len = None, -1
        for s in self.sites:
            n = s.covers(dst)
            if n > best_len:
                best, best_len = s, n
        self._route_cache[dst] = best
        return best

    def lose(self, tag: int, why: Loss) -> None:
        self.drops[why] += 1
        if tag >= 0:
            self.last_loss[tag] = why
            if why in REPORTED_LOSSES:
                self.losses[tag] = why
                self.lost_at[tag] = self.clock.now

    def send(self, data: bytes, tag: int, from_site: Site) -> None:
        """Send an IPv4 packet from a node on ``from_site`` towards its destination."""
        self.packets += 1
        if self.tap is not None:
            self.tap(self.clock.now, data)
        try:
            ip = parse_ip(data)
        except ParseError:
            self.lose(tag, Loss.PARSE)
            return
        dst = ip.dst
        site = self.route(dst)
        if site is None:
            self.lose(tag, Loss.NO_ROUTE)
            self._icmp(from_site, data, tag, ICMP_NET_UNREACH)  # ``ip_error``: the first router answers
            return
        rng = self.rng
        if site is from_site:
            delay = site.lan_latency
            if site.loss and rng.random() < site.loss:
                self.lose(tag, Loss.LINK)
                return
        else:
            delay = from_site.latency + site.latency
            if (from_site.loss and rng.random() < from_site.loss) or (site.loss and rng.random() < site.loss):
                self.lose(tag, Loss.LINK)
                return
        self.clock.after(delay, self._arrive, (site, dst), (data, tag))

    def _icmp(self, site: Site, data: bytes, tag: int, code: int) -> None:
        """The gateway of ``site`` answers ``data`` with ICMP destination unreachable (the lab's routers have
        no ICMP rate limit: ``tools.lab.topology.INET_SYSCTL``)."""
        msg = icmp_unreachable(site.gateway, data, code)
        if msg is not None:
            self.send(msg, -1, site)  # its own packet: its fate is no connection's loss

    def _arrive(self, where, packet) -> None:
        site, dst = where
        data, tag = packet
        if site.neigh is None:
            holder = site.holders.get(dst)
            if holder is None:
                self.lose(tag, Loss.NO_HOLDER)
                return
            holder(data, tag)
            return
        self._resolve(site, dst, data, tag)

    # -------------------------------------------------------------- neighbour resolution (neighbour.c)
    def _resolve(self, site: Site, dst: bytes, data: bytes, tag: int) -> None:
        """``neigh_resolve_output`` -> ``__neigh_event_send``: send, queue, or start resolving."""
        n = site.neighbours.get(dst)
        if n is None:
            n = site.neighbours[dst] = Neighbour()
        now = self.clock.now
        if self.skb_crosses and type(data) is ConfirmingSegment:  # ``sock_confirm_neigh``
            n.confirmed = now
        if n.state != Nud.REACHABLE:  # a reachable entry's frames take the cached header: ``used`` stays
            n.used = now
        if n.state in (Nud.NONE, Nud.FAILED):
            n.state, n.probes = Nud.INCOMPLETE, _neigh(site).ucast_probes
            n.queue = [(data, tag)]
            self._neigh_timer(site, dst, n)  # the first probe goes at once
            return
        if n.state == Nud.INCOMPLETE:
            if len(n.queue) >= _neigh(site).queue:
                old_data, old_tag = n.queue.pop(0)
                self.lose(old_tag, Loss.NO_HOLDER)
            n.queue.append((data, tag))
            return
        if n.state == Nud.STALE:
            n.state = Nud.DELAY
            self._neigh_arm(site, dst, n, now + _neigh(site).delay_first_probe)
        self._to_lladdr(site, dst, n, data, tag)

    def _to_lladdr(self, site: Site, dst: bytes, n: Neighbour, data: bytes, tag: int) -> None:
        """A frame to the entry's link-layer address: taken only if that machine still holds the address."""
        holder = site.holders.get(dst)
        if holder is None or holder != n.lladdr:
            self.lose(tag, Loss.NO_HOLDER)
            return
        holder(data, tag)

    def _neigh_arm(self, site: Site, dst: bytes, n: Neighbour, when: float) -> None:
        """The entry's timer (``neigh_add_timer``/``mod_timer``), run when the kernel's wheel runs it."""
        n.gen += 1
        now = self.clock.now
        self.clock.timer(max(when, now + TIMER_MIN), Network._neigh_fire, (self, site, dst), (n, n.gen))

    @staticmethod
    def _neigh_fire(where, which) -> None:
        net, site, dst = where
        n, gen = which
        if gen == n.gen:
            net._neigh_timer(site, dst, n)

    def _neigh_timer(self, site: Site, dst: bytes, n: Neighbour) -> None:
        """``neigh_timer_handler``: the state's timer ran out (or a new entry's first probe)."""
        p, now = _neigh(site), self.clock.now
        if n.state == Nud.REACHABLE:
            if now < n.confirmed + p.reachable:
                self._neigh_arm(site, dst, n, n.confirmed + p.reachable)
            elif now <= n.used + p.delay_first_probe:
                n.state = Nud.DELAY
                self._neigh_arm(site, dst, n, now + p.delay_first_probe)
            else:
                n.state = Nud.STALE
            return
        if n.state == Nud.DELAY:
            if now <= n.confirmed + p.delay_first_probe:  # confirmed meanwhile: reachable since then
                n.state = Nud.REACHABLE
                self._neigh_arm(site, dst, n, n.confirmed + p.reachable)
                return
            n.state, n.probes = Nud.PROBE, 0
        if n.state not in (Nud.INCOMPLETE, Nud.PROBE):
            return
        limit = p.ucast_probes + (p.mcast_probes if n.state == Nud.INCOMPLETE else 0)
        if n.probes >= limit:
            self._failed(site, n)
            return
        n.probes += 1
        holder = site.holders.get(dst)
        # INCOMPLETE broadcasts its request (whoever holds the address answers); PROBE asks the old MAC
        if holder is not None and dst not in site.silent and (n.state == Nud.INCOMPLETE or holder == n.lladdr):
            self._reachable(site, dst, n, holder)
            return
        self._neigh_arm(site, dst, n, now + p.retrans)

    def _reachable(self, site: Site, dst: bytes, n: Neighbour, holder: Receiver) -> None:
        """An answer (``neigh_update`` to NUD_REACHABLE): the held packets go out."""
        n.state, n.lladdr, n.confirmed = Nud.REACHABLE, holder, self.clock.now
        queue, n.queue = n.queue, []
        self._neigh_arm(site, dst, n, n.confirmed + _neigh(site).reachable)
        for data, tag in queue:
            holder(data, tag)

    def gratuitous(self, site: Site, dst: bytes) -> None:
        """The gateway hears a gratuitous ARP for ``dst`` from its holder (``arp_process``, arp_accept off): an
        entry it has takes it (``neigh_update`` to NUD_STALE, override; a valid one with the same address keeps
        its state); none is made.  What a resolving or failed entry held goes out as any packet to a stale
        entry does (``neigh_resolve_output``): the first sets DELAY."""
        n = site.neighbours.get(dst)
        holder = site.holders.get(dst)
        if n is None or holder is None:
            return
        if n.state not in (Nud.NONE, Nud.INCOMPLETE, Nud.FAILED) and n.lladdr == holder:
            return
        n.state, n.lladdr = Nud.STALE, holder
        n.gen += 1  # its timer is deleted: STALE has none
        queue, n.queue = n.queue, []
        for data, tag in queue:
            self._resolve(site, dst, data, tag)

    def _failed(self, site: Site, n: Neighbour) -> None:
        """``neigh_invalidate``: every held packet is answered with ICMP host unreachable."""
        n.state = Nud.FAILED
        n.gen += 1
        queue, n.queue = n.queue, []
        for data, tag in queue:
            self.lose(tag, Loss.NO_HOLDER)
            self._icmp(site, data, tag, ICMP_HOST_UNREACH)
