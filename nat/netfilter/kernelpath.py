"""The kernel path: a new outbound TCP or UDP flow whose mapping is already known -- its own
port -- is NATed by the kernel alone, with no packet queued.

Why: a queued first packet costs ~100 us of CPU in roam (queue, engine, ctnetlink create,
verdict), and the new-connection rate was a fifth of kernel MASQUERADE's (issue 10).  Most
new flows need no decision at all: port preservation gives an internal endpoint its own
port whenever no other endpoint holds it.  The kernel can tell that itself, from sets roam
keeps (the engine's mapping table stays the one truth):

* ``HELD`` (bitmap:port, one per protocol): every external port a mapping holds;
* ``KEEP`` (hash:ip,port): every internal endpoint whose mapping is its own port;
* ``MOVED`` (hash:ip,port): every endpoint mapped to another port (or queued after a clash);
* ``ALIVE`` (hash:net, both halves of IPv4, a timeout renewed while roam runs).

An outbound SYN or UDP packet from an internal endpoint (ip, port), port in the port
range, not MOVED, and KEEP or with a port not HELD, gets the packet mark ``KERNEL`` in
``raw`` and skips roam's queueing; its new connection gets the connmark ``MARK|KERNEL``
and ``MASQUERADE --to-ports`` the range (which keeps a free port), and the same step adds
the port to HELD and the endpoint to KEEP (``SET``), so another endpoint's flow with that
port is queued from the next packet on.  Everything else comes to roam as before: ICMP,
inbound, hairpin, ports out of the range, endpoints mapped elsewhere.

roam learns each such flow from its NEW event as an engine flow holding its mapping
(:func:`nat.offload.adopt`): endpoint-independent filtering, hairpinning, snapshots and
status see it, its DESTROY frees it.  A clash (two endpoints took one port at the same
instant; the kernel kept no port because a tuple was taken) removes the entry, counted,
and the endpoint is queued from then on (MOVED, for 10 minutes).  The mapping table's
journal (mappings made and freed) goes into the sets before any verdict that depends on
it.  Fail-closed as the queue: with roam gone, ALIVE lapses after ``ALIVE_FOR`` seconds,
and new flows then wait at the dead queue.  IPv4 only (NAT66 queues every new flow).

``--workers N``: each worker has sets of its own for its lane of the ports (the parent makes
them before its rules and removes them after the workers; the worker fills them, renews its
ALIVE, learns the NEW events of its lane's source ports), and each lane's rules read its
worker's sets: a dead or late worker closes its lane only.  The kernel may give a flow whose
tuple is taken a port of another lane: its worker cannot hold that, a clash.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from typing import Callable

from . import ipset
from .ipset import member
from .rules import _is_roam

log = logging.getLogger("roam.nat")

KERNEL = 0x10000000  # the packet mark of the kernel path; with offload.MARK, its entries' connmark
ALIVE_FOR = 3  # seconds the kernel path outlives roam's last renewal (renewed every second)
STALL = 30.0  # seconds the main loop may go without a round before the renewals stop (a wedged roam)
CLASH_QUEUED = 600  # seconds an endpoint that clashed is queued
_HALVES = (b"\0\0\0\0", b"\x80\0\0\0")


def remove_stale_sets() -> int:
    """Remove the sets of dead runs, whatever their queue (their rules are gone by now: those of this
    queue and of any queue on this external interface, :meth:`.rules.Rules.remove_stale`)."""
    n = 0
    for name in ipset.names():
        m = re.match(r"roam-q\d+-p(\d+)-", name)
        if m and int(m.group(1)) != os.getpid() and not _is_roam(int(m.group(1))):
            n += ipset.destroy(name)
    return n


class KernelPath:
    """The sets of one run (names carry the queue and the pid, as the rules' comments do)."""

    def __init__(self, queue: int, port_range: tuple[int, int], owner: int | None = None) -> None:
        # owner: the pid of the --workers parent that makes and removes these sets (None: this process)
        self.owns = owner is None
        base = f"roam-q{queue}-p{os.getpid() if owner is None else owner}-"
        self.held = {6: base + "tcp", 17: base + "udp"}
        self.keep, self.moved, self.alive = base + "keep", base + "moved", base + "alive"
        self.port_range = port_range
        self.writer: ipset.SetWriter | None = None
        self._alive: ipset.SetWriter | None = None  # the liveness entry's own socket: renewed without the lock
        self.journal: list | None = None
        self._renewed = float("-inf")
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters = {"kernel_flows": 0, "kernel_clashes": 0, "kernel_table_full": 0, "kernel_foreign": 0}

    def names(self) -> list[str]:
        return [*self.held.values(), self.keep, self.moved, self.alive]

    def create(self) -> None:
        """The sets, empty (before the rules that use them), unless a --workers parent made them;
        then this process's sockets to them."""
        if self.owns:
            self.make()
        self.writer, self._alive = ipset.SetWriter(), ipset.SetWriter()

    def make(self) -> None:
        """The sets alone (a --workers parent's: its workers fill them)."""
        for name in self.held.values():
            ipset.create(name, "bitmap:port", (0, 65535))
        most = 4 * (self.port_range[1] - self.port_range[0] + 1) + 65536  # (the default 65,536 is too few)
        ipset.create(self.keep, "hash:ip,port", maxelem=most)
        ipset.create(self.moved, "hash:ip,port", timeout=CLASH_QUEUED, maxelem=most)
        ipset.create(self.alive, "hash:net", timeout=ALIVE_FOR)

    def fill(self, table, now: float) -> None:
        """Every mapping of ``table`` (the IPv4 one) into the sets, then its journal on: from
        here on each mapping made or freed follows (:meth:`sync`)."""
        for e in table.by_external.values():
            self._apply(1, e.mapping)
        table.journal = self.journal = []
        self.renew(now, force=True)

    def sync(self) -> None:
        """The journal into the sets, sent (call before the verdicts that depend on it go out)."""
        j = self.journal
        if self.writer is None:  # (stopped)
            return
        if j:
            for op, m in j:
                self._apply(op, m)
            j.clear()
        self.writer.send()

    def _apply(self, op: int, m) -> None:
        w = self.writer
        assert w is not None, "sets made first"
        if op == 0:  # the address changed: every mapping went
            for name in (*self.held.values(), self.keep, self.moved):
                w.send()
                ipset.flush(name)
            return
        held = self.held.get(m.proto)
        if held is None or len(m.internal_ip) != 4:
            return
        add = op > 0
        if add or not m.static:  # (a static one removed by a reload: the pool keeps its port reserved)
            w.change(add, held, member(port=m.external_port))
        who = member(m.internal_ip, m.internal_port, m.proto)
        if m.internal_port == m.external_port:
            w.change(add, self.keep, who)
        else:
            w.change(add, self.moved, who + (member(timeout=0) if add else b""))  # (0: no timeout)

    def renew(self, now: float, force: bool = False) -> None:
        """Keep the kernel path open for ALIVE_FOR more seconds (its own socket: :meth:`start`'s
        thread calls it without the plugin's lock)."""
        w = self._alive
        if w is None or not force and now < self._renewed + 1.0:
            return
        self._renewed = now
        for half in _HALVES:
            w.change(True, self.alive, member(half, cidr=1, timeout=ALIVE_FOR))
        w.send()

    def start(self, clock: Callable[[], float], progress: Callable[[], float]) -> None:
        """Renew the liveness entry every second from a thread of its own -- a big table's dump or a
        backlog of events holds the main loop for seconds, and a lapse would queue every new flow --
        as long as the main loop went round (``progress``: when it last did) within STALL seconds."""
        def run() -> None:
            while not self._stopping.wait(1.0):
                now = clock()
                if now - progress() < STALL:
                    self.renew(now, force=True)
        self._thread = threading.Thread(target=run, name="roam-nat-alive", daemon=True)
        self._thread.start()

    def clash(self, proto: int, ip: bytes, port: int, port_held: bool, mapped: bool) -> None:
        """An endpoint the kernel NATed that roam cannot take (its port is another's, or the kernel
        gave it another port): undo what the kernel's rules added for it, queue it from now on
        (``mapped``: it has a mapping elsewhere, its member is there for good already: an add
        would overwrite its timeout)."""
        w = self.writer
        if w is None:
            return
        who = member(ip, port, proto)
        w.change(False, self.keep, who)
        if not port_held:
            w.change(False, self.held[proto], member(port=port))
        if not mapped:
            w.change(True, self.moved, who + member(timeout=CLASH_QUEUED))
        w.send()

    def unclaim(self, proto: int, ip: bytes, port: int, port_held: bool) -> None:
        """The kernel gave the endpoint another port (a tuple of its own was taken): its own port
        is not its mapping (KEEP), nor held unless another mapping holds it."""
        w = self.writer
        if w is None:
            return
        w.change(False, self.keep, member(ip, port, proto))
        if not port_held:
            w.change(False, self.held[proto], member(port=port))

    def status(self) -> dict:
        return dict(self.counters, kernel_set_errors=sum(w.errors() for w in (self.writer, self._alive) if w is not None))

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        for w in (self.writer, self._alive):
            if w is not None:
                w.close()
        self.writer = self._alive = None

    def destroy(self) -> None:
        """Remove this run's sets (once no rule uses them; a worker leaves its parent's be)."""
        self.close()
        if self.owns:
            for name in self.names():
                ipset.destroy(name)

    def remove_stale(self) -> int:
        """:func:`remove_stale_sets`, but a worker leaves that to its parent."""
        return remove_stale_sets() if self.owns else 0
