"""Offload, the driver half: the engine's decided flows as kernel conntrack entries.

Each flow the engine opened with a translation gets a conntrack entry carrying its NAT
(ctnetlink, :mod:`.ctnetlink`) and the mark ``MARK``; the rules (:mod:`.rules`) queue only
packets whose connection lacks that mark, so every later packet of the flow is translated
by the kernel's nf_nat (ICMP errors about it included) and never reaches user space.
The engine stays the one truth: its offloaded flows are held (not timed) while the kernel
has their entries; a DESTROY event, or an entry missing at a reconciliation, ends the
flow in the engine and frees its mapping.  The kernel times the entries with roam's
lifetimes: the namespace's conntrack timeout sysctls are set from the config (measured
choice: timeout policies attach only through a CT template rule on a packet, never to an
entry made over ctnetlink).
"""
from __future__ import annotations

import errno
import logging
import os

from conntrack.flow import KEY_SIZE, FlowTuple, packet_key
from conntrack.packet import parse_ip
from conntrack.table import Conn

from .. import offload
from ..config import NatConfig
from .ctnetlink import CtSocket, Events, KEntry, Tuple
from .kernelpath import KERNEL

log = logging.getLogger("roam.nat")

MARK = 0x20000000  # the conntrack mark bit of roam's entries (and the packet mark of pre-conntrack queueing)
RECONCILE = 2.0  # seconds between reconciliations (kernel entries vs engine flows), at least
#: entries a reconciliation may read per second of its interval: a dump costs ~20 us an entry on a
#: quiet core, ~60 under a flood of new connections (it takes the GIL from the packets): ~1.5% then;
#: events do the work and a lost one brings the next round forward (:attr:`Offloader.overrun`)
_PER_SECOND = 250
_SYSCTL = "/proc/sys/net/netfilter/"


def apply_sysctls(cfg: NatConfig) -> dict[str, int]:
    """roam's timeouts as this namespace's conntrack timeouts; events and accounting on."""
    values = dict(offload.kernel_timeouts(cfg), nf_conntrack_events=1, nf_conntrack_acct=1)
    for k, v in values.items():
        try:
            with open(_SYSCTL + k, "w") as f:
                f.write(str(v))
        except OSError as exc:
            log.warning("cannot set %s: %s", k, exc)
    return values


