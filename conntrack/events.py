"""What the tracker tells its user: per-packet verdicts and per-connection events."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple

from .answer import Action
from .flow import FlowTuple
from .tcp_states import Direction, TcpState

if TYPE_CHECKING:
    from .table import Conn


class CtState(IntEnum):
    """Linux's ctstate of a packet (what iptables' ``-m conntrack --ctstate`` matches)."""

    NEW = 0
    ESTABLISHED = 1
    RELATED = 2
    INVALID = 3
    UNTRACKED = 4


class Why(IntEnum):
    """Why a packet was not tracked or an entry went away."""

    TCP_INVALID = 1  # segment the state table calls invalid
    ICMP_NO_FLOW = 2  # ICMP error quoting a flow we do not know
    ICMP_UNMATCHED_REPLY = 3  # echo reply with no request
    FRAGMENT_WITHOUT_HEAD = 4  # non-first fragment before its first
    TABLE_FULL = 5  # full, and no unassured entry to drop
    TUPLE_TAKEN = 7  # the reply tuple asked for belongs to another entry (a NAT clash)
    NOT_TRACKABLE = 6  # e.g. ICMPv6 neighbour discovery
    TIMEOUT = 10
    RESET = 11  # RST before any reply: killed at once, as Linux does
    REOPEN = 12  # SYN on a tuple in TIME_WAIT/CLOSE
    EARLY_DROP = 13  # evicted to make room, unassured
    REMOVED = 14  # removed by the user (flush, NAT address loss)


# The tracker refuses a packet only when it cannot make room for its entry (Linux drops
# it too: "nf_conntrack: table full, dropping packet"); INVALID and UNTRACKED packets go
# on, for a firewall rule to judge, as in Linux.
_REFUSED = frozenset({Why.TABLE_FULL, Why.TUPLE_TAKEN})


class Tracked(NamedTuple):
    """The tracker's answer to one packet, in the engines' one shape (see
    :mod:`conntrack.answer`): ``action``, ``reason``, ``data`` (always None: the tracker
    never rewrites), ``sends`` (always empty) and the ``events`` the packet caused; plus
    what only a tracker knows: the ctstate, the direction and the entry.

    A NamedTuple, not a frozen dataclass: one is built per packet, and each field of a
    frozen dataclass costs an ``object.__setattr__`` (measured: ~8% of ``roam bench
    conntrack`` for the ``events`` field alone)."""

    ctstate: CtState
    direction: Direction = Direction.ORIGINAL
    conn: "Conn | None" = None
    why: Why | None = None
    events: tuple["ConnEvent", ...] = ()

    @property
    def data(self) -> None:
        """Always None: the tracker never rewrites."""
        return None

    @property
    def sends(self) -> tuple[()]:
        """Always empty: the tracker never originates a message."""
        return ()

    @property
    def action(self) -> Action:
        return Action.DROP if self.why in _REFUSED else Action.ACCEPT

    @property
    def reason(self) -> "Why | CtState":
        return self.ctstate if self.why is None else self.why


class EventKind(IntEnum):
    NEW = 1
    UPDATE = 2
    DESTROY = 3


@dataclass(frozen=True, slots=True)
class ConnEvent:
    kind: EventKind
    original: FlowTuple
    reply: FlowTuple
    state: TcpState | None  # TCP only
    assured: bool
    now: float
    why: Why | None = None
    conn: "Conn | None" = field(default=None, compare=False, repr=False)
