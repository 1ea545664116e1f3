"""The lab topology: sites, hosts, peers, an internet and a VM, as network namespaces.

Built on :mod:`tools.lab.netlab` (which owns every lab rule: naming, nothing in the root
namespace, cleanup).  One namespace per role::

    inet        the internet core and every site's gateway router: one bridge per site
                LAN (``lan<i>``, the site's gateway address on it), a point-to-point link
                to each peer, ip_forward on, no default route (an address nobody routes
                gets ICMP net unreachable, like the simulator's "no route")
    home        the home site's proxy machine: bridge ``br0`` on the home LAN, the proxy's
                address on it (``roam tunnel proxy`` joins ``br0``)
    h<j>        a host (hypervisor) on a site: uplink ``up0`` on the site's LAN bridge in
                ``inet``, bridge ``br0`` holding ``up0`` and the host's address (so a bridged
                VM is on the site LAN), default route via the site's gateway
    p<k>        a remote peer: its public address on ``eth0``, a /30 transit link to inet
    vm          the VM: ``eth0`` (the scenario's MAC); its other end ``vm0`` lives in the
                host the VM runs on and is what a migration moves (:meth:`Topology.move_vm`)

Addresses come from the scenario (sites, hosts, peers) and must lie in the documentation
ranges 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 (public roles) or 198.18.0.0/15
(private); transit links use 198.19.<k>.0/30.  :func:`default_layout` gives the layout
``roam lab up --sites N`` builds.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .netlab import Lab

PUBLIC = tuple(ipaddress.IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"))
PRIVATE = ipaddress.IPv4Network("198.18.0.0/15")
TRANSIT = ipaddress.IPv4Network("198.19.0.0/16")  # peer <-> inet links: 198.19.<k>.0/30
VM_LINK = "vm0"  # the host end of the VM's link (moves on migration)
VM_IF = "eth0"  # the VM's own interface


#: The internet/gateway namespace: it routes, does no source filtering (like the simulator's
#: network, which routes on the destination only), and notices a neighbour that left its LAN
#: within about two seconds (short ARP timers on its LAN interfaces, :data:`INET_NEIGH`; the
#: defaults hold a vanished neighbour for up to 45 s), answering what is sent to it with ICMP
#: host unreachable.
INET_SYSCTL = {
    "net.ipv4.ip_forward": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
    "net.ipv4.icmp_ratelimit": "0",
}
#: Per interface (a fresh namespace has no ``neigh/default`` to inherit from).
INET_NEIGH = {"base_reachable_time_ms": "1000", "delay_first_probe_time": "1", "retrans_time_ms": "250"}


class TopologyError(ValueError):
    """A layout the lab cannot build (address outside the allowed ranges, overlap, ...)."""


@dataclass(frozen=True, slots=True)
class SiteNet:
    name: str
    prefix: str
    gateway: str  # the inet namespace's address on this LAN
    bridge: str  # bridge name in the inet namespace
    proxy: str | None = None  # home site: the proxy's address

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.prefix).prefixlen


@dataclass(frozen=True, slots=True)
class HostNode:
    name: str
    site: str
    address: str
    ns: str


@dataclass(frozen=True, slots=True)
class PeerNode:
    name: str
    address: str
    ns: str
    transit: str  # the peer's transit address (inet is .1 of the same /30)


@dataclass
class Topology:
    """What was built; the VM's current host is ``vm_host`` (None while it moves)."""

    lab: Lab
    inet: str
    sites: dict[str, SiteNet]
    hosts: dict[str, HostNode]
    peers: dict[str, PeerNode]
    home: str | None = None  # the proxy's namespace
    vm: str | None = None
    vm_mac: str | None = None
    vm_host: str | None = None
    extra: dict = field(default_factory=dict)

    # -- the VM's link -----------------------------------------------------
    def host_ns(self, host: str) -> str:
        return self.hosts[host].ns

    def vm_link_down(self) -> None:
        """Cut the VM off (migration begins): its link's host end goes down."""
        if self.vm_host is not None:
            ipr = self.lab.ipr(self.host_ns(self.vm_host))
            ipr.link("set", index=self.lab.index(self.host_ns(self.vm_host), VM_LINK), state="down")

    def move_vm(self, to: str) -> None:
        """Move the host end of the VM's link to host ``to`` (down; the caller plugs it and brings it up).

        The kernel takes the interface out of any bridge and drops its addresses on
        the move; the VM's own interface keeps its addresses.
        """
        if self.vm_host is None:
            raise TopologyError("the VM is not attached anywhere")
        if to == self.vm_host:
            return
        self.lab.move_link(self.host_ns(self.vm_host), VM_LINK, self.host_ns(to), up=False)
        self.vm_host = to

    def plug_bridge(self, bridge: str = "br0") -> None:
        """Enslave the VM link's host end to ``bridge`` on its current host and bring it up."""
        assert self.vm_host is not None, "the VM's link is on no host"
        ns = self.host_ns(self.vm_host)
        ipr = self.lab.ipr(ns)
        ipr.link("set", index=self.lab.index(ns, VM_LINK), master=self.lab.index(ns, bridge))
        self.lab.up(ns, VM_LINK)

    def plug_routed(self, cidr: str) -> None:
        """Give the VM link's host end ``cidr`` (the host's side of a host-only/NAT net) and bring it up."""
        assert self.vm_host is not None, "the VM's link is on no host"
        ns = self.host_ns(self.vm_host)
        self.lab.flush_addr(ns, VM_LINK)
        self.lab.addr(ns, VM_LINK, cidr)
        self.lab.up(ns, VM_LINK)

    def vm_readdress(self, cidr: str | None, gateway: str | None) -> None:
        """Replace the VM's address (and default route); ``None`` leaves it without one."""
        lab, vm = self.lab, self.vm
        assert vm is not None, "a topology without a VM"
        lab.flush_addr(vm, VM_IF)
        if cidr:
            lab.addr(vm, VM_IF, cidr)
            if gateway:
                lab.route(vm, "default", gateway)

    # -- the kernel's draws ----------------------------------------------------
    def neigh_draws(self) -> dict[str, float]:
        """Each site router's reachable time in force, as a factor of its base: the kernel's draw
        (``neigh_rand_reach_time``), which the simulator replays (``sim.linux.NeighParams``)."""
        draws = {}
        for s in self.sites.values():
            out = self.lab.run(self.inet, ["ip", "ntable", "show", "dev", s.bridge], check=False).stdout.split()
            try:
                reach, base = int(out[out.index("reachable") + 1]), int(out[out.index("base_reachable") + 1])
            except (ValueError, IndexError):  # an ip(8) that prints otherwise: the simulator plays the mean
                continue
            if base > 0:
                draws[s.name] = reach / base
        return draws

    # -- description ----------------------------------------------------------
    def describe(self) -> dict:
        return {
            "suffix": self.lab.suffix,
            "prefix": self.lab.prefix,
            "namespaces": list(self.lab.namespaces),
            "inet": self.inet,
            "home": self.home,
            "vm": self.vm,
            "vm_mac": self.vm_mac,
            "vm_host": self.vm_host,
            "sites": {s.name: {"prefix": s.prefix, "gateway": s.gateway, "bridge": s.bridge, "proxy": s.proxy}
                      for s in self.sites.values()},
            "hosts": {h.name: {"site": h.site, "address": h.address, "ns": h.ns} for h in self.hosts.values()},
            "peers": {p.name: {"address": p.address, "ns": p.ns} for p in self.peers.values()},
            **({"extra": self.extra} if self.extra else {}),
        }


