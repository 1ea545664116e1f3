"""Mappings: frozen values, the entries that count their users, and the table of them.

A mapping binds an internal endpoint (address, port or ICMP identifier) to an
external one.  It is endpoint-independent (RFC 4787 REQ-1, RFC 5382 REQ-1): every
connection from the same internal endpoint uses the same external endpoint, whatever
the destination.  It lives while any connection uses it (inbound mappings -- the
config's static port forwards -- live while the external address does).  Filtering
decides which inbound packets from endpoints the mapping has not talked to may open a
connection through it.

A connection's :class:`Binding` (kept in ``Conn.extra``) names the mappings it uses and
both rewrite targets.  :class:`MappingTable` holds every live mapping of one external
address, by internal endpoint and by external port, with the port pools; it follows a
reloaded config's inbound mappings.  One table per address family (NAT66 beside NAT44):
each has its own external address, pools and inbound mappings (those to its family's
addresses), as Linux keeps IPv4 and IPv6 NAT apart.  What happens to mappings is told as events
(:mod:`nat.events`), appended to the list the engine gives it.
"""
from __future__ import annotations

import ipaddress
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Iterator, TypeVar

from conntrack.packet import Proto
from conntrack.table import Conn

from .config import Filtering, NatConfig, PortForward, family as _family
from .events import ConfigWarning, MappingCreated, MappingFreed, PoolFull, Reloaded
from .ports import PortPool
from .rewrite import precompute

_K = TypeVar("_K", bound=Hashable)


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
        _release(self.peers, remote_ip)
        _release(self.peer_ports, (remote_ip, remote_port))


def endpoint(ip: bytes, port: int) -> str:
    """``address:port``, an IPv6 address in brackets."""
    return f"{ipaddress.IPv4Address(ip)}:{port}" if len(ip) == 4 else f"[{ipaddress.IPv6Address(ip)}]:{port}"


def _release(counts: Counter[_K], key: _K) -> None:
    """One reference fewer to ``key``; gone at none (filtering looks only at live peers)."""
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


class Binding:
    """What a connection needs to be translated (kept in ``Conn.extra``).

    How the two tuples map (as in Linux NAT): a packet travelling on the original tuple
    O is rewritten to ``R.reversed()`` (``fwd``), one on the reply tuple R to
    ``O.reversed()`` (``rev``).
    """

    __slots__ = ("fwd", "rev", "internal", "attached", "fx", "rx", "mids")

    def __init__(self, fwd: tuple, rev: tuple, internal: int, attached: list) -> None:
        self.fwd = fwd  # (src, dst, sport, dport) for packets on the original tuple
        self.rev = rev  # ... and on the reply tuple
        self.internal = internal  # bit d set: packets in direction d come from the internal side
        self.attached = attached  # [(MapEntry, remote_ip, remote_port)]
        # precomputed rewrites (see prepare); fx None: the flow is dead
        self.fx: tuple | None = None
        self.rx: tuple | None = None
        self.mids: list[bytes] = []  # half-translated hairpin keys (Stage.HAIRPIN_SRC looks them up)

    def prepare(self, c: Conn) -> None:
        """Precompute each direction's new header bytes and checksum deltas from the tuples
        (IPv6 flows take the general path: ``()``, alive but nothing to precompute)."""
        self.fx = precompute(c.original, self.fwd, c.proto)
        self.rx = precompute(c.reply, self.rev, c.proto)


