"""One `roam tunnel proxy` serving many `roam tunnel host` agents on the real kernel (issue 11, "Scale").

The real subset of ``tests/unit/test_tunnel_scale.py`` (100 host ends and 1,000 VMs, the
engines in memory): the tunnel lab of :mod:`tests.netns.test_tunnel_lab` (home LAN with the
peer and the proxy, the internet namespace), plus :data:`HOSTS` host namespaces on a transit
LAN the internet namespace routes (:data:`TRANSIT`; the lab's own two hosts are idle here),
each running one agent told no MAC, with :data:`VMS` VMs (namespaces whose veths sit on the
host's bridge; addresses on the home LAN, 198.18.0.0/24).  Every VM pings the home peer, and the peer every VM;
every ping is answered; the proxy places each VM's MAC behind its own host's session.
Every namespace and process is the ``lab`` fixture's: removed also on failure.
"""
from __future__ import annotations

from tools.lab.topology import enslave

from .test_tunnel_agent import AgentLab
from .test_tunnel_lab import PEER_IP, wait_for

HOSTS = 10
VMS = 3
TRANSIT = "198.19.200"  # the hosts' LAN behind the internet namespace (.254): host k at .(k + 1)


def _mac(k: int, v: int) -> str:
    return f"02:00:00:01:{k:02x}:{v:02x}"


def _ip(k: int, v: int) -> str:
    return f"198.18.0.{100 + k * VMS + v}"


def _hosts(t: AgentLab) -> dict[str, list[tuple[str, str, str]]]:
    """Make the hosts and their VMs: host name -> [(VM namespace, MAC, address)]."""
    lab, ns = t.lab, t.ns
    lab.bridge(ns["inet"], "bh")
    lab.addr(ns["inet"], "bh", f"{TRANSIT}.254/24")
    vms: dict[str, list[tuple[str, str, str]]] = {}
    for k in range(HOSTS):
        h = f"h{k}"
        ns[h] = lab.ns(h)
        for scope in ("default", "all"):  # the host's own bridge stays silent on the VMs' LAN
            lab.sysctl(ns[h], f"net.ipv6.conf.{scope}.disable_ipv6", "1")
        lab.veth(ns[h], "up0", ns["inet"], f"hb{k}")
        enslave(lab, ns["inet"], f"hb{k}", "bh")
        lab.addr(ns[h], "up0", f"{TRANSIT}.{k + 1}/24")
        lab.route(ns[h], "default", f"{TRANSIT}.254")
        lab.bridge(ns[h], "brvm")
        vms[h] = []
        for v in range(VMS):
            vm = lab.ns(f"h{k}v{v}")
            lab.veth(vm, "eth0", ns[h], f"vm{v}")
            lab.ipr(vm).link("set", index=lab.index(vm, "eth0"), address=_mac(k, v))
            lab.addr(vm, "eth0", f"{_ip(k, v)}/24")
            enslave(lab, ns[h], f"vm{v}", "brvm")
            vms[h].append((vm, _mac(k, v), _ip(k, v)))
    return vms


def _drops(t: AgentLab, ends) -> dict:
    """Every end's drop counts but the host ends' late handshake duplicates (stale: harmless)."""
    return {p.pid: {k: n for k, n in _status(t, p)["drops"].items() if k != "stale"} for p in ends}


def _status(t: AgentLab, p) -> dict:
    st = t.status(p)
    assert st is not None, f"no status file of {p.args}"
    return st


def test_one_proxy_serves_ten_agents_each_with_vms_pinging_the_lan(lab, tmp_path):
    t = AgentLab(lab, tmp_path, "udp")
    try:
        vms = _hosts(t)
        proxy = t.start_proxy()
        wait_for(lambda: t.status(proxy), 30, "the proxy to start")
        agents = {h: t.start_agent(h) for h in vms}
        for h, p in agents.items():
            wait_for(lambda p=p: t.attached(p), 60, f"the agent on {h} to attach")
        wait_for(lambda: len((t.status(proxy) or {}).get("sessions", ())) == HOSTS, 30, "every session at the proxy")
        # Drops until then are the LAN's frames with no session to go to and the handshake's late duplicates
        # (stale): counted from here on.
        drops = _drops(t, [proxy, *agents.values()])
        for h, guests in vms.items():
            for vm, mac, ip in guests:  # the first ping also teaches the agent the VM (ARP through it)
                wait_for(lambda vm=vm: lab.ping(vm, PEER_IP, count=1, timeout=0.5) == 1, 30,
                         f"{ip} ({mac}) on {h} to reach the home peer")
        for h, guests in vms.items():
            for vm, mac, ip in guests:
                assert lab.ping(vm, PEER_IP, count=3) == 3, f"{ip} on {h} -> {PEER_IP}"
                assert lab.ping(t.ns["peer"], ip, count=3) == 3, f"{PEER_IP} -> {ip} on {h}"
        pst = _status(t, proxy)
        sessions = {s["endpoint"].split(":")[0]: s["session"] for s in pst["sessions"]}
        assert len(pst["sessions"]) == HOSTS and all(s["state"] == "ATTACHED" for s in pst["sessions"])
        for k, (h, guests) in enumerate(vms.items()):
            assert sorted(_status(t, agents[h])["macs"]) == sorted(mac for _, mac, _ in guests)
            for _, mac, _ in guests:
                assert pst["macs"].get(mac) == f"session {sessions[f'{TRANSIT}.{k + 1}']}", (h, mac)
        assert _drops(t, [proxy, *agents.values()]) == drops
        for p in [*agents.values(), proxy]:
            assert lab.stop(p) == 0
    except BaseException:
        print(t.dump_logs())
        raise
