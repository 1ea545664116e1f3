"""What the tunnel ends tell their drivers: frozen events, drained with ``pop_events()``."""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Hashable


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


@dataclass(frozen=True, slots=True)
class TunnelEvent:
    kind: EventKind
    session: int
    now: float
    endpoint: Hashable | None = None
    detail: str = ""
