"""What the lab backends share to play a scenario: endpoints, servers, the driver loop's pump, the report.

The netns backend (:mod:`tools.lab.netns`: a namespace plays the VM) and the qemu backend
(:mod:`tools.lab.qemu_play`: a real guest) differ only in the VM and in how it moves; the
peers' endpoint programs, the servers, the one client schedule's starts, the events'
collection, the components' logs, the one judge (:func:`tools.lab.logs.verdicts`) and
the Report of every mode are this module's, once.
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


def last_settle(sc) -> float | None:
    """When the last migration's downtime ends (None without migrations)."""
    return settle(Move(m.at, m.downtime) for m in sc.migrations)


def horizon(sc) -> float:
    """Scenario seconds the driver waits at most: clients go on past the duration until answered after the
    last move (or they give up)."""
    longest = max([sc.tcp_timeout, sc.udp_timeout] + [sc.timeout_of(c) for c in sc.connections])
    return max(sc.duration, last_settle(sc) or 0.0) + longest + GRACE


def start_peers(lab, topo, sc, limit: float, logdir: str | None) -> dict[str, EndpointProc]:
    return {f"peer:{p.name}": EndpointProc(lab, topo.peers[p.name].ns, f"peer:{p.name}", time.monotonic(), limit,
                                           logdir) for p in sc.peers}


def wait_ready(procs: dict) -> str | None:
    """Wait for every endpoint's ``ready`` line; the error text if one exits or is late (None: all up)."""
    ready: set[str] = set()
    deadline = time.monotonic() + READY_TIMEOUT
    while len(ready) < len(procs):
        for role, p in procs.items():
            ready |= {role for ev in p.pump() if ev["ev"] == "ready"}
            if p.p.poll() is not None:
                return f"endpoint {role} exited at start (exit {p.p.returncode})"
        if time.monotonic() > deadline:
            return f"endpoints {', '.join(sorted(set(procs) - ready))} not up after {READY_TIMEOUT:.0f} s"
        time.sleep(0.02)
    for p in procs.values():
        p.events.clear()
    return None


def open_servers(sc, procs: dict) -> str | None:
    """One server per side, protocol and port, each listening before this returns (a busy machine runs an
    endpoint's commands late, and a client's first packet must not find its server not yet there: the
    simulator's servers listen from time zero).  The error text if one never says so."""
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
    waiting = {side: sum(1 for s, _, _ in opened if s == side) for side, _, _ in opened
               if isinstance(procs[side], EndpointProc)}  # the qemu guest's executor opens at once
    deadline = time.monotonic() + READY_TIMEOUT
    while any(waiting.values()):
        for side in waiting:
            waiting[side] -= sum(1 for ev in procs[side].pump() if ev["ev"] == "listening")
        if time.monotonic() > deadline:
            return f"servers of {', '.join(s for s, n in waiting.items() if n > 0)} not listening after " \
                   f"{READY_TIMEOUT:.0f} s"
        time.sleep(0.005)
    return None


def start_connection(sc, drv, procs: dict, idx: int) -> None:
    """Connection ``idx``'s client starts (the VM's, or the peer's to what the mode publishes)."""
    c = sc.connections[idx]
    common = dict(idx=idx, start=c.start, interval=c.interval, request=c.request, response=c.response, timeout=sc.timeout_of(c),
                  end=sc.duration, settle=last_settle(sc))
    op = "tcp_connect" if c.protocol == Proto.TCP else "udp_connect"
    if c.direction == "outbound":
        procs["vm"].send(op=op, dst=sc.peer(c.peer).address, port=c.port, src="", sport=VM_EPHEMERAL + idx % 20000,
                         **common)
    else:
        addr, port = drv.published(c.protocol, c.port)
        procs[f"peer:{c.peer}"].send(op=op, dst=addr or "0.0.0.0", port=port, src=sc.peer(c.peer).address,
                                     sport=PEER_EPHEMERAL + idx % 15000, **common)


