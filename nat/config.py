"""NAT configuration: VMware's ``nat.conf`` and roam's own TOML, into one frozen value.

Both parsers fail only with :class:`ConfigError`, which names the file and line.
Settings below the RFC minimums are honoured (the config wins) but each one adds a
warning to ``NatConfig.warnings``; unknown sections and keys are kept out and warned about.

nat.conf (VMware)::

    [host]
    ip = 198.18.0.1          # the NAT's own internal address ...
    netmask = 255.255.255.0  # ... and the internal network it implies
    [udp]
    timeout = 60             # seconds (below 120 s: warning, RFC 4787 REQ-5)
    [tcp]
    timeWaitTimeout = 30
    [incomingtcp]
    8080 = 198.18.0.2:80
    [incomingudp]
    5353 = 198.18.0.2:53

NAT66 (IPv6, as ip6tables MASQUERADE): VMware's ``[host] natIp6Enable = 1`` with
``natIp6Prefix = 2001:db8:1::/64`` (the internal IPv6 network); an inbound mapping to an
IPv6 internal address is written ``8080 = [2001:db8:1::2]:80`` and maps that port of the
external IPv6 address (the same port may be mapped in both families).  In TOML: ``nat66 =
true``, ``internal6 = [...]``, ``external_ip6 = "..."``; ``to = "[2001:db8:1::2]:80"``.

TOML (roam)::

    external_ip = "203.0.113.1"       # optional; the plugin reads the interface
    internal = ["198.18.0.0/24"]
    filtering = "endpoint-independent" # | "address-dependent" | "address-and-port-dependent"
    hairpinning = true
    [ports]
    range = "1024-65535"
    low_range = "600-1023"
    [timeouts]
    udp = 300
    tcp_established = 7440
    tcp_transitory = 240
    tcp_time_wait = 240
    icmp = 60
    [[inbound]]
    proto = "tcp"
    port = 8080
    to = "198.18.0.2:80"
"""
from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from enum import IntEnum

from conntrack.packet import Proto

#: RFC minimums (seconds): RFC 4787 REQ-5, RFC 5382 REQ-5, RFC 5508 REQ-1.
UDP_MIN = 120
TCP_ESTABLISHED_MIN = 7440
TCP_TRANSITORY_MIN = 240
ICMP_MIN = 60
#: "No timeout" (nat.conf's ``[udp] timeout = 0``): a finite lifetime no flow reaches (~136
#: years), because the tracker files deadlines by whole seconds and infinity has none.
NO_TIMEOUT = float(2 ** 32)


class Filtering(IntEnum):
    """Which inbound packets an existing mapping admits (RFC 4787 section 5)."""

    ENDPOINT_INDEPENDENT = 1
    ADDRESS_DEPENDENT = 2
    ADDRESS_AND_PORT_DEPENDENT = 3


_FILTERING_NAMES = {
    "endpoint-independent": Filtering.ENDPOINT_INDEPENDENT,
    "address-dependent": Filtering.ADDRESS_DEPENDENT,
    "address-and-port-dependent": Filtering.ADDRESS_AND_PORT_DEPENDENT,
}