def _allowed(addr: ipaddress.IPv4Address | ipaddress.IPv4Network, what: str) -> None:
    nets = [*PUBLIC, PRIVATE]
    if isinstance(addr, ipaddress.IPv4Network):
        ok = any(addr.subnet_of(n) for n in nets)
    else:
        ok = any(addr in n for n in nets)
    if not ok:
        raise TopologyError(f"{what} {addr} is outside the lab's ranges (192.0.2.0/24, 198.51.100.0/24, "
                            f"203.0.113.0/24, 198.18.0.0/15)")


def host_only_side(vm_address: str, prefixlen: int = 24) -> str:
    """The host's address on a VM's host-only network: the network's first address (second if the VM has it)."""
    net = ipaddress.IPv4Network(f"{vm_address}/{prefixlen}", strict=False)
    side = net.network_address + 1
    return str(side + 1 if str(side) == vm_address else side)


def vm_addresses(vm) -> list[tuple[str, str]]:
    """(what, address) for every address the lab may configure for ``vm`` (a VmSpec) in any mode."""
    out = [("VM home_address", vm.home_address), ("VM nat_address", vm.nat_address),
           ("VM nat_gateway", vm.nat_gateway), ("VM host_only_address", vm.host_only_address)]
    if vm.host_only_address:
        out.append(("the host side of the VM's host-only network", host_only_side(vm.host_only_address)))
    return [(w, a) for w, a in out if a]


