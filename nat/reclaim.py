"""Early drop under port pressure (as Linux's ``early_drop``): a full port range frees the
ports of the oldest flows that never got a reply, so a flood of unanswered UDP does not
lock new legitimate flows out for a whole UDP lifetime (RFC 4787 REQ-5 timers)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from conntrack.events import Why
from conntrack.table import Conn

from .events import Reclaimed

if TYPE_CHECKING:
    from .engine import NatEngine

_RECLAIM_BATCH = 64  # unreplied flows ended at least per full-pool round (fewer scans of the table)
_RECLAIM_QUIET = 1.0  # seconds without a scan after one found nothing to reclaim


def reclaim(eng: "NatEngine", proto: int, rng, now: float, ext: bytes) -> bool:
    """A full port range (``rng``, a :class:`~nat.ports.PortRange`): end the oldest VM flows
    of ``proto`` that never got a reply, holding ports of it (at least a batch, then until
    a port is free); True if one is.  The host's own flows and the other family's
    (another ``ext``) are left alone."""
    if now < eng._reclaim_quiet:
        return False
    victims: list[Conn] = []
    for c in eng.table:
        b = c.extra
        if b is None or c.proto != proto or c.seen_reply:
            continue
        for e, _, _ in b.attached:
            m = e.mapping
            if not m.static and m.internal_ip != ext and m.external_ip == ext and m.external_port in rng:
                victims.append(c)
                break
    victims.sort(key=lambda c: c.deadline)
    n = 0
    for c in victims:
        if n >= _RECLAIM_BATCH and not rng.full():
            break
        eng.table.remove(c, now, Why.EARLY_DROP)
        eng._drain()
        n += 1
    if not n:
        eng._reclaim_quiet = now + _RECLAIM_QUIET
        return False
    eng.counters["reclaimed_unreplied"] += n
    eng.counters["reclaim_rounds"] += 1
    eng._events.append(Reclaimed(proto, n, eng.counters["reclaim_rounds"]))
    return not rng.full()

