"""Connection tracking: bytes -> packet headers -> flow keys -> connection states.

The tracker every other roam engine stands on.  Sans-I/O: time is always passed in.
"""
from .errors import LocalProtocolError, Malformed, ParseError, ProtocolError
from .events import ConnEvent, CtState, EventKind, Tracked, Why
from .flow import FlowTuple, packet_key
from .packet import Frame, Fragment, Packet, Proto, TcpFlag, parse_frame, parse_ip
from .table import Conn, ConnTable
from .tcp_states import Direction, TcpState
from .timeouts import Timeouts

__all__ = [
    "Conn", "ConnEvent", "ConnTable", "CtState", "Direction", "EventKind", "FlowTuple", "Fragment",
    "Frame", "Packet", "LocalProtocolError", "Malformed", "ParseError", "Proto", "ProtocolError", "TcpFlag", "TcpState", "Timeouts", "Tracked",
    "Why", "packet_key", "parse_frame", "parse_ip",
]
