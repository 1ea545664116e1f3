"""One scenario connection while a mode runs: the application on top of the sockets.

The client side sends a request every ``interval`` seconds once the previous one
was answered; the server side answers each request.  A client keeps going past
the scenario's ``duration`` until it has had an answer after the last migration's
downtime ended (``settle``), or gives up: a connection "survives" only when packets
showed it working after the last move, never because nothing was tried.  The flow only *observes*
what the sockets report (established, data, reset, gave up) and what the peer saw;
it never decides an outcome itself.
"""
from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from conntrack import Proto

from .results import ConnResult, Reason, Verdict
from .stack import SockState
from .world import Clock, Loss, UNREACHABLE_LOSSES

if TYPE_CHECKING:
    from .scenario import ConnSpec


class Flow:
    __slots__ = ("tag", "spec", "clock", "request", "response", "interval", "end", "timeout", "sock",
                 "established_at", "broken_at", "broken_state", "broken_client", "last_progress", "mark",
                 "interruption", "runs", "slack", "peer_saw", "awaiting", "waiting_since", "udp", "settle")

    def __init__(self, tag: int, spec: "ConnSpec", clock: Clock, end: float, timeout: float,
                 settle: float | None = None) -> None:
        self.tag = tag
        self.settle = settle  # when the last migration's downtime ends (None: no migration)
        self.spec = spec
        self.clock = clock
        self.request = spec.request
        self.response = spec.response
        self.interval = spec.interval
        self.end = end
        self.timeout = timeout
        self.udp = spec.protocol == Proto.UDP
        self.sock = None  # the client socket
        self.established_at: float | None = None
        self.broken_at: float | None = None
        self.broken_state: SockState | None = None
        self.broken_client = True
        self.last_progress: float | None = None
        self.mark: float | None = None  # last progress before a migration began, until the next one
        self.interruption = 0.0
        self.runs: list[list[float]] = []
        self.slack = 1.5 * spec.interval + 0.25
        self.peer_saw: list[tuple[float, bytes, int]] = []
        self.awaiting = False
        self.waiting_since: float | None = None

    # ------------------------------------------------------------ socket callbacks
    def on_established(self, now: float, sock) -> None:
        if self.established_at is None:
            self.established_at = now
            self._progress(now)

    def on_data(self, now: float, sock, n: int) -> None:
        if sock.client:
            self.awaiting = False
            self.waiting_since = None
            if self.udp and self.established_at is None:
                self.established_at = now
            self._progress(now)
        elif not self.udp:
            sock.send(self.response)

    def on_broken(self, now: float, state: SockState, client: bool) -> None:
        if self.broken_at is None:
            self.broken_at = now
            self.broken_state = state
            self.broken_client = client

    def on_peer_saw(self, now: float, src: bytes, sport: int) -> None:
        seen = self.peer_saw
        if not seen or seen[-1][1] != src or seen[-1][2] != sport:
            seen.append((now, src, sport))

    def _progress(self, now: float) -> None:
        if self.mark is not None:
            gap = now - self.mark
            if gap > self.interruption:
                self.interruption = gap
            self.mark = None
        self.last_progress = now
        runs = self.runs
        if runs and now - runs[-1][1] <= self.slack:
            runs[-1][1] = now
        else:
            runs.append([now, now])

    def migration_begins(self) -> None:
        if self.mark is None and self.last_progress is not None and self.broken_at is None:
            self.mark = self.last_progress

    # ------------------------------------------------------------ the client application
    @staticmethod
    def tick(flow: "Flow", _=None) -> None:
        now = flow.clock.now
        if flow.broken_at is not None:
            return
        sock = flow.sock
        if flow.udp:
            if flow.waiting_since is not None and now - flow.waiting_since >= flow.timeout:
                flow.on_broken(now, SockState.TIMED_OUT, True)
                return
            if now >= flow.end and flow.waiting_since is None and flow.proven():
                return
            if flow.waiting_since is None:
                flow.waiting_since = now
            sock.send(flow.request)
        else:
            if not sock.alive:
                return
            if now >= flow.end and not flow.awaiting and flow.proven():
                return
            if sock.state == SockState.ESTABLISHED and not flow.awaiting:
                flow.awaiting = True
                sock.send(flow.request)
        flow.clock.after(flow.interval, Flow.tick, flow)

    def proven(self) -> bool:
        """Has an answer come back since the last migration's downtime ended?"""
        return self.settle is None or (self.last_progress is not None and self.last_progress > self.settle)

    # ------------------------------------------------------------ the verdict
    def result(self, losses: dict[int, Loss]) -> ConnResult:
        """Survived or broken, from what the endpoints saw; the reason from where packets died.

        Survived: established, never broken, and answered after the last move (``proven``).
        A client keeps asking until it is answered or gives up, so an unproven connection
        that did not break is one the run ended on (a horizon too short): broken, timed out.
        """
        reason = None
        if self.broken_at is None and self.established_at is not None and self.proven():
            verdict = Verdict.SURVIVED
        else:
            verdict = Verdict.BROKEN
            if self.broken_state == SockState.RESET:
                reason = Reason.RESET_BY_PEER
            else:
                loss = losses.get(self.tag)
                if loss in UNREACHABLE_LOSSES:
                    reason = Reason.UNREACHABLE
                elif loss == Loss.NO_MAPPING:
                    reason = Reason.NO_INBOUND_MAPPING
                else:
                    reason = Reason.TIMED_OUT
        saw = tuple((t, str(ipaddress.ip_address(a)), p) for t, a, p in self.peer_saw)
        return ConnResult(
            id=self.spec.id, verdict=verdict, reason=reason, established=self.established_at is not None,
            established_at=self.established_at, broken_at=self.broken_at,
            interruption_ms=self.interruption * 1000 if verdict == Verdict.SURVIVED else None,
            runs=tuple((a, b) for a, b in self.runs), peer_saw=saw,
            broken_side=None if self.broken_at is None else ("vm" if self._vm_side() else "peer"),
        )

    def _vm_side(self) -> bool:
        outbound = self.spec.direction == "outbound"
        return self.broken_client == outbound
