"""The attachment modes: how a VM's packets get from its virtual NIC to the world.

Each mode is a thin driver: it moves real bytes between the VM's stack, the host,
the engines (``nat/``, ``tunnel/``) and the network, and re-wires itself when the
VM moves (``detach`` on the old host, ``attach`` on the new one).  Every engine
answers with a ``conntrack.answer.Answer``; a mode carries it out (a DROP is a lost
packet with a reason, ``data`` and ``sends`` go on) and never diffs an engine's
counters.  Packets are read with ``conntrack.parse_ip`` / ``parse_frame`` and built
with ``conntrack.build``.  No mode knows or says whether a connection survives: the
endpoints find out from the packets, and the judge (``sim.judge``) decides.

* bridged   -- the VM is a machine on the host's LAN, with an address from that
               site's DHCP (re-leased or kept on a move, as the scenario says).
* host-only -- the VM sits on a network only its host reaches: nothing routes out.
* nat       -- the VM sits behind its host's NAT engine (``nat/``); a move lands it
               behind another host's NAT, which starts from nothing.
* nat+state -- as nat, but the old NAT's state is carried to the new host's engine
               (it still has a new external address).
* tunnel    -- the VM's frames go through the tunnel agent (``tunnel/``) of its
               host to the proxy on its home LAN; every host runs one from the start,
               told nothing: the VM's frames name it where it runs.
"""
from __future__ import annotations

import random
from functools import partial
from typing import TYPE_CHECKING, Callable

from conntrack import ParseError, Proto, build, parse_frame, parse_ip
from conntrack.packet import EtherType

from . import wire
from .linux import ICMP_HOST_UNREACH, ICMP_NET_UNREACH, LINUX_NEIGH
from .world import Clock, Loss, Network, Site

if TYPE_CHECKING:
    from conntrack.answer import Answer
    from nat.engine import NatEngine
    from tunnel.host import HostEnd

    from .scenario import Scenario
    from .stack import Stack


class EngineUnavailable(RuntimeError):
    """A mode whose engine (``nat/`` or ``tunnel/``) cannot be used: no verdict, an error."""


class Host:
    """A hypervisor host on a site; packets to its address go through its handlers in turn."""

    def __init__(self, name: str, site: Site, address: bytes, net: Network, stack: "Stack") -> None:
        self.name = name
        self.site = site
        self.address = address
        self.net = net
        self.stack = stack  # the host's own TCP/UDP (answers RST for what nothing else takes)
        self.handlers: list[Callable[[bytes, int], bool]] = []
        stack.addresses.add(address)
        stack.out = self.send
        site.holders[address] = self.receive
        site.reserved.add(address)

    def send(self, data: bytes, tag: int) -> None:
        self.net.send(data, tag, self.site)

    def receive(self, data: bytes, tag: int) -> None:
        for h in self.handlers:
            if h(data, tag):
                return
        self.stack.receive(data, tag)


class EngineTimer:
    """Calls ``expire(now)`` at the engine's ``next_deadline()`` and hands its answer to ``after``."""

    __slots__ = ("clock", "engine", "after", "at", "gen", "stopped")

    def __init__(self, clock: Clock, engine, after: Callable[[Answer], None]) -> None:
        self.clock, self.engine, self.after = clock, engine, after
        self.at: float | None = None
        self.gen = 0
        self.stopped = False

    def update(self) -> None:
        if self.stopped:
            return
        d = self.engine.next_deadline()
        if d is None:
            return
        d = max(d, self.clock.now + 1e-6)
        if self.at is None or d < self.at:
            self.at = d
            self.gen += 1
            self.clock.at(d, EngineTimer._fire, self, self.gen)

    @staticmethod
    def _fire(t: "EngineTimer", gen: int) -> None:
        if gen != t.gen or t.stopped:
            return
        t.at = None
        t.after(t.engine.expire(t.clock.now))
        t.update()

    def stop(self) -> None:
        self.stopped = True
        self.gen += 1


