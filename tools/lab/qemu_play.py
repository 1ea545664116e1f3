"""`roam replay --backend qemu`: play a scenario with a real guest, live-migrated by QEMU.

    from tools.lab.qemu_play import run_qemu
    report = run_qemu(scenario, ("bridged", "tunnel"), progress)   # the Report of sim.run.replay

The netns backend's lab (:mod:`tools.topology`: internet, sites, hosts, peers), its
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
* the one judge (:mod:`sim.judge`) gets the same observations (:func:`tools.lab.logs.observations`),
  with each move running from the guest's pause to its resume as QEMU reported them.

Each mode's run also carries QEMU's own figures per move (:class:`QemuRun`): total
migration time, QEMU's downtime (its switch-over), RAM sent, and the pause as held.
"""
from __future__ import annotations

import ipaddress
import json
import os
import threading
import time
from dataclasses import dataclass, fields
from typing import Callable

from conntrack import Proto
from sim.judge import Move, judge
from sim.results import ConnInfo, ModeRun, Report

from ..netlab import Lab, LabError
from ..topology import Topology, TopologyError, _allowed, build, vm_addresses
from .attach import DRIVERS, ModeUnavailable
from .logs import observations
from .netns import GRACE, READY_TIMEOUT, SETTLE, EndpointProc, _router_packets, _settle, _start
from .guest_vm import GuestVm
from .qemu import Guest, GuestSpec, Migration, QemuError, qemu_missing

LEAD = 1.0  # seconds of pre-copy (guest running) before a move's pause (less than the first pass takes)
TAPS = ("vm0", "vm1")  # the guest's TAPs on every host (a migration's two QEMUs hold one each)
#: The host side of the guest's link has one MAC on every host, as the netns backend's veth carries its
#: MAC when it moves: a NAT or host-only gateway with another MAC on the new host is one the guest's ARP
#: cache does not know, and it sends to the old one until that entry expires (tens of seconds).  "fe:"
#: (as libvirt's TAPs) so that a bridge never takes it as its own address.
TAP_MAC = "fe:72:6f:61:6d:00"


@dataclass(frozen=True, slots=True)
class QemuRun(ModeRun):
    """A mode's run with QEMU's own figures for each move."""

    moves: tuple[Migration, ...] = ()
    boot_s: float = 0.0


class GuestTopology(Topology):
    """The lab with a real guest: its link is a TAP on its host, plugged by a mode's driver as the netns veth is.

    Every host has two TAPs, ``vm0`` and ``vm1`` (:data:`TAPS`), made before the guest
    boots: a migration's destination QEMU takes the one the source does not hold, so a
    move to another host and a move within one host (a local migration) are the same.
    The guest itself is re-addressed over its control port.
    """

    link: str = TAPS[0]  # the TAP the running QEMU holds, on ``vm_host``
    vm_endpoint: GuestVm | None = None

    def next_link(self) -> str:
        return TAPS[1] if self.link == TAPS[0] else TAPS[0]

    def vm_link_down(self) -> None:
        if self.vm_host is not None:
            ns = self.host_ns(self.vm_host)
            self.lab.ipr(ns).link("set", index=self.lab.index(ns, self.link), state="down")

    def move_vm(self, to: str, link: str | None = None) -> None:
        """To ``link`` on host ``to``; the old TAP leaves its bridge and addresses (as a moved veth does)."""
        if self.vm_host is None:
            raise TopologyError("the VM is not attached anywhere")
        ns = self.host_ns(self.vm_host)
        self.lab.ipr(ns).link("set", index=self.lab.index(ns, self.link), master=0, state="down")
        self.lab.flush_addr(ns, self.link)
        self.vm_host, self.link = to, link or self.next_link()

    def plug_bridge(self, bridge: str = "br0") -> None:
        ns = self.host_ns(self.vm_host)
        self.lab.ipr(ns).link("set", index=self.lab.index(ns, self.link), master=self.lab.index(ns, bridge))
        self.lab.up(ns, self.link)

    def plug_routed(self, cidr: str) -> None:
        ns = self.host_ns(self.vm_host)
        self.lab.flush_addr(ns, self.link)
        self.lab.addr(ns, self.link, cidr)
        self.lab.up(ns, self.link)

    def vm_readdress(self, cidr: str | None, gateway: str | None) -> None:
        """Re-address the guest's eth0 (held while it is paused; waited for at first)."""
        self.vm_endpoint.readdress(cidr, gateway)


