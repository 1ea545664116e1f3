"""A migration scenario as frozen values: sites, hosts, the VM, peers, connections, migrations, modes.

The model only; reading and writing TOML (with a line for every problem) is
``sim.scenario_toml``, connections taken from a capture ``sim.capture``.
``examples/scenarios/example.toml`` documents every field.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from conntrack import Proto

from .results import MODES

class ScenarioError(ValueError):
    """A scenario that cannot be run; ``line`` is 1-based (0 when unknown)."""

    def __init__(self, message: str, line: int = 0, path: str = "") -> None:
        self.message = message
        self.line = line
        self.path = path
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else (f"line {line}: " if line else ""))
        super().__init__(where + message)


@dataclass(frozen=True, slots=True)
class SiteSpec:
    name: str
    prefix: str
    gateway: str | None = None
    latency: float = 0.005  # one way, LAN to internet core, seconds
    loss: float = 0.0
    proxy: str | None = None  # the tunnel proxy's address: this site is the VM's home


@dataclass(frozen=True, slots=True)
class HostSpec:
    name: str
    site: str
    address: str


@dataclass(frozen=True, slots=True)
class PeerSpec:
    name: str
    address: str
    latency: float = 0.02
    loss: float = 0.0


@dataclass(frozen=True, slots=True)
class VmSpec:
    name: str
    mac: str
    host: str
    home_address: str | None = None  # tunnel mode: its address on the home LAN
    nat_address: str = "198.18.0.10"  # nat modes: its address behind each host's NAT
    nat_gateway: str = "198.18.0.1"
    host_only_address: str = "198.18.1.10"
    bridged: str = "re-lease"  # or "keep": a bridged VM keeps its first address after a move


@dataclass(frozen=True, slots=True)
class ForwardSpec:
    """An inbound NAT mapping (port forward) to the VM, configured on some hosts."""

    protocol: int
    port: int  # the VM's port
    external_port: int
    hosts: tuple[str, ...] | None = None  # None: every host


@dataclass(frozen=True, slots=True)
class ConnSpec:
    id: str
    direction: str  # "outbound" (the VM connects) or "inbound" (a peer connects to the VM)
    protocol: int  # Proto.TCP or Proto.UDP
    peer: str
    port: int  # the server's port: the peer's (outbound) or the VM's (inbound)
    start: float
    interval: float = 1.0
    request: int = 100
    response: int = 200
    session: bool = False  # UDP: the server keys its session on the client's address and port
    timeout: float | None = None  # overrides the scenario's timeout for this connection

    @property
    def protocol_name(self) -> str:
        return "tcp" if self.protocol == Proto.TCP else "udp"


@dataclass(frozen=True, slots=True)
class MigrationSpec:
    at: float
    to: str
    downtime: float  # seconds


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    duration: float
    sites: tuple[SiteSpec, ...]
    hosts: tuple[HostSpec, ...]
    peers: tuple[PeerSpec, ...]
    vm: VmSpec
    connections: tuple[ConnSpec, ...]
    migrations: tuple[MigrationSpec, ...] = ()
    forwards: tuple[ForwardSpec, ...] = ()
    modes: tuple[str, ...] = MODES
    seed: int = 1
    tcp_timeout: float = 30.0
    udp_timeout: float = 30.0
    tunnel_keepalive: float = 5.0
    source: str = field(default="", compare=False)

    def site(self, name: str) -> SiteSpec:
        return next(s for s in self.sites if s.name == name)

    def host(self, name: str) -> HostSpec:
        return next(h for h in self.hosts if h.name == name)

    def peer(self, name: str) -> PeerSpec:
        return next(p for p in self.peers if p.name == name)

    def timeout_of(self, c: ConnSpec) -> float:
        if c.timeout is not None:
            return c.timeout
        return self.tcp_timeout if c.protocol == Proto.TCP else self.udp_timeout

    @property
    def home(self) -> SiteSpec | None:
        return next((s for s in self.sites if s.proxy), None)
