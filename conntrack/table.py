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
from typing import Any, Iterator

from .events import ConnEvent, CtState, EventKind, Tracked, Why
from .flow import _PACK4, _PACK6, FlowTuple, packet_key, reverse_key
from .packet import ICMP4_QUERIES, ICMP6_QUERIES, Packet
from .tcp_states import NEXT, REOPEN_STATES, STATE_OF, Direction, TcpState
from .timeouts import Timeouts

SEEN_REPLY = 1
ASSURED = 2
DEAD = 4

_EARLY_DROP_SCAN = 64  # entries looked at for an unassured victim when full (Linux: 8 per bucket)
_ORIG, _REPLY = Direction.ORIGINAL, Direction.REPLY
_DIRS = (_ORIG, _REPLY)
_NEW, _EST, _REL, _INV, _UNT = (CtState.NEW, CtState.ESTABLISHED, CtState.RELATED,
                                CtState.INVALID, CtState.UNTRACKED)
# Conn keeps its TCP state in the low byte of one int and its status bits above it
# (one slot fewer per entry); these are the status bits in that int.
_SEEN, _ASSURED, _DEAD = SEEN_REPLY << 8, ASSURED << 8, DEAD << 8
_STATE_MASK = 0xFF
_TCP, _UDP, _UDPLITE, _ICMP, _ICMPV6 = 6, 17, 136, 1, 58
_SYN_SENT, _SYN_RECV, _ESTABLISHED, _TIME_WAIT, _CLOSE = 1, 2, 3, 7, 8
_IGNORE, _INVALID = int(TcpState.IGNORE), int(TcpState.INVALID)


