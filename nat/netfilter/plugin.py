"""The netfilter plugin: NFQUEUE in, the NAT engine, verdicts out; addresses, signals, state.

A thin driver around :class:`nat.NatEngine`: queued packets (through NetfilterQueue, or
with ``--gso`` roam's own client, :mod:`.queue`) go to one dispatch, :meth:`Plugin._answer`,
which picks the side and stage from the hook and interfaces, asks the engine, logs the
answer's events and returns what the verdict carries.  Rules are :mod:`.rules`'s,
addresses :mod:`.interfaces`'s.  With offload (the default) each decided flow also goes
into the kernel's conntrack with its NAT (:mod:`.offload`), so only new flows' packets
come (NAT66 too: IPv6 from ip6tables rules on the same queue).  The clock comes from the
caller (``clock``), as DESIGN.md wants nothing below tools/ to read it.

Packets are handled in a thread of their own, blocked in the queue's receive loop (one
recv syscall a packet, no select round per wake-up); the main thread waits for address
events, signals and the housekeeping timer.  One lock serialises the two around the
engine.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import struct
import threading
from typing import IO, Any, Callable

from conntrack.answer import Action
from conntrack.build import fill_l4_checksum

from .. import snapshot
from ..answers import NatReason, Side, Stage
from ..config import ConfigError, NatConfig, forwards_outside, load
from ..engine import NatEngine
from . import PluginError
from .droplog import drop_line
from .interfaces import (AddressEvents, RouteCache, iface_address, iface_address6, iface_index, iface_networks,
                         resolve_internal)
from .kernelpath import KernelPath
from .lifecycle import Signals, remove_rules
from .offload import MARK, Offloader, apply_sysctls, flow_key
from .packets import PacketThread
from .queue import NfQueue
from .rules import Rules
from .status import status_data
from .workers import NoRules, WorkerOffloader

__all__ = ["Plugin", "PluginError"]

log = logging.getLogger("roam.nat")

HOOK_PREROUTING = 0
HOOK_POSTROUTING = 4
_HOUSEKEEPING = 1.0  # seconds between expiry/status/snapshot rounds
#: the share of the time periodic snapshots may take: a table of 100,000s of flows (new connections
#: by the thousand per second, each held through TIME_WAIT) costs a second's CPU to write, taken from
#: the packet thread (one GIL); such a table is written less often than every round (SIGUSR1: at once)
_SNAPSHOT_SHARE = 0.05
_RECV_TIMEOUT = 0.2  # seconds the idle packet thread waits in recv before looking for a stop
#: seconds between two reads of the kernel's DESTROY events: read as they came, a flood of short
#: connections woke the main thread 3,000 times a second, each round taking the lock and the GIL
#: from the packets (measured: a fifth of the process's CPU); a flow's mapping outlives its entry
#: by this much at most
_EVENTS_EVERY = 0.05
_EVENTS_SLICE, _EVENT_SLICES = 256, 20  # events read under the lock at once; slices per main-loop round
_ACCEPT, _NOT_OURS = Action.ACCEPT, NatReason.NOT_OURS
_DECIDED = (NatReason.TRANSLATED, NatReason.HAIRPINNED)
_INVALID = NatReason.INVALID
_INTERNAL, _EXTERNAL = Side.INTERNAL, Side.EXTERNAL
_FULL, _HAIRPIN_DST, _HAIRPIN_SRC = Stage.FULL, Stage.HAIRPIN_DST, Stage.HAIRPIN_SRC


def log_events(events) -> None:
    """The engine's events as log lines (each says its own level)."""
    for ev in events:
        log.log(ev.level, "%s", ev)


