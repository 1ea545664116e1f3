"""Timeouts in seconds, Linux nf_conntrack's defaults, all configurable."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .tcp_states import TcpState

DAY = 86400


@dataclass(frozen=True, slots=True)
class Timeouts:
    syn_sent: float = 120
    syn_recv: float = 60
    established: float = 5 * DAY
    fin_wait: float = 120
    close_wait: float = 60
    last_ack: float = 30
    time_wait: float = 120
    close: float = 10
    syn_sent2: float = 120
    udp: float = 30  # unreplied
    udp_stream: float = 120  # once a reply was seen (Linux waits 2 s more; see README)
    icmp: float = 30
    generic: float = 600
    fragment: float = 30  # how long a fragment's head is remembered

    def tcp(self, state: TcpState) -> float:
        return getattr(self, state.name.lower())

    def with_(self, **changes: float) -> "Timeouts":
        """A copy with some values changed; unknown names are a clear error."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown timeout(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        bad = [k for k, v in changes.items() if not (isinstance(v, (int, float)) and v >= 0)]
        if bad:
            raise ValueError(f"timeout(s) must be non-negative numbers: {', '.join(bad)}")
        return replace(self, **changes)