class Mode:
    """The common shape of an attachment mode."""

    name = ""

    def __init__(self, sc: "Scenario", clock: Clock, net: Network, vm: "Stack", hosts: dict[str, Host],
                 sites: dict[str, Site], rng: random.Random) -> None:
        self.sc, self.clock, self.net, self.vm, self.hosts, self.sites, self.rng = sc, clock, net, vm, hosts, sites, rng
        self.host: Host | None = None  # None while the VM is in transit
        self.last_host: Host = hosts[sc.vm.host]  # where a peer's lookup still points during a move
        self.mac = wire.mac(sc.vm.mac)
        self.engine_errors: list[str] = []  # exceptions an engine raised on a packet (its bugs)
        vm.out = self.from_vm

    def attach(self, host: Host) -> None:
        self.host = host
        self.last_host = host

    def detach(self) -> None:
        self.host = None

    def from_vm(self, data: bytes, tag: int) -> None:  # the VM sent an IP packet
        raise NotImplementedError

    def vm_address(self) -> bytes:
        """The address the VM's sockets bind to now."""
        raise NotImplementedError

    def published(self, proto: int, port: int) -> tuple[bytes, int]:
        """What a peer dialling in to the VM's ``port`` looks up (DNS, configuration) right now."""
        return self.vm_address(), port

    def to_vm(self, data: bytes, tag: int) -> None:
        self.vm.receive(data, tag)


class Bridged(Mode):
    name = "bridged"

    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.address: bytes | None = None
        self.site: Site | None = None
        self.lease_site: Site | None = None  # where its address and its gateway came from (DHCP)
        self.left_at = 0.0  # when it left that LAN (its gateway's neighbour entry last confirmed)
        self.probe_end: float | None = None  # that entry's probes (DELAY, PROBE) end then

    def attach(self, host: Host) -> None:
        super().attach(host)
        site = host.site
        if self.address is None or self.sc.vm.bridged == "re-lease":
            new = site.lease(self.mac)  # DHCP: the same address again on a LAN that knows the VM
            self.vm.addresses.discard(self.address)
            self.address = new
            self.lease_site = site
        if site is not self.lease_site and self.site is self.lease_site:
            self.left_at, self.probe_end = self.clock.now, None
        self.vm.addresses.add(self.address)
        self.site = site
        site.holders[self.address] = self.to_vm  # the VM answers ARP on its new LAN

    def detach(self) -> None:
        if self.site is not None and self.address is not None and self.site.holders.get(self.address) == self.to_vm:
            del self.site.holders[self.address]
        super().detach()

    def from_vm(self, data: bytes, tag: int) -> None:
        if self.host is None:
            self.net.lose(tag, Loss.VM_DOWN)
            return
        if self.site is not self.lease_site:
            self._off_link(data, tag)
            return
        assert self.site is not None  # on a host: attach() put the VM on its site
        self.net.send(data, tag, self.site)

    def _off_link(self, data: bytes, tag: int) -> None:
        """A VM that kept its address on another LAN still sends to its old gateway's MAC, which nobody
        here takes: lost without a word while the neighbour entry is REACHABLE (Linux's base reachable
        time from when it left), then DELAY and unicast PROBEs (``neigh_timer_handler``), also lost; once
        it has FAILED, a packet starts a resolution that fails too and the VM tells itself host
        unreachable (``ipv4_link_failure``).  (Measured: the lab's VM kept its gateway REACHABLE and
        timed out; the simulator routed it through the new LAN's gateway and heard "unreachable".)"""
        self.net.lose(tag, Loss.OFF_LINK)
        now, p = self.clock.now, LINUX_NEIGH
        if self.probe_end is None:
            if now >= self.left_at + p.reachable:  # STALE: this packet starts DELAY, then PROBE
                self.probe_end = now + p.delay_first_probe + p.probe_probes() * p.retrans
            return
        if now >= self.probe_end:  # FAILED: INCOMPLETE with this packet queued, failing in turn
            self.vm.unreachable(data, tag, ICMP_HOST_UNREACH, p.incomplete_probes() * p.retrans)

    def vm_address(self) -> bytes:
        assert self.address is not None  # leased at the VM's first attach, kept from then on
        return self.address


