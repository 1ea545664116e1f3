"""TCP tracking states: one IntEnum, one transition table (everything about them lives here).

The table follows Linux ``nf_conntrack_proto_tcp.c`` (``tcp_conntracks``): for each
direction, kind of segment and current state, the next state, or IGNORE (pass the
segment, change nothing) or INVALID (the segment does not fit the connection).
"""
from __future__ import annotations

from enum import IntEnum

from .packet import TcpFlag


class TcpState(IntEnum):
    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    SYN_SENT2 = 9  # simultaneous open: a SYN seen in the reply direction
    IGNORE = 100  # judgement, not a state: pass the segment, keep the state
    INVALID = 101  # judgement, not a state: the segment is invalid


class Direction(IntEnum):
    ORIGINAL = 0
    REPLY = 1


class Segment(IntEnum):
    """What a segment's flags say, in Linux's order of precedence."""

    SYN = 0
    SYNACK = 1
    FIN = 2
    ACK = 3
    RST = 4
    NONE = 5


def _classify(flags: int) -> Segment:
    if flags & TcpFlag.RST:
        return Segment.RST
    if flags & TcpFlag.SYN:
        return Segment.SYNACK if flags & TcpFlag.ACK else Segment.SYN
    if flags & TcpFlag.FIN:
        return Segment.FIN
    if flags & TcpFlag.ACK:
        return Segment.ACK
    return Segment.NONE


_SEGMENT_OF = tuple(_classify(f) for f in range(64))  # the six flag bits a Packet keeps


def classify(flags: int) -> Segment:
    """What the segment is, from its flags (precedence: RST, SYN/SYN-ACK, FIN, ACK)."""
    return _SEGMENT_OF[flags & 0x3F]


_S = TcpState
_COLUMNS = (_S.NONE, _S.SYN_SENT, _S.SYN_RECV, _S.ESTABLISHED, _S.FIN_WAIT, _S.CLOSE_WAIT,
            _S.LAST_ACK, _S.TIME_WAIT, _S.CLOSE, _S.SYN_SENT2)
NO, SS, SR, ES, FW, CW, LA, TW, CL, S2 = _COLUMNS
IV, IG = _S.INVALID, _S.IGNORE


def _row(*cells: TcpState) -> dict[TcpState, TcpState]:
    assert len(cells) == len(_COLUMNS)
    return dict(zip(_COLUMNS, cells))


#: TRANSITIONS[direction][segment][state] -> next state, IGNORE or INVALID.
TRANSITIONS: dict[Direction, dict[Segment, dict[TcpState, TcpState]]] = {
    Direction.ORIGINAL: {
        #                      NO  SS  SR  ES  FW  CW  LA  TW  CL  S2
        Segment.SYN:    _row(SS, SS, IG, IG, IG, IG, IG, SS, SS, S2),
        Segment.SYNACK: _row(IV, IV, SR, IV, IV, IV, IV, IV, IV, SR),
        Segment.FIN:    _row(IV, IV, FW, FW, LA, LA, LA, TW, CL, IV),
        Segment.ACK:    _row(ES, IV, ES, ES, CW, CW, TW, TW, CL, IV),
        Segment.RST:    _row(IV, CL, CL, CL, CL, CL, CL, CL, CL, CL),
        Segment.NONE:   _row(IV, IV, IV, IV, IV, IV, IV, IV, IV, IV),
    },
    Direction.REPLY: {
        #                      NO  SS  SR  ES  FW  CW  LA  TW  CL  S2
        Segment.SYN:    _row(IV, S2, IV, IV, IV, IV, IV, SS, IV, S2),
        Segment.SYNACK: _row(IV, SR, IG, IG, IG, IG, IG, IG, IG, SR),
        Segment.FIN:    _row(IV, IV, FW, FW, LA, LA, LA, TW, CL, IV),
        Segment.ACK:    _row(IV, IG, SR, ES, CW, CW, TW, TW, CL, IG),
        Segment.RST:    _row(IV, CL, CL, CL, CL, CL, CL, CL, CL, CL),
        Segment.NONE:   _row(IV, IV, IV, IV, IV, IV, IV, IV, IV, IV),
    },
}

#: A SYN that the table sends to SYN_SENT from these states starts a new connection on
#: the same tuple (RFC 1122 reopening): the old entry is destroyed first, as Linux does.
#: In the reply direction (SYN in TIME_WAIT) the server has switched roles.
REOPEN_STATES = frozenset({TcpState.TIME_WAIT, TcpState.CLOSE})


#: The same table, flattened for the per-packet path (derived from TRANSITIONS, never edited):
#: ``NEXT[direction][flags & 0x3F][state]`` is ``int(TRANSITIONS[direction][classify(flags)][state])``.
#: Plain ints: indexing tuples with ints avoids hashing enum members per packet.
NEXT: tuple[tuple[tuple[int, ...], ...], ...] = tuple(
    tuple(tuple(int(TRANSITIONS[d][_SEGMENT_OF[f]][s]) for s in _COLUMNS) for f in range(64))
    for d in (Direction.ORIGINAL, Direction.REPLY))
#: TcpState members by value, for turning a stored int back into the enum cheaply.
STATE_OF: tuple[TcpState, ...] = _COLUMNS


def next_state(direction: Direction, segment: Segment, state: TcpState) -> TcpState:
    """Look the transition up; a state outside the table is a bug, so KeyError stands."""
    return TRANSITIONS[direction][segment][state]


def mermaid() -> str:
    """The state diagram, drawn from TRANSITIONS (the README embeds its output)."""
    edges: dict[tuple[TcpState, TcpState], dict[Segment, set[str]]] = {}
    for direction, rows in TRANSITIONS.items():
        for segment, row in rows.items():
            for state, nxt in row.items():
                if nxt not in (IV, IG) and nxt != state:
                    edges.setdefault((state, nxt), {}).setdefault(segment, set()).add(direction.name.lower())
    lines = ["stateDiagram-v2"]
    for (state, nxt), segments in edges.items():
        label = ", ".join(seg.name if len(dirs) == 2 else f"{seg.name} ({dirs.pop()})"
                          for seg, dirs in segments.items())
        lines.append(f"    {state.name} --> {nxt.name}: {label}")
    return "\n".join(lines)