def build(lab: Lab, sites, hosts, peers, vm=None, vm_host: str | None = None,
          home_peer: str | None = None) -> Topology:
    """Build the lab from scenario-style specs (``sim.scenario`` SiteSpec/HostSpec/PeerSpec/VmSpec).

    ``vm`` (a VmSpec, or None for no VM) gets its namespace and link; the link's
    host end is created in ``vm_host`` (default ``vm.host``) and left down and
    unplugged: the caller decides bridged, routed or tunnelled.  ``home_peer``: an
    address on the home LAN for a machine there (namespace ``homepc``).
    """
    if len(peers) > 250 or len(hosts) > 250 or len(sites) > 250:
        raise TopologyError("too many sites, hosts or peers for one lab (at most 250 each)")
    nets = []
    for s in sites:
        net = ipaddress.IPv4Network(s.prefix)
        _allowed(net, f"site {s.name!r} prefix")
        if net.overlaps(TRANSIT):
            raise TopologyError(f"site {s.name!r} prefix {net} overlaps the lab's transit range {TRANSIT}")
        nets.append(net)
    for p in peers:
        _allowed(ipaddress.IPv4Address(p.address), f"peer {p.name!r} address")
    if vm is not None:
        for what, a in vm_addresses(vm):
            _allowed(ipaddress.IPv4Address(a), what)
    if home_peer:
        _allowed(ipaddress.IPv4Address(home_peer), "home peer address")

    inet = lab.ns("inet")
    for key, value in INET_SYSCTL.items():
        lab.sysctl(inet, key, value)
    topo = Topology(lab, inet, {}, {}, {})

    for i, (s, net) in enumerate(zip(sites, nets)):
        gw = s.gateway or str(net.network_address + 1)
        br = lab.bridge(inet, f"lan{i}")
        for key, value in INET_NEIGH.items():
            lab.sysctl(inet, f"net.ipv4.neigh.{br}.{key}", value)
        lab.addr(inet, br, f"{gw}/{net.prefixlen}")
        topo.sites[s.name] = SiteNet(s.name, str(net), gw, br, s.proxy)
        if s.proxy:
            home = lab.ns("home")
            lab.veth(home, "lan0", inet, f"hm{i}")
            lab.ipr(inet).link("set", index=lab.index(inet, f"hm{i}"), master=lab.index(inet, br))
            lab.bridge(home, "br0", ports=["lan0"])
            lab.addr(home, "br0", f"{s.proxy}/{net.prefixlen}")
            lab.route(home, "default", gw)
            topo.home = home
            if home_peer:
                if ipaddress.IPv4Address(home_peer) not in net:
                    raise TopologyError(f"home peer {home_peer} is outside the home prefix {net}")
                pc = lab.ns("homepc")
                lab.veth(pc, "eth0", inet, f"hp{i}")
                lab.ipr(inet).link("set", index=lab.index(inet, f"hp{i}"), master=lab.index(inet, br))
                lab.addr(pc, "eth0", f"{home_peer}/{net.prefixlen}")
                lab.route(pc, "default", gw)
                topo.peers["homepc"] = PeerNode("homepc", home_peer, pc, home_peer)

    for j, h in enumerate(hosts, 1):
        site = topo.sites[h.site]
        ns = lab.ns(f"h{j}")
        lab.veth(ns, "up0", inet, f"hl{j}")
        lab.ipr(inet).link("set", index=lab.index(inet, f"hl{j}"), master=lab.index(inet, site.bridge))
        lab.bridge(ns, "br0", ports=["up0"])
        lab.addr(ns, "br0", f"{h.address}/{site.prefixlen}")
        lab.route(ns, "default", site.gateway)
        topo.hosts[h.name] = HostNode(h.name, h.site, h.address, ns)

    for k, p in enumerate(peers, 1):
        ns = lab.ns(f"p{k}")
        transit = TRANSIT.network_address + 4 * k
        lab.veth(ns, "eth0", inet, f"pl{k}")
        lab.addr(inet, f"pl{k}", f"{transit + 1}/30")
        lab.addr(ns, "eth0", f"{transit + 2}/30")
        lab.addr(ns, "eth0", f"{p.address}/32")
        # the peer's public address is the source of everything it starts
        lab.ipr(ns).route("add", dst="0.0.0.0/0", gateway=str(transit + 1), prefsrc=p.address)
        lab.route(inet, f"{p.address}/32", str(transit + 2))
        topo.peers[p.name] = PeerNode(p.name, p.address, ns, str(transit + 2))

    if vm is not None:
        where = vm_host or vm.host
        if where not in topo.hosts:
            raise TopologyError(f"the VM's host {where!r} is not a host of the lab")
        vmns = lab.ns("vm")
        lab.veth(vmns, VM_IF, topo.hosts[where].ns, VM_LINK)
        lab.ipr(vmns).link("set", index=lab.index(vmns, VM_IF), address=vm.mac)
        lab.ipr(topo.hosts[where].ns).link("set", index=lab.index(topo.hosts[where].ns, VM_LINK), state="down")
        topo.vm, topo.vm_mac, topo.vm_host = vmns, vm.mac, where
    return topo


