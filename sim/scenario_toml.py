"""Scenario files (TOML) in and out: ``load_scenario``, ``parse_scenario``, ``to_toml``.

``load_scenario(path)`` returns a frozen :class:`~sim.scenario.Scenario` or raises
:class:`~sim.scenario.ScenarioError` naming the file, the line and the problem.  TOML
syntax errors carry tomllib's own line; for everything else a line map built from the
text (table headers and ``key =`` lines) points at the offending key.
``examples/scenarios/example.toml`` documents every field.

Connections can also come from a pcap of the VM's traffic (``[[capture]]``): each
TCP or UDP flow in it becomes one connection (``sim.capture``).
"""
from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections import Counter
from typing import Any, overload

from conntrack import Proto

from .capture import flows_from_capture, read_capture
from .results import MODES
from .scenario import (
    ConnSpec, ForwardSpec, HostSpec, MigrationSpec, PeerSpec, Scenario, ScenarioError, SiteSpec, VmSpec,
)

_PROTOS = {"tcp": Proto.TCP, "udp": Proto.UDP}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}$")


# ---------------------------------------------------------------- line map
_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]?\s*(#.*)?$")
_PART = r"(?:[A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*')"
_KEY = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=")
_PARTS = re.compile(_PART)


class LineMap:
    """Where each table and key sits in the text: ``line(table, index, key)``."""

    def __init__(self, text: str) -> None:
        self.keys: dict[tuple[str, int, str], int] = {}
        self.tables: dict[tuple[str, int], int] = {}
        counts: Counter[str] = Counter()
        table, index = "", 0
        depth = 0  # inside a multi-line array value: keys there are not ours
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0] if '"' not in raw else raw
            if depth == 0:
                m = _HEADER.match(raw)
                if m and not _KEY.match(raw):
                    name = m.group(2).strip().strip('"')
                    if m.group(1) == "[[":
                        index = counts[name]
                        counts[name] += 1
                    else:
                        index = 0
                    table = name
                    self.tables[(table, index)] = n
                    continue
                k = _KEY.match(raw)
                if k:  # a dotted key (``scenario.duration = 5``) is a key of the table it names
                    parts = [p.strip("\"'") for p in _PARTS.findall(k.group(1))]
                    where = ".".join(x for x in (table, *parts[:-1]) if x)
                    at = index if where == table else 0
                    self.keys.setdefault((where, at, parts[-1]), n)
                    if len(parts) > 1:
                        self.keys.setdefault((table, index, parts[0]), n)
                        self.tables.setdefault((where, at), n)
            depth += line.count("[") - line.count("]")
            depth = max(depth, 0)

        self.last = max(n_lines(text), 1)

    def line(self, table: str, index: int = 0, key: str | None = None) -> int:
        """The key's line, else its table's, else where the table is written inline (``vm = {...}``,
        ``site = [{...}]``); 0 only when the text has none of them."""
        if key is not None and (table, index, key) in self.keys:
            return self.keys[(table, index, key)]
        return self.tables.get((table, index)) or self.keys.get(("", 0, table), 0)

    def anywhere(self, table: str, index: int = 0, key: str | None = None) -> int:
        """Like :meth:`line`, but never 0: a thing the file lacks is reported at its end, where it goes."""
        return self.line(table, index, key) or self.last


def n_lines(text: str) -> int:
    return len(text.splitlines())


