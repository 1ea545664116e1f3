"""What the tunnel ends tell their drivers: frozen events, and the causes of answers that drop nothing.

Every call on an end returns a :class:`conntrack.answer.Answer`.  A DROP's reason
is a :class:`~tunnel.wire.Drop`; an ACCEPT's or CONSUME's is a :class:`Cause`.
Events ride in the answer of the input (or timer, or call) that caused them.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Hashable

from conntrack.answer import Action, Answer


class Cause(IntEnum):
    """Why an answer drops nothing (the reason of ACCEPT and CONSUME answers)."""

    DATA = 1  # ACCEPT: a frame carried on (sealed for the proxy, opened for the TAP or the LAN, forwarded)
    CONTROL = 2  # CONSUME: a control message for the end itself (ATTACH, its ACK, KEEPALIVE, EPOCH, DETACH)
    TIMER = 3  # CONSUME: expire(now)
    START = 4  # CONSUME: start(now)
    ROAMED = 5  # CONSUME: roamed(now)
    CLOSE = 6  # CONSUME: close(now)
    CHALLENGE = 7  # CONSUME: an authentic ATTACH for no session we know, answered with EPOCH and nothing else:
    #                 a replayed ATTACH draws the same answer as a fresh one, so it proves nothing
    SEGMENT = 8  # CONSUME: a segment held until its message is whole (not authenticated yet: proves nothing)
    MACS = 9  # CONSUME: the host end's served MACs changed by a call (serve/forget), ATTACH in sends if live


def proves_peer(answer: Answer) -> bool:
    """Whether an end's answer to a message proves its sender holds the key *now*: authentic and
    fresh, so a driver may trust the connection it came on.  Any ACCEPT or CONSUME but a CHALLENGE
    or a SEGMENT held for reassembly."""
    return answer.action != Action.DROP and answer.reason != Cause.CHALLENGE and answer.reason != Cause.SEGMENT


class EventKind(IntEnum):
    ATTACHING = 1  # host: ATTACH sent for a new round (start, roam, new session)
    ATTACHED = 2  # host: ATTACH acknowledged
    SESSION_OPENED = 3  # proxy: a new session
    SESSION_CLOSED = 4  # either end: session ended (detail says why)
    ENDPOINT_CHANGED = 5  # proxy: authentic traffic from a new address (roaming)
    MAC_MOVED = 6  # proxy: a MAC now lives behind another port
    ANNOUNCED = 7  # proxy: gratuitous ARP / unsolicited NA sent for a VM address
    NEW_SESSION_ID = 8  # host: proxy silent too long, re-attaching under a new id
    MAC_LEARNED = 9  # host: a new VM MAC seen on the TAP, named in a new ATTACH
    OFFLOAD = 10  # either end: a session's offload was negotiated (detail "on" or "off"); the TAP follows
    MAC_KEPT = 11  # proxy: a claim refused, the MAC speaks behind another session (see tunnel.presence)
    MAC_FORGOTTEN = 12  # host: a VM MAC no longer served (its TAP left, seen elsewhere, detached), named no more


@dataclass(frozen=True, slots=True)
class TunnelEvent:
    kind: EventKind
    session: int
    now: float
    endpoint: Hashable | None = None
    detail: str = ""