def build_for(lab: Lab, sc) -> Topology:
    """The lab for a :class:`sim.scenario.Scenario`: its sites, hosts, peers and VM."""
    return build(lab, sc.sites, sc.hosts, sc.peers, sc.vm)


def default_layout(n_sites: int = 2):
    """(sites, hosts, peers, vm) for ``roam lab up``: a home site and ``n_sites`` remote sites, one host each."""
    from sim.scenario import HostSpec, PeerSpec, SiteSpec, VmSpec

    if not 1 <= n_sites <= 8:
        raise TopologyError(f"--sites must be 1..8, got {n_sites}")
    sites = [SiteSpec("home", "192.0.2.0/24", "192.0.2.1", proxy="192.0.2.2")]
    hosts = []
    for i in range(n_sites):
        net = ipaddress.IPv4Network(f"203.0.113.{32 * i}/27")
        sites.append(SiteSpec(f"site{i + 1}", str(net), str(net.network_address + 1)))
        hosts.append(HostSpec(f"host{i + 1}", f"site{i + 1}", str(net.network_address + 10)))
    peers = [PeerSpec("peer1", "198.51.100.10"), PeerSpec("peer2", "198.51.100.11")]
    vm = VmSpec("vm", "02:00:00:00:00:01", "host1", home_address="192.0.2.50")
    return sites, hosts, peers, vm


# ------------------------------------------------------------------ a lab that outlives its process
LAB_PREFIX = "roamlab"  # `roam lab` namespaces: never touched by the tests' cleanup_stale("roam")


