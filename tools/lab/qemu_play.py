"""`roam replay --backend qemu`: play a scenario with a real guest, live-migrated by QEMU.

    from tools.lab.qemu_play import run_qemu
    report = run_qemu(scenario, ("bridged", "tunnel"), progress)   # the Report of sim.run.replay

The netns backend's lab (:mod:`tools.lab.topology`: internet, sites, hosts, peers), its
peers' endpoint programs (:mod:`tools.lab.endpoint`) and its mode drivers
(:mod:`tools.lab.attach`: the real ``roam nat`` and ``roam tunnel``), with a real
Linux guest (:mod:`tools.lab.guest`) instead of a namespace playing the VM:

* the guest's NIC is a TAP ``vm0`` in every host namespace (made before the guest
  boots, so a destination's link exists before the guest resumes there), plugged by
  the mode's driver exactly where the netns backend plugs its veth (:class:`GuestTopology`);
* a move is QEMU's live migration (:meth:`tools.lab.qemu.Guest.begin_migration`): the
  pre-copy starts :data:`LEAD` seconds before the move while the guest runs, the guest is
  paused at the move's time, the mode's driver readies the destination while it is
  paused, QEMU switches over, and the guest resumes the scenario's downtime after it
  paused (later if the copy or the driver took longer);
* there is ONE client schedule (:mod:`sim.schedule`): the guest runs no Python, so its
  clients' schedules run here (:class:`GuestVm`) and the guest's ``roam-ep serve``
  (``guest_endpoint.c``) only opens, sends, receives and reports, each report stamped
  with the host clock on arrival; while the guest is paused its clients' timers wait, as
  a frozen process's would, and commands for it are held until it resumes;
* the one judge gets the same observations and drops (:func:`tools.lab.logs.verdicts`), with each
  move running from the guest's pause to its resume as QEMU reported them.

Each mode's run also carries QEMU's own figures per move (``ModeRun.moves``): total
migration time, QEMU's downtime (its switch-over), RAM sent, and the pause as held.
What the two backends share is :mod:`tools.lab.play` and :mod:`tools.lab.vmlink`.
"""
from __future__ import annotations

import ipaddress
import os
import threading
import time
from dataclasses import fields
from typing import Callable

from sim.judge import Move
from sim.results import ModeRun, Report

from .netlab import Lab, LabError
from .topology import TopologyError, _allowed, build, vm_addresses
from .attach import DRIVERS, ModeUnavailable
from .guest_vm import GuestVm
from .logs import collect_drops, verdicts
from .play import (SETTLE, Collector, EndpointProc, finish, horizon, loss_warning, open_servers, router_packets,
                   run_modes, start_connection, start_peers, wait_ready, warn_if_redrawn)
from .qemu import Guest, GuestSpec, Migration, QemuError, qemu_missing
from .vmlink import SwitchedTopology, add_host_links
from ..report import moves_dict, moves_text  # noqa: F401 - where they were

LEAD = 1.0  # seconds of pre-copy (guest running) before a move's pause (less than the first pass takes)
TAPS = ("vm0", "vm1")  # the guest's TAPs on every host (a migration's two QEMUs hold one each)
LATE = 0.25  # seconds a resume may come after its time before the report warns


class GuestTopology(SwitchedTopology):
    """The lab with a real guest: its link is a TAP on its host, plugged by a mode's driver as the netns one is.

    Every host has two TAPs, ``vm0`` and ``vm1`` (:data:`TAPS`), made before the guest
    boots: a migration's destination QEMU takes the one the source does not hold, so a
    move to another host and a move within one host (a local migration) are the same.
    The guest itself is re-addressed over its control port.
    """

    link: str = TAPS[0]  # the TAP the running QEMU holds, on ``vm_host``
    vm_endpoint: GuestVm | None = None

    def next_link(self) -> str:
        return TAPS[1] if self.link == TAPS[0] else TAPS[0]

    def vm_readdress(self, cidr: str | None, gateway: str | None) -> None:
        """Re-address the guest's eth0 (held while it is paused; waited for at first)."""
        assert self.vm_endpoint is not None  # set once the guest runs, before any move
        self.vm_endpoint.readdress(cidr, gateway)


