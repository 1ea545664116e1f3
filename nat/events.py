"""What the NAT tells its driver: frozen events, one per thing that happened.

The engine never logs (DESIGN.md, principle 1).  The events a packet causes come in its
:class:`~conntrack.answer.Answer`; the others (expiries, an address change, a reload)
wait in ``NatEngine.pop_events()``.  Each event reads as a log line (``str``) and says
how loud it is (``level``, in :mod:`logging`'s numbers, kept here as data), so every
driver -- the plugin, ``roam nat translate`` -- logs them alike.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from conntrack.packet import Proto

if TYPE_CHECKING:
    from .mapping import Mapping

DEBUG, INFO, WARNING = 10, 20, 30  # logging.DEBUG, INFO, WARNING


def _ip(b: bytes | None) -> str:
    return str(ipaddress.ip_address(b)) if b is not None else "none"


def _endpoints(m: "Mapping") -> str:
    return (f"{Proto(m.proto).name} {_ip(m.internal_ip)}:{m.internal_port} -> "
            f"{_ip(m.external_ip)}:{m.external_port}")


@dataclass(frozen=True, slots=True)
class MappingCreated:
    """A dynamic mapping was made for a new outbound flow."""

    mapping: "Mapping"
    level = DEBUG

    def __str__(self) -> str:
        return f"mapping created: {_endpoints(self.mapping)}"


@dataclass(frozen=True, slots=True)
class MappingFreed:
    """A mapping lost its last connection (or its address) and its port went back to the pool."""

    mapping: "Mapping"
    level = DEBUG

    def __str__(self) -> str:
        return f"mapping freed: {_endpoints(self.mapping)}"


def _sparse(n: int) -> int:
    """WARNING for the 1st, 2nd, 4th, 8th... of a recurring event, DEBUG between: a log line
    without a flood."""
    return WARNING if n & (n - 1) == 0 else DEBUG


@dataclass(frozen=True, slots=True)
class PoolFull:
    """A new flow was dropped: no free external port of its class.  ``dropped`` counts such
    drops so far; only the 1st, 2nd, 4th, 8th... is a warning (a log line without a flood)."""

    proto: int
    internal_ip: bytes
    internal_port: int
    dropped: int

    @property
    def level(self) -> int:
        return _sparse(self.dropped)

    def __str__(self) -> str:
        return (f"port pool for {Proto(self.proto).name} full: new flow from {_ip(self.internal_ip)}:"
                f"{self.internal_port} dropped ({self.dropped} so far)")


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """A port pool was full: the oldest flows that never got a reply were ended to make room
    (Linux's early drop of unassured entries), so a flood of unanswered UDP cannot hold every
    port for the whole UDP timeout.  ``rounds`` counts such rounds so far; the 1st, 2nd, 4th...
    is a warning."""

    proto: int
    flows: int
    rounds: int

    @property
    def level(self) -> int:
        return _sparse(self.rounds)

    def __str__(self) -> str:
        return (f"port pool for {Proto(self.proto).name} full: {self.flows} unreplied flows ended to make room "
                f"({self.rounds} times so far)")


@dataclass(frozen=True, slots=True)
class AddressChanged:
    """The external address changed or vanished (None): every mapping on the old one died."""

    old: str | None
    new: str | None
    flows_killed: int
    level = WARNING

    def __str__(self) -> str:
        return f"external address {self.old} -> {self.new} ({self.flows_killed} flows dropped)"


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """Part of a new config was not taken (the rest was)."""

    text: str
    level = WARNING

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Reloaded:
    """A new config is in force; established flows went on."""

    inbound_mappings: int
    level = INFO

    def __str__(self) -> str:
        return f"reloaded: {self.inbound_mappings} inbound mappings"


@dataclass(frozen=True, slots=True)
class FlowsRestored:
    """Flows (and their mappings) came back from a snapshot."""

    flows: int
    rebound: bool  # moved from the snapshot's external address to this one
    level = INFO

    def __str__(self) -> str:
        return f"restored {self.flows} flows" + (" (moved to this external address)" if self.rebound else "")


NatEvent = MappingCreated | MappingFreed | PoolFull | Reclaimed | AddressChanged | ConfigWarning | Reloaded | FlowsRestored
