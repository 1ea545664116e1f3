"""The one survival judge: what a connection's endpoints observed -> survived or broken, why, and the stall.

Both backends call it and nothing else decides: the simulator with what its sockets
and network saw (``sim.connection``), the namespace lab with what its endpoint programs
logged (``tools.lab.logs``).  A fix to a rule here reaches both, and a test feeds it an
observation script directly.

The rules, in one place:

* survived: the client's connection came up, no endpoint saw it break, and the client
  was answered after the last move's downtime ended.  Clients keep asking past the
  scenario's end until they are, so one that was not is one the run cut short: broken.
* the cause of a break: reset by peer when the first break was a reset; otherwise the
  last loss or error seen for the connection says where its packets died (unreachable,
  no inbound mapping), and plain timed out when nothing says more.
* the interruption (survivors only): the longest stall across the moves, from the last
  answer before a move to the first answer after it.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable

from .results import Cause, ConnResult, Outcome


class Seen(IntEnum):
    """What an observation reports."""

    ESTABLISHED = 1  # the client's connection came up (TCP handshake done; UDP: its first answer)
    ANSWERED = 2  # the client was answered
    RESET = 3  # an endpoint was reset (an acceptable RST; ECONNRESET, ECONNREFUSED): broken
    GAVE_UP = 4  # an endpoint gave up (retransmission or answer timeout, EOF, another error): broken
    UNREACHABLE = 5  # an error or loss saying the destination, or the sender's own address, is unreachable
    NO_MAPPING = 6  # lost at a NAT with no mapping for it (the simulator sees this; an endpoint cannot)
    LOST = 7  # lost for any other reason (downtime, link, a tunnel or NAT drop...)
    PEER_SAW = 8  # the peer saw the connection arrive from ``where`` (address, port)


#: The losses and errors that can explain a timeout, and the cause each gives.
_EXPLAINS = {Seen.UNREACHABLE: Cause.UNREACHABLE, Seen.NO_MAPPING: Cause.NO_INBOUND_MAPPING,
             Seen.LOST: Cause.TIMED_OUT}
_BREAKS = (Seen.RESET, Seen.GAVE_UP)
_PROGRESS = (Seen.ESTABLISHED, Seen.ANSWERED)


@dataclass(frozen=True, slots=True)
class Observation:
    """One thing an endpoint (or the simulated network) saw at time ``t``.

    ``by`` is whose: "vm" or "peer".  ESTABLISHED and ANSWERED are the client's only.
    """

    t: float
    seen: Seen
    by: str = "vm"
    where: tuple[str, int] | None = None  # PEER_SAW: the source address and port


@dataclass(frozen=True, slots=True)
class Move:
    """A migration: the VM leaves at ``at`` and is back ``downtime`` seconds later."""

    at: float
    downtime: float


def settle(moves: Iterable[Move]) -> float | None:
    """When the last move's downtime ends (None without moves): an answer after it proves survival."""
    return max((m.at + m.downtime for m in moves), default=None)


#: A gap between two answers longer than this many intervals is a stall (the timeline draws it).
LATE = 1.25


def timeline_runs(progress: Iterable[float], moves: Iterable[Move], interval: float) -> tuple[tuple[float, float], ...]:
    """Runs of steady progress, split at every stall: a gap of more than ``LATE`` intervals, and
    every gap a move falls in (the one the judge measures, so a drawn gap is the interruption
    it reports)."""
    marks = sorted(m.at for m in moves)
    runs: list[list[float]] = []
    for t in sorted(progress):
        if runs:
            last = runs[-1][1]
            if t - last <= LATE * interval and not any(last < m <= t for m in marks):
                runs[-1][1] = t
                continue
        runs.append([t, t])
    return tuple((a, b) for a, b in runs)


def judge(conn_id: str, observations: Iterable[Observation], moves: Iterable[Move], interval: float) -> ConnResult:
    """The verdict on one connection from its observations (any order) and the scenario's moves."""
    obs = sorted(observations, key=lambda o: o.t)
    moves = tuple(moves)
    progress = [o.t for o in obs if o.seen in _PROGRESS]
    established_at = next((o.t for o in obs if o.seen == Seen.ESTABLISHED), None)
    first_break = next((o for o in obs if o.seen in _BREAKS), None)
    last = settle(moves)
    proven = last is None or any(t > last for t in progress)
    if established_at is not None and first_break is None and proven:
        outcome, cause = Outcome.SURVIVED, None
    else:
        outcome = Outcome.BROKEN
        if first_break is not None and first_break.seen == Seen.RESET:
            cause = Cause.RESET_BY_PEER
        else:
            explained = [o.seen for o in obs if o.seen in _EXPLAINS]
            cause = _EXPLAINS[explained[-1]] if explained else Cause.TIMED_OUT
    interruption = _interruption(progress, moves, None if first_break is None else first_break.t)
    saw: list[tuple[float, str, int]] = []
    for o in obs:
        where = o.where
        if o.seen == Seen.PEER_SAW and where is not None and (not saw or saw[-1][1:] != where):
            saw.append((o.t, where[0], where[1]))
    return ConnResult(
        id=conn_id, outcome=outcome, cause=cause, established=established_at is not None,
        established_at=established_at, broken_at=None if first_break is None else first_break.t,
        interruption_ms=interruption * 1000 if outcome == Outcome.SURVIVED else None,
        runs=timeline_runs(progress, moves, interval), peer_saw=tuple(saw), broken_side=None if first_break is None else first_break.by)


def _interruption(progress: list[float], moves: tuple[Move, ...], broken_at: float | None) -> float:
    """The longest stall across the moves.

    A move marks the last progress before it (if the connection had any and was not yet
    broken); the next progress after it ends that stall.  Moves too close for progress in
    between count as one stall.
    """
    marks = sorted(m.at for m in moves)
    interruption, mark, last = 0.0, None, None
    mi = 0
    for t in progress:
        while mi < len(marks) and marks[mi] <= t:
            if mark is None and last is not None and (broken_at is None or broken_at > marks[mi]):
                mark = last
            mi += 1
        if mark is not None:
            interruption = max(interruption, t - mark)
            mark = None
        last = t
    return interruption
