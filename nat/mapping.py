"""Mappings: frozen values, and the table that shares them among connections.

A mapping binds an internal endpoint (address, port or ICMP identifier) to an
external one.  It is endpoint-independent (RFC 4787 REQ-1, RFC 5382 REQ-1): every
connection from the same internal endpoint uses the same external endpoint, whatever
the destination.  It lives while any connection uses it (static port forwards live
while the external address does).  Filtering decides which inbound packets from
endpoints the mapping has not talked to may open a connection through it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .config import Filtering


@dataclass(frozen=True, slots=True)
class Mapping:
    proto: int
    internal_ip: bytes
    internal_port: int
    external_ip: bytes
    external_port: int
    static: bool = False


class MapEntry:
    """A live mapping plus what filtering and reference counting need (owned by the table)."""

    __slots__ = ("mapping", "conns", "peers", "peer_ports")

    def __init__(self, mapping: Mapping) -> None:
        self.mapping = mapping
        self.conns = 0
        self.peers: Counter[bytes] = Counter()  # remote address -> live connections
        self.peer_ports: Counter[tuple[bytes, int]] = Counter()

    def admits(self, filtering: Filtering, remote_ip: bytes, remote_port: int) -> bool:
        """May a packet from this remote endpoint open a new connection through the mapping?"""
        if self.mapping.static or filtering == Filtering.ENDPOINT_INDEPENDENT:
            return True
        if filtering == Filtering.ADDRESS_DEPENDENT:
            return self.peers.get(remote_ip, 0) > 0
        return self.peer_ports.get((remote_ip, remote_port), 0) > 0

    def attach(self, remote_ip: bytes, remote_port: int) -> None:
        self.conns += 1
        self.peers[remote_ip] += 1
        self.peer_ports[(remote_ip, remote_port)] += 1

    def detach(self, remote_ip: bytes, remote_port: int) -> None:
        self.conns -= 1
        for c, k in ((self.peers, remote_ip), (self.peer_ports, (remote_ip, remote_port))):
            n = c.get(k, 0) - 1
            if n > 0:
                c[k] = n
            else:
                c.pop(k, None)
