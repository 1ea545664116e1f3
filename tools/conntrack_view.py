"""Render tracker entries and events as conntrack-tools prints them, or as JSON-ready dicts.

The layouts are libnetfilter_conntrack's ``__snprintf_conntrack_default``, field for field:
``[EVENT] [l3name l3num] l4name l4num [timeout] [TCP state] src= dst= sport= dport=
packets= bytes= [UNREPLIED] src= dst= sport= dport= packets= bytes= [ASSURED] mark= use=``,
with ``%-8s %u`` for the names and numbers (the family number is AF_INET 2 or AF_INET6 10)
and ``%9s`` for the event tag.  Scripts written against ``conntrack -L`` and ``conntrack
-E -o timestamp`` read ours unchanged.  What a capture cannot know is printed as the
kernel's usual value: ``mark=0 use=1``; the accounting fields are always there (as with
``nf_conntrack_acct=1``).
"""
from __future__ import annotations

import socket

from conntrack import Conn, FlowTuple, Proto
from conntrack.events import ConnEvent, EventKind
from conntrack.table import ASSURED, SEEN_REPLY

_NAMES: dict[int, str] = {Proto.TCP: "tcp", Proto.UDP: "udp", Proto.ICMP: "icmp", Proto.ICMPV6: "icmpv6",
          Proto.UDPLITE: "udplite", Proto.SCTP: "sctp", Proto.DCCP: "dccp", Proto.GRE: "gre"}
_PORTS = frozenset({Proto.TCP, Proto.UDP, Proto.UDPLITE, Proto.SCTP, Proto.DCCP})
#: family -> (conntrack's name, AF_ number it prints)
FAMILIES = {4: ("ipv4", socket.AF_INET), 6: ("ipv6", socket.AF_INET6)}
_AF = {4: socket.AF_INET, 16: socket.AF_INET6}
_TAG = {EventKind.NEW: "[NEW]", EventKind.UPDATE: "[UPDATE]", EventKind.DESTROY: "[DESTROY]"}


def _state_name(c: Conn) -> str:
    """A TCP entry's state name (every TCP entry has a state)."""
    state = c.tcp_state
    assert state is not None
    return state.name


def proto_name(proto: int) -> str:
    return _NAMES.get(proto, "unknown")


def address(raw: bytes) -> str:
    """As conntrack prints it (inet_ntop: e.g. ``::ffff:192.0.2.1`` for a mapped address)."""
    return socket.inet_ntop(_AF[len(raw)], raw)


def _tuple(t: FlowTuple) -> str:
    s = f"src={address(t.src)} dst={address(t.dst)}"
    if t.is_icmp:
        return f"{s} type={t.dport} code=0 id={t.sport}"
    if t.proto in _PORTS:
        return f"{s} sport={t.sport} dport={t.dport}"
    if t.proto == Proto.GRE:
        return f"{s} srckey={t.sport:#x} dstkey={t.dport:#x}"
    return s


def _head(original: FlowTuple, extended: bool) -> str:
    proto = original.proto
    head = f"{proto_name(proto):<8} {proto}"
    if extended:
        name, number = FAMILIES[original.family]
        head = f"{name:<8} {number} {head}"
    return head


def _body(parts: list[str], o: FlowTuple, r: FlowTuple, counters: tuple[int, int, int, int] | None,
          seen_reply: bool, assured: bool) -> None:
    parts.append(_tuple(o))
    if counters is not None:
        parts.append(f"packets={counters[0]} bytes={counters[1]}")
    if not seen_reply:
        parts.append("[UNREPLIED]")
    parts.append(_tuple(r))
    if counters is not None:
        parts.append(f"packets={counters[2]} bytes={counters[3]}")
    if assured:
        parts.append("[ASSURED]")


def line(c: Conn, now: float, extended: bool = False) -> str:
    """One `conntrack -L` line (``extended``: `-o extended`, family name and number first).

    The timeout is the whole seconds left at ``now`` (the kernel truncates as well)."""
    o, r = c.tuples()
    parts = [_head(o, extended), str(max(0, int(c.deadline - now)))]
    if c.proto == Proto.TCP:
        parts.append(_state_name(c))
    _body(parts, o, r, (c.orig_packets, c.orig_bytes, c.reply_packets, c.reply_bytes),
          bool(c.status & SEEN_REPLY), bool(c.status & ASSURED))
    parts.append("mark=0 use=1")
    return " ".join(parts)


def event_line(e: ConnEvent, extended: bool = False, at: float | None = None) -> str:
    """One `conntrack -E -o timestamp` line: ``[SEC.USEC]<TAB>`` then the event.

    As the kernel's events carry them: NEW and UPDATE give the timeout (whole seconds
    from the event on), DESTROY gives the counters instead; the TCP state always; no
    ``mark`` (the kernel sends it only when not 0) and no ``use``.  ``at`` is the time
    printed (default: the event's)."""
    t = e.now if at is None else at
    sec = int(t)
    usec = int(round((t - sec) * 1e6))
    if usec >= 1_000_000:
        sec, usec = sec + 1, usec - 1_000_000
    o, r = e.original, e.reply
    parts = [f"[{sec}.{usec:06d}]\t{_TAG[e.kind]:>9}", _head(o, extended)]
    c = e.conn
    counters = None
    if e.kind != EventKind.DESTROY:
        if c is not None:
            parts.append(str(max(0, int(c.deadline - e.now))))
    elif c is not None:
        counters = (c.orig_packets, c.orig_bytes, c.reply_packets, c.reply_bytes)
    if e.state is not None:
        parts.append(e.state.name)
    seen = bool(c.status & SEEN_REPLY) if c is not None else e.kind != EventKind.NEW
    _body(parts, o, r, counters, seen, e.assured)
    return " ".join(parts)


def _tuple_dict(t: FlowTuple, packets: int, nbytes: int) -> dict:
    d = {"src": address(t.src), "dst": address(t.dst), "sport": t.sport, "dport": t.dport,
         "packets": packets, "bytes": nbytes}
    if t.is_icmp:
        d.update(type=t.dport, code=0, id=t.sport)
    return d


def as_dict(c: Conn, now: float) -> dict:
    o, r = c.tuples()
    name, number = FAMILIES[o.family]
    return {
        "family": name,
        "l3protonum": int(number),
        "proto": proto_name(c.proto),
        "protonum": c.proto,
        "state": _state_name(c) if c.proto == Proto.TCP else None,
        "original": _tuple_dict(o, c.orig_packets, c.orig_bytes),
        "reply": _tuple_dict(r, c.reply_packets, c.reply_bytes),
        "packets": c.orig_packets + c.reply_packets,
        "bytes": c.orig_bytes + c.reply_bytes,
        "assured": bool(c.status & ASSURED),
        "unreplied": not c.status & SEEN_REPLY,
        "timeout": round(max(0.0, c.deadline - now), 6),
        "mark": 0,
    }