def keep(lab: Lab) -> None:
    """Let ``lab``'s namespaces outlive this process (``roam lab up``); ``remove_namespaces`` ends them."""
    lab.detach()


def remove_namespaces(names: list[str], prefix: str = LAB_PREFIX) -> tuple[list[str], list[str]]:
    """Stop what runs inside and delete each of our namespaces; returns (removed, errors).

    Names that do not follow our naming are refused (returned as errors), never touched.
    """
    from . import netlab

    removed, errors = [], []
    for name in names:
        present = name in netlab.list_lab_namespaces(prefix)
        error = netlab.remove_namespace(name, prefix)
        if error:
            errors.append(error)
        elif present:
            removed.append(name)
    return removed, errors


# ------------------------------------------------------------------ the tunnel's lab
TUNNEL_VM_MAC = "02:00:00:00:00:50"
TUNNEL_VM_IP, TUNNEL_PEER_IP, TUNNEL_PROXY_IP = "198.18.0.50", "198.18.0.10", "192.0.2.1"


def tunnel_lab(lab: Lab) -> dict[str, str]:
    """The tunnel's lab (its netns tests and `roam bench tunnel`): role -> namespace.

    home: the home LAN bridge br0 with the peer (198.18.0.10) on it and the proxy's
    public address 192.0.2.1; inet routes to two remote hosts, hosta (198.51.100.1) and
    hostb (203.0.113.1), each with a VM bridge brvm; the VM (198.18.0.50, its home
    address) has its link ``vmport`` on host A's brvm.
    """
    ns = {r: lab.ns(r) for r in ("home", "peer", "inet", "hosta", "hostb", "vm")}
    for h in ("hosta", "hostb"):  # the hosts' own bridges stay silent on the VM's LAN (no IPv6 chatter)
        lab.sysctl(ns[h], "net.ipv6.conf.default.disable_ipv6", "1")
        lab.sysctl(ns[h], "net.ipv6.conf.all.disable_ipv6", "1")
    lab.veth(ns["peer"], "p0", ns["home"], "hp")
    lab.bridge(ns["home"], "br0", ports=["hp"])
    lab.addr(ns["peer"], "p0", f"{TUNNEL_PEER_IP}/24")
    lab.veth(ns["home"], "hi", ns["inet"], "ih")
    lab.veth(ns["hosta"], "ai", ns["inet"], "ia")
    lab.veth(ns["hostb"], "bi", ns["inet"], "ib")
    for n, i, a in (("home", "hi", TUNNEL_PROXY_IP), ("hosta", "ai", "198.51.100.1"), ("hostb", "bi", "203.0.113.1")):
        lab.addr(ns[n], i, f"{a}/24")
        lab.route(ns[n], "default", a.rsplit(".", 1)[0] + ".254")
    for i, a in (("ih", "192.0.2.254"), ("ia", "198.51.100.254"), ("ib", "203.0.113.254")):
        lab.addr(ns["inet"], i, f"{a}/24")
    lab.sysctl(ns["inet"], "net.ipv4.ip_forward", "1")
    for h in ("hosta", "hostb"):
        lab.bridge(ns[h], "brvm")
    lab.veth(ns["vm"], "eth0", ns["hosta"], "vmport")
    lab.ipr(ns["vm"]).link("set", index=lab.index(ns["vm"], "eth0"), address=TUNNEL_VM_MAC)
    lab.addr(ns["vm"], "eth0", f"{TUNNEL_VM_IP}/24")
    enslave(lab, ns["hosta"], "vmport", "brvm")
    return ns


def enslave(lab: Lab, ns: str, ifname: str, bridge: str) -> None:
    """Put ``ifname`` on ``bridge`` in ``ns`` and bring it up."""
    lab.ipr(ns).link("set", index=lab.index(ns, ifname), master=lab.index(ns, bridge))
    lab.up(ns, ifname)
