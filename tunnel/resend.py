"""Frames sent toward a VM that may never have reached it, kept to send again where it went.

A live migration stops the guest, copies its last pages, and resumes it elsewhere.
Frames the proxy sends toward the old host in between die in the stopped source's
TAP, and each costs its sender a retransmission timer (a peer's TCP: ~200 ms).  So
the proxy keeps, per VM MAC, the unicast frames it forwarded toward the MAC's session
since the VM was last heard there (less :data:`SLACK`, for frames still on their way
when the VM last spoke), and when the MAC moves it sends them again to the new
location.  A frame the VM did get arrives twice: harmless to TCP (a duplicate
segment, acknowledged again), and bounded for everything else.

Bounds: frames older than ``window`` seconds are never re-sent; each MAC holds at
most ``max_frames`` frames and ``max_bytes`` bytes (the oldest go first), all MACs
together at most ``budget`` bytes (beyond it a frame is not kept: counted).
Sans-I/O: time is a parameter; the frames are the bytes the proxy was given (kept by
reference, not copied).
"""
from __future__ import annotations

from collections import deque

#: Frames sent this long before the VM was last heard are still kept: they may have been on their
#: way when it spoke, and reached the host after the guest stopped (the tunnel's one-way delay).
SLACK = 0.05
WINDOW = 1.0
MAX_FRAMES = 512
MAX_BYTES = 1 << 20
BUDGET = 32 << 20


class _Held:
    __slots__ = ("frames", "size")

    def __init__(self) -> None:
        self.frames: deque[tuple[float, bytes]] = deque()
        self.size = 0


class Resend:
    def __init__(self, window: float = WINDOW, max_frames: int = MAX_FRAMES, max_bytes: int = MAX_BYTES,
                 budget: int = BUDGET) -> None:
        self.window = window
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.budget = budget
        self.size = 0  # bytes held for all MACs
        self._held: dict[bytes, _Held] = {}
        self.evicted = 0  # frames pushed out by the per-MAC bounds
        self.not_kept = 0  # frames not kept: over the budget, or larger than a MAC's bound

    @property
    def counters(self) -> dict[str, int]:
        return {"resend_evicted": self.evicted, "resend_not_kept": self.not_kept}

    def __len__(self) -> int:
        return sum(len(h.frames) for h in self._held.values())

    def keep(self, mac: bytes, frame: bytes, now: float, heard: float) -> None:
        """``frame`` was sent toward ``mac``, last heard (at the port it was sent to) at ``heard``.
        On the proxy's data path: a few comparisons, one append, and as many pops as it pushes out."""
        h = self._held.get(mac)
        if h is None:
            if self.window <= 0:
                return
            h = self._held[mac] = _Held()
        q = h.frames
        cut = now - self.window
        if heard - SLACK > cut:
            cut = heard - SLACK
        n = len(frame)
        size = h.size
        if n > self.max_bytes:
            self.not_kept += 1
            return
        dropped = 0
        while q and (q[0][0] < cut or len(q) >= self.max_frames or size - dropped + n > self.max_bytes):
            if q[0][0] >= cut:
                self.evicted += 1  # bounds, not age: counted
            dropped += len(q.popleft()[1])
        size -= dropped
        if self.size - dropped + n > self.budget:
            h.size = size
            self.size -= dropped
            self.not_kept += 1
            return
        q.append((now, frame))
        h.size = size + n
        self.size += n - dropped

    def take(self, mac: bytes, since: float, now: float) -> list[bytes]:
        """The frames kept for ``mac`` sent at ``since`` or later and within the window (all of them
        handed over: the MAC moved)."""
        h = self._held.pop(mac, None)
        if h is None:
            return []
        self.size -= h.size
        cut = max(since, now - self.window)
        return [f for t, f in h.frames if t >= cut]

    def forget(self, mac: bytes) -> None:
        h = self._held.pop(mac, None)
        if h is not None:
            self.size -= h.size

    def expire(self, now: float) -> None:
        """Drop what is past the window (run at the proxy's other timers: no wake-up of its own, the
        budget bounds what waits in between)."""
        cut = now - self.window
        for mac in [m for m, h in self._held.items() if not h.frames or h.frames[-1][0] < cut]:
            self.forget(mac)
