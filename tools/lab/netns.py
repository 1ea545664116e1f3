"""`roam replay --backend netns`: play a scenario in the namespace lab, with real kernel TCP and UDP.

    from tools.lab.netns import run_netns
    report = run_netns(scenario, ("bridged", "tunnel"), progress, parallel=True)   # same Report as sim.run.replay

For each mode a fresh lab is built from the scenario (:mod:`tools.topology`): the
internet, the sites and their hosts, the peers and the VM.  Endpoints are small
socket programs (:mod:`tools.lab.endpoint`) started with ``lab.popen`` in the VM's
and each peer's namespace.  This driver tells them, on their stdin and at the
scenario's times, which servers to open and which connections to start; they run
the one client schedule the simulator runs and log what they observe.  Migrations
are done for real: the VM's link goes down at ``at``, and after the downtime its
host end is moved (``Topology.move_vm``) to the new host and plugged in as the mode
requires (:mod:`tools.lab.attach`).

The verdicts come only from those logs, through the one judge the simulator uses
(:mod:`tools.lab.logs` -> :mod:`sim.judge`).  A mode the lab cannot run (a missing
command, a scenario without a home site...) comes back as a ModeRun with ``error``
set, never a verdict.

Not reproduced: link latency and loss (the lab's links are plain veths; a warning
says so when the scenario has loss).  Reasons can differ from the simulator's where
the simulator knows something no endpoint could observe: e.g. a packet to an address
that left its LAN is "unreachable" there at once, while a real router holds the old
neighbour entry for a while and the sender just times out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Callable

from conntrack import Proto
from sim.judge import Move, settle
from sim.results import ConnInfo, ModeRun, Report

from ..netlab import Lab, LabError
from ..topology import TopologyError, build_for
from .attach import DRIVERS, NOT_YET, Driver, ModeUnavailable
from .logs import verdicts

VM_EPHEMERAL = 40000  # client ports, as in sim.run
PEER_EPHEMERAL = 50000
SETTLE = 0.2  # seconds between every endpoint being up and time zero
READY_TIMEOUT = 30.0  # seconds the endpoints may take to start
GRACE = 2.0  # seconds after the last possible give-up before the driver stops waiting


class EndpointProc:
    """An endpoint process: commands in, JSON events out (read without blocking)."""

    def __init__(self, lab, ns: str, role: str, t0: float, limit: float, logdir: str | None) -> None:
        self.role = role
        if logdir:
            os.makedirs(logdir, exist_ok=True)
        self.errfile = open(os.path.join(logdir, f"{role.replace(':', '-')}.stderr"), "w") if logdir else \
            open(os.devnull, "w")
        self.p = lab.popen(ns, [sys.executable, "-m", "tools.lab.endpoint", f"{t0!r}", f"{limit:.3f}"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errfile, bufsize=0)
        os.set_blocking(self.p.stdout.fileno(), False)
        self.buf = b""
        self.events: list[dict] = []

    def send(self, **cmd) -> None:
        try:
            self.p.stdin.write((json.dumps(cmd) + "\n").encode())
        except (BrokenPipeError, OSError):
            pass

    def pump(self) -> list[dict]:
        new = []
        while True:
            try:
                chunk = os.read(self.p.stdout.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buf += chunk
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ev["who"] = self.role
            new.append(ev)
        self.events += new
        return new


def run_mode_netns(sc, mode: str, progress: Callable[[float], None] | None = None,
                   logdir: str | None = None):
    """One mode in a fresh lab; a mode this backend cannot run comes back with ``error`` set."""
    if mode in NOT_YET:
        return ModeRun(mode, {}, f"{mode} is not available in the netns backend: {NOT_YET[mode]}")
    if mode not in DRIVERS:
        return ModeRun(mode, {}, f"unknown mode {mode!r}")
    if os.geteuid() != 0:
        return ModeRun(mode, {}, "the netns backend needs root (network namespaces)")
    warnings = []
    if any(s.loss for s in sc.sites) or any(p.loss for p in sc.peers):
        warnings.append("link loss in the scenario is not reproduced by the netns backend (links are lossless)")
    wall0 = time.monotonic()
    try:
        with Lab("roam") as lab:
            try:
                topo = build_for(lab, sc)
            except TopologyError as exc:
                return ModeRun(mode, {}, f"cannot build the lab for this scenario: {exc}")
            try:
                drv = DRIVERS[mode](sc, topo)
            except ModeUnavailable as exc:
                return ModeRun(mode, {}, f"{mode} is not available in the netns backend: {exc}")
            drv.logdir = logdir
            try:
                return _play(sc, mode, topo, drv, progress, logdir, warnings, wall0)
            finally:
                drv.close()
    except (LabError, OSError, ModeUnavailable) as exc:
        return ModeRun(mode, {}, f"the lab failed: {exc}")
    except Exception as exc:  # noqa: BLE001 - any failure is this mode's error, never the other modes' end
        return ModeRun(mode, {}, f"the netns backend failed: {type(exc).__name__}: {exc}")


def _play(sc, mode, topo, drv, progress, logdir, warnings, wall0):
    lab = topo.lab
    drv.attach(sc.vm.host, first=True)
    longest = max([sc.tcp_timeout, sc.udp_timeout] + [sc.timeout_of(c) for c in sc.connections])
    # clients go on past the duration until answered after the last move (or they give up)
    horizon = max(sc.duration, _settle(sc) or 0.0) + longest + GRACE
    provisional = time.monotonic()
    procs = {"vm": EndpointProc(lab, topo.vm, "vm", provisional, horizon + 60, logdir)}
    for p in sc.peers:
        procs[f"peer:{p.name}"] = EndpointProc(lab, topo.peers[p.name].ns, f"peer:{p.name}", provisional, horizon + 60,
                                        logdir)
    # time zero once every endpoint is up (Python takes a while to start on a busy machine)
    ready: set[str] = set()
    deadline = time.monotonic() + READY_TIMEOUT
    while len(ready) < len(procs):
        for role, p in procs.items():
            ready |= {role for ev in p.pump() if ev["ev"] == "ready"}
            if p.p.poll() is not None:
                return ModeRun(mode, {}, f"endpoint {role} exited at start (exit {p.p.returncode})")
        if time.monotonic() > deadline:
            return ModeRun(mode, {}, f"endpoints {', '.join(sorted(set(procs) - ready))} not up after "
                           f"{READY_TIMEOUT:.0f} s")
        time.sleep(0.02)
    for p in procs.values():
        p.events.clear()
    t0 = time.monotonic() + SETTLE
    for p in procs.values():
        p.send(op="clock", t0=t0)
    # servers (one per side, protocol and port)
    opened = set()
    for c in sc.connections:
        side = "vm" if c.direction == "inbound" else f"peer:{c.peer}"
        key = (side, c.protocol, c.port)
        if key in opened:
            continue
        opened.add(key)
        bind = "" if side == "vm" else sc.peer(c.peer).address
        if c.protocol == Proto.TCP:
            procs[side].send(op="tcp_listen", port=c.port, bind=bind, timeout=sc.timeout_of(c))
        else:
            procs[side].send(op="udp_listen", port=c.port, bind=bind, session=c.session)
    # the schedule, in scenario seconds
    plan: list[tuple[float, int, str, object]] = []
    for i, c in enumerate(sc.connections):
        plan.append((c.start, 1, "start", i))
    for m in sc.migrations:
        plan.append((m.at, 0, "leave", m))
        plan.append((m.at + m.downtime, 0, "arrive", m))
    plan.sort(key=lambda x: (x[0], x[1]))
    status: dict[int, str] = {}  # idx -> "done" | "broken"
    events: list[dict] = []
    n = len(sc.connections)
    pi = 0
    while True:
        now = time.monotonic() - t0
        while pi < len(plan) and plan[pi][0] <= now:
            _, _, what, arg = plan[pi]
            pi += 1
            if what == "start":
                _start(sc, drv, procs, arg)
            elif what == "leave":
                topo.vm_link_down()
                drv.detach()
                if getattr(drv, "carry_state", False):
                    took = drv.carry(topo.vm_host, arg.to)
                    if took > arg.downtime:
                        warnings.append(f"carrying the NAT state to {arg.to} took {took:.2f} s, longer "
                                        f"than the {arg.downtime:.2f} s downtime: the VM arrived late")
            else:
                topo.move_vm(arg.to)
                drv.attach(arg.to, first=False)
        for p in procs.values():
            for ev in p.pump():
                events.append(ev)
                if ev.get("idx") is not None and ev["ev"] in ("broken", "done"):
                    status.setdefault(ev["idx"], "broken" if ev["ev"] == "broken" else "done")
                    if ev["ev"] == "broken":
                        status[ev["idx"]] = "broken"
        if progress:
            progress(min(1.0, max(0.0, now / horizon)))
        if now >= horizon or (pi >= len(plan) and len(status) >= n):
            break
        if any(p.p.poll() is not None for p in procs.values()):
            dead = [r for r, p in procs.items() if p.p.poll() is not None]
            return ModeRun(mode, {}, f"endpoint(s) {', '.join(dead)} exited early (see logs)")
        nxt = plan[pi][0] - now if pi < len(plan) else 0.05
        time.sleep(max(0.0, min(0.05, nxt)))
    # what happens once the driver stops (endpoints closing their sockets) is not the scenario's
    stop_at = time.monotonic() - t0
    for p in procs.values():
        p.send(op="quit")
    for p in procs.values():
        try:
            p.p.wait(timeout=5)
        except Exception:  # noqa: BLE001 - lab.close() stops it
            pass
        events += p.pump()
        p.errfile.close()
    if logdir:
        with open(os.path.join(logdir, "events.jsonl"), "w") as f:
            for e in sorted(events, key=lambda e: e["t"]):
                f.write(json.dumps(e) + "\n")
    results = verdicts(sc, [e for e in events if e["t"] < stop_at])
    warnings += getattr(drv, "warnings", [])
    return ModeRun(mode, results, None, _router_packets(topo), len(events), {}, time.monotonic() - wall0,
                   tuple(warnings))


def _router_packets(topo) -> int:
    """Packets the internet namespace sent on its links (what crossed the lab's core), from the kernel's counters."""
    total = 0
    try:
        for link in topo.lab.ipr(topo.inet).get_links():
            if link.get_attr("IFLA_IFNAME") == "lo" or link.get_attr("IFLA_LINKINFO") is not None and \
                    link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "bridge":
                continue
            stats = link.get_attr("IFLA_STATS64")
            if stats is not None:
                total += stats["tx_packets"]
    except Exception:  # noqa: BLE001 - a count for the report only
        return 0
    return total


def _start(sc, drv: Driver, procs: dict, idx: int) -> None:
    c = sc.connections[idx]
    timeout = sc.timeout_of(c)
    common = dict(idx=idx, interval=c.interval, request=c.request, response=c.response, timeout=timeout,
                  end=sc.duration, settle=_settle(sc))
    op = "tcp_connect" if c.protocol == Proto.TCP else "udp_connect"
    if c.direction == "outbound":
        procs["vm"].send(op=op, dst=sc.peer(c.peer).address, port=c.port, src="", sport=VM_EPHEMERAL + idx % 20000,
                         **common)
    else:
        addr, port = drv.published(c.protocol, c.port)
        procs[f"peer:{c.peer}"].send(op=op, dst=addr or "0.0.0.0", port=port, src=sc.peer(c.peer).address,
                                     sport=PEER_EPHEMERAL + idx % 15000, **common)


def run_netns(sc, modes: tuple[str, ...] | None = None, progress=None, *, parallel: bool = False,
              logdir: str | None = None):
    """Every mode of the scenario (or ``modes``) in the lab; the same Report as ``sim.run.replay``.

    ``parallel``: run the modes at once, each in its own lab (wall time of the
    slowest instead of the sum).  ``logdir``: keep each endpoint's stderr there.
    """
    modes = tuple(modes or sc.modes)
    runs: dict[str, object] = {}
    done: dict[str, float] = {m: 0.0 for m in modes}
    lock = threading.Lock()

    def report(mode: str, frac: float) -> None:
        if not progress:
            return
        if not parallel:
            progress(mode, frac)
            return
        # all modes at once: report the overall fraction in the caller's (mode index + fraction) terms
        with lock:
            done[mode] = frac
            overall = sum(done.values())  # in modes done: 0 .. len(modes)
            i = min(int(overall), len(modes) - 1)
            progress(modes[i], overall - i)

    def one(mode: str) -> None:
        try:
            runs[mode] = run_mode_netns(sc, mode, lambda frac: report(mode, frac),
                                        os.path.join(logdir, mode) if logdir else None)
        except Exception as exc:  # noqa: BLE001 - in a thread: a mode's failure is its error, not a KeyError later
            runs[mode] = ModeRun(mode, {}, f"the netns backend failed: {type(exc).__name__}: {exc}")
        report(mode, 1.0)

    if parallel:
        threads = [threading.Thread(target=one, args=(m,), daemon=True) for m in modes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for m in modes:
            one(m)
    conns = tuple(ConnInfo(c.id, c.protocol_name, c.direction, c.peer, c.port, c.start) for c in sc.connections)
    migs = tuple((m.at, m.to, m.downtime, sc.host(m.to).site) for m in sc.migrations)
    return Report(sc.name, conns, migs, tuple(runs[m] for m in modes), sc.duration, backend="netns")


def _settle(sc) -> float | None:
    """When the last migration's downtime ends (None without migrations)."""
    return settle(Move(m.at, m.downtime) for m in sc.migrations)
