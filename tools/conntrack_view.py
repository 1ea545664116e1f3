"""Render tracker entries the way `conntrack -L` does, or as JSON-ready dicts."""
from __future__ import annotations

from conntrack import Conn, FlowTuple, Proto
from conntrack.table import ASSURED, SEEN_REPLY

_NAMES = {Proto.TCP: "tcp", Proto.UDP: "udp", Proto.ICMP: "icmp", Proto.ICMPV6: "icmpv6",
          Proto.UDPLITE: "udplite", Proto.SCTP: "sctp", Proto.DCCP: "dccp", Proto.GRE: "gre"}


def proto_name(proto: int) -> str:
    return _NAMES.get(proto, "unknown")


def _fields(t: FlowTuple) -> str:
    s = f"src={t.src_text} dst={t.dst_text}"
    if t.is_icmp:
        return f"{s} type={t.dport} code=0 id={t.sport}"
    if t.sport or t.dport or t.proto in _NAMES:
        return f"{s} sport={t.sport} dport={t.dport}"
    return s


def _tuple_dict(t: FlowTuple, packets: int, nbytes: int) -> dict:
    d = {"src": t.src_text, "dst": t.dst_text, "sport": t.sport, "dport": t.dport,
         "packets": packets, "bytes": nbytes}
    if t.is_icmp:
        d.update(type=t.dport, code=0, id=t.sport)
    return d


def line(c: Conn, now: float) -> str:
    """One `conntrack -L -o extended`-style line (family and accounting included)."""
    o, r = c.tuples()
    fam = "ipv4" if o.family == 4 else "ipv6"
    parts = [f"{fam:<8} {o.family if o.family == 4 else 10} {proto_name(c.proto):<8} {c.proto} {int(c.deadline - now)}"]
    if c.proto == Proto.TCP:
        parts.append(c.tcp_state.name)
    parts.append(f"{_fields(o)} packets={c.orig_packets} bytes={c.orig_bytes}")
    if not c.status & SEEN_REPLY:
        parts.append("[UNREPLIED]")
    parts.append(f"{_fields(r)} packets={c.reply_packets} bytes={c.reply_bytes}")
    if c.status & ASSURED:
        parts.append("[ASSURED]")
    parts.append("mark=0 use=1")
    return " ".join(parts)


def as_dict(c: Conn, now: float) -> dict:
    o, r = c.tuples()
    return {
        "family": "ipv4" if o.family == 4 else "ipv6",
        "proto": proto_name(c.proto),
        "protonum": c.proto,
        "state": c.tcp_state.name if c.proto == Proto.TCP else None,
        "original": _tuple_dict(o, c.orig_packets, c.orig_bytes),
        "reply": _tuple_dict(r, c.reply_packets, c.reply_bytes),
        "packets": c.orig_packets + c.reply_packets,
        "bytes": c.orig_bytes + c.reply_bytes,
        "assured": bool(c.status & ASSURED),
        "unreplied": not c.status & SEEN_REPLY,
        "timeout": round(max(0.0, c.deadline - now), 6),
    }
