"""How the namespace lab plugs the VM in, one class per mode (``roam replay --backend netns``).

A mode's name only chooses how the VM is plugged in, never an outcome:

* ``bridged``: the VM's link on the host's LAN bridge, an address of that site
  (a per-site lease table: the same address again on a LAN that knows its MAC;
  re-leased or kept on a move, as the scenario says), the site's gateway.
* ``host-only``: an address on a link to the host only, no gateway; the host does
  not forward.
* ``nat``: ``roam nat --external br0`` running in every host namespace, with the
  scenario's ``[[forward]]`` mappings; the VM on the NAT network behind it.
* ``nat+state``: as nat; on a move the old host's latest NAT snapshot is rebound to
  the new host's address and the new host's ``roam nat`` restarted on it.
* ``tunnel``: ``roam tunnel proxy`` on the home LAN, a ``roam tunnel host`` agent on
  every host from the start, told no MAC; the VM keeps its home address.

A mode the lab cannot run raises :class:`ModeUnavailable`: the ModeRun's error, never
a verdict.
"""
from __future__ import annotations

import glob
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from conntrack import Proto

from .topology import host_only_side


class ModeUnavailable(RuntimeError):
    """A mode this backend cannot run (yet): reported as the ModeRun's error, never a verdict."""


def _counters(into: dict[str, int], prefix: str, counts: dict) -> None:
    for k, v in (counts or {}).items():
        if isinstance(v, int) and v:
            into[f"{prefix}{k}"] = into.get(f"{prefix}{k}", 0) + v


class Driver:
    """How the VM is plugged in, per mode.  Never decides an outcome."""

    name = ""
    logdir: str | None = None

    def drops(self) -> tuple[list[dict], dict[str, int]]:
        """Stop the mode's components and return what they dropped: each drop they logged (``t`` on the
        monotonic clock) and their drop counters by reason (kept in the log dir too)."""
        return [], {}

    def __init__(self, sc, topo) -> None:
        self.sc, self.topo = sc, topo

    def attach(self, host: str, first: bool) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        pass

    def vm_address(self) -> str | None:
        raise NotImplementedError

    def published(self, proto: int, port: int) -> tuple[str | None, int]:
        return self.vm_address(), port

    def close(self) -> None:
        pass


class Bridged(Driver):
    """The VM on the host's LAN bridge with an address of that site (kept or re-leased on a move)."""

    name = "bridged"

    def __init__(self, sc, topo) -> None:
        super().__init__(sc, topo)
        self.address: str | None = None
        self.leases: dict[str, dict[str, str]] = {}  # site -> MAC -> address (a DHCP server per site)
        self.next: dict[str, int] = {}

    def lease(self, site: str) -> str:
        got = self.leases.setdefault(site, {}).get(self.sc.vm.mac)
        if got:
            return got
        net = ipaddress.IPv4Network(self.topo.sites[site].prefix)
        s = self.topo.sites[site]
        reserved = {s.gateway, s.proxy} | {h.address for h in self.topo.hosts.values()}
        if s.proxy and self.sc.vm.home_address:
            reserved.add(self.sc.vm.home_address)
        size = net.num_addresses
        n = self.next.get(site, 100)
        for _ in range(size):
            off = n % size
            n += 1
            if off in (0, size - 1) and size > 2:
                continue
            cand = str(net.network_address + off)
            if cand not in reserved and cand not in self.leases[site].values():
                self.next[site] = n
                self.leases[site][self.sc.vm.mac] = cand
                return cand
        raise ModeUnavailable(f"site {site}: no free address to lease")

    def attach(self, host: str, first: bool) -> None:
        topo = self.topo
        topo.plug_bridge("br0")
        site = topo.sites[topo.hosts[host].site]
        if first or self.sc.vm.bridged == "re-lease":
            new = self.lease(site.name)
            if new != self.address:
                topo.vm_readdress(f"{new}/{site.prefixlen}", site.gateway)
                self.address = new

    def vm_address(self) -> str | None:
        return self.address