def guest_topology(lab: Lab, sc) -> GuestTopology:
    for what, a in vm_addresses(sc.vm):
        _allowed(ipaddress.IPv4Address(a), what)
    topo = build(lab, sc.sites, sc.hosts, sc.peers)
    g = GuestTopology(**{f.name: getattr(topo, f.name) for f in fields(topo)})
    add_host_links(lab, g.hosts.values(), TAPS, lambda h, name: lab.tap(h.ns, name))
    g.vm_mac, g.vm_host = sc.vm.mac, sc.vm.host
    return g


class _Mover(threading.Thread):
    """The scenario's moves, one after another, each a held live migration (see the module docstring)."""

    def __init__(self, sc, topo: GuestTopology, drv, guest: Guest, vm: GuestVm, t0: float) -> None:
        super().__init__(daemon=True)
        self.sc, self.topo, self.drv, self.guest, self.vm, self.t0 = sc, topo, drv, guest, vm, t0
        self.done: list[Migration] = []
        self.error: str | None = None
        self.warnings: list[str] = []
        self.busy = False

    def run(self) -> None:
        try:
            for m in self.sc.migrations:
                self._one(m)
        except Exception as exc:  # noqa: BLE001 - the mode's error, reported by the loop
            self.error = f"{type(exc).__name__}: {exc}"
            self.vm.release()

    def _sleep_until(self, when: float) -> None:
        while time.monotonic() < when:
            time.sleep(min(0.01, when - time.monotonic()))

    def _one(self, m) -> None:
        topo, g = self.topo, self.guest
        self._sleep_until(self.t0 + m.at - LEAD)
        self.busy = True
        link = topo.next_link()
        g.begin_migration(topo.host_ns(m.to), link)
        self._sleep_until(self.t0 + m.at)
        self.vm.hold()
        paused = g.pause()
        # the guest is paused: the old host's link goes, the new one is readied (as the netns backend does)
        topo.vm_link_down()
        self.drv.detach()
        if getattr(self.drv, "carry_state", False):
            took = self.drv.carry(topo.vm_host, m.to)
            if took > m.downtime:
                self.warnings.append(f"carrying the NAT state to {m.to} took {took:.2f} s, longer than the "
                                     f"{m.downtime:.2f} s downtime: the guest resumed late")
        topo.move_vm(m.to, link)
        self.drv.attach(m.to, first=False)
        g.switch_over()
        mig = g.resume(at=paused + m.downtime, on_resume=self.vm.release)
        self.done.append(mig)
        self.busy = False


def run_mode_qemu(sc, mode: str, image, progress: Callable[[float], None] | None = None,
                  logdir: str | None = None) -> ModeRun:
    """One mode with a real guest in a fresh lab; a mode that cannot run comes back with ``error`` set."""
    if mode not in DRIVERS:
        return ModeRun(mode, {}, f"unknown mode {mode!r}")
    if os.geteuid() != 0:
        return ModeRun(mode, {}, "the qemu backend needs root (network namespaces, TAP devices)")
    why = qemu_missing()
    if why:
        return ModeRun(mode, {}, why)
    warnings = loss_warning(sc, "qemu")
    wall0 = time.monotonic()
    try:
        with Lab("roam") as lab:
            try:
                topo = guest_topology(lab, sc)
            except TopologyError as exc:
                return ModeRun(mode, {}, f"cannot build the lab for this scenario: {exc}")
            guest = Guest(lab, GuestSpec(image, sc.vm.mac))
            try:
                guest.boot(topo.host_ns(sc.vm.host), topo.link)
                vm = topo.vm_endpoint = GuestVm(guest)
                guest.send("exec roam-ep serve")
                guest.wait_for(lambda e: e.get("ev") == "ready", 20, "the guest's executor")
                try:
                    drv = DRIVERS[mode](sc, topo)
                except ModeUnavailable as exc:
                    return ModeRun(mode, {}, f"{mode} is not available in the qemu backend: {exc}")
                drv.logdir = logdir
                try:
                    return _play(sc, mode, topo, drv, guest, vm, progress, logdir, warnings, wall0)
                finally:
                    drv.close()
            finally:
                guest.close()
    except (LabError, OSError, ModeUnavailable, QemuError) as exc:
        return ModeRun(mode, {}, f"the qemu lab failed: {exc}")
    except Exception as exc:  # noqa: BLE001 - any failure is this mode's error, never the other modes' end
        return ModeRun(mode, {}, f"the qemu backend failed: {type(exc).__name__}: {exc}")


