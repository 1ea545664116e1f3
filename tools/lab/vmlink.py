"""The VM's link in the lab backends: up on every host it may use, switched at a move; the VM paused meanwhile.

A migration must not add the lab's own delays to the scenario's downtime.  Moving a veth
between host namespaces (what the lab once did) flaps its carrier, and the VM's kernel then
holds its frames in the qdisc and skips retransmissions (``tcp_retransmit_skb`` -> -EBUSY)
for up to a second: interruptions that were the lab's, not the migration's.  So, as QEMU's
TAP is up on the destination before the guest resumes:

* every host has the host end of the VM's link from the start, all with one MAC (the netns
  backend: veth ``vm0``, whose other end is a port of the switch namespace's bridge; the
  qemu backend: two TAPs, one per QEMU of a migration); the mode's driver plugs the one on
  the VM's host (a bridge, or the host's side of a routed net) as before;
* a move unplugs the old host's end (it leaves its bridge and addresses, stays up) and the
  driver readies the new one while the VM is paused; at the resume the switch connects the
  VM to it (netns) or QEMU switches over (qemu);
* the netns VM is paused for the downtime: its processes are frozen (:class:`Freezer`: the
  cgroup v2 freezer, else SIGSTOP/SIGCONT).  Its kernel is not: its TCP timers run on and
  what it sends meanwhile is lost at the switch, as the simulator's paused VM
  (``sim.stack``) does.  Its re-addressing is held until the resume, as a guest's DHCP runs
  only once it runs.
* at the resume the VM's link sends the RARP QEMU sends for a resumed guest
  (:func:`conntrack.build.rarp_announce`): switches and the tunnel's agent learn where it is
  before it says anything (the simulator plays the same announce).
"""
from __future__ import annotations

import os
import signal
import socket
import time

from conntrack.build import rarp_announce

from .topology import VM_IF, Topology, TopologyError

HOST_LINK = "vm0"  # the host end of the VM's link, on every host
#: One MAC for the host end on every host (a moved veth carried its MAC; a NAT or host-only gateway with
#: another MAC on the new host is one the VM's ARP cache does not know).  "fe:" (as libvirt's TAPs) so
#: that a bridge never takes it as its own address.
HOST_LINK_MAC = "fe:72:6f:61:6d:00"
SWITCH = "sw"  # the bridge of the netns backend's switch namespace


class SwitchedTopology(Topology):
    """The lab whose VM link has a host end on every host; ``link`` is the one in use on ``vm_host``."""

    link: str = HOST_LINK

    def vm_link_down(self, keep_addresses: bool = False) -> None:
        """The VM leaves (it is paused): the old host's end leaves its bridge and its addresses, and stays up.
        ``keep_addresses``: it comes back to this host, whose side of the VM network stays as it was."""
        if self.vm_host is None:
            return
        ns = self.host_ns(self.vm_host)
        self.lab.ipr(ns).link("set", index=self.lab.index(ns, self.link), master=0)
        if not keep_addresses:
            self.lab.flush_addr(ns, self.link)

    def move_vm(self, to: str, link: str | None = None) -> None:
        """The VM's host end is now ``link`` (default: the one link) on ``to``; the driver plugs it.

        A move within one host keeps that host's addresses on the VM network: a hypervisor does not
        re-address its own end when a guest migrates within it, and removing an interface's last
        address flushes its neighbour entries (``fib_disable_ip`` -> ``arp_ifdown``), which a real
        host's NAT gateway keeps (the simulator does: its router resolved the VM at once on return,
        the lab's failed its resolution during the pause; campaign scenario 8, nat)."""
        if self.vm_host is None:
            raise TopologyError("the VM is not attached anywhere")
        self.vm_link_down(keep_addresses=to == self.vm_host and (link or self.link) == self.link)
        self.vm_host, self.link = to, link or self.link

    def _vm_host_ns(self) -> str:
        """The namespace of the host the VM is on (it is on one while plugged)."""
        assert self.vm_host is not None, "the VM is not attached anywhere"
        return self.host_ns(self.vm_host)

    def plug_bridge(self, bridge: str = "br0") -> None:
        ns = self._vm_host_ns()
        self.lab.ipr(ns).link("set", index=self.lab.index(ns, self.link), master=self.lab.index(ns, bridge))
        self.lab.up(ns, self.link)

    def plug_routed(self, cidr: str) -> None:
        ns = self._vm_host_ns()
        ip, plen = cidr.split("/")
        have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                for a in self.lab.ipr(ns).get_addr(index=self.lab.index(ns, self.link), family=socket.AF_INET)}
        if have != {(ip, int(plen))}:  # (a move within the host found its side as it was: kept, see move_vm)
            self.lab.flush_addr(ns, self.link)
            self.lab.addr(ns, self.link, cidr)
        self.lab.up(ns, self.link)


