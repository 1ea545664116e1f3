"""The one shape every roam engine answers in.

The tracker, the NAT and both tunnel ends take an input (bytes, where they came from,
``now``) and answer with an :class:`Answer`: what becomes of the input, why (a reason
code a driver counts by name), the bytes to send, and the frozen events the input
caused.  Drivers (NFQUEUE, TAP, sockets) and the simulator only move those bytes and
turn events into logs and counters; nobody diffs counters to learn what happened
(aioquic's ``datagrams_to_send``/``next_event``, mitmproxy's commands, in one value).

``Answer`` is a NamedTuple, not a frozen dataclass: one is built per packet, and a
tuple costs about a tenth as much (measured in the NAT's hot path).
"""
from __future__ import annotations

from enum import IntEnum
from typing import Any, Hashable, NamedTuple


class Action(IntEnum):
    """What becomes of the input."""

    ACCEPT = 1  # it goes on: ``data`` is the input as it continues (rewritten, opened or sealed)
    DROP = 2  # it ends here; ``reason`` says why (a counted drop)
    CONSUME = 3  # it was for the engine itself (a control message); any answer is in ``sends``


class Answer(NamedTuple):
    """An engine's answer to one input.

    ``data`` is the input as it continues on its way (None unless ACCEPT).  ``sends`` are
    other messages the engine originates, each ``(to, bytes)`` with ``to`` an
    engine-defined destination (a peer endpoint, ``"lan"``, ``"tap"``...).  ``events``
    are the frozen events the input caused, in order.
    """

    action: Action
    reason: IntEnum
    data: bytes | None = None
    sends: tuple[tuple[Hashable, bytes], ...] = ()
    events: tuple[Any, ...] = ()

    @property
    def dropped(self) -> bool:
        return self.action == Action.DROP
