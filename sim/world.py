"""The discrete-event world: a clock the simulator owns, and a network routing real bytes.

* :class:`Clock` is a heap of timed callbacks; simulated time only moves when the
  next event is taken.  Nothing here reads the wall clock.
* :class:`Network` routes an IPv4 packet by its destination address: the longest
  site prefix that covers it, then whoever currently *holds* the address on that
  site's LAN.  An address no prefix covers, or one nobody holds any more, is lost,
  and the loss is written down with a :class:`Loss` reason.
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

from conntrack import ParseError, parse_ip

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


#: Losses that make a timed-out connection "unreachable" rather than plain "timed out": a router
#: or the sender's own stack would say so (ICMP unreachable, no route, address gone).  A packet a
#: NAT translated for a VM that has left its host is not among them: the ICMP error that host
#: could send quotes the translated packet, which the peer cannot match (the lab agrees).
UNREACHABLE_LOSSES = frozenset({Loss.NO_ROUTE, Loss.NO_HOLDER, Loss.ADDRESS_GONE})


class Clock:
    """Simulated time: a heap of ``(time, seq, fn, a, b)``; ``fn(a, b)`` runs at ``time``."""

    __slots__ = ("now", "_heap", "_seq", "events")

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list = []
        self._seq = 0
        self.events = 0

    def at(self, when: float, fn: Callable, a=None, b=None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when if when > self.now else self.now, self._seq, fn, a, b))

    def after(self, delay: float, fn: Callable, a=None, b=None) -> None:
        self.at(self.now + delay, fn, a, b)

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


class Site:
    """A LAN with a prefix routed to it; ``holders`` maps each address present to its receiver."""

    __slots__ = ("name", "prefix", "net", "mask", "gateway", "latency", "loss", "lan_latency",
                 "holders", "_leases", "_next_lease", "reserved")

    def __init__(self, name: str, prefix: str, gateway: str | None = None, latency: float = 0.005,
                 loss: float = 0.0, lan_latency: float = 0.0002) -> None:
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
        self._leases: dict[bytes, bytes] = {}  # MAC -> leased address (DHCP remembers clients)
        self._next_lease = 100
        self.reserved: set[bytes] = {self.gateway}

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


class Network:
    """The internet core plus every site's LAN."""

    def __init__(self, clock: Clock, rng: random.Random) -> None:
        self.clock = clock
        self.rng = rng
        self.sites: list[Site] = []
        self._route_cache: dict[bytes, Site | None] = {}
        self.losses: dict[int, Loss] = {}  # tag -> last loss reason seen for it
        self.lost_at: dict[int, float] = {}  # tag -> when that was
        self.drops: Counter[Loss] = Counter()
        self.packets = 0  # packets handed to the network
        self.tap: Callable[[float, bytes], None] | None = None  # e.g. a pcap writer

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
            self.losses[tag] = why
            self.lost_at[tag] = self.clock.now

    def send(self, data: bytes, tag: int, from_site: Site) -> None:
        """Send an IPv4 packet from a node on ``from_site`` towards its destination."""
        self.packets += 1
        if self.tap is not None:
            self.tap(self.clock.now, data)
        try:
            dst = parse_ip(data).dst
        except ParseError:
            self.lose(tag, Loss.PARSE)
            return
        site = self.route(dst)
        if site is None:
            self.lose(tag, Loss.NO_ROUTE)
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

    def _arrive(self, where, packet) -> None:
        site, dst = where
        data, tag = packet
        holder = site.holders.get(dst)
        if holder is None:
            self.lose(tag, Loss.NO_HOLDER)
            return
        holder(data, tag)