class HostOnly(Mode):
    name = "host-only"

    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.address = wire.addr(self.sc.vm.host_only_address)
        self.vm.addresses.add(self.address)
        ip = int.from_bytes(self.address, "big")
        self.lan = (ip & 0xFFFFFF00, 0xFFFFFF00)  # the host-only /24: the VM's only route (no gateway)

    def from_vm(self, data: bytes, tag: int) -> None:
        # The VM's own stack routes: its /24 (where only the host's side is) and nothing else.  A packet
        # for anywhere else has no route, like any stack without one; on the /24 nobody but the host is.
        try:
            dst = int.from_bytes(parse_ip(data).dst, "big")
        except ParseError:
            self.net.lose(tag, Loss.PARSE)
            return
        net, mask = self.lan
        if dst & mask == net:  # its own neighbour resolution fails (Linux's defaults), then it tells itself
            self.net.lose(tag, Loss.NO_HOLDER)
            p = LINUX_NEIGH
            self.vm.unreachable(data, tag, ICMP_HOST_UNREACH, p.mcast_probes * p.retrans)
        else:  # no route: the call fails at once (connect, send: ENETUNREACH)
            self.net.lose(tag, Loss.NO_ROUTE)
            self.vm.unreachable(data, tag, ICMP_NET_UNREACH)

    def vm_address(self) -> bytes:
        return self.address


# ------------------------------------------------------------------- tunnel
TUNNEL_PORT = 4789  # the proxy's UDP port in the simulation
HOST_END_PORT = 47000


