"""The proxy's MAC learning table: which port (a session id, or the LAN) a MAC lives behind.

Entries age out ``age`` seconds after they were last refreshed; the table holds at
most ``capacity`` entries and evicts the least recently refreshed when full.  Each
entry also keeps when a frame *from* the MAC last came through its port (``heard``:
the VM speaks there) and when it last moved (``moved``), which the proxy's presence
rules read (:mod:`tunnel.presence`).  Time is a parameter.
"""
from __future__ import annotations

from dataclasses import dataclass

NEVER = float("-inf")

#: The port id of the home LAN (session ids are never 0).
LAN = 0


def port_name(port: int | None) -> str:
    """A port as status and events show it."""
    if port is None:
        return "nowhere"
    return "lan" if port == LAN else f"session {port:08x}"


@dataclass(slots=True)
class MacEntry:
    port: int
    deadline: float
    heard: float = NEVER  # a frame from the MAC came through ``port`` (NEVER: only named there)
    moved: float = NEVER  # when it last came to ``port`` from another session


class MacTable:
    def __init__(self, age: float = 300.0, capacity: int = 4096) -> None:
        self.age = age
        self.capacity = capacity
        self._entries: dict[bytes, MacEntry] = {}  # least recently refreshed first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, mac: bytes) -> bool:
        return mac in self._entries

    def items(self):
        return self._entries.items()

    def entry(self, mac: bytes) -> MacEntry | None:
        return self._entries.get(mac)

    def lookup(self, mac: bytes) -> int | None:
        e = self._entries.get(mac)
        return None if e is None else e.port

    def learn(self, mac: bytes, port: int, now: float) -> int | None:
        """Put ``mac`` behind ``port``; returns the port it was behind before (or None)."""
        e = self._entries.pop(mac, None)
        if e is None:
            if len(self._entries) >= self.capacity:
                del self._entries[next(iter(self._entries))]
            self._entries[mac] = MacEntry(port, now + self.age)
            return None
        old = e.port  # refreshed once per frame: reuse the entry rather than make a new one
        if old != port:
            e.heard = NEVER  # heard behind the old port, not (yet) behind this one
        e.port, e.deadline = port, now + self.age
        self._entries[mac] = e
        return old

    def hear(self, mac: bytes, port: int, now: float) -> bool:
        """The data path: a frame from ``mac`` came through ``port``.  True when it lived there already
        (refreshed, heard now); False when it did not (nothing changed: the caller decides)."""
        e = self._entries.get(mac)
        if e is None or e.port != port:
            return False
        del self._entries[mac]
        e.deadline, e.heard = now + self.age, now
        self._entries[mac] = e
        return True

    def forget(self, mac: bytes) -> MacEntry | None:
        return self._entries.pop(mac, None)

    def forget_port(self, port: int) -> list[bytes]:
        gone = [m for m, e in self._entries.items() if e.port == port]
        for m in gone:
            del self._entries[m]
        return gone

    def next_deadline(self) -> float | None:
        if not self._entries:
            return None
        return next(iter(self._entries.values())).deadline

    def expire(self, now: float) -> list[bytes]:
        gone = []
        while self._entries:
            mac, e = next(iter(self._entries.items()))
            if e.deadline > now:
                break
            del self._entries[mac]
            gone.append(mac)
        return gone
