"""The VM's endpoint when the VM is a real guest: the one client schedule here, the sockets in the guest.

The guest runs no Python and there is ONE client schedule (:mod:`sim.schedule`), so
:class:`GuestVm` plays, for the driver loop of :mod:`tools.lab.qemu_play`, what a
namespace's endpoint program (:mod:`tools.lab.endpoint`) plays for the netns backend:
same commands in (``send(op=...)``), same events out (:meth:`GuestVm.pump`).  The
clients' schedules run here; the guest's ``roam-ep serve`` (``guest_endpoint.c``) opens,
sends, receives and reports, over the virtio-serial control port, and each report is
stamped with the host's clock on arrival (the guest's clock stops while it is paused).

While the guest is paused (:meth:`GuestVm.hold` .. :meth:`GuestVm.release`) its clients'
timers wait, as a frozen process's would, and commands for it are held: the control
port's host end changes with the migration.
"""
from __future__ import annotations

import heapq
import threading
import time
from typing import Callable

from sim.schedule import Schedule, Step, Transport

from .qemu import Guest, QemuError

_TCP_HEADER, _UDP_HEADER = 7, 5  # tools.lab.endpoint's _REQ and _DGRAM sizes


class _Client:
    """One of the guest's clients: its schedule here, its socket in the guest."""

    def __init__(self, c: dict, started: float) -> None:
        self.idx, self.udp = c["idx"], c["op"] == "udp_connect"
        self.interval, self.timeout = c["interval"], c["timeout"]
        self.request = max(c["request"], _UDP_HEADER if self.udp else _TCP_HEADER)
        self.response = c["response"]
        self.schedule = Schedule(self.udp, self.interval, self.timeout, c["end"], c.get("settle"))
        self.state = "up" if self.udp else "connecting"
        self.started, self.got, self.sent = started, 0, 0


