"""The lab endpoints' logs as the one judge's observations (``sim.judge``): the lab's verdicts.

Nothing but what the endpoints wrote counts, read as the simulator's sockets are:

* the client's ``established`` and ``answer`` lines are its progress;
* a ``broken`` line is a reset when its error is one (ECONNRESET, ECONNREFUSED), else
  the endpoint giving up (ETIMEDOUT, EOF, EPIPE, EINVAL...);
* an unreachable error (EHOSTUNREACH... from an ICMP error, as a ``broken`` or a
  passing ``error`` line), or a socket whose own address has gone, says unreachable;
* the peer's ``saw`` lines (and, for an inbound connection, what its client dialled)
  are where the peer saw the connection come from;
* a component's own drop log (``roam nat --drop-log``), each drop mapped to its
  connection by the peer's address and port: a drop for want of a mapping is the
  judge's ``Seen.NO_MAPPING``, as the simulator's NAT reports it (other drops are
  counted only, as in the simulator).
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

from sim.judge import Move, Observation, Seen, judge
from sim.results import ConnResult

from .endpoint import RESET_ERRORS, UNREACHABLE_ERRORS
from .play import PEER_EPHEMERAL, VM_EPHEMERAL

#: The components' drop reasons the judge reads (the simulator's ``REPORTED_LOSSES`` of a NAT).
_DROP_SEEN: dict[str | None, Seen] = {"no_mapping": Seen.NO_MAPPING}


class Drops(NamedTuple):
    """What the mode's components dropped: each logged drop (``t`` in scenario seconds) and the counters."""

    events: list
    counters: dict


def collect_drops(drv, t0: float) -> Drops:
    """Stop the driver's components and take their drops, on the scenario's clock."""
    events, counters = drv.drops()
    return Drops([dict(e, t=e["t"] - t0) for e in events], counters)


def drop_connection(sc, drop: dict) -> int | None:
    """The connection a drop belongs to: the peer's address and port on one side, the VM's client port
    (outbound) when several connections share the peer's."""
    found = []
    for idx, c in enumerate(sc.connections):
        if int(c.protocol) != drop["proto"]:
            continue
        addr = sc.peer(c.peer).address
        pport = c.port if c.direction == "outbound" else PEER_EPHEMERAL + idx % 15000
        for a, p, other in ((drop["src"], drop["sport"], drop["dport"]), (drop["dst"], drop["dport"], drop["sport"])):
            if a == addr and p == pport:
                found.append((idx, other == VM_EPHEMERAL + idx % 20000))
    exact = [i for i, hit in found if hit]
    if exact:
        return exact[0]
    return found[0][0] if len({i for i, _ in found}) == 1 else None


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


def verdicts(sc, events: list[dict], moves: tuple[Move, ...] | None = None,
             drops: Iterable[dict] = ()) -> dict[str, ConnResult]:
    """Every connection's verdict from what the endpoints logged and the components dropped (nothing else).

    ``moves``: each move as it really ran (the qemu backend: from the guest's pause to its
    resume); the scenario's by default.
    """
    if moves is None:
        moves = tuple(Move(m.at, m.downtime) for m in sc.migrations)
    lost: dict[int, list[Observation]] = {}
    for d in drops:
        seen = _DROP_SEEN.get(d.get("reason"))
        if seen is None:
            continue
        idx = drop_connection(sc, d)
        if idx is not None:
            lost.setdefault(idx, []).append(Observation(d["t"], seen, "vm"))
    results = {}
    for idx, c in enumerate(sc.connections):
        client = "vm" if c.direction == "outbound" else f"peer:{c.peer}"
        obs = observations(events, idx, client, f"peer:{c.peer}") + lost.get(idx, [])
        results[c.id] = judge(c.id, obs, moves, c.interval)
    return results
