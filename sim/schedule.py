"""The one client schedule: when a scenario connection's client sends, stops, or gives up.

The simulator's connections (``sim.connection``) and the namespace lab's endpoint
programs (``tools.lab.endpoint``) both ask this table what to do at each tick, so
the two backends play the same application.  Sans-I/O and standard library only
(the endpoint imports it inside every namespace): time is passed in, the caller
sends and re-arms its timer.

The application: a request every ``interval`` once the previous one was answered
(TCP); UDP re-sends while unanswered and gives up when a request stays unanswered
for ``timeout`` (TCP's give-up is the transport's).  Past the scenario's ``end`` a
client stops only once it has been answered after the last move's downtime ended
(``settle``): a connection survives because packets showed it working after the
move, never because nothing was tried.
"""
from __future__ import annotations

from enum import IntEnum


class Transport(IntEnum):
    """The client socket's state, as the application sees it."""

    CONNECTING = 1  # TCP: the handshake has not completed
    UP = 2  # TCP established; UDP always (connectionless)
    BROKEN = 3  # the transport ended the connection (reset, gave up, an error)


class Step(IntEnum):
    """What the client does at a tick."""

    SEND = 1  # send a request now; tick again after the interval
    WAIT = 2  # nothing to send now; tick again after the interval
    DONE = 3  # answered after the last move and past the end: no more ticks
    GIVE_UP = 4  # UDP: a request unanswered for the timeout; the connection is broken, no more ticks
    STOP = 5  # the transport broke: no more ticks


class Schedule:
    """One client's request schedule (its clock is the caller's)."""

    __slots__ = ("udp", "interval", "timeout", "end", "settle", "waiting_since", "answered_at")

    def __init__(self, udp: bool, interval: float, timeout: float, end: float, settle: float | None) -> None:
        self.udp = udp
        self.interval = interval
        self.timeout = timeout
        self.end = end  # the scenario's duration
        self.settle = settle  # when the last move's downtime ends (None: no move)
        self.waiting_since: float | None = None  # when the unanswered request went out (None: none)
        self.answered_at: float | None = None

    @property
    def awaiting(self) -> bool:
        """Is a request waiting for its answer?"""
        return self.waiting_since is not None

    def proven(self) -> bool:
        """Has an answer come back since the last move's downtime ended?"""
        return self.settle is None or (self.answered_at is not None and self.answered_at > self.settle)

    def answered(self, now: float) -> None:
        """An answer arrived (or the connection came up, which answers the connect)."""
        self.waiting_since = None
        self.answered_at = now

    def tick(self, now: float, transport: Transport) -> Step:
        if transport == Transport.BROKEN:
            return Step.STOP
        waiting = self.waiting_since
        if self.udp and waiting is not None and now - waiting >= self.timeout:
            return Step.GIVE_UP
        if now >= self.end and waiting is None and transport == Transport.UP and self.proven():
            return Step.DONE
        if self.udp or (transport == Transport.UP and waiting is None):
            if waiting is None:
                self.waiting_since = now
            return Step.SEND
        return Step.WAIT