class Offloader:
    """The engine's flows in the kernel's conntrack table (owned by the plugin's lock holder)."""

    kernel = None  # the kernel path (set in __init__)

    def __init__(self, engine, cfg: NatConfig, kernel=None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.kernel = kernel  # the kernel path (:class:`.kernelpath.KernelPath`): its flows are learned here
        self.ct = CtSocket()
        self.ct_dump = CtSocket()  # the main loop's, for dumps (self.ct is the packet thread's)
        # (the kernel path's NEW events double the flow of them: a bigger buffer)
        self.events = Events(16 << 20 if kernel is not None else 4 << 20, new=KERNEL if kernel is not None else 0)
        engine.ended = []  # flows the engine ends (reclaim, expiry): their kernel entries go at once
        self.flows: dict[bytes, Conn] = {}  # original key -> engine Conn, offloaded
        self._gen = 0  # dump generation: a flow installed after a dump began is not judged by it
        self._born: dict[bytes, int] = {}  # original key -> the generation it was installed in
        self._replaced: dict[bytes, int] = {}  # entries roam deleted itself: their DESTROY events are no news
        self.kernel_packets = [0, 0]  # packets the kernel translated: out, in (entries alive at the last dump)
        self._dead_packets = [0, 0]  # ... of entries that died
        self.changes = 0  # kernel-side moves of offloaded flows (a new snapshot is due)
        self._lost_seen = 0  # events.lost at the last reconciliation
        self._last = self._next = 0.0  # when the last reconciliation's dump began; the next is due
        self.counters = {"offloaded": 0, "offload_failed": 0, "offload_ended": 0, "adopted": 0}

    def close(self) -> None:
        self.ct.close()
        self.ct_dump.close()
        self.events.close()

    # -- flows in ------------------------------------------------------------------
    @property
    def interval(self) -> float:
        """Seconds between reconciliations: events do the work, the dumps are the safety net, so
        a big table is read less often (its cost stays a few percent of a core)."""
        return max(RECONCILE, len(self.flows) / _PER_SECOND)

    @property
    def overrun(self) -> bool:
        """Events were lost since the last reconciliation: it is due soon, not in minutes."""
        return self.events.lost != self._lost_seen

    def due(self, now: float, asked: bool = False) -> bool:
        """Whether a reconciliation is due: its interval passed, a snapshot ``asked`` for the kernel's
        state, or events were lost -- then no sooner than RECONCILE after the last one (a big table's
        dump under a flood can itself overflow the event socket: a dump per loss would never end)."""
        return asked or now >= self._next or self.overrun and now >= self._last + RECONCILE

    def _hold(self) -> float:
        """How long an offloaded flow lives in the engine without a reconciliation seeing it."""
        return 3 * self.interval + 5

    def install(self, data, now: float, key: bytes | None = None) -> bool:
        """The packet's flow into the kernel, unless it is there already.  False: it could not
        be (the caller drops the packet: the kernel would not translate it).  ``key``: the packet's
        :func:`flow_key`, if the caller read it already."""
        key = flow_key(data) if key is None else key
        c = self.engine.table.lookup(key) if key is not None else None
        if c is None:
            return False
        ok = c.original
        if ok in self.flows:
            return True
        d = offload.decision(c)
        if d is None:
            return True  # nothing to translate: the kernel tracks it as its own
        # the engine's TCP state (same numbering as the kernel's): a flow first seen mid-stream
        # (a migrated VM, a restart) is ESTABLISHED, and its next segment must not be INVALID
        state = c.state if d.proto == 6 and 0 < c.state <= 9 else 0
        err = self.ct.create(Tuple(d.proto, d.src, d.dst, d.sport, d.dport),
                             offload.initial_timeout(self.cfg, d.proto), MARK,
                             snat=d.snat, dnat=d.dnat, tcp_state=state)
        if err == errno.EEXIST:  # an older entry for the tuple: replace it (the kernel's own, made
            # for this flow's first packet queued after conntrack; ours of a reopened connection)
            log.debug("conntrack entry exists, replaced: %s", d)
            t = Tuple(d.proto, d.src, d.dst, d.sport, d.dport)
            old = self.ct.get(t)
            if self.ct.delete(t) == 0 and (old is None or old.mark & MARK):
                self._replaced[ok] = self._replaced.get(ok, 0) + 1  # ours: its DESTROY is no news
            if d.proto != 1 and d.proto != 58:  # and the kernel's own (unmarked) of a reply that came before ours
                (rdst, rdport), (rsrc, rsport) = d.snat or (d.src, d.sport), d.dnat or (d.dst, d.dport)
                t = Tuple(d.proto, rsrc, rdst, rsport, rdport)
                old = self.ct.get(t)
                if old is not None and not old.mark & MARK:
                    self.ct.delete(t)
            err = self.ct.create(Tuple(d.proto, d.src, d.dst, d.sport, d.dport),
                                 offload.initial_timeout(self.cfg, d.proto), MARK, snat=d.snat, dnat=d.dnat,
                                 tcp_state=state)
        if err:
            self.counters["offload_failed"] += 1
            if self.counters["offload_failed"] & (self.counters["offload_failed"] - 1) == 0:
                log.warning("conntrack entry not created: %s (%d so far)", os.strerror(err),
                            self.counters["offload_failed"])
            return False
        self.flows[ok] = c
        self._born[ok] = self._gen
        self.changes += 1
        offload.hold(c, now + self._hold())
        self.counters["offloaded"] += 1
        return True

    def refresh(self, data, now: float, key: bytes | None = None) -> bool:
        """The kernel's current state of the packet's offloaded flow into the engine (which saw
        none of its packets since the first): True if it moved, so the packet is judged again
        (a SYN reusing the tuple of a connection the kernel has in TIME_WAIT reopens it)."""
        key = flow_key(data) if key is None else key
        c = self.flows.get(key) if key is not None else None
        if c is None:
            return False
        f = FlowTuple.from_key(c.original)
        e = self.ct.get(Tuple(f.proto, f.src, f.dst, f.sport, f.dport))
        if e is None:  # gone, or expired and reaped by this read: its DESTROY ends the flow now, before
            self.on_events(now)  # the SYN reopens the tuple (read later, it would end the new flow)
            return False
        return offload.sync(c, e.status, e.tcp_state)

    # -- flows out -----------------------------------------------------------------
    def sweep(self) -> None:
        """Delete the kernel entries of flows the engine ended (a reclaimed port must not stay
        translated in the kernel while the engine gives it to another flow)."""
        ended = self.engine.ended
        if not ended:
            return
        for k in ended:
            c = self.flows.pop(k, None)
            self._born.pop(k, None)
            if c is not None:
                self.changes += 1
                self.counters["offload_ended"] += 1
                f = FlowTuple.from_key(k)
                if self.ct.delete(Tuple(f.proto, f.src, f.dst, f.sport, f.dport)) == 0:
                    self._replaced[k] = self._replaced.get(k, 0) + 1
        ended.clear()

    def _gone(self, key: bytes, now: float) -> None:
        c = self.flows.pop(key, None)
        self._born.pop(key, None)
        if c is not None:
            self.changes += 1
            self.counters["offload_ended"] += 1
            if c.extra is not None:
                self.engine.end_flow(key, now)

    def on_events(self, now: float, limit: int = 0) -> int:
        """Read the kernel's events (at most ``limit``; ``events.more``: some are left): each DESTROY
        of ours ends its engine flow, each NEW of the kernel path's becomes one (:meth:`learn`)."""
        n = 0
        debug = log.isEnabledFor(logging.DEBUG)  # (the text of each of 1,000s of events a second)
        for e in self.events.read(limit):
            if e.born:  # (only the kernel path's are read)
                if _key(e.original) not in self.flows:
                    self.learn(e, now)
                continue
            if e.mark & MARK:
                k = _key(e.original)
                if debug:
                    log.debug("kernel entry destroyed: %s", _text(e))
                if self._replaced.get(k):  # the one roam replaced, not the live one
                    self._replaced[k] -= 1
                    if not self._replaced[k]:
                        del self._replaced[k]
                    continue
                if k in self.flows:
                    self._count_dead(self.flows[k], e)
                    self._gone(k, now)
                    n += 1
        return n

    def learn(self, e: KEntry, now: float) -> Conn | None:
        """A flow the kernel NATed on its own (the kernel path) as an engine flow holding its
        mapping; None (entry removed, counted) if the engine cannot take it: its port is another
        endpoint's by now (two took it at once), or the table is full."""
        kp = self.kernel
        if kp is None or kp.writer is None:  # (not started, or stopping: a restart adopts it)
            return None
        o, r = e.original, e.reply
        if o.proto not in kp.held or len(o.src) != 4 or r.dst != self.engine.external_ip:
            # not the kernel path's (a foreign mark), or made on an address gone since (or one the
            # engine does not use): no mapping to hold
            kp.counters["kernel_foreign"] += 1
            self.ct.delete(o)
            return None
        k = _key(o)
        if self.engine.table.lookup(k) is not None:  # the kernel's new entry replaced the flow the engine had
            self.engine.end_flow(k, now)  # on this tuple (it reopened it): that one is over
            self.sweep()  # (now: a later sweep would delete the new entry)
        t = self.engine.table
        if len(t) >= t.capacity:  # full: the flow is refused, as a queued one would be (counted)
            kp.counters["kernel_table_full"] += 1
            self.ct.delete(o)
            return None
        c = offload.adopt(self.engine, o.proto, o.src, o.dst, o.sport, o.dport, r.src, r.dst, r.sport, r.dport,
                          now, now + self._hold())
        held = (o.proto, o.sport) in self.engine.mapping_table.by_external
        if c is None:
            kp.counters["kernel_clashes"] += 1
            if kp.counters["kernel_clashes"] & (kp.counters["kernel_clashes"] - 1) == 0:
                log.info("kernel path clash, flow removed and its endpoint queued from now on: %s (%d so far)",
                         _text(e), kp.counters["kernel_clashes"])
            self.ct.delete(o)
            mine = self.engine.mapping_table.by_internal.get((o.proto, o.src, o.sport))
            kp.clash(o.proto, o.src, o.sport, held, mine is not None and mine.mapping.external_port != o.sport)
            return None
        self.flows[k] = c
        self._born[k] = self._gen
        self.changes += 1
        kp.counters["kernel_flows"] += 1
        if r.dport != o.sport:  # the kernel chose another port: the sets say what the engine holds
            kp.unclaim(o.proto, o.src, o.sport, held)
        # (the mapping goes into the sets again from the journal, though the kernel's rules put it
        # there: a freeing of the flow's predecessor read just before may have taken it out since)
        return c

    def fetch(self, now: float) -> tuple[int, list[KEntry]]:
        """roam's entries in the kernel, and the generation of the dump (no engine state touched:
        call it without the lock; flows installed meanwhile are newer than the dump)."""
        self._gen += 1
        self._lost_seen = self.events.lost  # (before the dump: a loss during it brings another)
        self._last, self._next = now, now + self.interval
        return self._gen, self.ct_dump.dump(MARK, MARK)

    def reconcile(self, now: float, adopt: bool = False, fetched: tuple | None = None) -> None:
        """Engine flows vs kernel entries: held while there, ended when gone (a lost event);
        an engine flow that died (address change, reclaim) loses its kernel entry.  With
        ``adopt``, marked entries the engine lacks become engine flows (a restart)."""
        gen, entries = fetched if fetched is not None else self.fetch(now)
        # the DESTROYs of the entries the dump reaped first (expired ones: a dump removes them):
        # read later, one would end a flow reopened on the same tuple meanwhile
        self.on_events(now)
        seen = set()
        live = [0, 0]
        for e in entries:
            k = _key(e.original)
            c = self.flows.get(k)
            if c is None and not adopt and e.mark & KERNEL:  # its NEW event was lost -- or it ended since
                # the dump (read without the lock): then the kernel no longer has it
                c = self.engine.table.lookup(k) or (self.learn(e, now) if self.ct.get(e.original) else None)
                if c is None:
                    continue
                self.flows[k] = c
            if c is None and adopt:
                c = self.engine.table.lookup(k)
                if c is None:
                    o, r = e.original, e.reply
                    c = offload.adopt(self.engine, o.proto, o.src, o.dst, o.sport, o.dport, r.src, r.dst, r.sport,
                                      r.dport, now, now + self._hold())
                    if c is not None:
                        self.counters["adopted"] += 1
                        log.info("adopted the kernel's entry of an earlier run: %s", _text(e))
                if c is not None:
                    self.flows[k] = c
                else:  # not on this address (it changed while roam was down), or its port is taken
                    log.info("removed the kernel's entry of an earlier run: %s", _text(e))
                    self.ct.delete(e.original)
            if c is None:
                continue
            if c.extra is None:  # the engine ended it: the kernel follows
                self.ct.delete(e.original)
                continue
            seen.add(k)
            offload.hold(c, now + max(self._hold(), e.timeout))
            if offload.sync(c, e.status, e.tcp_state):
                self.changes += 1
            out_first = c.extra.internal & 1
            live[0 if out_first else 1] += e.packets_orig
            live[1 if out_first else 0] += e.packets_reply
        born = self._born
        for k in [k for k in self.flows if k not in seen and born.get(k, 0) < gen]:
            self._gone(k, now)
        if len(self._replaced) > 4096:  # their events were lost: the dumps judge instead
            self._replaced.clear()
        self.kernel_packets = [live[0] + self._dead_packets[0], live[1] + self._dead_packets[1]]

    def _count_dead(self, c, e: KEntry) -> None:
        if c.extra is None:
            return
        out_first = c.extra.internal & 1
        self._dead_packets[0 if out_first else 1] += e.packets_orig
        self._dead_packets[1 if out_first else 0] += e.packets_reply

    def flush(self, family: int = 4) -> int:
        """Remove every roam entry of ``family`` (its external address changed: all were on the old
        one).  At once by mark -- unless the other family has entries, which must go on: then one
        by one (measured: the kernel's flush by mark ignores the request's family)."""
        size = KEY_SIZE[family]
        gone = [k for k in self.flows if len(k) == size]
        others = len(gone) < len(self.flows)
        for k in gone:
            del self.flows[k]
            self._born.pop(k, None)
            self._replaced.pop(k, None)
            if others:
                f = FlowTuple.from_key(k)
                self.ct.delete(Tuple(f.proto, f.src, f.dst, f.sport, f.dport))
        n = len(gone)
        if others:
            return n
        err = self.ct.flush(MARK, MARK)
        if err:
            log.error("conntrack flush failed: %s", os.strerror(err))
        return n

    def status(self) -> dict:
        kp = self.kernel.status() if self.kernel is not None else {}
        return dict(self.counters, **kp, flows=len(self.flows), kernel_translated_out=self.kernel_packets[0],
                    kernel_translated_in=self.kernel_packets[1], events_lost=self.events.lost)


def flow_key(data) -> bytes | None:
    """The packet's flow key (``packet_key``), read straight from an option-less IPv4 TCP/UDP head
    (the common case, on the path of every queued first packet); parsed otherwise; None if it has none."""
    if len(data) >= 28 and data[0] == 0x45 and data[9] in (6, 17) and not data[6] & 0x3F and not data[7]:
        return bytes(data[9:10]) + bytes(data[12:24])
    try:
        return packet_key(parse_ip(data))
    except Exception:
        return None


def _text(e: KEntry) -> str:
    import ipaddress

    o, r = e.original, e.reply
    ip = ipaddress.ip_address
    return f"proto {o.proto} {ip(o.src)}:{o.sport} -> {ip(o.dst)}:{o.dport} (reply {ip(r.src)}:{r.sport} -> " \
           f"{ip(r.dst)}:{r.dport})"


def _key(t: Tuple) -> bytes:
    return FlowTuple(t.proto, t.src, t.dst, t.sport, t.dport).key()
