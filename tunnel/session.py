"""Tunnel session states: one IntEnum, one transition table (everything about them lives here).

A *session* is one attachment of a host end to the proxy, named by a 32-bit id
the host end draws at random.  Both ends keep one record per session and move it
through the same table; which events occur depends on the end:

* host end: START, ATTACH_ACKED, RETRY_TIMER, KEEPALIVE_TIMER, PEER_HEARD,
  ROAMED, DEAD_TIMER, DETACH;
* proxy end: ATTACH_RECEIVED, PEER_HEARD, EXPIRED, SUPERSEDED, DETACH.

Diagram (drawn from :data:`TRANSITIONS`)::

    IDLE --START--> ATTACHING --ATTACH_ACKED--> ATTACHED
    IDLE --ATTACH_RECEIVED--> ATTACHED                      (proxy: a new session)
    ATTACHING --RETRY_TIMER/PEER_HEARD--> ATTACHING          (send ATTACH again)
    ATTACHING --DEAD_TIMER--> ATTACHING                      (host: new session id)
    ATTACHED --ROAMED--> ATTACHING                           (host: our address changed)
    ATTACHED --DEAD_TIMER--> ATTACHING                       (host: proxy silent; new session id)
    ATTACHED --KEEPALIVE_TIMER/PEER_HEARD/ATTACH_*--> ATTACHED
    ATTACHED --EXPIRED/SUPERSEDED--> CLOSED                  (proxy)
    any but CLOSED --DETACH--> CLOSED

Anything not in the table is a bug of ours: :class:`SessionStateError`.
"""
from __future__ import annotations

from enum import IntEnum


class SessionState(IntEnum):
    IDLE = 0
    ATTACHING = 1  # host: ATTACH sent, no ATTACH_ACK yet
    ATTACHED = 2  # host: acknowledged; proxy: live session
    CLOSED = 3


class SessionEvent(IntEnum):
    START = 1  # host: begin attaching
    ATTACH_ACKED = 2  # host: authentic ATTACH_ACK for our latest ATTACH round
    RETRY_TIMER = 3  # host: no ack yet, send ATTACH again
    KEEPALIVE_TIMER = 4  # host: time for a keepalive
    PEER_HEARD = 5  # an authentic message from the other end
    ROAMED = 6  # host: our address or transport changed; re-attach the same session
    DEAD_TIMER = 7  # host: proxy silent too long (or it detached us, or restarted): new session id
    ATTACH_RECEIVED = 8  # proxy: authentic ATTACH for this session (new or again)
    EXPIRED = 9  # proxy: host end silent too long
    SUPERSEDED = 10  # proxy: a newer session named this one as its previous
    DETACH = 11  # authentic DETACH, or local close


class SessionStateError(RuntimeError):
    """A transition the table does not allow: our bug, not the peer's."""


_S, _E = SessionState, SessionEvent

#: TRANSITIONS[state][event] -> next state.  A missing key is an error.
TRANSITIONS: dict[SessionState, dict[SessionEvent, SessionState]] = {
    _S.IDLE: {
        _E.START: _S.ATTACHING,
        _E.ATTACH_RECEIVED: _S.ATTACHED,
        _E.DETACH: _S.CLOSED,
    },
    _S.ATTACHING: {
        _E.ATTACH_ACKED: _S.ATTACHED,
        _E.RETRY_TIMER: _S.ATTACHING,
        _E.PEER_HEARD: _S.ATTACHING,
        _E.ROAMED: _S.ATTACHING,
        _E.DEAD_TIMER: _S.ATTACHING,
        _E.DETACH: _S.CLOSED,
    },
    _S.ATTACHED: {
        _E.ATTACH_ACKED: _S.ATTACHED,
        _E.KEEPALIVE_TIMER: _S.ATTACHED,
        _E.PEER_HEARD: _S.ATTACHED,
        _E.ATTACH_RECEIVED: _S.ATTACHED,
        _E.ROAMED: _S.ATTACHING,
        _E.DEAD_TIMER: _S.ATTACHING,
        _E.EXPIRED: _S.CLOSED,
        _E.SUPERSEDED: _S.CLOSED,
        _E.DETACH: _S.CLOSED,
    },
    _S.CLOSED: {},
}


def transition(state: SessionState, event: SessionEvent) -> SessionState:
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise SessionStateError(f"no transition from {state.name} on {event.name}") from None


def diagram() -> str:
    """The table as ``STATE --EVENT--> STATE`` lines, for the docs."""
    return "\n".join(f"{s.name} --{e.name}--> {n.name}" for s, row in TRANSITIONS.items() for e, n in row.items())