class MappingTable:
    """The live mappings of one external address, the port pools, the inbound mappings.

    ``counters`` and ``events`` are the engine's: the table counts and tells what it does.
    """

    def __init__(self, config: NatConfig, external_ip: bytes | None, seed: int | None,
                 counters: Counter, events: list, family: int = 4) -> None:
        self.family = family
        self.config = config
        self._seed = seed
        self._counters = counters
        self._events = events
        self.by_internal: dict[tuple, MapEntry] = {}
        self.by_external: dict[tuple, MapEntry] = {}
        self.pools: dict[int, PortPool] = {}
        #: (the kernel path) mappings made (+1, mapping) and freed (-1, mapping) and address resets
        #: (0, None), in order, for the driver to mirror in the kernel's sets; None: nobody asks
        self.journal: list | None = None
        self.reset(external_ip)

    def _tell(self, op: int, m: Mapping | None) -> None:
        """A mapping made (1), freed (-1), or every one gone (0), into the journal if one is kept."""
        if self.journal is not None:
            self.journal.append((op, m))

    # ------------------------------------------------------------------ the address
    def reset(self, external_ip: bytes | None) -> None:
        """Start over on ``external_ip`` (None: no address, no mappings): fresh pools and the
        config's inbound mappings only."""
        self.external_ip = external_ip
        cfg = self.config
        self.by_internal.clear()
        self.by_external.clear()
        self._tell(0, None)
        self.pools = {p: PortPool(cfg.port_range, cfg.low_port_range, self._reserved(p), self._seed, cfg.port_lane)
                      for p in (Proto.TCP, Proto.UDP)}
        icmp = Proto.ICMP if self.family == 4 else Proto.ICMPV6
        self.pools[icmp] = PortPool(cfg.icmp_id_range, None, frozenset(), self._seed)
        if external_ip is not None:
            for f in self._mine(cfg.forwards):
                self._add_static(f)

    def _mine(self, forwards) -> list[PortForward]:
        """The inbound mappings to this table's family."""
        return [f for f in forwards if _family(f.internal_ip) == self.family]

    def _address(self) -> bytes:
        """The external address a new mapping is on: there is one whenever a mapping is made (the
        engine drops every packet while it has none; a snapshot restores nothing then)."""
        assert self.external_ip is not None, "a mapping made without an external address"
        return self.external_ip

    def _reserved(self, proto: int) -> frozenset[int]:
        return frozenset(f.external_port for f in self._mine(self.config.forwards) if f.proto == proto)

    def _add_static(self, f: PortForward) -> MapEntry:
        m = Mapping(f.proto, ipaddress.ip_address(f.internal_ip).packed, f.internal_port,
                    self._address(), f.external_port, static=True)
        e = MapEntry(m)
        self.by_external[(f.proto, f.external_port)] = e
        self.by_internal.setdefault((f.proto, m.internal_ip, f.internal_port), e)
        self._tell(1, m)
        return e

    # ------------------------------------------------------------------ lookups and allocation
    def outbound(self, proto: int, ip: bytes, port: int, reclaim=None) -> MapEntry | None:
        """The mapping of an internal endpoint, made if there is none (None: its pool is full).

        ``reclaim(port_range)``, when the range this port's class allocates from is full, may
        end flows to free some of it (the engine's: unreplied flows, oldest first); then one
        more try."""
        e = self.by_internal.get((proto, ip, port))
        if e is not None:
            return e
        pool = self.pools[proto]
        eport = pool.allocate(port)
        if eport is None and reclaim is not None and reclaim(pool.class_of(port)):
            eport = pool.allocate(port)
        if eport is None:
            c = self._counters
            c["pool_full"] += 1
            self._events.append(PoolFull(proto, ip, port, c["pool_full"]))
            return None
        e = MapEntry(Mapping(proto, ip, port, self._address(), eport))
        self.by_internal[(proto, ip, port)] = e
        self.by_external[(proto, eport)] = e
        self._counters["mappings_created"] += 1
        self._events.append(MappingCreated(e.mapping))
        self._tell(1, e.mapping)
        return e

    def inbound(self, proto: int, eport: int) -> MapEntry | None:
        """The mapping holding external port ``eport`` (filtering is the caller's, ``admits``)."""
        return self.by_external.get((proto, eport))

    def host(self, proto: int, ip: bytes, port: int) -> MapEntry | None:
        """The NAT host's own endpoint on the external address, held like a mapping so that no
        VM gets its port (None: a mapping holds that port already)."""
        entry = self.by_internal.get((proto, ip, port))
        if entry is None:
            if (proto, port) in self.by_external:
                return None
            self.pools[proto].take(port)  # a no-op for ports outside the pool
            entry = MapEntry(Mapping(proto, ip, port, ip, port))
            self.by_internal[(proto, ip, port)] = entry
            self.by_external[(proto, port)] = entry
            self._tell(1, entry.mapping)
        return entry

    def claim(self, proto: int, iip: bytes, iport: int, eport: int, static: bool) -> MapEntry | None:
        """A snapshot's mapping on this address: the live one if it is the same, a new dynamic
        one if its port is free, else None (gone from the config, or its port is taken now)."""
        e = self.by_external.get((proto, eport))
        if e is not None:
            return e if (e.mapping.internal_ip, e.mapping.internal_port) == (iip, iport) else None
        if static or not self.pools[proto].take(eport):
            return None
        e = MapEntry(Mapping(proto, iip, iport, self._address(), eport))
        self.by_external[(proto, eport)] = e
        self.by_internal.setdefault((proto, iip, iport), e)
        self._tell(1, e.mapping)
        return e

    def release_if_unused(self, e: MapEntry) -> None:
        """Free a dynamic mapping no connection uses any more (its port goes back to the pool)."""
        m = e.mapping
        if e.conns > 0 or m.static:
            return
        if self.by_internal.get((m.proto, m.internal_ip, m.internal_port)) is e:
            del self.by_internal[(m.proto, m.internal_ip, m.internal_port)]
        if self.by_external.get((m.proto, m.external_port)) is e:
            del self.by_external[(m.proto, m.external_port)]
            if m.external_ip == self.external_ip:
                self.pools[m.proto].free(m.external_port)
        self._counters["mappings_freed"] += 1
        self._events.append(MappingFreed(m))
        self._tell(-1, m)

    # ------------------------------------------------------------------ reload
    def reload(self, config: NatConfig, tell: bool = True) -> NatConfig:
        """Take a new config's inbound mappings of this family (and the rest of it); returns the
        config in force (the other family's inbound mappings passed through as given).

        Port ranges, the internal networks and NAT66 on or off are fixed for the engine's life
        (restart to change them); an inbound mapping whose port a live dynamic mapping holds is
        left out.  Both are told as :class:`~nat.events.ConfigWarning` events; ``tell``: say
        :class:`~nat.events.Reloaded` too (the last family's table does)."""
        old_cfg = self.config
        old = {(f.proto, f.external_port): f for f in self._mine(old_cfg.forwards)}
        new = {(f.proto, f.external_port): f for f in self._mine(config.forwards)}
        fixed = ("port_range", "low_port_range", "port_lane", "internal", "icmp_id_range", "nat66", "internal6")
        if any(getattr(config, k) != getattr(old_cfg, k) for k in fixed):
            self._events.append(ConfigWarning("port ranges, internal networks and NAT66 change only on restart"))
            config = config.with_(**{k: getattr(old_cfg, k) for k in fixed})
        keep = []
        for key, f in new.items():
            if key in old and old[key] == f:
                keep.append(f)
                continue
            busy = self.by_external.get(key)
            if busy is not None and not busy.mapping.static and busy.conns > 0:
                self._events.append(ConfigWarning(f"{Proto(f.proto).name} port {f.external_port} is in use by a "
                                             "dynamic mapping: inbound mapping not added"))
                continue
            keep.append(f)
        mine = set(keep)
        self.config = config.with_(forwards=tuple(f for f in config.forwards
                                                  if f in mine or _family(f.internal_ip) != self.family))
        if self.external_ip is not None:
            for key, f in old.items():
                if key not in new or new[key] != f:
                    e = self.by_external.get(key)
                    if e is not None and e.mapping.static:
                        del self.by_external[key]
                        ik = (e.mapping.proto, e.mapping.internal_ip, e.mapping.internal_port)
                        if self.by_internal.get(ik) is e:
                            del self.by_internal[ik]
                        self._tell(-1, e.mapping)
            for f in keep:
                if (f.proto, f.external_port) not in old or old[(f.proto, f.external_port)] != f:
                    self.pools[f.proto].take(f.external_port)  # keep it from dynamic use
                    self._add_static(f)
        if tell:
            self._events.append(Reloaded(len(self.config.forwards)))
        return self.config

    # ------------------------------------------------------------------ status
    def mappings(self) -> list[Mapping]:
        return list(self.each())

    def each(self) -> Iterator[Mapping]:
        """Live mappings, each once, lazily: the status file wants 200 and a count of a table
        that may hold 100,000s (written every second while packets wait for the GIL).  The dicts
        are read as they are: the caller holds the engine, which does not change meanwhile."""
        seen = set()
        for e in itertools.chain(self.by_external.values(), self.by_internal.values()):
            if id(e) not in seen:
                seen.add(id(e))
                yield e.mapping

    def rows(self, limit: int = 200) -> list[dict]:
        """Live mappings as plain data (for the status file), at most ``limit``."""
        rows = []
        for m in itertools.islice(self.each(), limit):
            e = self.by_external.get((m.proto, m.external_port))
            rows.append({"proto": Proto(m.proto).name.lower(),
                         "internal": endpoint(m.internal_ip, m.internal_port),
                         "external": endpoint(m.external_ip, m.external_port),
                         "static": m.static, "flows": e.conns if e is not None else 0})
        return rows

    def pool_use(self) -> dict:
        return {Proto(p).name.lower(): {"used": u.used, "size": u.size}
                for p, u in ((p, pool.use()) for p, pool in self.pools.items())}

