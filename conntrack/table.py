"""The connection table: entries, lookup in both directions, timeouts, events.

Sans-I/O: ``track(packet, now)`` and ``expire(now)`` are the only inputs; the caller
owns the clock and drains ``pop_events()``.  Expiry uses a one-second timer wheel
filled lazily (a refreshed entry is re-filed only when its old slot comes due, or at
once when its timeout gets shorter; a stale slot finds it alive and files it again), so
a packet costs a dict lookup and a few attribute writes; a lookup also checks the exact
deadline, so no entry is ever used past its timeout.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Iterator

from .events import ConnEvent, CtState, EventKind, Tracked, Why
from .flow import FlowTuple, packet_key, reverse_key
from .packet import ICMP4_QUERIES, ICMP6_QUERIES, Packet, Proto
from .tcp_states import REOPEN_STATES, Direction, Segment, TcpState, classify, next_state
from .timeouts import Timeouts

SEEN_REPLY = 1
ASSURED = 2
DEAD = 4

_EARLY_DROP_SCAN = 64  # entries looked at for an unassured victim when full (Linux: 8 per bucket)
_ORIG, _REPLY = Direction.ORIGINAL, Direction.REPLY
_NEW, _EST, _REL, _INV, _UNT = (CtState.NEW, CtState.ESTABLISHED, CtState.RELATED,
                                CtState.INVALID, CtState.UNTRACKED)


class Conn:
    """One tracked connection (mutable: the table owns it)."""

    __slots__ = ("original", "reply", "proto", "state", "status", "deadline", "orig_packets", "orig_bytes", "reply_packets", "reply_bytes", "extra")

    def __init__(self, original: bytes, reply: bytes, proto: int, state: int, now: float) -> None:
        self.original = original
        self.reply = reply
        self.proto = proto
        self.state = state  # TcpState for TCP, 0 otherwise
        self.status = 0
        self.deadline = now
        self.orig_packets = self.orig_bytes = self.reply_packets = self.reply_bytes = 0
        self.extra = None  # owned by the user (the NAT keeps its mapping here)

    @property
    def assured(self) -> bool:
        return bool(self.status & ASSURED)

    @property
    def seen_reply(self) -> bool:
        return bool(self.status & SEEN_REPLY)

    @property
    def tcp_state(self) -> TcpState | None:
        return TcpState(self.state) if self.proto == Proto.TCP else None

    def tuples(self) -> tuple[FlowTuple, FlowTuple]:
        return FlowTuple.from_key(self.original), FlowTuple.from_key(self.reply)

    def __repr__(self) -> str:
        o, r = self.tuples()
        return f"<Conn {o} / {r} state={self.state} status={self.status}>"


@dataclass(frozen=True, slots=True)
class Stats:
    entries: int
    capacity: int
    searched: int
    new: int
    invalid: int
    dropped_full: int
    early_drops: int
    expired: int


class ConnTable:
    """Tracks packets into connections, Linux-style, with a capacity."""

    def __init__(self, timeouts: Timeouts | None = None, capacity: int = 262144,
                 fragment_capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.timeouts = timeouts or Timeouts()
        self.capacity = capacity
        self.fragment_capacity = fragment_capacity
        self._by_key: dict[bytes, Conn] = {}  # both tuples of every entry
        self._count = 0
        self._wheel: dict[int, list[Conn]] = {}
        self._slots: list[int] = []  # heap of wheel slots in use
        self._slot_min: dict[int, float] = {}  # earliest deadline filed in each slot
        self._frags: dict[tuple, tuple[Conn, int, float]] = {}  # (src, dst, proto, id) -> head
        self._events: list[ConnEvent] = []
        self.emit_events = True
        self.counters = {"searched": 0, "new": 0, "invalid": 0, "dropped_full": 0,
                         "early_drops": 0, "expired": 0}

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Conn]:
        return (c for k, c in self._by_key.items() if k is c.original)

    def get(self, t: FlowTuple, now: float | None = None) -> Conn | None:
        """The live entry holding tuple ``t`` in either direction."""
        c = self._by_key.get(t.key())
        if c is not None and now is not None and c.deadline <= now:
            return None
        return c

    def stats(self) -> Stats:
        return Stats(self._count, self.capacity, **self.counters)

    def pop_events(self) -> list[ConnEvent]:
        ev, self._events = self._events, []
        return ev

    def next_deadline(self) -> float | None:
        """When ``expire`` next has work (may be early, never late; ``expire`` at it makes progress)."""
        if not self._slots:
            return None
        slot = self._slots[0]
        return self._slot_min.get(slot, float(slot))

    def timeout_left(self, c: Conn, now: float) -> float:
        return max(0.0, c.deadline - now)

    # ------------------------------------------------------------------ input
    def track(self, pkt: Packet, now: float, reply: FlowTuple | None = None) -> Tracked:
        """Account one packet; ``reply`` sets a new entry's reply tuple (NAT)."""
        self.counters["searched"] += 1
        if pkt.l4 < 0:
            return self._track_fragment(pkt, now)
        if pkt.inner is not None:
            return self._track_related(pkt, now)
        key = packet_key(pkt)
        if key is None:
            return Tracked(_UNT, why=Why.NOT_TRACKABLE)
        c = self._by_key.get(key)
        if c is not None and c.deadline <= now:
            self._destroy(c, now, Why.TIMEOUT)
            c = None
        if c is None:
            return self._new(pkt, key, now, reply)
        direction = _ORIG if key == c.original else _REPLY
        if pkt.proto == Proto.TCP:
            res = self._tcp(c, pkt, direction, now)
            if res is not None:
                return res
        else:
            self._refresh_other(c, direction, now)
        self._account(c, pkt, direction)
        if pkt.fragment is not None:
            self._note_head(pkt, c, direction, now)
        return Tracked(_EST if c.status & SEEN_REPLY else _NEW, direction, c)

    def expire(self, now: float) -> int:
        """Destroy every entry whose timeout has passed; returns how many."""
        n = 0
        slots, wheel = self._slots, self._wheel
        later: dict[int, Conn] = {}
        while slots and slots[0] <= now:
            slot = heapq.heappop(slots)
            self._slot_min.pop(slot, None)
            for c in wheel.pop(slot, ()):
                if c.status & DEAD:
                    continue
                if c.deadline <= now:
                    self._destroy(c, now, Why.TIMEOUT)
                    n += 1
                else:
                    later[id(c)] = c  # filed after the loop: it may belong in this very slot
        for c in later.values():
            self._file(c)
        if self._frags:
            for fk in [fk for fk, (_, _, t) in self._frags.items() if t <= now]:
                del self._frags[fk]
        self.counters["expired"] += n
        return n

    def remove(self, c: Conn, now: float, why: Why = Why.REMOVED) -> None:
        if not c.status & DEAD:
            self._destroy(c, now, why)

    def flush(self, now: float) -> None:
        for c in list(self):
            self._destroy(c, now, Why.REMOVED)

    # ------------------------------------------------------------------ internals
    def _new(self, pkt: Packet, key: bytes, now: float, reply: FlowTuple | None) -> Tracked:
        proto = pkt.proto
        state = 0
        if proto == Proto.TCP:
            state = next_state(_ORIG, classify(pkt.tcp_flags), TcpState.NONE)
            if state >= TcpState.IGNORE:
                self.counters["invalid"] += 1
                return Tracked(_INV, why=Why.TCP_INVALID)
        elif pkt.is_icmp:
            # a reply type cannot open an entry (Linux: "not a valid new type")
            if pkt.icmp_type not in (ICMP4_QUERIES if pkt.family == 4 else ICMP6_QUERIES):
                self.counters["invalid"] += 1
                return Tracked(_INV, why=Why.ICMP_UNMATCHED_REPLY)
        if self._count >= self.capacity and not self.expire(now) and not self._early_drop(now):
            self.counters["dropped_full"] += 1
            return Tracked(_INV, why=Why.TABLE_FULL)
        rkey = reply.key() if reply is not None else reverse_key(key)
        holder = self._by_key.get(rkey)
        if holder is not None and holder.deadline <= now:  # held by a timed-out entry: reap it
            self._destroy(holder, now, Why.TIMEOUT)
        if rkey in self._by_key:  # reply tuple taken (a NAT clash): not ours to resolve
            self.counters["invalid"] += 1
            return Tracked(_INV, why=Why.TABLE_FULL)
        c = Conn(key, rkey, proto, state, now)
        self._by_key[key] = c
        self._by_key[rkey] = c
        self._count += 1
        self.counters["new"] += 1
        c.deadline = now + self._timeout_for(c)
        self._file(c)
        self._account(c, pkt, _ORIG)
        if pkt.fragment is not None:
            self._note_head(pkt, c, _ORIG, now)
        self._emit(EventKind.NEW, c, now)
        return Tracked(_NEW, _ORIG, c)

    def _timeout_for(self, c: Conn) -> float:
        t = self.timeouts
        if c.proto == Proto.TCP:
            return t.tcp(TcpState(c.state))
        if c.proto in (Proto.UDP, Proto.UDPLITE):
            return t.udp_stream if c.status & ASSURED else t.udp
        if c.proto in (Proto.ICMP, Proto.ICMPV6):
            return t.icmp
        return t.generic

    def _tcp(self, c: Conn, pkt: Packet, direction: Direction, now: float) -> Tracked | None:
        seg = classify(pkt.tcp_flags)
        old = TcpState(c.state)
        new = next_state(direction, seg, old)
        if new == TcpState.SYN_SENT and old in REOPEN_STATES:
            self._destroy(c, now, Why.REOPEN)
            if direction is _REPLY:  # the server opens the new connection: roles switch (Linux)
                return self._new(pkt, c.reply, now, None)
            return self._new(pkt, c.original, now, None if c.reply == reverse_key(c.original)
                             else FlowTuple.from_key(c.reply))
        if new == TcpState.INVALID:
            self.counters["invalid"] += 1
            return Tracked(_INV, direction, c, Why.TCP_INVALID)
        if new == TcpState.IGNORE:
            self._account(c, pkt, direction)
            if direction is _REPLY:  # still a reply: Linux sets SEEN_REPLY for accepted packets
                c.status |= SEEN_REPLY
            return Tracked(_EST if c.status & SEEN_REPLY else _NEW, direction, c)
        if seg is Segment.RST and not c.status & SEEN_REPLY:
            self._account(c, pkt, direction)
            c.state = new  # CLOSE, as the kernel's DESTROY event reports it
            self._destroy(c, now, Why.RESET)
            return Tracked(_EST if direction is _REPLY else _NEW, direction, c)
        changed = new != old
        if (not c.status & ASSURED and c.status & SEEN_REPLY
                and old in (TcpState.SYN_RECV, TcpState.ESTABLISHED) and new == TcpState.ESTABLISHED):
            c.status |= ASSURED
            changed = True
        if direction is _REPLY and not c.status & SEEN_REPLY:
            c.status |= SEEN_REPLY
        c.state = new
        self._set_deadline(c, now + self.timeouts.tcp(new))
        if changed:
            self._emit(EventKind.UPDATE, c, now)
        return None

    def _refresh_other(self, c: Conn, direction: Direction, now: float) -> None:
        t = self.timeouts
        if direction is _REPLY and not c.status & SEEN_REPLY:
            c.status |= SEEN_REPLY
            if c.proto not in (Proto.UDP, Proto.UDPLITE, Proto.ICMP, Proto.ICMPV6):
                c.status |= ASSURED
                self._emit(EventKind.UPDATE, c, now)
        if c.proto in (Proto.UDP, Proto.UDPLITE):
            if c.status & SEEN_REPLY:
                if not c.status & ASSURED:
                    c.status |= ASSURED
                    self._emit(EventKind.UPDATE, c, now)
                self._set_deadline(c, now + t.udp_stream)
            else:
                self._set_deadline(c, now + t.udp)
        else:
            self._set_deadline(c, now + self._timeout_for(c))

    def _track_related(self, pkt: Packet, now: float) -> Tracked:
        inner = pkt.inner
        key = packet_key(inner) if inner.l4 >= 0 else None
        c = self._by_key.get(key) if key is not None else None
        if c is None or c.deadline <= now:
            self.counters["invalid"] += 1
            return Tracked(_INV, why=Why.ICMP_NO_FLOW)
        # the error travels against the quoted packet
        direction = _REPLY if key == c.original else _ORIG
        return Tracked(_REL, direction, c)

    def _track_fragment(self, pkt: Packet, now: float) -> Tracked:
        head = self._frags.get((pkt.src, pkt.dst, pkt.proto, pkt.fragment.ident))
        if head is None or head[0].status & DEAD or head[2] <= now or head[0].deadline <= now:
            return Tracked(_UNT, why=Why.FRAGMENT_WITHOUT_HEAD)
        c, direction, _ = head
        self._account(c, pkt, Direction(direction))
        return Tracked(_EST if c.status & SEEN_REPLY else _NEW, Direction(direction), c)

    def _note_head(self, pkt: Packet, c: Conn, direction: Direction, now: float) -> None:
        if len(self._frags) >= self.fragment_capacity:
            del self._frags[next(iter(self._frags))]
        self._frags[(pkt.src, pkt.dst, pkt.proto, pkt.fragment.ident)] = (
            c, int(direction), now + self.timeouts.fragment)

    @staticmethod
    def _account(c: Conn, pkt: Packet, direction: int) -> None:
        if direction:
            c.reply_packets += 1
            c.reply_bytes += pkt.end - pkt.l3
        else:
            c.orig_packets += 1
            c.orig_bytes += pkt.end - pkt.l3

    def _set_deadline(self, c: Conn, deadline: float) -> None:
        shorter = deadline < c.deadline
        c.deadline = deadline
        if shorter:  # the slot it sits in may be too late now: file it again as well
            self._file(c)

    def _file(self, c: Conn) -> None:
        slot = math.floor(c.deadline)  # never later than the deadline: expire(now) finds all due
        bucket = self._wheel.get(slot)
        if bucket is None:
            self._wheel[slot] = [c]
            self._slot_min[slot] = c.deadline
            heapq.heappush(self._slots, slot)
        else:
            bucket.append(c)
            if c.deadline < self._slot_min[slot]:
                self._slot_min[slot] = c.deadline

    def _early_drop(self, now: float) -> bool:
        for i, (k, c) in enumerate(self._by_key.items()):
            if i >= _EARLY_DROP_SCAN * 2:
                break
            if not c.status & ASSURED:
                self._destroy(c, now, Why.EARLY_DROP)
                self.counters["early_drops"] += 1
                return True
        return False

    def _destroy(self, c: Conn, now: float, why: Why) -> None:
        c.status |= DEAD
        self._by_key.pop(c.original, None)
        self._by_key.pop(c.reply, None)
        self._count -= 1
        self._emit(EventKind.DESTROY, c, now, why)

    def _emit(self, kind: EventKind, c: Conn, now: float, why: Why | None = None) -> None:
        if self.emit_events:
            o, r = c.tuples()
            self._events.append(ConnEvent(kind, o, r, c.tcp_state, bool(c.status & ASSURED), now, why, c))