class ConfigError(ValueError):
    """A configuration that cannot be used; says where (file:line) and why."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


@dataclass(frozen=True, slots=True)
class PortForward:
    """An explicit inbound mapping: external ``port`` of ``proto`` -> internal ip:port."""

    proto: int
    external_port: int
    internal_ip: str
    internal_port: int


@dataclass(frozen=True, slots=True)
class NatConfig:
    internal: tuple[str, ...] = ()  # CIDRs of the internal side
    external_ip: str | None = None
    forwards: tuple[PortForward, ...] = ()
    filtering: Filtering = Filtering.ENDPOINT_INDEPENDENT
    hairpinning: bool = True
    port_range: tuple[int, int] = (1024, 65535)
    low_port_range: tuple[int, int] = (600, 1023)
    icmp_id_range: tuple[int, int] = (1, 65535)
    #: ``roam nat --workers``: this worker's lane of the TCP/UDP ranges (:func:`nat.ports.in_lane`);
    #: set by the plugin, never read from a file
    port_lane: tuple[int, int, int] | None = None
    udp_timeout: float = 300
    tcp_established: float = TCP_ESTABLISHED_MIN
    tcp_transitory: float = TCP_TRANSITORY_MIN
    tcp_time_wait: float = TCP_TRANSITORY_MIN
    icmp_timeout: float = ICMP_MIN
    capacity: int = 65536
    nat66: bool = False  # translate IPv6 too (natIp6Enable)
    internal6: tuple[str, ...] = ()  # CIDRs of the internal side, IPv6 (natIp6Prefix)
    external_ip6: str | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)
    #: nat.conf sections roam does not use, kept as read: ((name, ((key, value), ...)), ...)
    other_sections: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = field(default=(), compare=False)

    def with_(self, **changes) -> "NatConfig":
        return replace(self, **changes)

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(c, strict=False) for c in self.internal)

    def networks6(self) -> tuple[ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.IPv6Network(c, strict=False) for c in self.internal6)


# ----------------------------------------------------------------------------- helpers
def _port(text, where: str, what: str = "port") -> int:
    try:
        p = int(str(text).strip(), 10)
    except ValueError:
        raise ConfigError(where, f"{what} {text!r} is not a number") from None
    if not 1 <= p <= 65535:
        raise ConfigError(where, f"{what} {p} is outside 1-65535")
    return p


def _ipv4(text, where: str) -> str:
    try:
        return str(ipaddress.IPv4Address(str(text).strip()))
    except ValueError:
        raise ConfigError(where, f"{text!r} is not an IPv4 address") from None


def _ipv6(text, where: str) -> str:
    try:
        return str(ipaddress.IPv6Address(str(text).strip()))
    except ValueError:
        raise ConfigError(where, f"{text!r} is not an IPv6 address") from None


def _endpoint(text, where: str) -> tuple[str, int]:
    """ADDRESS:PORT, or [IPv6 ADDRESS]:PORT (brackets as in URLs, RFC 3986)."""
    host, sep, port = str(text).strip().rpartition(":")
    if not sep:
        raise ConfigError(where, f"{text!r} should be ADDRESS:PORT or [IPV6-ADDRESS]:PORT")
    if host.startswith("[") and host.endswith("]"):
        return _ipv6(host[1:-1], where), _port(port, where)
    if ":" in host:
        raise ConfigError(where, f"{text!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
    return _ipv4(host, where), _port(port, where)


def family(ip: str) -> int:
    """4 or 6: the family of an address given as text (a PortForward's ``internal_ip``)."""
    return 6 if ":" in ip else 4


def _range(text, where: str, low: int = 1, high: int = 65535) -> tuple[int, int]:
    a, sep, b = str(text).partition("-")
    if not sep:
        raise ConfigError(where, f"range {text!r} should be FIRST-LAST")
    lo, hi = _port(a, where), _port(b, where)
    if lo > hi or lo < low or hi > high:
        raise ConfigError(where, f"range {lo}-{hi} must be ascending within {low}-{high}")
    return lo, hi


def _seconds(text, where: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise ConfigError(where, f"timeout {text!r} is not a number of seconds") from None
    if not math.isfinite(v):
        raise ConfigError(where, f"timeout {text!r} is not a finite number of seconds")
    if not v > 0:
        raise ConfigError(where, f"timeout {v} must be positive")
    return v


def _cidr(text, where: str) -> str:
    try:
        return str(ipaddress.IPv4Network(str(text).strip(), strict=False))
    except ValueError:
        raise ConfigError(where, f"{text!r} is not an IPv4 network (CIDR)") from None


def _cidr6(text, where: str) -> str:
    try:
        return str(ipaddress.IPv6Network(str(text).strip(), strict=False))
    except ValueError:
        raise ConfigError(where, f"{text!r} is not an IPv6 network (CIDR)") from None


def _flag(value, where: str, what: str) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v not in ("1", "0", "true", "false", "yes", "no"):
        raise ConfigError(where, f"{what} {value!r} should be true or false (1 or 0)")
    return v in ("1", "true", "yes")


def check_minimums(cfg: NatConfig) -> NatConfig:
    """Add a warning for every lifetime the config sets below the RFC minimum."""
    warn = list(cfg.warnings)
    for value, minimum, name, rfc in (
        (cfg.udp_timeout, UDP_MIN, "UDP mapping timeout", "RFC 4787 REQ-5"),
        (cfg.tcp_established, TCP_ESTABLISHED_MIN, "TCP established timeout", "RFC 5382 REQ-5"),
        (cfg.tcp_transitory, TCP_TRANSITORY_MIN, "TCP transitory timeout", "RFC 5382 REQ-5"),
        (cfg.tcp_time_wait, TCP_TRANSITORY_MIN, "TCP TIME_WAIT timeout", "RFC 5382 REQ-5 (transitory)"),
        (cfg.icmp_timeout, ICMP_MIN, "ICMP query timeout", "RFC 5508 REQ-1"),
    ):
        if value < minimum:
            warn.append(f"{name} {value:g} s is below the {rfc} minimum of {minimum} s (kept as configured)")
    lo_a, lo_b = cfg.low_port_range
    if lo_b >= 1024:
        warn.append(f"low port range {lo_a}-{lo_b} reaches 1024 or above (RFC 4787 REQ-3a keeps ports "
                    "below 1024 below 1024)")
    if cfg.port_range[0] < 1024:
        warn.append(f"port range {cfg.port_range[0]}-{cfg.port_range[1]} starts below 1024 (RFC 4787 REQ-3a)")
    warn.extend(forwards_outside(cfg))
    return replace(cfg, warnings=tuple(warn))


def forwards_outside(cfg: NatConfig) -> list[str]:
    """A warning for every inbound mapping to an address outside the internal networks (its
    answers would not come back through the NAT as internal traffic); none without networks."""
    out = []
    for f in cfg.forwards:
        nets, text = (cfg.networks(), cfg.internal) if family(f.internal_ip) == 4 else (cfg.networks6(), cfg.internal6)
        ip = ipaddress.ip_address(f.internal_ip)
        if nets and not any(ip in n for n in nets):
            out.append(f"{Proto(f.proto).name} port {f.external_port} forwards to {f.internal_ip}, outside the "
                       f"internal network ({', '.join(text)})")
    if not cfg.nat66 and any(family(f.internal_ip) == 6 for f in cfg.forwards):
        out.append("inbound mappings to IPv6 addresses are ignored while NAT66 is off (natIp6Enable = 1, "
                   "nat66 = true)")
    return out


def _check_duplicate(seen: dict, f: PortForward, where: str) -> None:
    """A second inbound mapping of one external port is an error naming both places."""
    key = (family(f.internal_ip), f.proto, f.external_port)  # one port may be mapped in each family
    if key in seen:
        raise ConfigError(where, f"{Proto(f.proto).name} port {f.external_port} is mapped twice "
                                 f"(first at {seen[key]})")
    seen[key] = where


# ----------------------------------------------------------------------------- nat.conf
_KNOWN = {"host", "udp", "tcp", "incomingtcp", "incomingudp", "roam"}


def parse_nat_conf(text: str, name: str = "nat.conf") -> NatConfig:
    """Parse VMware's nat.conf syntax. ``[roam]`` may set roam's own keys (as in TOML)."""
    section = None
    host_ip = netmask = None
    host_line = ip6_line = 0
    prefix_where = ""
    kw: dict = {}
    forwards: list[PortForward] = []
    warnings: list[str] = []
    warned_sections: set[str] = set()
    other: dict[str, list[tuple[str, str]]] = {}
    seen_ports: dict = {}
    for n, raw in enumerate(text.splitlines(), 1):
        where = f"{name}:{n}"
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise ConfigError(where, f"section header {line!r} should look like [name]")
            section = line[1:-1].strip().lower()
            if section not in _KNOWN and section not in warned_sections:
                warned_sections.add(section)
                other[section] = []
                warnings.append(f"{where}: unknown section [{section}] kept and ignored")
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(where, f"expected KEY = VALUE, got {line!r}")
        if section is None:
            raise ConfigError(where, f"{key!r} appears before any [section]")
        if section not in _KNOWN:
            other[section].append((key, value))
            continue
        k = key.lower()
        if section == "host":
            if k == "ip":
                host_ip, host_line = _ipv4(value, where), n
            elif k == "netmask":
                netmask = _ipv4(value, where)
            elif k == "externalip":
                kw["external_ip"] = _ipv4(value, where)
            elif k == "natip6enable":
                kw["nat66"], ip6_line = _flag(value, where, "natIp6Enable"), n
            elif k == "natip6prefix":
                kw["internal6"], prefix_where = (_cidr6(value, where),), where
            elif k == "externalip6":
                kw["external_ip6"] = _ipv6(value, where)
            else:
                warnings.append(f"{where}: [host] {key} ignored")
        elif section == "udp":
            if k == "timeout":
                if value == "0":  # VMware: no timeout
                    kw["udp_timeout"] = NO_TIMEOUT
                    warnings.append(f"{where}: [udp] timeout = 0: UDP mappings never time out (VMware's "
                                    "meaning); ports stay taken until a flow is reclaimed under pressure")
                else:
                    kw["udp_timeout"] = _seconds(value, where) if value != "-1" else 86400.0
            else:
                warnings.append(f"{where}: [udp] {key} ignored")
        elif section == "tcp":
            if k == "timewaittimeout":
                kw["tcp_time_wait"] = _seconds(value, where)
            elif k == "timeout":
                kw["tcp_established"] = _seconds(value, where)
            else:
                warnings.append(f"{where}: [tcp] {key} ignored")
        elif section in ("incomingtcp", "incomingudp"):
            proto = Proto.TCP if section == "incomingtcp" else Proto.UDP
            ext = _port(key, where, "external port")
            ip, port = _endpoint(value, where)
            forwards.append(PortForward(int(proto), ext, ip, port))
            _check_duplicate(seen_ports, forwards[-1], where)
        elif section == "roam":
            _roam_key(kw, k, value, where)
    if host_ip is not None:
        if netmask is None:
            raise ConfigError(f"{name}:{host_line}", "[host] ip needs a netmask")
        try:
            net = ipaddress.IPv4Network(f"{host_ip}/{netmask}", strict=False)
        except ValueError as exc:
            raise ConfigError(f"{name}:{host_line}", f"bad [host] netmask: {exc}") from None
        kw["internal"] = (str(net),)
    if kw.get("nat66") and not kw.get("internal6"):
        raise ConfigError(f"{name}:{ip6_line}", "natIp6Enable = 1 needs natIp6Prefix (the internal IPv6 network)")
    if prefix_where and not ip6_line:  # (natIp6Enable = 0 beside it is VMware's default: said, no warning)
        warnings.append(f"{prefix_where}: natIp6Prefix without natIp6Enable: IPv6 is not translated (natIp6Enable = 1)")
    try:
        return check_minimums(NatConfig(forwards=tuple(forwards), warnings=tuple(warnings),
                                        other_sections=tuple((k, tuple(v)) for k, v in other.items()), **kw))
    except ConfigError as exc:
        raise ConfigError(name, exc.message) from None


def _roam_key(kw: dict, k: str, value, where: str) -> None:
    if k == "filtering":
        v = str(value).strip().lower()
        if v not in _FILTERING_NAMES:
            raise ConfigError(where, f"filtering {value!r}: use one of {', '.join(_FILTERING_NAMES)}")
        kw["filtering"] = _FILTERING_NAMES[v]
    elif k in ("port_range", "range"):
        kw["port_range"] = _range(value, where)
    elif k in ("low_port_range", "low_range"):
        kw["low_port_range"] = _range(value, where)
    elif k == "hairpinning":
        kw["hairpinning"] = _flag(value, where, "hairpinning")
    elif k == "nat66":
        kw["nat66"] = _flag(value, where, "nat66")
    elif k == "internal6":
        kw["internal6"] = tuple(_cidr6(c, where) for c in (value if isinstance(value, list) else str(value).split(",")))
    elif k == "external_ip6":
        kw["external_ip6"] = _ipv6(value, where)
    elif k == "internal":
        kw["internal"] = tuple(_cidr(c, where) for c in (value if isinstance(value, list) else str(value).split(",")))
    elif k == "external_ip":
        kw["external_ip"] = _ipv4(value, where)
    elif k == "capacity":
        try:
            kw["capacity"] = int(value)
        except ValueError:
            raise ConfigError(where, f"capacity {value!r} is not a number") from None
        if kw["capacity"] < 1:
            raise ConfigError(where, "capacity must be at least 1")
    else:
        raise ConfigError(where, f"unknown key {k!r}")


# ----------------------------------------------------------------------------- TOML
_TIMEOUT_KEYS = {"udp": "udp_timeout", "tcp_established": "tcp_established",
                 "tcp_transitory": "tcp_transitory", "tcp_time_wait": "tcp_time_wait", "icmp": "icmp_timeout"}


def parse_toml(text: str, name: str = "nat.toml") -> NatConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(name, f"not valid TOML: {exc}") from None
    kw: dict = {}
    warnings: list[str] = []
    for key, value in doc.items():
        where = f"{name}: {key}"
        if key in ("filtering", "hairpinning", "internal", "external_ip", "capacity", "nat66", "internal6",
                   "external_ip6"):
            if key in ("internal", "internal6") and not isinstance(value, (list, str)):
                raise ConfigError(where, f"{key} should be a list of CIDRs")
            _roam_key(kw, key, value, where)
        elif key == "ports":
            for k, v in _table(value, where).items():
                if k not in ("range", "low_range", "icmp_range"):
                    raise ConfigError(f"{where}.{k}", "unknown key (range, low_range, icmp_range)")
                if k == "icmp_range":
                    kw["icmp_id_range"] = _range(v, f"{where}.{k}")
                else:
                    _roam_key(kw, k, v, f"{where}.{k}")
        elif key == "timeouts":
            for k, v in _table(value, where).items():
                if k not in _TIMEOUT_KEYS:
                    raise ConfigError(f"{where}.{k}", f"unknown timeout (known: {', '.join(_TIMEOUT_KEYS)})")
                kw[_TIMEOUT_KEYS[k]] = _seconds(v, _toml_where(text, name, key, k))
        elif key == "inbound":
            if not isinstance(value, list):
                raise ConfigError(where, "use [[inbound]] tables")
            fw = []
            seen_ports: dict = {}
            for i, item in enumerate(value, 1):
                w = f"{name}: inbound #{i}"
                item = _table(item, w)
                unknown = set(item) - {"proto", "port", "to"}
                if unknown:
                    raise ConfigError(w, f"unknown key(s) {', '.join(sorted(unknown))} (proto, port, to)")
                proto = str(item.get("proto", "")).lower()
                if proto not in ("tcp", "udp"):
                    raise ConfigError(w, f"proto {item.get('proto')!r} should be \"tcp\" or \"udp\"")
                if "port" not in item or "to" not in item:
                    raise ConfigError(w, "needs port and to")
                ip, port = _endpoint(item["to"], w)
                fw.append(PortForward(int(Proto.TCP if proto == "tcp" else Proto.UDP),
                                      _port(item["port"], w), ip, port))
                _check_duplicate(seen_ports, fw[-1], w)
            kw["forwards"] = tuple(fw)
        else:
            warnings.append(f"{where}: unknown key or table ignored")
    if kw.get("nat66") and not kw.get("internal6"):
        raise ConfigError(f"{name}: nat66", "nat66 = true needs internal6 (the internal IPv6 networks)")
    if kw.get("internal6") and not kw.get("nat66"):
        warnings.append(f"{name}: internal6 is set but nat66 is off: IPv6 is not translated")
    try:
        return check_minimums(NatConfig(warnings=tuple(warnings), **kw))
    except ConfigError as exc:
        raise ConfigError(name, exc.message) from None


def _toml_where(text: str, name: str, table: str, key: str) -> str:
    """``name:LINE: table.key`` for a key of a TOML table (tomllib keeps no lines): the first
    ``key =`` after the table's header, or a dotted ``table.key =``; without a line if not found."""
    inside = False
    for n, line in enumerate(text.splitlines(), 1):
        s = line.split("#", 1)[0].strip()
        if s.startswith("["):
            inside = s.strip("[] ") == table
        elif re.match(rf"{re.escape(key)}\s*=", s) and inside or re.match(rf"{re.escape(table)}\s*\.\s*"
                                                                          rf"{re.escape(key)}\s*=", s):
            return f"{name}:{n}: {table}.{key}"
    return f"{name}: {table}.{key}"


def _table(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(where, "should be a table")
    return value


def load(path: str) -> NatConfig:
    """Read ``path``: TOML when it ends in .toml, nat.conf syntax otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "not UTF-8 text") from None
    if path.endswith(".toml"):
        return parse_toml(text, path)
    return parse_nat_conf(text, path)