class GuestVm:
    """The VM's endpoint for the driver loop (what :class:`tools.lab.netns.EndpointProc` is for a namespace).

    Takes the same commands (``send(op=...)``) and yields the same events (:meth:`pump`),
    but runs the clients' schedules here and has the guest's executor do the sockets.
    """

    role = "vm"

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.paused = False
        self.held: list[str] = []  # command lines for the guest while it is paused
        self.deferred: list[dict] = []  # connections to start once it resumes
        self.clients: dict[int | None, _Client] = {}  # looked up by an event's idx, maybe absent
        self.timers: list = []
        self.seq = 0
        self.seen = 0  # guest events consumed
        self.out: list[dict] = []

    # -- to the guest ---------------------------------------------------------------
    def _line(self, line: str) -> None:
        with self.lock:
            if self.paused:
                self.held.append(line)
                return
            self._send(line)

    def _send(self, line: str) -> None:
        try:
            self.guest.send(line)
        except (OSError, QemuError):
            pass  # QEMU is gone: the driver loop sees it and ends the mode with an error

    def hold(self) -> None:
        """The guest is about to pause: hold its commands (its control port's host end is about to change)."""
        with self.lock:
            self.paused = True

    def release(self) -> None:
        """The guest runs again (on the destination): the held commands go, its timers run."""
        with self.lock:
            self.paused = False
            for line in self.held:
                self._send(line)
            self.held.clear()

    def readdress(self, cidr: str | None, gateway: str | None, wait: float = 20.0) -> None:
        after = len(self.guest.snapshot())
        self._line(f"A {cidr or '-'} {gateway or '-'}")
        if not self.paused:  # at first: the scenario starts on an addressed guest
            self._wait_addressed(after, wait)

    def _wait_addressed(self, after: int, wait: float) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if any(e.get("ev") == "addressed" for e in self.guest.snapshot()[after:]):
                return
            time.sleep(0.02)
        raise QemuError("the guest did not re-address eth0")

    # -- the driver's commands (tools.lab.netns's vocabulary) ------------------------
    def send(self, **c) -> None:
        op = c["op"]
        if op == "clock":
            self.t0 = c["t0"]
        elif op == "tcp_listen":
            self._line(f"L T {c['port']} {int(c['timeout'] * 1000)}")
        elif op == "udp_listen":
            self._line(f"L U {c['port']} {int(bool(c.get('session')))}")
        elif op in ("tcp_connect", "udp_connect"):
            with self.lock:
                if self.paused:  # a frozen process reads its commands when it runs again
                    self.deferred.append(c)
                    return
            self._connect(c)
        elif op == "quit":
            self._line("Q")

    def _connect(self, c: dict) -> None:
        now = self.now()
        cl = _Client(c, now)
        self.clients[cl.idx] = cl
        self._emit(now, ev="start", idx=cl.idx, side="client")
        kind = "U" if cl.udp else "T"
        tail = "" if cl.udp else f" {int(cl.timeout * 1000)}"
        self._line(f"C {kind} {cl.idx} {c['dst']} {c['port']} {c.get('sport', 0)}{tail}")
        if not cl.udp:  # connect() is bounded by the timeout too (as tools.lab.endpoint bounds it)
            self._at(now + cl.timeout + 0.05, lambda: self._connect_deadline(cl))
        self._tick(cl)

    def _connect_deadline(self, cl: _Client) -> None:
        if cl.state == "connecting":
            cl.state = "broken"
            self._line(f"B {cl.idx} ETIMEDOUT connect")

    def _tick(self, cl: _Client) -> None:
        now = self.now()
        transport = Transport.BROKEN if cl.state == "broken" else \
            Transport.UP if cl.state == "up" else Transport.CONNECTING
        step = cl.schedule.tick(now, transport)
        if step == Step.DONE:
            self._emit(now, ev="done", idx=cl.idx, side="client")
            return
        if step == Step.STOP:
            return
        if step == Step.GIVE_UP:  # the guest closes it and says whether its address is gone
            cl.state = "broken"
            self._line(f"B {cl.idx} ETIMEDOUT no_answer")
            return
        if step == Step.SEND:
            mark = "R" if not cl.udp else ("H" if cl.sent == 0 else "D")
            cl.sent += 1
            self._line(f"S {cl.idx} {cl.request} {cl.response} {mark}")
        self._at(now + cl.interval, lambda: self._tick(cl))

    def _at(self, when: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, fn))

    # -- the loop's side -------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def next_timer(self) -> float | None:
        return self.timers[0][0] if self.timers and not self.paused else None

    def run_timers(self) -> None:
        """Due timers and deferred starts, unless the guest is paused (its clock stands still for its programs)."""
        if self.paused:
            return
        with self.lock:
            deferred, self.deferred = self.deferred, []
        for c in deferred:
            self._connect(c)
        while self.timers and self.timers[0][0] <= self.now() and not self.paused:
            _, _, fn = heapq.heappop(self.timers)
            fn()

    def _emit(self, t: float, **ev) -> None:
        ev["t"], ev["who"] = round(t, 6), "vm"
        self.out.append(ev)

    def pump(self) -> list[dict]:
        """The guest's reports since the last call, as tools.lab.endpoint's events (host clock)."""
        with self.guest.lock:
            new = self.guest.events[self.seen:]
            self.seen = len(self.guest.events)
        for e in new:
            ev = e.get("ev")
            if ev is None or ev in ("ready", "listening", "addressed"):
                continue
            t = e["ht"] - self.t0
            cl = self.clients.get(e.get("idx")) if e.get("side") == "client" or ev == "rx" else None
            if ev == "rx":
                if cl is None or cl.state != "up":
                    continue
                if cl.udp:
                    cl.schedule.answered(t)
                    self._emit(t, ev="answer", idx=cl.idx, side="client", n=e["n"])
                    continue
                cl.got += e["n"]
                if cl.schedule.awaiting and cl.got >= cl.response:
                    cl.got -= cl.response
                    cl.schedule.answered(t)
                    self._emit(t, ev="answer", idx=cl.idx, side="client")
                continue
            if cl is not None and ev == "established" and not cl.udp:
                cl.state = "up"
                cl.schedule.answered(t)
            elif cl is not None and ev == "broken":
                cl.state = "broken"
            self._emit(t, **{k: v for k, v in e.items() if k not in ("t", "ht")})
        out, self.out = self.out, []
        return out