def guest_topology(lab: Lab, sc) -> GuestTopology:
    for what, a in vm_addresses(sc.vm):
        _allowed(ipaddress.IPv4Address(a), what)
    topo = build(lab, sc.sites, sc.hosts, sc.peers)
    g = GuestTopology(**{f.name: getattr(topo, f.name) for f in fields(topo)})
    for h in g.hosts.values():
        for tap in TAPS:
            lab.tap(h.ns, tap)
            lab.ipr(h.ns).link("set", index=lab.index(h.ns, tap), state="down", address=TAP_MAC)
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
    warnings = []
    if any(s.loss for s in sc.sites) or any(p.loss for p in sc.peers):
        warnings.append("link loss in the scenario is not reproduced by the qemu backend (links are lossless)")
    wall0 = time.monotonic()
    try:
        with Lab("roam") as lab:
            try:
                topo = guest_topology(lab, sc)
            except TopologyError as exc:
                return ModeRun(mode, {}, f"cannot build the lab for this scenario: {exc}")
            guest = Guest(lab, GuestSpec(image, sc.vm.mac))
            try:
                boot_s = guest.boot(topo.host_ns(sc.vm.host), topo.link)
                vm = topo.vm_endpoint = GuestVm(guest)
                guest.send("exec roam-ep serve")
                guest.wait_for(lambda e: e.get("ev") == "ready", 20, "the guest's executor")
                try:
                    drv = DRIVERS[mode](sc, topo)
                except ModeUnavailable as exc:
                    return ModeRun(mode, {}, f"{mode} is not available in the qemu backend: {exc}")
                drv.logdir = logdir
                try:
                    return _play(sc, mode, topo, drv, guest, vm, progress, logdir, warnings, wall0, boot_s)
                finally:
                    drv.close()
            finally:
                guest.close()
    except (LabError, OSError, ModeUnavailable, QemuError) as exc:
        return ModeRun(mode, {}, f"the qemu lab failed: {exc}")
    except Exception as exc:  # noqa: BLE001 - any failure is this mode's error, never the other modes' end
        return ModeRun(mode, {}, f"the qemu backend failed: {type(exc).__name__}: {exc}")


def _play(sc, mode, topo, drv, guest, vm, progress, logdir, warnings, wall0, boot_s):
    lab = topo.lab
    drv.attach(sc.vm.host, first=True)
    longest = max([sc.tcp_timeout, sc.udp_timeout] + [sc.timeout_of(c) for c in sc.connections])
    horizon = max(sc.duration, _settle(sc) or 0.0) + longest + GRACE
    provisional = time.monotonic()
    procs: dict[str, object] = {"vm": vm}
    peers = {}
    for p in sc.peers:
        peers[f"peer:{p.name}"] = EndpointProc(lab, topo.peers[p.name].ns, f"peer:{p.name}", provisional,
                                               horizon + 60 + LEAD * len(sc.migrations), logdir)
    procs.update(peers)
    ready: set[str] = set()
    deadline = time.monotonic() + READY_TIMEOUT
    while len(ready) < len(peers):
        for role, p in peers.items():
            ready |= {role for ev in p.pump() if ev["ev"] == "ready"}
            if p.p.poll() is not None:
                return ModeRun(mode, {}, f"endpoint {role} exited at start (exit {p.p.returncode})")
        if time.monotonic() > deadline:
            return ModeRun(mode, {}, f"endpoints {', '.join(sorted(set(peers) - ready))} not up after "
                           f"{READY_TIMEOUT:.0f} s")
        time.sleep(0.02)
    for p in peers.values():
        p.events.clear()
    t0 = time.monotonic() + max(SETTLE, LEAD - min((m.at for m in sc.migrations), default=LEAD))
    for p in procs.values():
        p.send(op="clock", t0=t0)
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
    mover = _Mover(sc, topo, drv, guest, vm, t0)
    mover.start()
    plan = sorted((c.start, i) for i, c in enumerate(sc.connections))
    status: dict[int, str] = {}
    events: list[dict] = []
    n = len(sc.connections)
    pi = 0
    error = None
    while True:
        now = time.monotonic() - t0
        while pi < len(plan) and plan[pi][0] <= now:
            _start(sc, drv, procs, plan[pi][1])
            pi += 1
        vm.run_timers()
        for p in procs.values():
            for ev in p.pump():
                events.append(ev)
                if ev.get("idx") is not None and ev["ev"] in ("broken", "done"):
                    status.setdefault(ev["idx"], "broken" if ev["ev"] == "broken" else "done")
                    if ev["ev"] == "broken":
                        status[ev["idx"]] = "broken"
        if progress:
            progress(min(1.0, max(0.0, now / horizon)))
        if mover.error:
            error = f"migration failed: {mover.error}"
            break
        moved = not mover.is_alive()
        if now >= horizon + (0 if moved else 30) or (moved and pi >= len(plan) and len(status) >= n):
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
    for p in procs.values():
        p.send(op="quit")
    for p in peers.values():
        try:
            p.p.wait(timeout=5)
        except Exception:  # noqa: BLE001 - lab.close() stops it
            pass
        events += p.pump()
        p.errfile.close()
    events += vm.pump()
    mover.join(timeout=1)
    if logdir:
        with open(os.path.join(logdir, "events.jsonl"), "w") as f:
            for e in sorted(events, key=lambda e: e["t"]):
                f.write(json.dumps(e) + "\n")
    if error:
        return ModeRun(mode, {}, error)
    if len(mover.done) != len(sc.migrations):
        return ModeRun(mode, {}, f"only {len(mover.done)} of {len(sc.migrations)} moves happened in time")
    moves = tuple(Move(m.paused - t0, m.resumed - m.paused) for m in mover.done)
    kept = [e for e in events if e["t"] < stop_at]
    results = {}
    for idx, c in enumerate(sc.connections):
        client = "vm" if c.direction == "outbound" else f"peer:{c.peer}"
        results[c.id] = judge(c.id, observations(kept, idx, client, f"peer:{c.peer}"), moves, c.interval)
    warnings += getattr(drv, "warnings", []) + mover.warnings
    for m, mig in zip(sc.migrations, mover.done):
        late = (mig.resumed - mig.paused) - m.downtime
        if late > 0.25:
            warnings.append(f"the move at {m.at:g} s paused the guest {late * 1000:.0f} ms longer than its "
                            f"{m.downtime * 1000:.0f} ms downtime (the copy or the destination's set-up took longer)")
    return QemuRun(mode, results, None, _router_packets(topo), len(events), {}, time.monotonic() - wall0,
                   tuple(warnings), tuple(mover.done), boot_s)