def add_host_links(lab, hosts, names: tuple[str, ...], make) -> None:
    """``make(host, name)`` each host end ``names`` on every host, then give it the one MAC, up and unplugged."""
    for h in hosts:
        for name in names:
            make(h, name)
            lab.ipr(h.ns).link("set", index=lab.index(h.ns, name), address=HOST_LINK_MAC, state="up")


class NetnsTopology(SwitchedTopology):
    """The netns backend's VM: a namespace whose ``eth0`` reaches a switch with one port per host.

    The switch (its own namespace, a bridge) connects the VM's port to the current host's
    port only while the VM runs: between :meth:`pause` and :meth:`resume` nothing of the
    VM's goes anywhere, and no carrier changes on its side.
    """

    switch_ns: str = ""
    freezer: "Freezer | None" = None
    held: tuple | None = None  # a re-addressing waiting for the resume
    paused: bool = False
    announcer: "socket.socket | None" = None  # an AF_PACKET socket on the VM's link, for QEMU's RARP at resume

    def port(self, host: str) -> str:
        return f"h{list(self.hosts).index(host)}"

    def _connect(self, on: bool) -> None:
        lab, sw = self.lab, self.switch_ns
        master = lab.index(sw, SWITCH) if on else 0
        assert self.vm_host is not None  # the switch connects the VM only while it is on a host
        lab.ipr(sw).link("set", index=lab.index(sw, self.port(self.vm_host)), master=master)

    def cut(self) -> None:
        """The move begins: the switch cuts the VM off (its kernel runs on, its frames are lost)."""
        self._connect(False)

    def pause(self, pids: list[int]) -> None:
        """Freeze the VM's processes (just after the move's instant: what was due at it ran, as in the
        simulator, whose ``Stack.holds`` this is)."""
        self.paused = True
        if self.freezer is not None:
            self.freezer.freeze(pids)

    def resume(self) -> None:
        """Apply the held re-addressing, connect the VM to its (new) host's port, thaw it."""
        if self.held is not None:
            Topology.vm_readdress(self, *self.held)
            self.held = None
        self._connect(True)
        self.paused = False
        if self.freezer is not None:
            self.freezer.thaw()
        if self.announcer is not None and self.vm_mac:  # as QEMU does for a resumed guest (the simulator plays it too)
            try:
                self.announcer.send(rarp_announce(bytes.fromhex(self.vm_mac.replace(":", ""))))
            except OSError:
                pass  # an announce lost is a switch that learns from the VM's next frame instead

    def vm_readdress(self, cidr: str | None, gateway: str | None) -> None:
        if self.paused:
            self.held = (cidr, gateway)
        else:
            Topology.vm_readdress(self, cidr, gateway)

    def close(self) -> None:
        if self.announcer is not None:
            self.announcer.close()
        if self.freezer is not None:
            self.freezer.close()


