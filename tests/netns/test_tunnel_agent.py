"""The host agent as operators run it: one `roam tunnel host` per host, started before any VM, told no MAC.

The tunnel lab of :mod:`tests.netns.test_tunnel_lab` (home LAN with the peer and the proxy, hosts A
and B each with a bridge ``brvm``), but the VM's link is out of every bridge when the agents start.
The VM then joins A's bridge, moves to B and back (its link leaving one bridge and joining the
other: the agents see both through netlink), and each time pings flow both ways through the
right host; the agent it left forgets it; ``roam tunnel detach`` makes the proxy drop it at once.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tools.tunnel_control import add_control_commands

from .test_tunnel_lab import PEER_IP, PORT, PROXY_IP, VM_IP, VM_MAC, TunnelLab, wait_for


class AgentLab(TunnelLab):
    """Each end with its own status directory (an agent's control socket lives there)."""

    def roam(self, ns: str, *args: str, log: str):
        self.status_dir = self.tmp / f"status-{log}"
        return super().roam(ns, *args, log=log)

    def status(self, p) -> dict | None:
        role = "proxy" if "proxy" in p.args else "host"
        for d in self.tmp.glob("status-*"):
            try:
                return json.loads((d / f"{role}-{p.pid}.json").read_text())
            except (OSError, ValueError):
                continue
        return None

    def start_agent(self, host: str):
        return self.roam(self.ns[host], "host", "--proxy", f"{PROXY_IP}:{PORT}", "--tap", "rt0", "--bridge", "brvm",
                         "--keepalive", "1", "--dead-after", "5", log=host)

    def begin(self, hosts: tuple[str, ...]):
        """The VM's link out of every bridge, then the proxy and an agent on each of ``hosts``, attached and
        serving nobody: (proxy, {host: agent})."""
        lab, ns = self.lab, self.ns
        lab.ipr(ns["hosta"]).link("set", index=lab.index(ns["hosta"], "vmport"), master=0, state="down")
        proxy = self.start_proxy()
        wait_for(lambda: self.status(proxy), 20, "the proxy to start")
        agents = {h: self.start_agent(h) for h in hosts}
        for h, p in agents.items():
            st = wait_for(lambda p=p: self.attached(p), 20, f"the agent on {h} to attach")
            assert st["macs"] == [] and st["bridge"] == "brvm"  # told nothing: serves nobody yet
        return proxy, agents


def _pings(lab, ns: str, dst: str) -> bool:
    return lab.ping(ns, dst, count=1, timeout=0.5) == 1


def _flows(t: AgentLab) -> None:
    """Pings from the VM to the home peer and from the peer to the VM (its MAC where it is at the proxy)."""
    lab, ns = t.lab, t.ns
    wait_for(lambda: _pings(lab, ns["vm"], PEER_IP), 20, "the VM to reach the home peer")
    assert lab.ping(ns["vm"], PEER_IP, count=3) == 3
    assert lab.ping(ns["peer"], VM_IP, count=3) == 3


def _served_by(t: AgentLab, proxy, host) -> bool:
    pst, hst = t.status(proxy), t.attached(host)
    return bool(pst and hst and pst["macs"].get(VM_MAC) == f"session {hst['session']}")


def _detach(status_dir: Path) -> int:
    parser = argparse.ArgumentParser()
    add_control_commands(parser.add_subparsers())
    args = parser.parse_args(["detach", "--mac", VM_MAC, "--status-dir", str(status_dir)])
    return args.func(args)


def test_agents_running_before_the_vm_carry_it_across_moves_and_detach_drops_it(lab, tmp_path):
    t = AgentLab(lab, tmp_path, "udp")
    ns = t.ns
    try:
        proxy, agents = t.begin(("hosta", "hostb"))

        # The VM arrives on A: its link joins A's bridge; the agent learns it from its frames.
        t.enslave("hosta", "vmport")
        _flows(t)
        wait_for(lambda: _served_by(t, proxy, agents["hosta"]), 10, "the proxy to place the VM behind A")
        # the agent's status file follows its events within 0.1 s (tunnel.io.loop.STATUS_SOONEST)
        wait_for(lambda: (t.attached(agents["hosta"]) or {}).get("macs") == [VM_MAC], 5, "A's status to name the VM")

        for there, left in (("hostb", "hosta"), ("hosta", "hostb")):
            lab.move_link(ns[left], "vmport", ns[there], up=False)
            t.enslave(there, "vmport")
            _flows(t)
            wait_for(lambda there=there: _served_by(t, proxy, agents[there]), 10, f"the VM behind {there}")
            # The agent it left saw its port leave and forgot it (if the proxy's announcement did not first).
            gone = wait_for(lambda left=left: (st := t.attached(agents[left])) and VM_MAC not in st["macs"]
                            and st["driver"].get("bridge_ports_left", 0) >= 1 and st, 10,
                            f"the agent on {left} to see the VM's port leave and forget the VM")
            assert gone["counters"].get("macs_forgotten", 0) + gone["counters"].get("macs_seen_elsewhere", 0) >= 1

        # The agent on A is told the VM left: the proxy drops its MAC at once (then learns it again
        # from the VM's next frame: it is still there).
        released = t.status(proxy)["counters"].get("macs_released", 0)
        assert _detach(t.tmp / "status-hosta") == 0
        wait_for(lambda: t.status(proxy)["counters"].get("macs_released", 0) > released, 10,
                 "the proxy to drop the detached MAC")
        wait_for(lambda: (t.attached(agents["hosta"]) or {}).get("driver", {}).get("control_detach") == 1, 5,
                 "A's status to count the detach")
        _flows(t)
        wait_for(lambda: _served_by(t, proxy, agents["hosta"]), 10, "the VM behind A again")
        pst = t.status(proxy)
        c = pst["counters"]
        assert c.get("presence_moves", 0) + c.get("claim_moves", 0) >= 4, c  # A, B, A, A again
        for p in [*agents.values(), proxy]:
            lab.stop(p)
        assert not list(tmp_path.glob("status-*/host.sock"))  # the agents removed their sockets
    except BaseException:
        print(t.dump_logs())
        raise


def test_a_vm_port_leaving_the_bridge_is_forgotten_with_no_other_host_in_sight(lab, tmp_path):
    """The VM's port leaves A's bridge and joins no other (a VM stopped, or a migration whose
    destination has not spoken yet): only the agent's bridge watch can tell, and it must.  The agent
    forgets the MAC (``macs_forgotten``, not ``macs_seen_elsewhere``) and withdraws it, so the proxy
    releases it."""
    t = AgentLab(lab, tmp_path, "udp")
    ns = t.ns
    try:
        proxy, agents = t.begin(("hosta",))
        agent = agents["hosta"]
        t.enslave("hosta", "vmport")
        _flows(t)
        wait_for(lambda: _served_by(t, proxy, agent), 10, "the proxy to place the VM behind A")
        wait_for(lambda: (t.attached(agent) or {}).get("macs") == [VM_MAC], 5, "A's status to name the VM")
        released = t.status(proxy)["counters"].get("macs_released", 0)

        lab.ipr(ns["hosta"]).link("set", index=lab.index(ns["hosta"], "vmport"), master=0)
        st = wait_for(lambda: (s := t.attached(agent)) and VM_MAC not in s["macs"] and s, 10,
                      "the agent to forget the VM whose port left its bridge")
        assert st["driver"].get("bridge_ports_left", 0) == 1, st["driver"]
        assert st["counters"].get("macs_forgotten", 0) == 1 and not st["counters"].get("macs_seen_elsewhere"), \
            st["counters"]
        wait_for(lambda: t.status(proxy)["counters"].get("macs_released", 0) == released + 1, 10,
                 "the proxy to release the withdrawn MAC")
        assert VM_MAC not in t.status(proxy)["macs"]
        for p in (agent, proxy):
            lab.stop(p)
    except BaseException:
        print(t.dump_logs())
        raise