# ---------------------------------------------------------------- loading
def load_scenario(path: str) -> Scenario:
    """Read and check a scenario file; every problem is a :class:`ScenarioError`."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ScenarioError(f"cannot read: {exc.strerror}", 0, path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"not UTF-8 text (byte {exc.start})", raw.count(b"\n", 0, exc.start) + 1,
                            path) from None
    return parse_scenario(text, path)


def parse_scenario(text: str, path: str = "<scenario>") -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg, line = _where(str(exc), text)
        raise ScenarioError(f"TOML syntax: {msg}", line, path) from None
    return _Builder(data, LineMap(text), path).build()


def _where(msg: str, text: str) -> tuple[str, int]:
    """tomllib's message without its position, and the line: "(at line L, column C)" keeps the column in
    the message; "(at end of document)" is the last line (tomllib on 3.11 has no ``lineno``)."""
    m = re.search(r" \(at line (\d+), column (\d+)\)$", msg)
    if m:
        return f"{msg[:m.start()]} (column {m.group(2)})", int(m.group(1))
    last = max(n_lines(text), 1)
    if msg.endswith(" (at end of document)"):
        return msg[: -len(" (at end of document)")] + " (at the end of the file)", last
    return msg, last


_KNOWN = {
    "scenario": {"name", "duration", "seed", "modes", "tcp_timeout", "udp_timeout", "tunnel_keepalive"},
    "site": {"name", "prefix", "gateway", "latency_ms", "loss", "proxy"},
    "host": {"name", "site", "address"},
    "peer": {"name", "address", "latency_ms", "loss"},
    "vm": {"name", "mac", "host", "home_address", "nat_address", "nat_gateway", "host_only_address", "bridged"},
    "forward": {"protocol", "port", "external_port", "hosts"},
    "connection": {"id", "direction", "protocol", "peer", "port", "start", "interval", "request", "response",
                   "session", "timeout"},
    "migration": {"at", "to", "downtime_ms"},
    "capture": {"file", "vm_address", "start", "peer_latency_ms", "limit", "interval"},
}
#: The longest time a scenario may name (seconds): its duration, a timeout, a move's downtime.
DAY = 86400.0
#: The longest one-way latency (ms) and the longest request interval (s).
LATENCY_MS = 60_000.0
INTERVAL = 3600.0

_ARRAYS = {"site", "host", "peer", "forward", "connection", "migration", "capture"}


#: The ranges a lab may configure (documentation and benchmarking ranges): the VM's own networks
#: (NAT and host-only) must lie in them.  Sites and peers may be anything in the simulator (a
#: capture brings real addresses); the netns backend checks those before it builds a lab.
LAB_RANGES = tuple(ipaddress.IPv4Network(n) for n in
                   ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "198.18.0.0/15"))


class _Builder:
    def __init__(self, data: dict, lines: LineMap, path: str) -> None:
        self.data = data
        self.lines = lines
        self.path = path

    def err(self, msg: str, table: str, index: int = 0, key: str | None = None) -> ScenarioError:
        return ScenarioError(msg, self.lines.anywhere(table, index, key), self.path)

    # -- typed getters -------------------------------------------------
    def get(self, d: dict, table: str, i: int, key: str, kind, default: Any = ..., what: str = "") -> Any:
        if key not in d:
            if default is ...:
                raise self.err(f"[{table}]{self._nth(table, i)} needs '{key}'{what}", table, i)
            return default
        v = d[key]
        ok = isinstance(v, kind) and not (kind in (int, float, (int, float)) and isinstance(v, bool))
        if not ok:
            names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                     list: "an array", (int, float): "a number"}
            raise self.err(f"'{key}' must be {names.get(kind, kind)}, not {type(v).__name__} {v!r}", table, i, key)
        return v

    def strings(self, d: dict, table: str, i: int, key: str, default: Any = ...) -> Any:
        """An array of strings (each item checked: a table or a number in it is the file's error, not ours)."""
        v = self.get(d, table, i, key, list, default)
        if v is default and default is not ...:
            return v
        for x in v:
            if not isinstance(x, str):
                raise self.err(f"'{key}' must be an array of strings; it holds {type(x).__name__} {x!r}",
                               table, i, key)
        return v

    def number(self, d, table, i, key, default=..., minimum=0.0, maximum=DAY, strict=False) -> float:
        """A finite number in range: NaN passes every ``<`` test and infinity (or 1e400) never ends a
        wait, so both are refused here rather than hanging a replay."""
        v = self.get(d, table, i, key, (int, float), default)
        if v is default and default is not ...:
            return v
        if isinstance(v, float) and not math.isfinite(v):
            raise self.err(f"'{key}' must be a finite number, got {v}", table, i, key)
        if v < minimum or (strict and v == minimum) or v > maximum:
            got = f"{v:g}" if isinstance(v, float) else (str(v) if v.bit_length() <= 64 else "a huge integer")
            raise self.err(f"'{key}' must be {'>' if strict else '>='} {minimum:g} and <= {maximum:g}, got {got}",
                           table, i, key)
        return float(v)

    @overload
    def address(self, d: dict, table: str, i: int, key: str, default: None) -> str | None: ...

    @overload
    def address(self, d: dict, table: str, i: int, key: str, default: str = ...) -> str: ...

    def address(self, d, table, i, key, default=...):
        """The IPv4 address at ``key`` (normalised); None only when that is the default given."""
        v = self.get(d, table, i, key, str, default)
        if v is None or (v is default and default is not ...):
            return v
        try:
            a = ipaddress.IPv4Address(v)
        except ValueError:
            raise self.err(f"'{key}' must be an IPv4 address, got {v!r}", table, i, key) from None
        return str(a)

    def port(self, d, table, i, key, default=...) -> int:
        v = self.get(d, table, i, key, int, default)
        if not 1 <= v <= 65535:
            raise self.err(f"'{key}' must be a port 1..65535, got {v}", table, i, key)
        return v

    def name(self, d, table, i, key="name", default=...) -> str:
        v = self.get(d, table, i, key, str, default)
        if not _NAME.match(v):
            raise self.err(f"'{key}' {v!r} must be 1-64 letters, digits or _.:+- (no spaces)", table, i, key)
        return v

    def _nth(self, table: str, i: int) -> str:
        return f" #{i + 1}" if table in _ARRAYS else ""

    def items(self, table: str) -> list[dict]:
        v = self.data.get(table, [])
        if table in _ARRAYS:
            if isinstance(v, dict):
                raise self.err(f"'{table}' is a list: write [[{table}]], not [{table}]", table, 0)
            if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
                raise self.err(f"'{table}' must be tables written as [[{table}]]", table, 0)
        for i, d in enumerate(v):
            unknown = sorted(set(d) - _KNOWN[table])
            if unknown:
                raise self.err(f"unknown key '{unknown[0]}' in [[{table}]]; known: {', '.join(sorted(_KNOWN[table]))}",
                               table, i, unknown[0])
        return v

    def unique(self, table: str, values: list[str], key: str = "name") -> None:
        seen: dict[str, int] = {}
        for i, v in enumerate(values):
            if v in seen:
                raise self.err(f"{key} {v!r} is used twice (first in [[{table}]] #{seen[v] + 1})", table, i, key)
            seen[v] = i

    # -- the whole file ---------------------------------------------------
    def build(self) -> Scenario:
        top_unknown = sorted(set(self.data) - set(_KNOWN))
        if top_unknown:
            t = top_unknown[0]
            raise ScenarioError(f"unknown table or key '{t}'; known: {', '.join(sorted(_KNOWN))}",
                                self.lines.anywhere(t, 0), self.path)
        sc = self.data.get("scenario", {})
        if not isinstance(sc, dict):
            raise self.err("[scenario] must be a table", "scenario")
        unknown = sorted(set(sc) - _KNOWN["scenario"])
        if unknown:
            raise self.err(f"unknown key '{unknown[0]}' in [scenario]; known: {', '.join(sorted(_KNOWN['scenario']))}",
                           "scenario", 0, unknown[0])
        name = self.get(sc, "scenario", 0, "name", str, os.path.splitext(os.path.basename(self.path))[0])
        duration = self.number(sc, "scenario", 0, "duration", 60.0, 0.0, DAY, strict=True)
        seed = self.get(sc, "scenario", 0, "seed", int, 1)
        modes = self.strings(sc, "scenario", 0, "modes", list(MODES))
        for m in modes:
            if m not in MODES:
                raise self.err(f"unknown mode {m!r}; modes: {', '.join(MODES)}", "scenario", 0, "modes")
        if not modes or len(set(modes)) != len(modes):
            raise self.err("'modes' must list at least one mode, each once", "scenario", 0, "modes")
        tcp_timeout = self.number(sc, "scenario", 0, "tcp_timeout", 30.0, 0.0, strict=True)
        udp_timeout = self.number(sc, "scenario", 0, "udp_timeout", 30.0, 0.0, strict=True)
        keepalive = self.number(sc, "scenario", 0, "tunnel_keepalive", 5.0, 0.0, INTERVAL, strict=True)

        sites = self.sites()
        hosts = self.hosts(sites)
        peers = list(self.peers())
        vm = self.vm(hosts, sites)
        if "tunnel" in modes:
            home = [s for s in sites if s.proxy]
            if len(home) != 1:
                raise self.err("mode 'tunnel' needs exactly one [[site]] with 'proxy' (the VM's home LAN)",
                               "scenario", 0, "modes")
            if vm.home_address is None:
                raise self.err("mode 'tunnel' needs 'home_address' (the VM's address on its home LAN)", "vm")
            if home[0].name and ipaddress.IPv4Address(vm.home_address) not in ipaddress.IPv4Network(home[0].prefix):
                raise self.err(f"home_address {vm.home_address} is not inside the home site's prefix "
                               f"{home[0].prefix}", "vm", 0, "home_address")
        forwards = self.forwards(hosts)
        conns = list(self.connections(peers, duration))
        conns += self.captures(peers, conns, duration)
        self.unique("connection", [c.id for c in conns], "id")
        if not conns:
            raise ScenarioError("no connections: add [[connection]] tables or a [[capture]]", self.lines.last,
                                self.path)
        self.check_addresses(sites, hosts, peers)
        migrations = self.migrations(hosts, duration)
        return Scenario(name=name, duration=duration, sites=tuple(sites), hosts=tuple(hosts), peers=tuple(peers),
                        vm=vm, connections=tuple(conns), migrations=tuple(migrations), forwards=tuple(forwards),
                        modes=tuple(modes), seed=seed, tcp_timeout=tcp_timeout, udp_timeout=udp_timeout,
                        tunnel_keepalive=keepalive, source=self.path)

    def sites(self) -> list[SiteSpec]:
        out = []
        items = self.items("site")
        if not items:
            raise ScenarioError("no sites: add at least one [[site]]", self.lines.last, self.path)
        for i, d in enumerate(items):
            name = self.name(d, "site", i)
            prefix = self.get(d, "site", i, "prefix", str)
            try:
                net = ipaddress.IPv4Network(prefix, strict=True)
            except ValueError as exc:
                raise self.err(f"'prefix' {prefix!r} is not an IPv4 network: {exc}", "site", i, "prefix") from None
            if net.prefixlen > 30:
                raise self.err(f"'prefix' {prefix} is too small for a LAN (at most /30)", "site", i, "prefix")
            gw = self.address(d, "site", i, "gateway", None)
            proxy = self.address(d, "site", i, "proxy", None)
            for key, a in (("gateway", gw), ("proxy", proxy)):
                if a is not None and ipaddress.IPv4Address(a) not in net:
                    raise self.err(f"'{key}' {a} is outside the site's prefix {prefix}", "site", i, key)
            latency = self.number(d, "site", i, "latency_ms", 5.0, 0.0, LATENCY_MS) / 1000
            out.append(SiteSpec(name, str(net), gw, latency,
                                self.number(d, "site", i, "loss", 0.0, 0.0, 1.0), proxy))
        self.unique("site", [s.name for s in out])
        for i, site in enumerate(out):
            for other in out[:i]:
                if ipaddress.IPv4Network(site.prefix).overlaps(ipaddress.IPv4Network(other.prefix)):
                    raise self.err(f"prefix {site.prefix} overlaps site {other.name!r} ({other.prefix})", "site", i,
                                   "prefix")
        return out

    def hosts(self, sites: list[SiteSpec]) -> list[HostSpec]:
        out = []
        items = self.items("host")
        if not items:
            raise ScenarioError("no hosts: add at least one [[host]]", self.lines.last, self.path)
        names = {s.name: s for s in sites}
        for i, d in enumerate(items):
            name = self.name(d, "host", i)
            site = self.get(d, "host", i, "site", str)
            if site not in names:
                raise self.err(f"site {site!r} is not a [[site]] (known: {', '.join(names)})", "host", i, "site")
            addr = self.address(d, "host", i, "address")
            if ipaddress.IPv4Address(addr) not in ipaddress.IPv4Network(names[site].prefix):
                raise self.err(f"address {addr} is outside site {site!r} ({names[site].prefix})", "host", i,
                               "address")
            out.append(HostSpec(name, site, addr))
        self.unique("host", [h.name for h in out])
        return out

    def peers(self):
        items = self.items("peer")
        for i, d in enumerate(items):
            yield PeerSpec(self.name(d, "peer", i), self.address(d, "peer", i, "address"),
                           self.number(d, "peer", i, "latency_ms", 20.0, 0.0, LATENCY_MS) / 1000,
                           self.number(d, "peer", i, "loss", 0.0, 0.0, 1.0))

    def vm(self, hosts: list[HostSpec], sites: list[SiteSpec]) -> VmSpec:
        d = self.data.get("vm")
        if not isinstance(d, dict):
            raise ScenarioError("needs a [vm] table (name, mac, host)", self.lines.last, self.path)
        unknown = sorted(set(d) - _KNOWN["vm"])
        if unknown:
            raise self.err(f"unknown key '{unknown[0]}' in [vm]; known: {', '.join(sorted(_KNOWN['vm']))}",
                           "vm", 0, unknown[0])
        name = self.name(d, "vm", 0, default="vm")
        mac = self.get(d, "vm", 0, "mac", str, "02:00:00:00:00:01")
        if not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", mac) or int(mac[:2], 16) & 1:
            raise self.err(f"'mac' must be a unicast MAC like 02:00:00:00:00:01, got {mac!r}", "vm", 0, "mac")
        host = self.get(d, "vm", 0, "host", str)
        if host not in {h.name for h in hosts}:
            raise self.err(f"host {host!r} is not a [[host]] (known: {', '.join(h.name for h in hosts)})",
                           "vm", 0, "host")
        bridged = self.get(d, "vm", 0, "bridged", str, "re-lease")
        if bridged not in ("keep", "re-lease"):
            raise self.err(f"'bridged' must be \"keep\" or \"re-lease\", got {bridged!r}", "vm", 0, "bridged")
        nat_address = self.address(d, "vm", 0, "nat_address", "198.18.0.10")
        nat_gateway = self.address(d, "vm", 0, "nat_gateway", "198.18.0.1")
        host_only = self.address(d, "vm", 0, "host_only_address", "198.18.1.10")
        # the VM's own networks (not a site's): the lab configures them as written, so they must be
        # in the documentation/benchmark ranges, and each /24 must be a usable network
        for key, a in (("nat_address", nat_address), ("nat_gateway", nat_gateway),
                       ("host_only_address", host_only)):
            ip = ipaddress.IPv4Address(a)
            if not any(ip in n for n in LAB_RANGES):
                raise self.err(f"'{key}' {a} is outside the ranges a lab may use ({', '.join(map(str, LAB_RANGES))})",
                               "vm", 0, key)
            if int(ip) & 0xFF in (0, 255):
                raise self.err(f"'{key}' {a} is the network or broadcast address of its /24", "vm", 0, key)
        if nat_address == nat_gateway:
            raise self.err(f"'nat_gateway' {nat_gateway} is the VM's nat_address", "vm", 0, "nat_gateway")
        if ipaddress.IPv4Address(nat_gateway) not in ipaddress.IPv4Network(f"{nat_address}/24", strict=False):
            raise self.err(f"'nat_gateway' {nat_gateway} is not on the VM's NAT network "
                           f"{ipaddress.IPv4Network(f'{nat_address}/24', strict=False)}", "vm", 0, "nat_gateway")
        return VmSpec(name, mac.lower(), host, self.address(d, "vm", 0, "home_address", None),
                      nat_address, nat_gateway, host_only, bridged)

    def forwards(self, hosts: list[HostSpec]):
        out = []
        names = {h.name for h in hosts}
        for i, d in enumerate(self.items("forward")):
            proto = self.get(d, "forward", i, "protocol", str, "tcp")
            if proto not in _PROTOS:
                raise self.err(f"'protocol' must be \"tcp\" or \"udp\", got {proto!r}", "forward", i, "protocol")
            port = self.port(d, "forward", i, "port")
            ext = self.port(d, "forward", i, "external_port", port)
            hs = self.strings(d, "forward", i, "hosts", None)
            if hs is not None:
                for h in hs:
                    if h not in names:
                        raise self.err(f"host {h!r} is not a [[host]]", "forward", i, "hosts")
                hs = tuple(hs)
            out.append(ForwardSpec(_PROTOS[proto], port, ext, hs))
        return out

    def connections(self, peers: list[PeerSpec], duration: float):
        names = {p.name for p in peers}
        for i, d in enumerate(self.items("connection")):
            cid = self.name(d, "connection", i, "id", f"c{i + 1}")
            direction = self.get(d, "connection", i, "direction", str, "outbound")
            if direction not in ("outbound", "inbound"):
                raise self.err(f"'direction' must be \"outbound\" or \"inbound\", got {direction!r}", "connection",
                               i, "direction")
            proto = self.get(d, "connection", i, "protocol", str, "tcp")
            if proto not in _PROTOS:
                raise self.err(f"'protocol' must be \"tcp\" or \"udp\", got {proto!r}", "connection", i, "protocol")
            peer = self.get(d, "connection", i, "peer", str)
            if peer not in names:
                raise self.err(f"peer {peer!r} is not a [[peer]] (known: {', '.join(sorted(names)) or 'none'})",
                               "connection", i, "peer")
            start = self.number(d, "connection", i, "start", 0.0)
            if start >= duration:
                raise self.err(f"'start' {start} is not before the scenario's duration {duration}", "connection",
                               i, "start")
            session = self.get(d, "connection", i, "session", bool, False)
            if session and proto != "udp":
                raise self.err("'session' applies to UDP connections only", "connection", i, "session")
            timeout = self.number(d, "connection", i, "timeout", None, 0.0, DAY, strict=True)
            yield ConnSpec(cid, direction, _PROTOS[proto], peer, self.port(d, "connection", i, "port"), start,
                           self.number(d, "connection", i, "interval", 1.0, 0.001, INTERVAL),
                           int(self.number(d, "connection", i, "request", 100, 1, 1400)),
                           int(self.number(d, "connection", i, "response", 200, 1, 1400)),
                           session, None if timeout is None else float(timeout))

    def migrations(self, hosts: list[HostSpec], duration: float):
        names = {h.name for h in hosts}
        out = []
        last = -1.0
        for i, d in enumerate(self.items("migration")):
            at = self.number(d, "migration", i, "at")
            to = self.get(d, "migration", i, "to", str)
            if to not in names:
                raise self.err(f"host {to!r} is not a [[host]] (known: {', '.join(sorted(names))})", "migration", i,
                               "to")
            down = self.number(d, "migration", i, "downtime_ms", 500.0, 0.0, DAY * 1000) / 1000
            if at < last:
                raise self.err(f"migrations must come in time order: 'at' {at} is before the previous move's end",
                               "migration", i, "at")
            if at >= duration:
                raise self.err(f"'at' {at} is not before the scenario's duration {duration}", "migration", i, "at")
            last = at + down
            out.append(MigrationSpec(at, to, down))
        return out

    def check_addresses(self, sites, hosts, peers) -> None:
        owners: dict[str, str] = {}
        for i, s in enumerate(sites):
            for key, a in (("gateway", s.gateway), ("proxy", s.proxy)):
                if a:
                    owners[a] = f"site {s.name!r} {key}"
        for i, h in enumerate(hosts):
            if h.address in owners:
                raise self.err(f"address {h.address} is already {owners[h.address]}", "host", i, "address")
            owners[h.address] = f"host {h.name!r}"
        for i, p in enumerate(peers):
            if p.address in owners:
                raise self.err(f"address {p.address} is already {owners[p.address]}", "peer", i, "address")
            owners[p.address] = f"peer {p.name!r}"
        self.unique("peer", [p.name for p in peers])

    # -- connections from a capture --------------------------------------
    def captures(self, peers: list[PeerSpec], conns: list[ConnSpec], duration: float) -> list[ConnSpec]:
        from conntrack.pcap import CaptureError

        out: list[ConnSpec] = []
        for i, d in enumerate(self.items("capture")):
            rel = self.get(d, "capture", i, "file", str)
            path = rel if os.path.isabs(rel) else os.path.join(os.path.dirname(os.path.abspath(self.path)), rel)
            vm_addr = self.address(d, "capture", i, "vm_address", None)
            offset = self.number(d, "capture", i, "start", 0.0)
            latency = self.number(d, "capture", i, "peer_latency_ms", 20.0, 0.0, LATENCY_MS) / 1000
            limit = int(self.number(d, "capture", i, "limit", 1000, 1, 1_000_000))
            min_interval = self.number(d, "capture", i, "interval", 1.0, 0.001, INTERVAL)
            try:
                packets = read_capture(path)
            except OSError as exc:
                raise self.err(f"cannot read capture {rel!r}: {exc.strerror}", "capture", i, "file") from None
            except CaptureError as exc:
                raise self.err(f"capture {rel!r}: {exc}", "capture", i, "file") from None
            if not packets:
                raise self.err(f"capture {rel!r} holds no IPv4 TCP or UDP packets", "capture", i, "file")
            out += flows_from_capture(packets, vm_addr, offset, latency, limit, min_interval, peers,
                                      {c.id for c in conns} | {c.id for c in out}, duration, f"cap{i + 1}")
        return out


# ---------------------------------------------------------------- writing
def to_toml(sc: Scenario) -> str:
    """The scenario as a TOML file ``load_scenario`` reads back to an equal value (connections inline)."""

    def v(x) -> str:
        if isinstance(x, bool):
            return "true" if x else "false"
        if isinstance(x, str):
            return '"' + x.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(x, (list, tuple)):
            return "[" + ", ".join(v(i) for i in x) + "]"
        return repr(x)

    def table(name: str, pairs: dict, array: bool = True) -> list[str]:
        out = [f"[[{name}]]" if array else f"[{name}]"]
        out += [f"{k} = {v(x)}" for k, x in pairs.items() if x is not None]
        return out + [""]

    lines = table("scenario", {"name": sc.name, "duration": sc.duration, "seed": sc.seed, "modes": list(sc.modes),
                               "tcp_timeout": sc.tcp_timeout, "udp_timeout": sc.udp_timeout,
                               "tunnel_keepalive": sc.tunnel_keepalive}, False)
    for s in sc.sites:
        lines += table("site", {"name": s.name, "prefix": s.prefix, "gateway": s.gateway,
                                "latency_ms": s.latency * 1000, "loss": s.loss, "proxy": s.proxy})
    for h in sc.hosts:
        lines += table("host", {"name": h.name, "site": h.site, "address": h.address})
    vm = sc.vm
    lines += table("vm", {"name": vm.name, "mac": vm.mac, "host": vm.host, "home_address": vm.home_address,
                          "nat_address": vm.nat_address, "nat_gateway": vm.nat_gateway,
                          "host_only_address": vm.host_only_address, "bridged": vm.bridged}, False)
    for p in sc.peers:
        lines += table("peer", {"name": p.name, "address": p.address, "latency_ms": p.latency * 1000,
                                "loss": p.loss})
    for f in sc.forwards:
        lines += table("forward", {"protocol": "tcp" if f.protocol == Proto.TCP else "udp", "port": f.port,
                                   "external_port": f.external_port,
                                   "hosts": list(f.hosts) if f.hosts is not None else None})
    for c in sc.connections:
        lines += table("connection", {"id": c.id, "direction": c.direction, "protocol": c.protocol_name,
                                      "peer": c.peer, "port": c.port, "start": c.start, "interval": c.interval,
                                      "request": c.request, "response": c.response,
                                      "session": c.session if c.protocol == Proto.UDP else None,
                                      "timeout": c.timeout})
    for m in sc.migrations:
        lines += table("migration", {"at": m.at, "to": m.to, "downtime_ms": m.downtime * 1000})
    return "\n".join(lines)