class Tunnel(Mode):
    """The VM keeps its home address; its frames ride the real ``tunnel`` engines.

    Each end answers every input with a ``conntrack.answer.Answer``: a DROP is a lost
    packet, ``data`` goes on (a sealed message to the proxy, a frame to the VM or the home
    LAN), ``sends`` are the end's own messages.  Within one answer the ends' messages go
    out first, then ``data``, the order the ends produced them.
    """

    name = "tunnel"

    def __init__(self, *a) -> None:
        super().__init__(*a)
        try:
            import tunnel as tun
            from conntrack.answer import Action
            self.tun = tun
            from tunnel.announce import neighbour_binding
            self._binding = neighbour_binding  # what an ARP frame the proxy sends to the LAN tells its router
            self.ACCEPT, self.DROP = Action.ACCEPT, Action.DROP
            key = tun.Key(bytes(self.rng.getrandbits(8) for _ in range(32)))
            self.cipher = tun.AeadCipher(key)
        except Exception as exc:  # noqa: BLE001 - any failure here means the engine is not usable
            raise EngineUnavailable(f"tunnel engine not available: {type(exc).__name__}: {exc}") from exc
        sc = self.sc
        home = sc.home
        if home is None or home.proxy is None or sc.vm.home_address is None:
            raise EngineUnavailable("mode 'tunnel' needs a [[site]] with 'proxy' (the home LAN) and "
                                    "[vm] home_address")
        self.home = self.sites[home.name]
        self.address = wire.addr(sc.vm.home_address)
        self.vm.addresses.add(self.address)
        self.proxy_addr = wire.addr(home.proxy)
        self.gw_mac = bytes.fromhex("020000fffe01")
        self._rand = random.Random(self.rng.getrandbits(64))
        self.proxy = tun.ProxyEnd(self.cipher, random_bytes=self._randbytes)
        self.proxy_timer = EngineTimer(self.clock, self.proxy, lambda ans: self._proxy_answer(ans, -1))
        self.home.holders[self.proxy_addr] = self._proxy_receive
        self.home.holders[self.address] = self._lan_to_proxy  # the VM's MAC lives behind the proxy's bridge port
        self.home.reserved.update({self.proxy_addr, self.address})
        self.agents: dict[str, HostEnd] = {}  # host name -> its agent (a tunnel.HostEnd), from the first attach
        self.timers: dict[str, EngineTimer] = {}
        self.ident = 0

    def _randbytes(self, n: int) -> bytes:
        return self._rand.getrandbits(8 * n).to_bytes(n, "big")

    @staticmethod
    def _ip_of(frame: bytes, mac: bytes) -> bytes | None:
        """The IPv4 packet in an Ethernet frame for ``mac`` (ARP, IPv6, other MACs: None)."""
        try:
            f = parse_frame(frame)
        except ParseError:
            return None
        if f.ethertype != EtherType.IPV4 or f.dst != mac or f.packet is None:
            return None
        return frame[f.l3:f.packet.end]

    # -- the host agents ---------------------------------------------------------------
    # One host end per host, as operators run them: running (and attached) before the scenario
    # starts, told no MAC.  The VM's first frame on a host names it there; leaving a host (its TAP
    # leaves the bridge) makes that agent forget it.  Where the VM's traffic goes is the proxy's to
    # decide from what the agents send (tunnel.presence), nothing here moves it.
    def _start_agents(self) -> None:
        now = self.clock.now
        for name, host in self.hosts.items():
            end = self.tun.HostEnd(self.cipher, keepalive=self.sc.tunnel_keepalive,
                                   dead_after=3 * self.sc.tunnel_keepalive, random_bytes=self._randbytes)
            self.agents[name] = end
            self.timers[name] = EngineTimer(self.clock, end, partial(self._end_answer, host, tag=-1))
            host.handlers.append(partial(self._host_receive, host))
            self._preattach(host, end, end.start(now), now)

    def _preattach(self, host: Host, end, ans, now: float) -> None:
        """The attach the agent made before the scenario began: its messages and the proxy's answers
        handed over directly (bounded), so at time zero every agent is attached, as in the lab."""
        ep = (host.address, HOST_END_PORT)
        pending = [m for _, m in ans.sends]
        for _ in range(8):
            if not pending:
                break
            replies = []
            for m in pending:
                pans = self.proxy.receive(m, ep, now)
                replies += [msg for to, msg in pans.sends if to == ep]
            pending = []
            for m in replies:
                pending += [msg for _, msg in end.receive(m, now).sends]
        if end.state != self.tun.SessionState.ATTACHED:
            raise EngineUnavailable(f"the tunnel agent on {host.name} did not attach before the scenario")
        self.timers[host.name].update()
        self.proxy_timer.update()

    def attach(self, host: Host) -> None:
        moved = bool(self.agents)  # the agents start with the scenario; a later attach is a move's resume
        if not moved:
            self._start_agents()
        super().attach(host)
        self.home.silent.discard(self.address)  # it answers ARP again (through the tunnel)
        if moved:  # QEMU announces the resumed guest: its RARP names it to this host's agent at once
            ans = self.agents[host.name].send_frame(build.rarp_announce(self.mac), self.clock.now)
            self._end_answer(host, ans, -1, to_proxy=True)

    def detach(self) -> None:
        """The VM stops on its host and its TAP leaves the bridge: that agent forgets it (at once).  Its
        address stays behind the proxy's bridge port, but the home gateway's ARP probes go unanswered."""
        host = self.host
        if host is not None:
            self._end_answer(host, self.agents[host.name].forget([self.mac], self.clock.now, "TAP left"), -1)
        self.home.silent.add(self.address)
        super().detach()

    def from_vm(self, data: bytes, tag: int) -> None:
        host = self.host
        if host is None:
            self.net.lose(tag, Loss.VM_DOWN)
            return
        ans = self.agents[host.name].send_frame(build.ether(self.gw_mac, self.mac, data), self.clock.now)
        self._end_answer(host, ans, tag, to_proxy=True)

    def _end_answer(self, host: Host, ans, tag: int, to_proxy: bool = False) -> None:
        """Carry out an agent's answer: its messages to the proxy, then ``data`` on its way (a sealed
        message to the proxy for a frame from the VM, else a frame for the VM, if it is on this host)."""
        if ans.action == self.DROP:
            self.net.lose(tag, Loss.TUNNEL_DROP)
        for _, msg in ans.sends:
            self._to_proxy(host, msg, tag)
        if ans.data is not None and ans.action == self.ACCEPT:
            if to_proxy:
                self._to_proxy(host, ans.data, tag)
            else:
                ip = self._ip_of(ans.data, self.mac)
                if ip is not None:
                    if self.host is host:
                        self.to_vm(ip, tag)
                    else:  # the frame dies in the bridge: the VM is not (or no longer) here
                        self.net.lose(tag, Loss.VM_ABSENT)
        self.timers[host.name].update()

    def _to_proxy(self, host: Host, msg: bytes, tag: int) -> None:
        self.ident += 1
        host.send(build.udp(host.address, self.proxy_addr, HOST_END_PORT, TUNNEL_PORT, msg, self.ident), tag)

    def _host_receive(self, host: Host, data: bytes, tag: int) -> bool:
        try:
            pkt = parse_ip(data)
        except ParseError:
            return False  # not the tunnel's: the host's own stack counts it
        if pkt.proto != Proto.UDP or pkt.dport != HOST_END_PORT:
            return False
        if pkt.src != self.proxy_addr:
            self.net.lose(tag, Loss.TUNNEL_DROP)
            return True
        self._end_answer(host, self.agents[host.name].receive(bytes(data[pkt.l4 + 8:pkt.end]), self.clock.now), tag)
        return True

    # -- the proxy at home --------------------------------------------------------------
    def _proxy_receive(self, data: bytes, tag: int) -> None:
        try:
            pkt = parse_ip(data)
        except ParseError:
            self.net.lose(tag, Loss.PARSE)
            return
        if pkt.proto != Proto.UDP or pkt.dport != TUNNEL_PORT:
            self.net.lose(tag, Loss.NO_SOCKET)
            return
        self._proxy_answer(self.proxy.receive(bytes(data[pkt.l4 + 8:pkt.end]), (pkt.src, pkt.sport),
                                              self.clock.now), tag)

    def _lan_to_proxy(self, data: bytes, tag: int) -> None:
        self._proxy_answer(self.proxy.from_lan(build.ether(self.mac, self.gw_mac, data), self.clock.now), tag)

    def _proxy_answer(self, ans, tag: int) -> None:
        """Carry out the proxy's answer: messages to host ends, then frames for the home LAN (its
        own, then ``data``), whose gateway routes IPv4 on."""
        if ans.action == self.DROP:
            self.net.lose(tag, Loss.TUNNEL_DROP)
        lan = []
        for to, msg in ans.sends:
            if to == self.tun.proxy.TO_LAN:
                lan.append(msg)
                continue
            addr, port = to
            self.ident += 1
            self.net.send(build.udp(self.proxy_addr, addr, TUNNEL_PORT, port, msg, self.ident), tag, self.home)
        if ans.data is not None and ans.action == self.ACCEPT:
            lan.append(ans.data)
        for frame in lan:
            ip = self._ip_of(frame, self.gw_mac)
            if ip is not None:
                self.net.send(ip, tag, self.home)
            else:
                b = self._binding(frame)
                if b is not None and len(b[0]) == 4:  # the proxy announces a VM that moved: its router takes it
                    self.clock.after(self.home.lan_latency, _garp_arrives, self.net, (self.home, b[0]))
        self.proxy_timer.update()

    def vm_address(self) -> bytes:
        return self.address