def _play(sc, mode, topo, drv, guest, vm, progress, logdir, warnings, wall0):
    lab = topo.lab
    drv.attach(sc.vm.host, first=True)
    until = horizon(sc)
    peers = start_peers(lab, topo, sc, until + 60 + LEAD * len(sc.migrations), logdir)
    procs: dict[str, GuestVm | EndpointProc] = {"vm": vm, **peers}
    err = wait_ready(peers)
    if err:
        return ModeRun(mode, {}, err)
    t0 = time.monotonic() + max(SETTLE, LEAD - min((m.at for m in sc.migrations), default=LEAD))
    draws = topo.neigh_draws()
    for p in procs.values():
        p.send(op="clock", t0=t0)
    err = open_servers(sc, procs)  # the guest's after its clock (its executor's order); the peers' acknowledged
    if err:
        return ModeRun(mode, {}, err)
    mover = _Mover(sc, topo, drv, guest, vm, t0)
    mover.start()
    plan = sorted((c.start, i) for i, c in enumerate(sc.connections))
    col = Collector(len(sc.connections))
    pi = 0
    error = None
    while True:
        now = time.monotonic() - t0
        while pi < len(plan) and plan[pi][0] <= now:
            start_connection(sc, drv, procs, plan[pi][1])
            pi += 1
        vm.run_timers()
        col.pump(procs.values())
        if progress:
            progress(min(1.0, max(0.0, now / until)))
        if mover.error:
            error = f"migration failed: {mover.error}"
            break
        moved = not mover.is_alive()
        if now >= until + (0 if moved else 30) or (moved and pi >= len(plan) and col.all_ended()):
            break
        if guest.current is None or guest.current.proc.poll() is not None and not mover.busy:
            error = "QEMU exited early (see its console log)"
            break
        dead = [r for r, p in peers.items() if p.p.poll() is not None]
        if dead:
            error = f"endpoint(s) {', '.join(dead)} exited early (see logs)"
            break
        waits = [0.05, (plan[pi][0] - now) if pi < len(plan) else 0.05]
        nt = vm.next_timer()
        if nt is not None:
            waits.append(nt - now)
        time.sleep(max(0.0, min(waits)))
    stop_at = time.monotonic() - t0
    warn_if_redrawn(topo, draws, warnings)
    finish(procs, peers, col, logdir, extra=vm.pump)
    mover.join(timeout=1)
    if error:
        return ModeRun(mode, {}, error)
    if len(mover.done) != len(sc.migrations):
        return ModeRun(mode, {}, f"only {len(mover.done)} of {len(sc.migrations)} moves happened in time")
    moves = tuple(Move(m.paused - t0, m.resumed - m.paused) for m in mover.done)
    drops = collect_drops(drv, t0)
    results = verdicts(sc, [e for e in col.events if e["t"] < stop_at], moves,
                       drops=[d for d in drops.events if d["t"] < stop_at])
    warnings += getattr(drv, "warnings", []) + mover.warnings
    for m, mig in zip(sc.migrations, mover.done):
        late = (mig.resumed - mig.paused) - m.downtime
        if late > LATE:
            warnings.append(f"the move at {m.at:g} s paused the guest {late * 1000:.0f} ms longer than its "
                            f"{m.downtime * 1000:.0f} ms downtime (the copy or the destination's set-up took longer)")
    return ModeRun(mode, results, None, router_packets(topo), len(col.events), drops.counters,
                   time.monotonic() - wall0, tuple(warnings), tuple(mover.done), draws=draws)


def run_qemu(sc, modes: tuple[str, ...] | None = None, progress=None, *, parallel: bool = False,
             logdir: str | None = None) -> Report:
    """Every mode of the scenario (or ``modes``) with a real guest; the same Report as ``sim.run.replay``.

    ``parallel``: the modes at once, each in its own lab with its own guest (each guest
    takes about a core under TCG: at most as many at once as the machine has cores).
    """
    from .guest import GuestError, build as build_image

    modes = tuple(modes or sc.modes)
    failed = image = None
    try:
        image = build_image()
    except GuestError as exc:
        failed = ModeRun("", {}, f"the guest image cannot be built: {exc}")
    return run_modes(sc, modes, lambda mode, prog: run_mode_qemu(
        sc, mode, image, prog, os.path.join(logdir, mode) if logdir else None), progress, parallel, "qemu",
        slots=max(1, os.cpu_count() or 1), failed=failed)
