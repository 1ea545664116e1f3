"""What a replay concludes, per connection and mode: frozen values, IntEnum reasons."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

#: The modes a scenario can compare, in report order.
MODES = ("bridged", "host-only", "nat", "nat+state", "tunnel")


class Outcome(IntEnum):
    """Did a connection survive the moves?  (Not nat's Verdict: that is what a NAT does with a packet.)"""

    SURVIVED = 1
    BROKEN = 2

    @property
    def text(self) -> str:
        return self.name.lower()


class Cause(IntEnum):
    """Why a connection broke, as its endpoints experienced it (not an engine's drop reason)."""

    RESET_BY_PEER = 1  # an acceptable RST arrived
    UNREACHABLE = 2  # timed out; its packets were last lost for want of a route or an address
    NO_INBOUND_MAPPING = 3  # timed out; its packets were last lost at a NAT with no mapping
    TIMED_OUT = 4  # timed out for any other loss (downtime, link loss, a tunnel drop...)

    @property
    def text(self) -> str:
        return self.name.lower().replace("_", " ")


@dataclass(frozen=True, slots=True)
class ConnResult:
    """One connection under one mode."""

    id: str
    outcome: Outcome
    cause: Cause | None
    established: bool
    established_at: float | None
    broken_at: float | None
    interruption_ms: float | None  # longest stall across the migrations (survivors only)
    runs: tuple[tuple[float, float], ...] = ()  # spans of steady progress (for the timeline)
    peer_saw: tuple[tuple[float, str, int], ...] = ()  # (since, address, port) the peer saw, in order
    broken_side: str | None = None  # "vm" or "peer": whose endpoint gave up or was reset

    def as_dict(self) -> dict:
        return {
            "verdict": self.outcome.text,
            "reason": self.cause.text if self.cause is not None else None,
            "interruption_ms": None if self.interruption_ms is None else round(self.interruption_ms, 1),
            "established": self.established,
            "established_at": self.established_at,
            "broken_at": None if self.broken_at is None else round(self.broken_at, 6),
            "broken_side": self.broken_side,
            "peer_saw": [{"since": round(t, 6), "address": a, "port": p} for t, a, p in self.peer_saw],
        }


@dataclass(frozen=True, slots=True)
class ModeRun:
    """One mode's run of a scenario; ``error`` instead of results when it could not run."""

    mode: str
    results: dict[str, ConnResult] = field(default_factory=dict)
    error: str | None = None
    packets: int = 0
    events: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    end: float = 0.0
    warnings: tuple[str, ...] = ()  # e.g. engine exceptions: results stand, but look
    moves: tuple = ()  # the qemu backend: QEMU's own figures per move (tools.lab.qemu.Migration)
    #: each site router's reachable-time draw, as a factor of its base (``sim.linux.NeighParams.drawn``):
    #: what the simulator played, or what a lab backend read from its kernel
    draws: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConnInfo:
    id: str
    protocol: str
    direction: str
    peer: str
    port: int
    start: float


@dataclass(frozen=True, slots=True)
class Report:
    scenario: str
    connections: tuple[ConnInfo, ...]
    migrations: tuple[tuple[float, str, float, str], ...]  # (at, to host, downtime s, to site)
    runs: tuple[ModeRun, ...]
    duration: float
    backend: str = "sim"

    def as_dict(self) -> dict:
        out = []
        for c in self.connections:
            modes = {}
            for r in self.runs:
                if r.error is not None:
                    modes[r.mode] = {"verdict": None, "reason": None, "interruption_ms": None, "error": r.error}
                else:
                    modes[r.mode] = r.results[c.id].as_dict()
            out.append({"id": c.id, "protocol": c.protocol, "direction": c.direction, "peer": c.peer,
                        "port": c.port, "start": c.start, "modes": modes})
        return {
            "scenario": self.scenario,
            "backend": self.backend,
            "duration": self.duration,
            "modes": [r.mode for r in self.runs],
            "migrations": [{"at": at, "to": to, "downtime_ms": round(d * 1000, 3), "site": site}
                           for at, to, d, site in self.migrations],
            "connections": out,
            "runs": {r.mode: {"error": r.error, "packets": r.packets, "events": r.events, "drops": r.drops,
                              "warnings": list(r.warnings)}
                     for r in self.runs},
        }