class Conn:
    """One tracked connection (mutable: the table owns it).

    ``proto`` is read from the original key's first byte and ``state``/``status`` share
    one int (``_ss``): fewer slots, less memory per entry. All three read and write as
    plain attributes.
    """

    __slots__ = ("original", "reply", "_ss", "deadline", "orig_packets", "orig_bytes", "reply_packets",
                 "reply_bytes", "extra")

    def __init__(self, original: bytes, reply: bytes, proto: int, state: int, now: float) -> None:
        # ``proto`` is original[0] (the key starts with it); kept in the signature for callers
        self.original = original
        self.reply = reply
        self._ss = int(state)  # TcpState for TCP, 0 otherwise; status bits << 8
        self.deadline = now
        self.orig_packets = self.orig_bytes = self.reply_packets = self.reply_bytes = 0
        self.extra: Any = None  # owned by the user (the NAT keeps its mapping here)

    @property
    def proto(self) -> int:
        return self.original[0]

    @property
    def state(self) -> int:
        """TcpState for TCP, 0 otherwise."""
        s = self._ss & _STATE_MASK
        return STATE_OF[s] if self.original[0] == _TCP else s

    @state.setter
    def state(self, value: int) -> None:
        self._ss = (self._ss & ~_STATE_MASK) | int(value)

    @property
    def status(self) -> int:
        """SEEN_REPLY | ASSURED | DEAD bits."""
        return self._ss >> 8

    @status.setter
    def status(self, value: int) -> None:
        self._ss = (self._ss & _STATE_MASK) | (int(value) << 8)

    @property
    def assured(self) -> bool:
        return bool(self._ss & _ASSURED)

    @property
    def seen_reply(self) -> bool:
        return bool(self._ss & _SEEN)

    @property
    def tcp_state(self) -> TcpState | None:
        return STATE_OF[self._ss & _STATE_MASK] if self.original[0] == _TCP else None

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
        #: the event kinds the journal keeps: a NAT reads only DESTROY (each NEW or UPDATE costs
        #: a tuple pair, measured an eighth of a new flow's time in the NAT engine)
        self.journal: frozenset[EventKind] = frozenset(EventKind)
        self.counters = {"searched": 0, "new": 0, "invalid": 0, "dropped_full": 0,
                         "early_drops": 0, "expired": 0}

    @property
    def timeouts(self) -> Timeouts:
        return self._timeouts

    @timeouts.setter
    def timeouts(self, t: Timeouts) -> None:
        self._timeouts = t
        # TCP timeout by state value, looked up per packet (Timeouts.tcp goes by the name)
        self._tcp_timeout = tuple(t.tcp(s) if s != TcpState.NONE else t.syn_sent for s in STATE_OF)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Conn]:
        return (c for k, c in self._by_key.items() if k is c.original)

    def get(self, t: FlowTuple, now: float | None = None) -> Conn | None:
        """The live entry holding tuple ``t`` in either direction."""
        return self.lookup(t.key(), now)

    def lookup(self, key: bytes, now: float | None = None) -> Conn | None:
        """The entry holding the packed tuple ``key`` (``FlowTuple.key()``, ``packet_key``) in
        either direction; with ``now``, None for an entry whose timeout has passed (it stays
        until ``expire`` or the next ``track`` on it destroys it)."""
        c = self._by_key.get(key)
        if c is not None and now is not None and c.deadline <= now:
            return None
        return c

    def adopt(self, c: Conn) -> None:
        """Insert a ready-made connection (e.g. one restored from a snapshot), no event.

        Raises ValueError if either of its tuples is taken or the table is full."""
        if c.original in self._by_key or c.reply in self._by_key:
            raise ValueError("a tuple of this connection is already tracked")
        if self._count >= self.capacity:
            raise ValueError("table full")
        c._ss &= ~_DEAD
        self._by_key[c.original] = c
        self._by_key[c.reply] = c
        self._count += 1
        self._file(c)

    @property
    def has_events(self) -> bool:
        """Whether ``pop_events`` has anything (cheaper than popping an empty list)."""
        return bool(self._events)

    def stats(self) -> Stats:
        return Stats(self._count, self.capacity, **self.counters)

    def pop_events(self) -> list[ConnEvent]:
        ev, self._events = self._events, []
        return ev

    def next_deadline(self) -> float | None:
        """When ``expire`` next has work (may be early, never late; ``expire`` at it makes progress)."""
        slots = self._slots
        if not slots:
            return None
        slot = slots[0]
        return self._slot_min.get(slot, float(slot))

    def timeout_left(self, c: Conn, now: float) -> float:
        return max(0.0, c.deadline - now)

    # ------------------------------------------------------------------ input
    def track(self, pkt: Packet, now: float, reply: FlowTuple | None = None) -> Tracked:
        """Account one packet; ``reply`` sets a new entry's reply tuple (NAT).

        The answer carries the events the packet caused; they also stay in the journal
        that ``pop_events`` drains (with the expiries, which no packet causes).  The
        common case builds its answer inline (a wrapper around the whole method cost ~8%
        of ``roam bench conntrack``); the rest go through :meth:`_caused`."""
        events = self._events
        mark = len(events)
        family, proto, src, dst, l3, l4, end, sport, dport, flags = pkt[:10]
        if l4 < 0:
            self.counters["searched"] += 1
            return self._caused(mark, self._track_fragment(pkt, now))
        if pkt.inner is not None:
            self.counters["searched"] += 1
            return self._caused(mark, self._track_related(pkt, now))
        key: bytes | None
        if proto == _TCP or proto == _UDP:  # packet_key's common case, inline
            key = (_PACK4 if family == 4 else _PACK6)(proto, src, dst, sport, dport)
        else:
            key = packet_key(pkt)
        if key is None:
            self.counters["searched"] += 1
            return Tracked(_UNT, why=Why.NOT_TRACKABLE)
        c = self._by_key.get(key)
        if c is not None and c.deadline <= now:
            self._destroy(c, now, Why.TIMEOUT)
            c = None
        if c is None:
            self.counters["searched"] += 1
            return self._caused(mark, self._new(pkt, key, now, reply))
        direction = 0 if key == c.original else 1
        if self.track_conn(c, direction, flags, end - l3, now):
            if pkt.fragment is not None:
                self._note_head(pkt, c, direction, now)
            if len(events) == mark:
                return Tracked(_EST if c._ss & _SEEN else _NEW, _DIRS[direction], c)
            return Tracked(_EST if c._ss & _SEEN else _NEW, _DIRS[direction], c, None, tuple(events[mark:]))
        self.counters["searched"] += 1
        return self._caused(mark, self._tcp(c, pkt, _DIRS[direction], now))  # only TCP declines track_conn

    def _caused(self, mark: int, tr: Tracked) -> Tracked:
        """``tr`` with the events emitted since the journal held ``mark`` of them."""
        events = self._events
        return tr._replace(events=tuple(events[mark:])) if len(events) > mark else tr

    def track_conn(self, c: Conn, direction: int, tcp_flags: int, nbytes: int, now: float) -> bool:
        """The common case of ``track`` for a packet of a known, live entry (from ``lookup``):
        ``direction`` 0 on its original tuple, 1 on its reply tuple; ``nbytes`` the IP length.

        Returns True when the packet was accounted exactly as ``track`` would (its ctstate is
        ESTABLISHED if ``c.seen_reply`` else NEW). Returns False, having changed nothing, for
        a TCP segment that needs ``track`` itself (invalid, ignored, a reopening SYN, an RST
        before any reply); the caller then calls ``track``.
        """
        ss = c._ss
        proto = c.original[0]
        if proto == _TCP:
            old = ss & _STATE_MASK
            new = NEXT[direction][tcp_flags & 0x3F][old]
            if (new >= _IGNORE or (new == _SYN_SENT and (old == _TIME_WAIT or old == _CLOSE))
                    or (tcp_flags & 4 and not ss & _SEEN)):
                return False
            changed = new != old
            if not ss & _ASSURED and ss & _SEEN and (old == _SYN_RECV or old == _ESTABLISHED) and new == _ESTABLISHED:
                ss |= _ASSURED
                changed = True
            if direction:
                ss |= _SEEN
            c._ss = (ss & ~_STATE_MASK) | new
            deadline = now + self._tcp_timeout[new]
            if changed:
                self._set_deadline(c, deadline)
                self._emit(EventKind.UPDATE, c, now)
            elif deadline < c.deadline:
                self._set_deadline(c, deadline)
            else:
                c.deadline = deadline
        else:
            t = self._timeouts
            if proto == _UDP or proto == _UDPLITE:
                if direction and not ss & _SEEN:
                    ss |= _SEEN
                    c._ss = ss
                if ss & _SEEN:
                    if not ss & _ASSURED:  # the first reply assures a UDP flow
                        c._ss = ss | _ASSURED
                        self._emit(EventKind.UPDATE, c, now)
                    deadline = now + t.udp_stream
                else:
                    deadline = now + t.udp
            else:
                if direction and not ss & _SEEN:
                    if proto == _ICMP or proto == _ICMPV6:
                        c._ss = ss | _SEEN
                    else:
                        c._ss = ss | _SEEN | _ASSURED
                        self._emit(EventKind.UPDATE, c, now)
                deadline = now + (t.icmp if proto == _ICMP or proto == _ICMPV6 else t.generic)
            if deadline < c.deadline:
                self._set_deadline(c, deadline)
            else:
                c.deadline = deadline
        if direction:
            c.reply_packets += 1
            c.reply_bytes += nbytes
        else:
            c.orig_packets += 1
            c.orig_bytes += nbytes
        self.counters["searched"] += 1
        return True

    def expire(self, now: float) -> int:
        """Destroy every entry whose timeout has passed; returns how many."""
        n = 0
        slots, wheel = self._slots, self._wheel
        later: dict[int, Conn] = {}
        while slots and slots[0] <= now:
            slot = heapq.heappop(slots)
            self._slot_min.pop(slot, None)
            for c in wheel.pop(slot, ()):
                if c._ss & _DEAD:
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
        if not c._ss & _DEAD:
            self._destroy(c, now, why)

    def flush(self, now: float) -> None:
        for c in list(self):
            self._destroy(c, now, Why.REMOVED)

    # ------------------------------------------------------------------ internals
    def _new(self, pkt: Packet, key: bytes, now: float, reply: FlowTuple | None) -> Tracked:
        proto = pkt.proto
        state = 0
        if proto == _TCP:
            state = NEXT[0][pkt.tcp_flags & 0x3F][0]
            if state >= _IGNORE:
                self.counters["invalid"] += 1
                return Tracked(_INV, why=Why.TCP_INVALID)
        elif proto == (_ICMP if pkt.family == 4 else _ICMPV6):
            # a reply type cannot open an entry (Linux: "not a valid new type")
            if pkt.icmp_type not in (ICMP4_QUERIES if pkt.family == 4 else ICMP6_QUERIES):
                self.counters["invalid"] += 1
                return Tracked(_INV, why=Why.ICMP_UNMATCHED_REPLY)
        if self._count >= self.capacity and not self.expire(now) and not self._early_drop(now):
            self.counters["dropped_full"] += 1
            return Tracked(_INV, why=Why.TABLE_FULL)
        rkey = reply.key() if reply is not None else reverse_key(key)
        by_key = self._by_key
        holder = by_key.get(rkey)
        if holder is not None:
            if holder.deadline <= now:  # held by a timed-out entry: reap it
                self._destroy(holder, now, Why.TIMEOUT)
            if rkey in by_key:  # reply tuple taken (a NAT clash): not ours to resolve
                self.counters["invalid"] += 1
                return Tracked(_INV, why=Why.TUPLE_TAKEN)
        c = Conn(key, rkey, proto, state, now)
        by_key[key] = c
        by_key[rkey] = c
        self._count += 1
        self.counters["new"] += 1
        c.deadline = now + self._timeout_for(c)
        self._file(c)
        self._account(c, pkt.end - pkt.l3, 0)
        if pkt.fragment is not None:
            self._note_head(pkt, c, 0, now)
        self._emit(EventKind.NEW, c, now)
        return Tracked(_NEW, _ORIG, c)

    def _timeout_for(self, c: Conn) -> float:
        t = self._timeouts
        proto = c.original[0]
        if proto == _TCP:
            return self._tcp_timeout[c._ss & _STATE_MASK]
        if proto == _UDP or proto == _UDPLITE:
            return t.udp_stream if c._ss & _ASSURED else t.udp
        if proto == _ICMP or proto == _ICMPV6:
            return t.icmp
        return t.generic

    def _tcp(self, c: Conn, pkt: Packet, direction: Direction, now: float) -> Tracked:
        """The TCP segments ``track_conn`` declines: a reopening SYN, an INVALID or IGNOREd
        segment, an RST before any reply (it takes every other one)."""
        flags = pkt.tcp_flags & 0x3F
        old = c._ss & _STATE_MASK
        new = NEXT[direction][flags][old]
        if new == _SYN_SENT and old in REOPEN_STATES:
            self._destroy(c, now, Why.REOPEN)
            if direction is _REPLY:  # the server opens the new connection: roles switch (Linux)
                return self._new(pkt, c.reply, now, None)
            return self._new(pkt, c.original, now, None if c.reply == reverse_key(c.original)
                             else FlowTuple.from_key(c.reply))
        if new == _INVALID:
            self.counters["invalid"] += 1
            return Tracked(_INV, direction, c, Why.TCP_INVALID)
        self._account(c, pkt.end - pkt.l3, direction)
        if new == _IGNORE:
            if direction is _REPLY:  # still a reply: Linux sets SEEN_REPLY for accepted packets
                c._ss |= _SEEN
            return Tracked(_EST if c._ss & _SEEN else _NEW, direction, c)
        # what is left: an RST before any reply
        c._ss = (c._ss & ~_STATE_MASK) | new  # CLOSE, as the kernel's DESTROY event reports it
        self._destroy(c, now, Why.RESET)
        return Tracked(_EST if direction is _REPLY else _NEW, direction, c)

    def _track_related(self, pkt: Packet, now: float) -> Tracked:
        inner = pkt.inner
        assert inner is not None  # track() comes here only for an ICMP error (it quotes a packet)
        key = packet_key(inner) if inner.l4 >= 0 else None
        c = self._by_key.get(key) if key is not None else None
        if c is None or c.deadline <= now:
            self.counters["invalid"] += 1
            return Tracked(_INV, why=Why.ICMP_NO_FLOW)
        # the error travels against the quoted packet
        direction = _REPLY if key == c.original else _ORIG
        return Tracked(_REL, direction, c)

    def _track_fragment(self, pkt: Packet, now: float) -> Tracked:
        assert pkt.fragment is not None  # track() comes here only for a non-first fragment
        head = self._frags.get((pkt.src, pkt.dst, pkt.proto, pkt.fragment.ident))
        if head is None or head[0]._ss & _DEAD or head[2] <= now or head[0].deadline <= now:
            return Tracked(_UNT, why=Why.FRAGMENT_WITHOUT_HEAD)
        c, direction, _ = head
        self._account(c, pkt.end - pkt.l3, direction)
        return Tracked(_EST if c._ss & _SEEN else _NEW, _DIRS[direction], c)

    def _note_head(self, pkt: Packet, c: Conn, direction: int, now: float) -> None:
        if len(self._frags) >= self.fragment_capacity:
            del self._frags[next(iter(self._frags))]
        assert pkt.fragment is not None  # called only for a fragment
        self._frags[(pkt.src, pkt.dst, pkt.proto, pkt.fragment.ident)] = (
            c, int(direction), now + self._timeouts.fragment)

    @staticmethod
    def _account(c: Conn, nbytes: int, direction: int) -> None:
        if direction:
            c.reply_packets += 1
            c.reply_bytes += nbytes
        else:
            c.orig_packets += 1
            c.orig_bytes += nbytes

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
            if not c._ss & _ASSURED:
                self._destroy(c, now, Why.EARLY_DROP)
                self.counters["early_drops"] += 1
                return True
        return False

    def _destroy(self, c: Conn, now: float, why: Why) -> None:
        c._ss |= _DEAD
        self._by_key.pop(c.original, None)
        self._by_key.pop(c.reply, None)
        self._count -= 1
        self._emit(EventKind.DESTROY, c, now, why)

    def _emit(self, kind: EventKind, c: Conn, now: float, why: Why | None = None) -> None:
        if kind in self.journal:
            o, r = c.tuples()
            self._events.append(ConnEvent(kind, o, r, c.tcp_state, bool(c._ss & _ASSURED), now, why, c))