class HostOnly(Driver):
    """The VM on a network only its host reaches: an address, no gateway, the host does not forward."""

    name = "host-only"
    NET = 24

    def attach(self, host: str, first: bool) -> None:
        vm = self.sc.vm
        host_side = host_only_side(vm.host_only_address, self.NET)
        self.topo.lab.sysctl(self.topo.host_ns(host), "net.ipv4.ip_forward", "0")
        self.topo.plug_routed(f"{host_side}/{self.NET}")
        if first:
            self.topo.vm_readdress(f"{vm.host_only_address}/{self.NET}", None)

    def vm_address(self) -> str | None:
        return self.sc.vm.host_only_address


class Nat(Driver):
    """The VM behind its host's ``roam nat`` (NFQUEUE plugin), one running on every host.

    Same NAT network on every host (the VM keeps ``nat_address``; the host side of its
    link is ``nat_gateway``); each host's ``roam nat`` has that host's address
    (``--external br0``) and the scenario's ``[[forward]]`` mappings for it.  A NAT keeps
    its state when the VM leaves, as a NAT daemon would.
    """

    name = "nat"
    carry_state = False
    READY = 15.0  # seconds a starting `roam nat` may take to publish its status

    def __init__(self, sc, topo) -> None:
        super().__init__(sc, topo)
        if shutil.which("roam") is None:
            raise ModeUnavailable("the `roam` command is not on PATH (needed to run `roam nat` in the lab)")
        self.procs: dict[str, subprocess.Popen] = {}
        self.last_host: str | None = None
        self.warnings: list[str] = []
        self.dir = tempfile.mkdtemp(prefix="roam-netns-nat-")
        try:
            for h in topo.hosts:  # all at once: each takes a second or so to come up
                self._start(h, wait=False)
            for h in topo.hosts:
                self._wait(h)
        except BaseException:
            self.close()  # the caller gets no driver to close: stop what started, remove the dir
            raise

    def _paths(self, host: str) -> tuple[str, str, str]:
        d = os.path.join(self.dir, host)
        return d, os.path.join(d, "nat-q0.status.json"), os.path.join(d, "nat-q0.snapshot.json")

    def _config(self, host: str) -> str:
        vm = self.sc.vm
        net = ipaddress.IPv4Network(f"{vm.nat_address}/24", strict=False)
        lines = [f'internal = ["{net}"]', ""]
        for f in self.sc.forwards:
            if f.hosts is None or host in f.hosts:
                proto = "tcp" if f.protocol == Proto.TCP else "udp"
                lines += ["[[inbound]]", f'proto = "{proto}"', f"port = {f.external_port}",
                          f'to = "{vm.nat_address}:{f.port}"', ""]
        d, _, _ = self._paths(host)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "nat.toml")
        with open(path, "w") as fh:
            fh.write("\n".join(lines))
        return path

    def _start(self, host: str, wait: bool = True) -> None:
        lab, ns = self.topo.lab, self.topo.host_ns(host)
        d, status, _ = self._paths(host)
        cfg = self._config(host)
        if os.path.exists(status):
            os.remove(status)
        lab.sysctl(ns, "net.ipv4.ip_forward", "1")
        log = open(os.path.join(d, "nat.log"), "a")
        p = lab.popen(ns, ["roam", "-v", "nat", "--config", cfg, "--external", "br0", "--state-dir", d,
                           "--drop-log", os.path.join(d, "drops.jsonl")],
                      stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[host] = p
        if wait:
            self._wait(host)

    def _wait(self, host: str) -> None:
        d, status, _ = self._paths(host)
        p = self.procs[host]
        deadline = time.monotonic() + self.READY
        while not os.path.exists(status):
            if p.poll() is not None:
                raise ModeUnavailable(f"`roam nat` on {host} exited with {p.returncode}: "
                                      f"{open(os.path.join(d, 'nat.log')).read()[-400:]}")
            if time.monotonic() > deadline:
                raise ModeUnavailable(f"`roam nat` on {host} did not come up within {self.READY:.0f} s")
            time.sleep(0.05)

    def _stop(self, host: str) -> None:
        p = self.procs.pop(host, None)
        if p is not None:
            self.topo.lab.stop(p, wait=5.0)

    def attach(self, host: str, first: bool) -> None:
        vm = self.sc.vm
        self.topo.plug_routed(f"{vm.nat_gateway}/24")
        if first:
            self.topo.vm_readdress(f"{vm.nat_address}/24", vm.nat_gateway)
        self.last_host = host

    def carry(self, old: str, new: str) -> float:
        """nat+state: the old host's NAT state, rebound to the new host's address, restored there.

        The old host's ``roam nat`` is asked for its state as it is at the move (SIGUSR1, as
        a migration hook would: its periodic snapshot may predate its last read of the kernel's
        state and hold an offloaded TCP flow as SYN_SENT, whose next segment the new host's
        tracker then calls invalid); that snapshot is moved to the new host's external address
        (ports unchanged) by the NAT engine itself, ``restore(snap, now, rebind=True)``
        as the simulator does, in an engine configured as the new host's ``roam nat``
        (which restores its state dir without rebinding), and the new host's ``roam
        nat`` is restarted on the result.
        The old host's NAT keeps running with what it had, as in the simulator.
        Returns the seconds it took.
        """
        from nat import snapshot as natsnap

        t = time.monotonic()
        if old == new:
            return 0.0
        snap = natsnap.load(self._snapshot_now(old))
        if snap is None:
            self.warnings.append(f"nat+state: {old}'s roam nat had written no snapshot yet; nothing carried")
            return time.monotonic() - t
        self._stop(new)
        natsnap.save(self._paths(new)[2], self._rebound(snap, new))
        self._start(new)
        return time.monotonic() - t

    SNAPSHOT_WAIT = 2.0  # seconds an old host's `roam nat` may take to write the snapshot asked for

    def _snapshot_now(self, host: str) -> str:
        """The path of ``host``'s snapshot, after asking its ``roam nat`` for one taken now (a
        warning, and the periodic one, if it does not come).  Its status file counts the snapshots
        asked for and is written just after each: a periodic snapshot written meanwhile is not it."""
        _, status, path = self._paths(host)
        p = self.procs.get(host)
        if p is None or p.poll() is not None:
            self.warnings.append(f"nat+state: {host}'s roam nat is not running; its last snapshot carried")
            return path

        def asked() -> int:
            try:
                with open(status) as f:
                    return int(json.load(f).get("snapshots_asked", 0))
            except (OSError, ValueError):
                return -1
        before = asked()
        p.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + self.SNAPSHOT_WAIT
        while time.monotonic() < deadline:
            if asked() > before >= 0:
                return path
            time.sleep(0.005)
        self.warnings.append(f"nat+state: {host}'s roam nat wrote no snapshot within {self.SNAPSHOT_WAIT:.0f} s "
                             "of SIGUSR1; its last periodic one carried")
        return path

    def _rebound(self, snap: dict, host: str) -> dict:
        """``snap`` moved to ``host``'s external address by the engine (``restore(rebind=True)``)."""
        import nat as natmod

        vm = self.sc.vm
        fwds = tuple(natmod.PortForward(f.protocol, f.external_port, vm.nat_address, f.port)
                     for f in self.sc.forwards if f.hosts is None or host in f.hosts)
        net = str(ipaddress.IPv4Network(f"{vm.nat_address}/24", strict=False))
        eng = natmod.NatEngine(natmod.NatConfig(internal=(net,), external_ip=self.topo.hosts[host].address,
                                                forwards=fwds))
        eng.restore(snap, 0.0, rebind=True)  # times are relative: restored and taken at the same instant
        return eng.snapshot(0.0)

    def vm_address(self) -> str | None:
        return self.sc.vm.nat_address

    def published(self, proto: int, port: int) -> tuple[str, int]:
        host = self.last_host
        for f in self.sc.forwards:
            if f.protocol == proto and f.port == port and (f.hosts is None or host in f.hosts):
                return self.topo.hosts[host].address, f.external_port
        return self.topo.hosts[host].address, port

    def drops(self) -> tuple[list[dict], dict[str, int]]:
        """Every host's ``roam nat --drop-log`` lines and its final ``roam nat status`` drop counters."""
        for h in list(self.procs):
            self._stop(h)  # its final status is written on exit
        events: list[dict] = []
        counters: dict[str, int] = {}
        for h in self.topo.hosts:
            d, status, _ = self._paths(h)
            try:
                with open(os.path.join(d, "drops.jsonl")) as f:
                    events += [dict(json.loads(line), host=h) for line in f if line.strip()]
            except (OSError, ValueError):
                pass
            try:
                with open(status) as f:
                    st = json.load(f)
            except (OSError, ValueError):
                continue
            _counters(counters, "nat_", {k[len("dropped_"):]: v for k, v in st.get("engine", {}).get("counters", {}).items()
                                         if k.startswith("dropped_")})
        return events, counters

    def close(self) -> None:
        for h in list(self.procs):
            self._stop(h)
        if self.logdir:  # keep each host's `roam nat` log, drops and status with the endpoints' logs
            os.makedirs(self.logdir, exist_ok=True)
            for h in self.topo.hosts:
                d, status, _ = self._paths(h)
                for src, name in ((os.path.join(d, "nat.log"), f"nat-{h}.log"),
                                  (os.path.join(d, "drops.jsonl"), f"nat-{h}.drops.jsonl"),
                                  (status, f"nat-{h}.status.json")):
                    if os.path.exists(src):
                        shutil.copy(src, os.path.join(self.logdir, name))
        shutil.rmtree(self.dir, ignore_errors=True)


class NatState(Nat):
    name = "nat+state"
    carry_state = True


class Tunnel(Driver):
    """The VM on its home LAN through ``roam tunnel``, run as deployed: the proxy in the home namespace,
    an agent on every host from the start.

    Every host gets a bridge ``brvm`` and a ``roam tunnel host`` agent on it, started (and attached)
    before the scenario begins, told no MAC: the VM's link joins the bridge of the host it runs on,
    and its own frames name it there; on a move its link leaves that bridge (the agent sees the port
    go and forgets it) and joins the new host's.  The VM keeps its home address.
    """

    name = "tunnel"
    PORT = 4789
    READY = 15.0

    def __init__(self, sc, topo) -> None:
        super().__init__(sc, topo)
        if shutil.which("roam") is None:
            raise ModeUnavailable("the `roam` command is not on PATH (needed to run `roam tunnel`)")
        if topo.home is None or sc.home is None or not sc.vm.home_address:
            raise ModeUnavailable("the scenario has no home site with a proxy, or no home_address for the VM")
        self.home = topo.sites[sc.home.name]
        self.proxy_at = f"{self.home.proxy}:{self.PORT}"
        self.logs: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.warnings: list[str] = []
        self.proxy = None
        self.here: str | None = None
        self.counters: dict[str, int] = {}  # drops of the ends, from their status
        self.dir = tempfile.mkdtemp(prefix="roam-netns-tunnel-")
        try:
            self.key = os.path.join(self.dir, "tunnel.key")
            fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(subprocess.run(["roam", "tunnel", "genkey"], capture_output=True, text=True, check=True,
                                       timeout=30).stdout)
            self.proxy = self._popen("proxy", topo.home, ["proxy", "--listen", self.proxy_at, "--bridge", "br0"])
            keep = self.sc.tunnel_keepalive
            for host in topo.hosts:
                ns = topo.host_ns(host)
                if not topo.lab.ipr(ns).link_lookup(ifname="brvm"):
                    topo.lab.bridge(ns, "brvm")
                self.procs[host] = self._popen(f"host-{host}", ns, [
                    "host", "--proxy", self.proxy_at, "--tap", "vmtap0", "--bridge", "brvm",
                    "--keepalive", f"{keep:g}", "--dead-after", f"{3 * keep:g}"])
            for host, p in self.procs.items():
                self._wait_attached(host, p)
        except BaseException:
            self.close()  # the caller gets no driver to close: the dir holds the key
            raise

    def _popen(self, role: str, ns: str, argv: list[str]):
        log = os.path.join(self.dir, f"{role}.log")
        self.logs[role] = log
        with open(log, "a") as f:
            return self.topo.lab.popen(ns, ["roam", "-v", "tunnel", *argv, "--key-file", self.key,
                                            "--status-dir", os.path.join(self.dir, f"status-{role}")],
                                       stdout=f, stderr=subprocess.STDOUT)

    def _wait_attached(self, host: str, p) -> None:
        log = self.logs[f"host-{host}"]
        deadline = time.monotonic() + self.READY
        while True:
            with open(log) as f:
                text = f.read()
            if "attached session" in text:
                return
            if p.poll() is not None or self.proxy is None or self.proxy.poll() is not None:
                raise ModeUnavailable(f"`roam tunnel` exited: {text[-400:]}")
            if time.monotonic() > deadline:
                raise ModeUnavailable(f"`roam tunnel host` on {host} did not attach within {self.READY:.0f} s")
            time.sleep(0.05)

    def attach(self, host: str, first: bool) -> None:
        """The VM's link joins the bridge of the host's agent (running since the start)."""
        self.topo.plug_bridge("brvm")
        self.here = host
        if first:
            self.topo.vm_readdress(f"{self.sc.vm.home_address}/{self.home.prefixlen}", self.home.gateway)

    def _status(self, role: str) -> None:
        """A running end's ``roam tunnel status`` (its status file, removed when it exits): its drops counted,
        the file kept in the log dir."""
        for path in glob.glob(os.path.join(self.dir, f"status-{role}", "*.json")):
            try:
                with open(path) as f:
                    st = json.load(f)
            except (OSError, ValueError):
                continue
            _counters(self.counters, "tunnel_", st.get("drops", {}))
            if self.logdir:
                os.makedirs(self.logdir, exist_ok=True)
                with open(os.path.join(self.logdir, f"tunnel-{role}.status.json"), "a") as f:
                    f.write(json.dumps(st, default=str) + "\n")

    def drops(self) -> tuple[list[dict], dict[str, int]]:
        if not self.counters:  # once: the ends' counts at the end of the run
            for role in [f"host-{h}" for h in self.procs] + ["proxy"]:
                self._status(role)
        return [], dict(self.counters)

    def detach(self) -> None:
        """Nothing to stop: the VM's link leaves the bridge with the move, and the agent sees it go."""
        self.here = None

    def vm_address(self) -> str | None:
        return self.sc.vm.home_address

    def close(self) -> None:
        for p in [*self.procs.values(), self.proxy]:
            if p is not None:
                self.topo.lab.stop(p, wait=5.0)
        self.procs.clear()
        if self.logdir:
            os.makedirs(self.logdir, exist_ok=True)
            for role, log in self.logs.items():
                if os.path.exists(log):
                    shutil.copy(log, os.path.join(self.logdir, f"tunnel-{role}.log"))
        shutil.rmtree(self.dir, ignore_errors=True)


DRIVERS: dict[str, type[Driver]] = {"bridged": Bridged, "host-only": HostOnly, "nat": Nat,
                                     "nat+state": NatState, "tunnel": Tunnel}
NOT_YET: dict[str, str] = {}