def _garp_arrives(net: Network, where: tuple[Site, bytes]) -> None:
    net.gratuitous(*where)


# ------------------------------------------------------------------- nat
class Nat(Mode):
    """The VM behind its host's real NAT engine (``nat.NatEngine``), one engine per host.

    The VM has the same address behind every host (one NAT network configuration
    everywhere, as with VMware's vmnet8); each host's engine has that host's address
    as its external address and the scenario's ``[[forward]]`` mappings configured
    for it.  An engine keeps its state when the VM leaves (a NAT daemon does not know
    the VM went): what it still translates towards the VM is lost on the host.
    """

    name = "nat"
    carry_state = False

    def __init__(self, *a) -> None:
        super().__init__(*a)
        try:
            import nat as natmod
            from conntrack.answer import Action
            self.natmod = natmod
            self.Side, self.ACCEPT, self.NO_MAPPING = natmod.Side, Action.ACCEPT, natmod.NatReason.NO_MAPPING
        except Exception as exc:  # noqa: BLE001 - any failure here means the engine is not usable
            raise EngineUnavailable(f"nat engine not available: {type(exc).__name__}: {exc}") from exc
        vm = self.sc.vm
        self.address = wire.addr(vm.nat_address)
        self.vm.addresses.add(self.address)
        self.engines: dict[str, NatEngine] = {}
        self.timers: dict[str, EngineTimer] = {}
        self.here: Host | None = None  # where the VM's NIC is plugged in now (None in transit)
        self.snapshot: dict | None = None

    def engine(self, host: Host):
        e = self.engines.get(host.name)
        if e is None:
            import ipaddress
            nm = self.natmod
            vm = self.sc.vm
            fwds = tuple(nm.PortForward(f.protocol, f.external_port, vm.nat_address, f.port)
                         for f in self.sc.forwards if f.hosts is None or host.name in f.hosts)
            net = str(ipaddress.IPv4Network(f"{vm.nat_address}/24", strict=False))
            cfg = nm.NatConfig(internal=(net,), external_ip=wire.text(host.address), forwards=fwds)
            try:
                e = nm.NatEngine(cfg, seed=self.rng.getrandbits(32))
            except Exception as exc:  # noqa: BLE001
                raise EngineUnavailable(f"nat engine not available: {type(exc).__name__}: {exc}") from exc
            self.engines[host.name] = e
            self.timers[host.name] = EngineTimer(self.clock, e, lambda _: None)  # expiries send nothing
            host.handlers.append(partial(self._inbound, host))
        return e

    def attach(self, host: Host) -> None:
        super().attach(host)
        eng = self.engine(host)
        if self.carry_state and self.snapshot is not None:
            # another host has another external address: the engine moves the mappings and flows
            # to its own address, ports unchanged (peers still see the new address)
            eng.restore(self.snapshot, self.clock.now, rebind=True)
            self.timers[host.name].update()
        self.snapshot = None
        self.here = host

    def detach(self) -> None:
        host = self.here
        if host is not None and self.carry_state:
            self.snapshot = self.engines[host.name].snapshot(self.clock.now)
        self.here = None
        super().detach()

    def from_vm(self, data: bytes, tag: int) -> None:
        host = self.here
        if host is None:
            self.net.lose(tag, Loss.VM_DOWN)
            return
        ans = self._process(host, data, self.Side.INTERNAL)
        if ans is None:
            self.net.lose(tag, Loss.ENGINE_ERROR)
            return
        if ans.action != self.ACCEPT:
            self.net.lose(tag, Loss.NAT_DROP)
            return
        self._deliver(host, ans.data, tag)  # out, or hairpinned back to the VM

    def _inbound(self, host: Host, data: bytes, tag: int) -> bool:
        ans = self._process(host, data, self.Side.EXTERNAL)
        if ans is None:
            self.net.lose(tag, Loss.ENGINE_ERROR)
            return True
        if ans.action != self.ACCEPT:
            self.net.lose(tag, Loss.NO_MAPPING if ans.reason == self.NO_MAPPING else Loss.NAT_DROP)
            return True
        if self.here is not host:
            self.net.lose(tag, Loss.VM_ABSENT)  # translated for a VM that is not here (any more)
            return True
        self._deliver(host, ans.data, tag)
        return True

    def _deliver(self, host: Host, data: bytes, tag: int) -> None:
        """A translated packet: to the VM if it is for the VM's address, else out of the host."""
        try:
            to_vm = parse_ip(data).dst == self.address
        except ParseError:  # the engine's output does not parse: its bug, counted like a raise
            self.engine_errors.append("NAT answer data does not parse")
            self.net.lose(tag, Loss.ENGINE_ERROR)
            return
        if to_vm:
            self.to_vm(data, tag)
        else:
            host.send(data, tag)

    def _process(self, host: Host, data: bytes, side):
        """The engine's answer; None if the engine raised (its bug: counted, reported, never hidden)."""
        try:
            ans = self.engines[host.name].process(data, side, self.clock.now)
        except Exception as exc:  # noqa: BLE001 - the engine promises never to raise on input
            self.engine_errors.append(f"{type(exc).__name__}: {exc}")
            ans = None
        self.timers[host.name].update()
        return ans

    def vm_address(self) -> bytes:
        return self.address

    def published(self, proto: int, port: int) -> tuple[bytes, int]:
        host = self.last_host
        for f in self.sc.forwards:
            if f.protocol == proto and f.port == port and (f.hosts is None or host.name in f.hosts):
                return host.address, f.external_port
        return host.address, port


class NatState(Nat):
    """nat, with the old engine's snapshot restored into the new host's engine."""

    name = "nat+state"
    carry_state = True


MODE_CLASSES: dict[str, type[Mode]] = {"bridged": Bridged, "host-only": HostOnly, "nat": Nat, "nat+state": NatState,
                                       "tunnel": Tunnel}
