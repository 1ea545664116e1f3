"""External port (and ICMP identifier) allocation.

Port preservation first: the internal port is kept when it is free and inside the
pool of its range class.  Otherwise a free port of the same class, chosen from a
random starting point (RFC 6056 style) and probed linearly, so allocation never
fails while a port is free.  Classes follow RFC 4787 REQ-3a: an internal port below
1024 gets an external port from the low range, any other from the high range.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PoolUse:
    used: int
    size: int


def in_lane(port: int, lane: tuple[int, int, int] | None) -> bool:
    """Whether ``port`` is in ``lane`` = (modulus, lo, hi): lo <= (port >> 1) % modulus <= hi
    (modulus a power of two; None: every port).  ``roam nat --workers`` gives each worker a
    lane of the pools (:mod:`nat.netfilter.workers` says why interleaved, not contiguous)."""
    return lane is None or lane[1] <= (port >> 1) & (lane[0] - 1) <= lane[2]


def lane_count(first: int, last: int, lane: tuple[int, int, int] | None) -> int:
    """How many ports of ``first..last`` are in ``lane``: every 2*modulus ports hold each lane
    value twice, so only the tail is counted one by one."""
    if lane is None:
        return last - first + 1
    m, lo, hi = lane
    full = (last - first + 1) // (2 * m)
    return full * 2 * (hi - lo + 1) + sum(in_lane(p, lane) for p in range(first + full * 2 * m, last + 1))


class PortRange:
    """One contiguous range of ports, or its ports in one lane; tracks which are in use."""

    __slots__ = ("first", "last", "used", "reserved", "lane", "_size", "_rng")

    def __init__(self, first: int, last: int, reserved: frozenset[int] = frozenset(),
                 rng: random.Random | None = None, lane: tuple[int, int, int] | None = None) -> None:
        if not 0 <= first <= last <= 65535:
            raise ValueError(f"bad port range {first}-{last}")
        self.first, self.last, self.lane = first, last, lane
        self.reserved = frozenset(p for p in reserved if p in self)
        self.used: set[int] = set()
        self._size = lane_count(first, last, lane) - len(self.reserved)
        self._rng = rng or random.Random()

    @property
    def size(self) -> int:
        return self._size

    def __contains__(self, port: int) -> bool:
        return self.first <= port <= self.last and in_lane(port, self.lane)

    def full(self) -> bool:
        return len(self.used) >= self.size

    def take(self, port: int) -> bool:
        """Take ``port`` if it is in range and free."""
        if port in self and port not in self.used and port not in self.reserved:
            self.used.add(port)
            return True
        return False

    def allocate(self) -> int | None:
        if self.full():
            return None
        n = self.last - self.first + 1
        start = self._rng.randrange(n)
        used, reserved, lane = self.used, self.reserved, self.lane
        for i in range(n):
            p = self.first + (start + i) % n
            if p not in used and p not in reserved and in_lane(p, lane):
                used.add(p)
                return p
        return None  # unreachable while size is counted right

    def free(self, port: int) -> None:
        self.used.discard(port)


class PortPool:
    """The external ports of one protocol on one external address."""

    def __init__(self, high: tuple[int, int], low: tuple[int, int] | None = None,
                 reserved: frozenset[int] = frozenset(), seed: int | None = None,
                 lane: tuple[int, int, int] | None = None) -> None:
        rng = random.Random(seed)
        self.high = PortRange(*high, reserved=reserved, rng=rng, lane=lane)
        self.low = PortRange(*low, reserved=reserved, rng=rng, lane=lane) if low else None

    def class_of(self, internal_port: int) -> PortRange:
        """The range an internal port's external port comes from (RFC 4787 REQ-3a)."""
        if self.low is not None and internal_port < 1024:
            return self.low
        return self.high

    def allocate(self, internal_port: int) -> int | None:
        """An external port for ``internal_port``: itself if possible, else one of its class."""
        r = self.class_of(internal_port)
        if r.take(internal_port):
            return internal_port
        return r.allocate()

    def take(self, port: int) -> bool:
        """Claim a specific port (restore from a snapshot)."""
        for r in (self.high, self.low):
            if r is not None and port in r:
                return r.take(port)
        return False

    def free(self, port: int) -> None:
        for r in (self.high, self.low):
            if r is not None and port in r:
                r.free(port)

    def use(self) -> PoolUse:
        rs = [r for r in (self.high, self.low) if r is not None]
        return PoolUse(sum(len(r.used) for r in rs), sum(r.size for r in rs))

    def in_use(self, port: int) -> bool:
        return any(r is not None and port in r.used for r in (self.high, self.low))