def run_qemu(sc, modes: tuple[str, ...] | None = None, progress=None, *, parallel: bool = False,
             logdir: str | None = None) -> Report:
    """Every mode of the scenario (or ``modes``) with a real guest; the same Report as ``sim.run.replay``.

    ``parallel``: the modes at once, each in its own lab with its own guest (each guest
    takes about a core under TCG: at most as many at once as the machine has cores).
    """
    from .guest import GuestError, build

    modes = tuple(modes or sc.modes)
    runs: dict[str, ModeRun] = {}
    try:
        image = build()
    except GuestError as exc:
        image = None
        for m in modes:
            runs[m] = ModeRun(m, {}, f"the guest image cannot be built: {exc}")
    done = {m: 0.0 for m in modes}
    lock = threading.Lock()
    slots = threading.Semaphore(max(1, os.cpu_count() or 1) if parallel else 1)

    def report(mode: str, frac: float) -> None:
        if not progress:
            return
        if not parallel:
            progress(mode, frac)
            return
        with lock:
            done[mode] = frac
            overall = sum(done.values())
            i = min(int(overall), len(modes) - 1)
            progress(modes[i], overall - i)

    def one(mode: str) -> None:
        with slots:
            try:
                runs[mode] = run_mode_qemu(sc, mode, image, lambda f: report(mode, f),
                                           os.path.join(logdir, mode) if logdir else None)
            except Exception as exc:  # noqa: BLE001 - a mode's failure is its error
                runs[mode] = ModeRun(mode, {}, f"the qemu backend failed: {type(exc).__name__}: {exc}")
        report(mode, 1.0)

    if image is not None:
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
    return Report(sc.name, conns, migs, tuple(runs[m] for m in modes), sc.duration, backend="qemu")


def moves_text(rep: Report) -> str:
    """QEMU's own figures per mode and move, for the table's foot."""
    lines = []
    for r in rep.runs:
        for i, m in enumerate(getattr(r, "moves", ()), 1):
            lines.append(f"  {r.mode:<10} move {i}: QEMU total {m.total_ms:.0f} ms, "
                         f"QEMU downtime {m.downtime_ms:.0f} ms, guest paused {(m.resumed - m.paused) * 1000:.0f} ms, "
                         f"{m.ram_bytes / 2**20:.1f} MiB sent")
    return ("QEMU live migrations:\n" + "\n".join(lines) + "\n") if lines else ""


def moves_dict(rep: Report) -> dict:
    """QEMU's own figures per mode and move, for the JSON report."""
    return {r.mode: [{"total_ms": m.total_ms, "qemu_downtime_ms": m.downtime_ms, "setup_ms": m.setup_ms,
                      "paused_ms": round((m.resumed - m.paused) * 1000, 1), "ram_bytes": m.ram_bytes}
                     for m in getattr(r, "moves", ())] for r in rep.runs}