class Collector:
    """Every endpoint's events, and which connections have ended (done or broken)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.events: list[dict] = []
        self.status: dict[int, str] = {}
        self.marks: set[tuple[str, str, float]] = set()  # (endpoint, "barrier" | "synced", move time)

    def pump(self, procs) -> None:
        for p in procs:
            for ev in p.pump():
                if ev["ev"] in ("barrier", "synced"):  # the driver's, not the judge's
                    self.marks.add((ev.get("who"), ev["ev"], ev["at"]))
                    continue
                self.events.append(ev)
                if ev.get("idx") is not None and ev["ev"] in ("broken", "done"):
                    if ev["ev"] == "broken" or ev["idx"] not in self.status:
                        self.status[ev["idx"]] = ev["ev"]

    def all_ended(self) -> bool:
        return len(self.status) >= self.n

    def wait_mark(self, procs: list, mark: str, at: float, timeout: float = 2.0) -> bool:
        """Wait (bounded) for every endpoint of ``procs`` to give its ``mark`` of the move at ``at``; False if
        one never did."""
        end = time.monotonic() + timeout
        while not all((p.role, mark, at) in self.marks for p in procs):
            if time.monotonic() > end or any(p.p.poll() is not None for p in procs):
                return False
            self.pump(procs)
            if not all((p.role, mark, at) in self.marks for p in procs):
                time.sleep(0.0005)
        return True


def finish(procs: dict, peers: dict, col: Collector, logdir: str | None, extra=None) -> None:
    """Stop the endpoints (``peers``: those that are processes to wait for), collect their last events (and
    ``extra()``'s, once they stopped), keep them all in ``events.jsonl``."""
    for p in procs.values():
        p.send(op="quit")
    for p in peers.values():
        try:
            p.p.wait(timeout=5)
        except Exception:  # noqa: BLE001 - lab.close() stops it
            pass
        col.events += p.pump()
        p.errfile.close()
    if extra is not None:
        col.events += extra()
    if logdir:
        os.makedirs(logdir, exist_ok=True)
        with open(os.path.join(logdir, "events.jsonl"), "w") as f:
            for e in sorted(col.events, key=lambda e: e["t"]):
                f.write(json.dumps(e) + "\n")


def router_packets(topo) -> int:
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


def warn_if_redrawn(topo, draws: dict[str, float], warnings: list[str]) -> None:
    """A warning if the kernel drew the routers' reachable times again since time zero's ``draws`` (it does
    every 300 s, for every interface at once): the simulator replays those of time zero."""
    if topo.neigh_draws() != draws:
        warnings.append("the kernel drew the routers' reachable times again during the run (it does every "
                        "300 s): a verdict hanging on them may differ from the simulator's")


def loss_warning(sc, backend: str) -> list[str]:
    if any(s.loss for s in sc.sites) or any(p.loss for p in sc.peers):
        return [f"link loss in the scenario is not reproduced by the {backend} backend (links are lossless)"]
    return []


def run_modes(sc, modes: tuple[str, ...], one_mode: Callable[[str, Callable[[float], None]], ModeRun], progress,
              parallel: bool, backend: str, slots: int | None = None, failed: ModeRun | None = None) -> Report:
    """Every mode by ``one_mode(mode, progress)``, one after the other or (``parallel``) at most ``slots`` at once;
    a mode's exception is its error.  ``progress(mode, fraction)`` in the caller's terms.  The Report."""
    runs: dict[str, ModeRun] = {}
    done = {m: 0.0 for m in modes}
    lock = threading.Lock()
    gate = threading.Semaphore(slots or len(modes) or 1) if parallel else threading.Semaphore(1)

    def report(mode: str, frac: float) -> None:
        if not progress:
            return
        if not parallel:
            progress(mode, frac)
            return
        with lock:  # all modes at once: the overall fraction as (mode index + fraction)
            done[mode] = frac
            overall = sum(done.values())
            i = min(int(overall), len(modes) - 1)
            progress(modes[i], overall - i)

    def one(mode: str) -> None:
        with gate:
            try:
                runs[mode] = one_mode(mode, lambda frac: report(mode, frac))
            except Exception as exc:  # noqa: BLE001 - in a thread: a mode's failure is its error
                runs[mode] = ModeRun(mode, {}, f"the {backend} backend failed: {type(exc).__name__}: {exc}")
        report(mode, 1.0)

    if failed is not None:
        runs = {m: ModeRun(m, {}, failed.error) for m in modes}
    elif parallel:
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
    return Report(sc.name, conns, migs, tuple(runs[m] for m in modes), sc.duration, backend=backend)