def netns_topology(lab, sc) -> NetnsTopology:
    """The scenario's lab (:func:`tools.lab.topology.build`) with the VM behind a switch and a host end on every host."""
    from dataclasses import fields

    from .topology import build

    base = build(lab, sc.sites, sc.hosts, sc.peers)
    topo = NetnsTopology(**{f.name: getattr(base, f.name) for f in fields(base)})
    sw = topo.switch_ns = lab.ns("vsw")
    lab.bridge(sw, SWITCH)
    vm = lab.ns("vm")
    lab.veth(vm, VM_IF, sw, "vm")
    lab.ipr(vm).link("set", index=lab.index(vm, VM_IF), address=sc.vm.mac)
    lab.ipr(sw).link("set", index=lab.index(sw, "vm"), master=lab.index(sw, SWITCH))
    add_host_links(lab, topo.hosts.values(), (HOST_LINK,),
                   lambda h, name: lab.veth(h.ns, name, sw, topo.port(h.name)))
    if sc.vm.host not in topo.hosts:
        raise TopologyError(f"the VM's host {sc.vm.host!r} is not a host of the lab")
    topo.vm, topo.vm_mac, topo.vm_host = vm, sc.vm.mac, sc.vm.host
    topo._connect(True)
    topo.freezer = Freezer(lab.suffix)
    topo.announcer = lab.socket(vm, socket.AF_PACKET, socket.SOCK_RAW)
    topo.announcer.bind((VM_IF, 0))
    return topo


def _cgroup2_root() -> str | None:
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                dev, where, kind = line.split()[:3]
                if kind == "cgroup2" and os.path.exists(os.path.join(where, "cgroup.procs")):
                    return where
    except OSError:
        pass
    return None


class Freezer:
    """Pause a namespace's processes as a hypervisor pauses its guest: cgroup v2 ``cgroup.freeze``, else SIGSTOP.

    The freezer stops a process wherever it is without it noticing (no signal it can see,
    no EINTR); SIGSTOP is the fallback where no writable cgroup v2 hierarchy exists.
    """

    def __init__(self, name: str) -> None:
        self.dir: str | None = None
        self.pids: list[int] = []
        root = _cgroup2_root()
        if root is not None:
            path = os.path.join(root, f"roam-lab-{name}-vm")
            try:
                os.makedirs(path, exist_ok=True)
                if os.path.exists(os.path.join(path, "cgroup.freeze")):
                    self.dir = path
                else:
                    os.rmdir(path)
            except OSError:
                self.dir = None

    @property
    def how(self) -> str:
        return "cgroup" if self.dir else "sigstop"

    def _write(self, name: str, value: str) -> None:
        assert self.dir is not None  # only the cgroup freezer writes
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(value)

    def _signal(self, sig: int) -> None:
        """Without a cgroup freezer: stop or continue each process (one already gone is skipped)."""
        for p in self.pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass

    def freeze(self, pids: list[int], wait: float = 1.0) -> None:
        self.pids = [p for p in pids if p]
        if self.dir is None:
            self._signal(signal.SIGSTOP)
            return
        for p in self.pids:
            try:
                self._write("cgroup.procs", str(p))
            except OSError:
                pass  # gone already
        self._write("cgroup.freeze", "1")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with open(os.path.join(self.dir, "cgroup.events")) as f:
                if "frozen 1" in f.read():
                    return
            time.sleep(0.001)

    def thaw(self) -> None:
        if self.dir is None:
            self._signal(signal.SIGCONT)
            return
        self._write("cgroup.freeze", "0")

    def close(self) -> None:
        """Thaw, hand the processes back to the root cgroup and remove ours (the lab then stops them)."""
        if self.dir is None:
            self.thaw()
            return
        try:
            self._write("cgroup.freeze", "0")
            root = os.path.dirname(self.dir)
            with open(os.path.join(self.dir, "cgroup.procs")) as f:
                left = [line.strip() for line in f if line.strip()]
            for p in left:
                try:
                    with open(os.path.join(root, "cgroup.procs"), "w") as g:
                        g.write(p)
                except OSError:
                    pass
            os.rmdir(self.dir)
        except OSError:
            pass
        self.dir = None
