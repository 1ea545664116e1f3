"""The lab endpoints' logs as the one judge's observations (``sim.judge``): the lab's verdicts.

Nothing but what the endpoints wrote counts, read as the simulator's sockets are:

* the client's ``established`` and ``answer`` lines are its progress;
* a ``broken`` line is a reset when its error is one (ECONNRESET, ECONNREFUSED), else
  the endpoint giving up (ETIMEDOUT, EOF, EPIPE, EINVAL...);
* an unreachable error (EHOSTUNREACH... from an ICMP error, as a ``broken`` or a
  passing ``error`` line), or a socket whose own address has gone, says unreachable;
* the peer's ``saw`` lines (and, for an inbound connection, what its client dialled)
  are where the peer saw the connection come from.
"""
from __future__ import annotations

from sim.judge import Move, Observation, Seen, judge
from sim.results import ConnResult

from .endpoint import RESET_ERRORS, UNREACHABLE_ERRORS


def observations(events: list[dict], idx: int, client: str, peer: str) -> list[Observation]:
    """Connection ``idx``'s observations from every endpoint's events (``who`` is the endpoint's role)."""
    out = []
    for e in events:
        if e.get("idx") != idx:
            continue
        t, ev, who = e["t"], e["ev"], e["who"]
        by = "vm" if who == "vm" else "peer"
        if who == client and ev == "established":
            out.append(Observation(t, Seen.ESTABLISHED, by))
        elif who == client and ev == "answer":
            out.append(Observation(t, Seen.ANSWERED, by))
        if ev == "broken":
            out.append(Observation(t, Seen.RESET if e["err"] in RESET_ERRORS else Seen.GAVE_UP, by))
        if ev in ("broken", "error") and (e["err"] in UNREACHABLE_ERRORS or e.get("address_gone")):
            out.append(Observation(t, Seen.UNREACHABLE, by))
        if who == peer and ev == "saw":
            out.append(Observation(t, Seen.PEER_SAW, "peer", (e["address"], e["port"])))
        elif who == peer and ev == "established":  # the peer is the client: it sees the address it dialled
            out.append(Observation(t, Seen.PEER_SAW, "peer", tuple(e["remote"])))
    return out


def verdicts(sc, events: list[dict]) -> dict[str, ConnResult]:
    """Every connection's verdict from what the endpoints logged (and nothing else)."""
    moves = tuple(Move(m.at, m.downtime) for m in sc.migrations)
    results = {}
    for idx, c in enumerate(sc.connections):
        client = "vm" if c.direction == "outbound" else f"peer:{c.peer}"
        results[c.id] = judge(c.id, observations(events, idx, client, f"peer:{c.peer}"), moves, c.interval)
    return results
