"""`roam replay --backend netns`: play a scenario in the namespace lab, with real kernel TCP and UDP.

    from tools.lab.netns import run_netns
    report = run_netns(scenario, ("bridged", "tunnel"), progress, parallel=True)   # same Report as sim.run.replay

For each mode a fresh lab is built from the scenario (:mod:`tools.lab.topology`): the
internet, the sites and their hosts, the peers and the VM.  Endpoints are small
socket programs (:mod:`tools.lab.endpoint`) started with ``lab.popen`` in the VM's
and each peer's namespace.  This driver tells them, on their stdin and at the
scenario's times, which servers to open and which connections to start; they run
the one client schedule the simulator runs and log what they observe.  A migration
pauses the VM (its processes frozen) at ``at`` and resumes it after the downtime; its
link has a host end on every host, up all along, and is switched to the new host's at
the resume, which the mode's driver (:mod:`tools.lab.attach`) readied during the pause
(:mod:`tools.lab.vmlink`: no carrier flap, no delay of the lab's own).

The verdicts come only from those logs and the components' own drop logs, through the
one judge the simulator uses (:mod:`tools.lab.logs` -> :mod:`sim.judge`).  A mode the lab cannot run (a missing
command, a scenario without a home site...) comes back as a ModeRun with ``error``
set, never a verdict.

Not reproduced: link latency and loss (the lab's links are plain veths; a warning
says so when the scenario has loss).  The VM's kernel is not paused (only its
processes): its TCP timers run on while it is away, as the simulator's do.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

from sim.results import ModeRun

from .netlab import Lab, LabError
from .topology import TopologyError
from .attach import DRIVERS, NOT_YET, ModeUnavailable
from .logs import collect_drops, verdicts
from .play import (SETTLE, Collector, EndpointProc, finish, horizon, loss_warning, open_servers, router_packets,
                   run_modes, start_connection, start_peers, wait_ready, warn_if_redrawn)
from .vmlink import netns_topology

LATE = 0.25  # seconds a resume may come after its time before the report warns
#: A move, ordered by the endpoints themselves (a busy machine runs the driver and the endpoints late, each
#: by its own amount): the driver sends a barrier BARRIER_EARLY before the move; at the move's instant on
#: its clock every endpoint stops and says so (a peer's send due at that instant comes after the move, as in
#: the simulator); the switch cuts the VM off and the endpoints go on; once the VM's endpoint
#: has run what was due at the move (the simulator's ``Stack.holds``: that ran, and was lost) it says
#: ``synced`` and the VM is frozen.  CUT_EARLY, FREEZE_LATE: when the driver starts waiting for each.
BARRIER_EARLY, CUT_EARLY, FREEZE_LATE = 0.2, 0.002, 0.001


def run_mode_netns(sc, mode: str, progress: Callable[[float], None] | None = None,
                   logdir: str | None = None):
    """One mode in a fresh lab; a mode this backend cannot run comes back with ``error`` set."""
    if mode in NOT_YET:
        return ModeRun(mode, {}, f"{mode} is not available in the netns backend: {NOT_YET[mode]}")
    if mode not in DRIVERS:
        return ModeRun(mode, {}, f"unknown mode {mode!r}")
    if os.geteuid() != 0:
        return ModeRun(mode, {}, "the netns backend needs root (network namespaces)")
    warnings = loss_warning(sc, "netns")
    wall0 = time.monotonic()
    try:
        with Lab("roam") as lab:
            try:
                topo = netns_topology(lab, sc)
            except TopologyError as exc:
                return ModeRun(mode, {}, f"cannot build the lab for this scenario: {exc}")
            try:
                try:
                    drv = DRIVERS[mode](sc, topo)
                except ModeUnavailable as exc:
                    return ModeRun(mode, {}, f"{mode} is not available in the netns backend: {exc}")
                drv.logdir = logdir
                try:
                    return _play(sc, mode, topo, drv, progress, logdir, warnings, wall0)
                finally:
                    drv.close()
            finally:
                topo.close()
    except (LabError, OSError, ModeUnavailable) as exc:
        return ModeRun(mode, {}, f"the lab failed: {exc}")
    except Exception as exc:  # noqa: BLE001 - any failure is this mode's error, never the other modes' end
        return ModeRun(mode, {}, f"the netns backend failed: {type(exc).__name__}: {exc}")


def _play(sc, mode, topo, drv, progress, logdir, warnings, wall0):
    lab = topo.lab
    drv.attach(sc.vm.host, first=True)
    until = horizon(sc)
    procs = {"vm": EndpointProc(lab, topo.vm, "vm", time.monotonic(), until + 60, logdir)}
    peers = start_peers(lab, topo, sc, until + 60, logdir)
    procs.update(peers)
    # time zero once every endpoint is up (Python takes a while to start on a busy machine)
    err = wait_ready(procs) or open_servers(sc, procs)
    if err:
        return ModeRun(mode, {}, err)
    t0 = time.monotonic() + SETTLE
    draws = topo.neigh_draws()
    for p in procs.values():
        p.send(op="clock", t0=t0)
    # the schedule, in scenario seconds
    plan: list[tuple[float, int, str, Any]] = []  # a connection's index, or a move
    for i, c in enumerate(sc.connections):
        plan.append((c.start, 1, "start", i))
    for m in sc.migrations:
        plan.append((m.at - BARRIER_EARLY, 0, "barrier", m))
        plan.append((m.at - CUT_EARLY, 0, "cut", m))
        plan.append((m.at + FREEZE_LATE, 0, "leave", m))
        plan.append((m.at + m.downtime, 0, "arrive", m))
    plan.sort(key=lambda x: (x[0], x[1]))
    col = Collector(len(sc.connections))
    pi = 0
    while True:
        now = time.monotonic() - t0
        while pi < len(plan) and plan[pi][0] <= now:
            when, _, what, arg = plan[pi]
            pi += 1
            if what == "start":
                start_connection(sc, drv, procs, arg)
            elif what == "barrier":  # every endpoint holds at the move's instant: a tie goes to the move
                for p in procs.values():
                    p.send(op="barrier", at=arg.at)
            elif what == "cut":  # a peer needs no waiting for: one that comes to the move after the go goes on
                if not col.wait_mark([procs["vm"]], "barrier", arg.at):
                    warnings.append(f"the VM's endpoint did not stop at the move at {arg.at:g} s")
                topo.cut()
                for p in procs.values():
                    p.send(op="go", at=arg.at)
            elif what == "leave":  # the VM pauses; its destination is readied meanwhile
                if not col.wait_mark([procs["vm"]], "synced", arg.at):
                    warnings.append(f"the VM's endpoint did not run what was due at the move at {arg.at:g} s")
                topo.pause([procs["vm"].p.pid])
                drv.detach()
                if getattr(drv, "carry_state", False):
                    drv.carry(topo.vm_host, arg.to)
                topo.move_vm(arg.to)
                drv.attach(arg.to, first=False)
            else:
                late = time.monotonic() - t0 - when
                topo.resume()
                if late > LATE:
                    warnings.append(f"the move at {arg.at:g} s resumed the VM {late * 1000:.0f} ms after its "
                                    f"{arg.downtime * 1000:.0f} ms downtime (readying {arg.to} took longer)")
        col.pump(procs.values())
        if progress:
            progress(min(1.0, max(0.0, now / until)))
        if now >= until or (pi >= len(plan) and col.all_ended()):
            break
        dead = [r for r, p in procs.items() if p.p.poll() is not None]
        if dead:
            return ModeRun(mode, {}, f"endpoint(s) {', '.join(dead)} exited early (see logs)")
        nxt = plan[pi][0] - now if pi < len(plan) else 0.05
        time.sleep(max(0.0, min(0.05, nxt)))
    # what happens once the driver stops (endpoints closing their sockets) is not the scenario's
    stop_at = time.monotonic() - t0
    warn_if_redrawn(topo, draws, warnings)
    finish(procs, procs, col, logdir)
    drops = collect_drops(drv, t0)
    results = verdicts(sc, [e for e in col.events if e["t"] < stop_at],
                       drops=[d for d in drops.events if d["t"] < stop_at])
    warnings += getattr(drv, "warnings", [])
    return ModeRun(mode, results, None, router_packets(topo), len(col.events), drops.counters,
                   time.monotonic() - wall0, tuple(warnings), draws=draws)


def run_netns(sc, modes: tuple[str, ...] | None = None, progress=None, *, parallel: bool = False,
              logdir: str | None = None):
    """Every mode of the scenario (or ``modes``) in the lab; the same Report as ``sim.run.replay``.

    ``parallel``: run the modes at once, each in its own lab (wall time of the
    slowest instead of the sum).  ``logdir``: keep each endpoint's stderr there.
    """
    modes = tuple(modes or sc.modes)
    return run_modes(sc, modes, lambda mode, prog: run_mode_netns(
        sc, mode, prog, os.path.join(logdir, mode) if logdir else None), progress, parallel, "netns")