class Plugin(PacketThread):
    def __init__(self, cfg: NatConfig, config_path: str, external: str, internal: list[str], queue: int,
                 status_path: str, snapshot_path: str, clock, wall, restore: bool = True, gso: bool = False,
                 offload: bool = True, worker: tuple | None = None, kernel_path: bool = True,
                 kernel_owner: int | None = None) -> None:
        self.config_path = config_path
        self.external = external
        self.internal_specs = internal
        self.queue = queue
        self.status_path = status_path
        self.snapshot_path = snapshot_path
        self.clock = clock
        self.wall = wall
        self.restore = restore
        # --gso: our own netlink client (.queue) with NFQA_CFG_F_GSO, packets up to 64 KiB
        # (offload: always -- only first packets come, and batched verdicts make more of them)
        self.gso = gso or offload
        self.largest_packet = 0
        self.gso_packets = 0
        self.csum_filled = 0
        iface_networks(external)  # raises PluginError naming it if there is no such interface
        nets = resolve_internal(internal, cfg)
        if not nets:
            raise PluginError("no internal network: give --internal IFACE|CIDR or [host] ip/netmask in the config")
        self.cfg = cfg.with_(internal=nets)
        self.worker = worker  # this process owns lane ``index`` of the port pools
        if worker is not None:
            self.cfg = worker[1].config(self.cfg, worker[0])
        for w in forwards_outside(self.cfg) if nets != cfg.internal else ():  # the config's own were checked
            log.warning("%s", w)
        # a host stack stands behind the external address: what no mapping claims is the host's
        self.engine = NatEngine(self.cfg, iface_address(external), host_stack=True,
                                external_ip6=iface_address6(external) if cfg.nat66 else None)
        self._process = self.engine.process
        # offload: decided flows go into the kernel's conntrack (.offload); only packets of
        # flows without such an entry are queued
        self.offload = offload
        self.offloader: Offloader | None = None
        self.routes: RouteCache | None = None
        self.queued = 0
        # the kernel path (.kernelpath): new outbound flows keeping their own port never come here
        # (a worker's: for its lane, in sets its parent ``kernel_owner`` made)
        self.kernel = KernelPath(queue, self.cfg.port_range, kernel_owner) \
            if offload and kernel_path and (worker is None or kernel_owner is not None) else None
        self.rules = Rules(external, queue, self.cfg.internal, self.cfg.hairpinning, MARK if offload else 0,
                           internal6=self.cfg.internal6, nat66=self.cfg.nat66,
                           kernel=[self.kernel] if self.kernel else None) \
            if worker is None else NoRules()  # a worker's rules are its parent's
        self.ext_index = 0
        self._stop = False
        self._reload = False
        self._snap_now = False  # SIGUSR1: a migration hook wants the state as it is now
        self._snap_mark: tuple | None = None
        self.bugs = 0
        # The packet thread and the main loop (addresses, signals, housekeeping) share the
        # engine: each packet and each control step holds this lock.
        self._lock = threading.Lock()
        self._stop_packets = False
        self._loop_at = 0.0  # when the main loop last went round
        self._packet_error: OSError | None = None
        self._deferred: list = []  # (offload) TCP packets whose flow's entry goes in after their verdicts

    # -- packets -----------------------------------------------------------------
    def _answer(self, hook: int, indev: int, outdev: int, data: bytes, info: int,
                mark: int = 0) -> bytes | bytearray | None:
        """The one dispatch of both queue clients: the packet to accept (``data`` itself: as it
        came), or None to drop it.  ``info`` is NFQA_SKB_INFO (0 from NetfilterQueue), ``mark``
        the packet mark (offload: MARK set = queued before conntrack).
        Per packet: no enum attribute lookups."""
        self.queued += 1
        try:
            if mark & MARK and self.offloader is not None:
                return self._before_conntrack(indev, data)
            if hook == HOOK_PREROUTING:
                if indev == self.ext_index:
                    a = self._process(data, _EXTERNAL, self.clock(), _FULL)
                else:
                    a = self._process(data, _INTERNAL, self.clock(), _HAIRPIN_DST)
            elif outdev == self.ext_index:
                a = self._process(data, _INTERNAL, self.clock(), _FULL)
            else:
                a = self._process(data, _INTERNAL, self.clock(), _HAIRPIN_SRC)
            if not self._passes(a, data):
                return None
            if a.reason is _NOT_OURS:
                return data
            if self.engine.ended and self.offloader is not None:  # (offload) entries of ended flows go first
                self.offloader.sweep()
            if self.offloader is not None and a.reason in _DECIDED and not (hook != HOOK_PREROUTING
                                                                            and outdev != self.ext_index):
                # its entry, so its later packets stay in the kernel (this one's connection
                # is the kernel's own: translated here, as without offload).  TCP: once this
                # one's verdict is out (:meth:`_install_deferred`): the packet holds the
                # kernel's own new, unconfirmed entry, an entry of ours made now would clash
                # with it at confirmation, and TCP (unlike UDP, ICMP) drops a clashing packet:
                # a mid-stream first packet (a migrated VM, a restart) was lost.
                if data[9 if data[0] >> 4 == 4 else 6] == 6:
                    self._deferred.append(data)
                else:
                    self.offloader.install(data, self.clock())
            out = a.data
            assert out is not None, "an accepted packet has its data"
            if info & 3 and not (info & 2 and hook != HOOK_PREROUTING and out[9 if out[0] >> 4 == 4 else 6] == 6):
                # CSUMNOTREADY: the field held the pseudo-header sum only; GSO: the field
                # may be a merged packet's first segment's.  A verdict with a payload makes
                # the kernel take the packet as CHECKSUM_NONE, and in PREROUTING (after raw)
                # its conntrack verifies the whole super-packet's checksum before
                # segmentation would recompute it: so write a complete one.  GSO TCP in
                # POSTROUTING is left alone: nothing checks it before tcp4_gso_segment
                # recomputes every segment's checksum (ip_summed is not PARTIAL).
                filled = bytearray(out)
                fill_l4_checksum(filled)
                self.csum_filled += 1
                return filled
            return out
        except Exception:  # a bug of ours, not the peer's: counted apart, packet dropped
            self._bug()
            return None

    def _before_conntrack(self, indev: int, data: bytes) -> bytes | None:
        """Offload: a new flow's first packet (a SYN, an echo request) queued before conntrack.
        Decided, its entry goes in and the packet goes on as it came: conntrack finds the
        entry and the kernel translates it.  No entry, no packet."""
        now, off, routes = self.clock(), self.offloader, self.routes
        assert off is not None and routes is not None, "only the offload path queues before conntrack"
        v4 = data[0] >> 4 == 4
        dst, ext = (data[16:20], self.engine.external_ip) if v4 else (data[24:40], self.engine.external_ip6)
        l4, proto = ((data[0] & 15) * 4, data[9]) if v4 else (40, data[6])
        syn = proto == 6 and len(data) > l4 + 13 and data[l4 + 13] & 0x12 == 0x02
        key = flow_key(data)  # (read once for the refreshes and the install below)
        if syn and off.flows:
            # a SYN on an offloaded flow reopens it (a port reused while the kernel's entry is in
            # TIME_WAIT): the engine must judge it in the kernel's state, else it lets it pass on
            # the old entry, which conntrack then kills and replaces by one of its own, without
            # roam's NAT, racing the answer (measured: 1.7% of new connections lost a SYN)
            off.refresh(data, now, key)
        if indev == self.ext_index:
            a = self._process(data, _EXTERNAL, now, _FULL)
        elif dst == ext:
            a = self._process(data, _INTERNAL, now, _HAIRPIN_DST)  # not to a mapping: the host's own
        elif self.engine.is_internal(dst) or routes.oif(dst) != self.ext_index:
            return data  # it will not leave the external interface: never NATed, the kernel's own
        else:
            a = self._process(data, _INTERNAL, now, _FULL)
        if a.action is not _ACCEPT and a.reason is _INVALID and not syn and off.refresh(data, now, key):  # (a SYN: read)
            a = self._process(data, _EXTERNAL if indev == self.ext_index else _INTERNAL, now,
                              _HAIRPIN_DST if dst == ext and indev != self.ext_index
                              else _FULL)  # judged again with the kernel's state of the flow
        if not self._passes(a, data):
            return None
        if self.engine.ended:
            off.sweep()
        if a.reason in _DECIDED and not off.install(data, now, key):
            return None
        return data

    def _install_deferred(self) -> None:
        """The entries of TCP flows decided after conntrack, now that their packets' verdicts
        are out (offload always uses our own queue client): reinjection ran the rest of the
        hooks, so the kernel's own entry for each is confirmed, and the install replaces it
        (EEXIST) rather than clashing with it."""
        if self._deferred and self.offloader is not None:
            now = self.clock()
            for data in self._deferred:
                self.offloader.install(data, now)
            self._deferred.clear()

    #: SIGUSR1 snapshots written: in the status file, written just after each, so that a hook
    #: waits for this to rise, not for a snapshot file that a periodic round may have written
    snapshots_asked = 0
    #: --workers: (index, :class:`.workers.Slices`); None: the one process (set in __init__)
    worker: tuple | None = None
    #: the kernel path's sets (:mod:`.kernelpath`); None: every new flow is queued (set in __init__)
    kernel: KernelPath | None = None
    #: opt-in (``roam nat --drop-log FILE``): a JSON line per dropped packet, for the lab's judge
    drop_log: IO[str] | None = None
    #: called once every rule is in place and packets flow (sd_notify READY=1), and when stopping
    on_ready: Callable[[], None] | None = None
    on_stopping: Callable[[], None] | None = None

    def _passes(self, a, data) -> bool:
        """Log the answer's events; whether the packet goes on (a drop is logged to --drop-log)."""
        if a.events:
            log_events(a.events)
        if a.action is _ACCEPT:
            return True
        if self.drop_log is not None and (line := drop_line(self.clock(), a.reason.name.lower(), data)):
            self.drop_log.write(line)
        return False

    # -- control -----------------------------------------------------------------
    def _refresh_address(self) -> None:
        if self.kernel is not None and self.offloader is not None:  # flows made on the old address first
            self.offloader.on_events(self.clock())
        if self.routes is not None:
            self.routes.clear()
        ip = iface_address(self.external)
        self.ext_index = iface_index(self.external)
        if ip != self.engine.address_text():
            if self.offloader is not None:  # every IPv4 entry was on the old address: they go now
                self.offloader.flush()
            self.engine.set_external_address(ip, self.clock())
            self.rules.set_address(ip)
        ip6 = iface_address6(self.external, keep=self.engine.address_text(6)) if self.cfg.nat66 else None
        if self.cfg.nat66 and ip6 != self.engine.address_text(6):
            if self.offloader is not None:
                self.offloader.flush(6)
            self.engine.set_external_address(ip6, self.clock(), family=6)
            self.rules.set_address6(ip6)

    def _do_reload(self) -> None:
        try:
            cfg = load(self.config_path)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return
        for w in cfg.warnings:
            log.warning("%s", w)
        pinned: dict[str, Any] = {"internal": self.cfg.internal}
        if self.worker is not None:  # its share of the pools, not the config's whole ranges
            pinned.update(port_range=self.cfg.port_range, low_port_range=self.cfg.low_port_range,
                          port_lane=self.cfg.port_lane, icmp_id_range=self.cfg.icmp_id_range)
        self.engine.reload(cfg.with_(**pinned), self.clock())
        if self.offloader is not None:
            self.offloader.cfg = self.engine.config
            apply_sysctls(self.engine.config)

    def _write_status(self) -> None:
        snapshot.save(self.status_path, self._status_data())

    def _status_data(self) -> dict:
        """The status as data (under the lock; written outside it): :func:`.status.status_data`."""
        return status_data(self)

    def live_status(self) -> dict:
        """The status as `roam nat status` shows it, now (from another thread: the metrics)."""
        with self._lock:
            return self._status_data()

    def _write_snapshot(self, force: bool = False) -> None:
        snap = self._snapshot_data(force)
        if snap is not None:
            snapshot.save(self.snapshot_path, snap)

    def _snapshot_data(self, force: bool = False) -> dict | None:
        """Mappings and flows as data (under the lock; written outside it, so packets do not
        wait for the JSON), unless nothing moved since the last one."""
        c = self.engine.counters
        mark = (c["translated_out"], c["translated_in"], c["address_changes"], len(self.engine.table),
                self.offloader.changes if self.offloader is not None else 0)
        if not force and mark == self._snap_mark:
            return None
        self._snap_mark = mark
        return self.engine.snapshot(self.clock())

    def _restore(self) -> None:
        try:
            snap = snapshot.load(self.snapshot_path)
            if snap is not None:
                log.info("snapshot %s", self.snapshot_path)
                self.engine.restore(snap, self.clock())
        except (ValueError, KeyError, TypeError) as exc:
            log.error("snapshot %s not used: %s", self.snapshot_path, exc)
        log_events(self.engine.pop_events())

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (0).  Fail-closed at every instant: the signal handlers come
        before any rule, so a signal at any point of start-up ends in the ``finally`` that
        removes them (and closes the queue); ours go in before a dead run's come out."""
        from netfilterqueue import NetfilterQueue

        os.makedirs(os.path.dirname(self.status_path) or ".", exist_ok=True)
        sigs = Signals({signal.SIGTERM: self._sig_stop, signal.SIGINT: self._sig_stop,
                        signal.SIGHUP: self._sig_reload, signal.SIGUSR1: self._sig_snapshot})
        wsig = sigs.wsig
        nfq: Any = None  # our NfQueue (--gso) or NetfilterQueue's binding
        addrs = packets = nfsock = None
        ours = made_sets = False  # past the owner check: the rules of this queue are ours to remove
        started = False  # rules went in: a snapshot and a status to leave
        try:
            sigs.install()
            if self.restore:
                self._restore()
            self.rules.check_owners()
            ours = True
            if self.offload:
                apply_sysctls(self.cfg)
                if self.worker is None:
                    self.offloader = Offloader(self.engine, self.engine.config, self.kernel)
                else:
                    wo = WorkerOffloader(self.engine, self.engine.config, self.kernel)
                    wo.index, wo.slices = self.worker
                    self.offloader = wo
                self.routes = RouteCache()
            try:
                if self.gso:
                    nfq = NfQueue(self.queue, gso=True)
                    nfq.batch = True
                else:
                    nfq = NetfilterQueue()
                    nfq.bind(self.queue, self._on_packet, max_len=4096)
            except OSError as exc:
                raise PluginError(f"cannot bind NFQUEUE {self.queue}: {exc}") from None
            addrs = AddressEvents(v6=True) if self.cfg.nat66 else AddressEvents()
            with self._lock:
                self._refresh_address()
                started = True
                if self.offloader is not None:  # a dead run's entries: its flows go on, held here
                    self.offloader.reconcile(self.clock(), adopt=True)
                if self.kernel is not None:  # its sets, full, before the rules that read them
                    made_sets = True
                    try:
                        self.kernel.create()
                        self.kernel.fill(self.engine.mapping_table, self.clock())
                    except Exception as exc:  # (a kernel without IP sets) every new flow is queued
                        log.warning("kernel path off: its IP sets cannot be made (%s)", exc)
                        self.kernel.destroy()
                        self.kernel, self.rules.kernel = None, []
                        assert self.offloader is not None
                        self.offloader.kernel = None
                self.rules.install(self.engine.address_text())
                if self.cfg.nat66:
                    self.rules.set_address6(self.engine.address_text(6))
                log_events(self.engine.pop_events())
            stale = self.rules.remove_stale()  # only now: ours match first already
            if stale:
                log.warning("replaced %d stale rules of an earlier run on queue %d", stale, self.queue)
            if self.kernel is not None:
                self.kernel.remove_stale()
            # The packet thread blocks in the binding's own recv loop (one syscall a packet, no
            # select round per wake-up); the receive timeout lets it see a stop when idle.
            nfsock = nfq.sock if self.gso else socket.fromfd(nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
            nfsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                              struct.pack("ll", 0, int(_RECV_TIMEOUT * 1e6)))
            with self._lock:
                self._refresh_address()
                log_events(self.engine.pop_events())
            if self._stop:  # a signal during start-up
                log.info("roam nat stopped during start-up")
                return 0
            (lo, hi), lane = self.cfg.port_range, self.cfg.port_lane
            log.info("roam nat running: queue %d, external %s (%s), internal %s, ports %d-%d%s, %s", self.queue,
                     self.external, self.engine.address_text(), ", ".join(self.cfg.internal), lo, hi,
                     f" (lane {lane[1]}-{lane[2]} of {lane[0]})" if lane else "",
                     "offload to the kernel's conntrack" if self.offload else "every packet in user space")
            self._write_status()
            if self.kernel is not None:
                self._loop_at = self.clock()
                self.kernel.start(self.clock, lambda: self._loop_at)
            if self.on_ready is not None:
                self.on_ready()
            packets = threading.Thread(target=self._gso_loop if self.gso else self._packet_loop, args=(nfq, wsig),
                                       name="roam-nat-packets", daemon=True)
            packets.start()
            self._main_loop(addrs, sigs)
            log.info("roam nat stopping")
            return 0
        finally:
            removed = remove_rules(self.rules, ours, self.on_stopping)
            self._stop_packets = True
            if packets is not None:
                packets.join(10 * _RECV_TIMEOUT + 5)  # what is queued still gets its verdict
                if packets.is_alive():
                    log.error("packet thread did not stop")
            if made_sets and self.kernel is not None:  # (their rules are gone, the packet thread too)
                self.kernel.destroy()
            try:
                if nfq is not None:
                    nfq.close() if self.gso else nfq.unbind()
            except Exception:
                pass
            if nfsock is not None and not self.gso:
                nfsock.close()
            if addrs is not None:
                addrs.close()
            if self.offloader is not None:  # its entries stay: offloaded flows go on in the kernel
                self.offloader.close()
            if self.routes is not None:
                self.routes.close()
            if started:
                try:
                    self._write_snapshot(force=True)
                    self._write_status()
                except OSError as exc:
                    log.error("final snapshot/status not written: %s", exc)
                if self.worker is None:  # a worker's rules are its parent's to remove
                    log.info("removed %d rules", removed)
            sigs.restore()  # last: a signal while rules were being removed changed nothing

    def _main_loop(self, addrs: AddressEvents, sigs: Signals) -> None:
        """Address events, signals and housekeeping until a stop (the packet thread runs apart)."""
        next_house = next_snap = self.clock() + _HOUSEKEEPING
        off = self.offloader
        base: list[Any] = [addrs, sigs.rsig]
        events_at = 0.0  # the kernel's DESTROY events are read no sooner than this (see _EVENTS_EVERY)
        while not self._stop:
            now = self.clock()
            self._loop_at = now  # (the kernel path's liveness follows it: .kernelpath.KernelPath.start)
            timeout = max(0.0, next_house - now)
            waits = base
            if off is not None:
                if now >= events_at:
                    waits = base + [off.events]
                else:
                    timeout = min(timeout, events_at - now)
            try:
                ready, _, _ = select.select(waits, [], [], timeout)
            except InterruptedError:
                continue
            if self._packet_error is not None:
                raise self._packet_error
            if addrs in ready:
                addrs.drain()  # any address or link event: look again
                with self._lock:
                    self._refresh_address()
            if sigs.rsig in ready:
                sigs.drain()
            if self._reload:
                self._reload = False
                with self._lock:
                    self._do_reload()
            now = self.clock()
            snap_now = self._snap_now  # (served by the snapshot below, taken after the signal)
            if snap_now:
                self._snap_now = False
            if off is not None and off.events in ready:
                events_at = now + _EVENTS_EVERY
                for _ in range(_EVENT_SLICES):  # in slices, so queued packets need not wait for all of them
                    with self._lock:
                        off.on_events(now, _EVENTS_SLICE)
                    if not off.events.more:
                        break
                else:  # a backlog: the rest after this round's housekeeping (the kernel path's liveness)
                    events_at = now
            # an offloaded flow's packets pass the engine by: its TCP state is the kernel's, read
            # at each reconciliation -- and at once for a snapshot asked for (a carried SYN_SENT
            # makes the flow's next segment INVALID on the new host)
            if off is not None and off.due(now, snap_now):
                fetched = off.fetch(now)  # the kernel's entries, read while packets go on
                with self._lock:
                    off.reconcile(self.clock(), fetched=fetched)
            if now >= next_house or snap_now:
                next_house = now + _HOUSEKEEPING
                take = snap_now or now >= next_snap
                with self._lock:
                    self.engine.expire(now)
                    if off is not None:
                        off.sweep()
                    began = self.clock()
                    snap = self._snapshot_data(force=snap_now) if take else None
                    self.snapshots_asked += snap_now
                    st = self._status_data()
                if snap is not None:
                    snapshot.save(self.snapshot_path, snap)
                    # what writing it cost (not the reconciliation or the lock before it)
                    next_snap = now + max(_HOUSEKEEPING, (self.clock() - began) / _SNAPSHOT_SHARE)
                snapshot.save(self.status_path, st)
            with self._lock:
                events = self.engine.pop_events()
                if self.kernel is not None:  # what the events and expiry freed; the kernel path kept open
                    self.kernel.sync()
            log_events(events)

    def _sig_stop(self, signum, frame) -> None:
        self._stop = True

    def _sig_reload(self, signum, frame) -> None:
        self._reload = True

    def _sig_snapshot(self, signum, frame) -> None:
        self._snap_now = True
