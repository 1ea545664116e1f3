"""The lab topology (tools/topology.py) and `roam lab` (tools/cmd_lab.py), on the real kernel.

* the topology builds from a layout, and packets cross it: host to peer, home PC to a
  remote host, peer to the home proxy, a bridged VM to a peer; an address nobody
  routes gets no answer
* migration moves the VM's link: its host end leaves the old host's namespace and
  appears in the new one's; the old site's address stops working there, a new one
  from the new site works
* a lab that is closed leaves no namespace behind; `roam lab up` / `status` / `down`
  build, report and remove a lab that outlives its process
"""
from __future__ import annotations

import json
import os

import pytest

from sim.scenario import PeerSpec, SiteSpec
from tools.lab import netlab
from tools.lab.topology import (LAB_PREFIX, VM_LINK, TopologyError, build, default_layout, remove_namespaces)

pytestmark = pytest.mark.netns


def _links(lab, ns) -> set[str]:
    return {link.get_attr("IFLA_IFNAME") for link in lab.ipr(ns).get_links()}


def test_topology_routes_between_sites_and_peers(lab):
    sites, hosts, peers, vm = default_layout(2)
    topo = build(lab, sites, hosts, peers, vm, home_peer="192.0.2.10")
    h1, h2 = topo.hosts["host1"], topo.hosts["host2"]
    assert lab.ping(h1.ns, "198.51.100.10", count=1) == 1  # host -> remote peer
    assert lab.ping(topo.peers["homepc"].ns, h2.address, count=1) == 1  # home LAN -> another site
    assert lab.ping(topo.peers["peer2"].ns, "192.0.2.2", count=1) == 1  # peer -> the proxy's machine
    assert lab.ping(h1.ns, h2.address, count=1) == 1  # site to site
    # an address inside no site and no peer: the internet has no route, nothing answers
    assert lab.ping(h1.ns, "198.51.100.99", count=1, timeout=0.5) == 0
    # the VM, bridged on host1's LAN with a site1 address
    site = topo.sites[h1.site]
    topo.plug_bridge()
    topo.vm_readdress(f"203.0.113.20/{site.prefixlen}", site.gateway)
    assert lab.ping(topo.vm, "198.51.100.11", count=1) == 1
    # everything lives in the lab's namespaces, named with its suffix
    assert all(ns.endswith(lab.suffix) for ns in lab.namespaces)
    assert len(lab.namespaces) == 1 + 1 + 1 + 2 + 2 + 1  # inet, home, homepc, hosts, peers, vm


def test_migration_moves_the_vm_link(lab):
    sites, hosts, peers, vm = default_layout(2)
    topo = build(lab, sites, hosts, peers, vm)
    h1, h2 = topo.hosts["host1"], topo.hosts["host2"]
    s1, s2 = topo.sites[h1.site], topo.sites[h2.site]
    topo.plug_bridge()
    topo.vm_readdress(f"203.0.113.20/{s1.prefixlen}", s1.gateway)
    assert lab.ping(topo.vm, "198.51.100.10", count=1) == 1
    assert VM_LINK in _links(lab, h1.ns) and VM_LINK not in _links(lab, h2.ns)

    topo.vm_link_down()
    assert lab.ping(topo.vm, "198.51.100.10", count=1, timeout=0.5) == 0  # in transit: cut off
    topo.move_vm("host2")
    topo.plug_bridge()
    assert topo.vm_host == "host2"
    assert VM_LINK in _links(lab, h2.ns) and VM_LINK not in _links(lab, h1.ns)
    # on site2's LAN the site1 address and gateway lead nowhere...
    assert lab.ping(topo.vm, "198.51.100.10", count=1, timeout=0.5) == 0
    # ...and a site2 address works
    new = str(__import__("ipaddress").IPv4Network(s2.prefix).network_address + 20)
    topo.vm_readdress(f"{new}/{s2.prefixlen}", s2.gateway)
    assert lab.ping(topo.vm, "198.51.100.10", count=1) == 1
    assert lab.ping(topo.peers["peer1"].ns, new, count=1) == 1


def test_layout_outside_the_documentation_ranges_is_refused():
    lab = netlab.Lab("roam")
    try:
        sites, hosts, peers, vm = default_layout(1)
        with pytest.raises(TopologyError, match="outside the lab's ranges"):
            build(lab, sites, hosts, [PeerSpec("dns", "8.8.8.8")], vm)
        with pytest.raises(TopologyError, match="outside the lab's ranges"):
            build(lab, [SiteSpec("x", "10.0.0.0/24")], [], [], None)
        # every address the lab would configure for the VM, in any mode, is checked too
        import dataclasses

        for key, bad in (("nat_address", "10.0.0.10"), ("nat_gateway", "172.16.0.1"),
                         ("host_only_address", "192.168.1.10"), ("home_address", "100.64.0.5")):
            with pytest.raises(TopologyError, match=f"VM {key} {bad} is outside the lab's ranges"):
                build(lab, sites, hosts, peers, dataclasses.replace(vm, **{key: bad}))
        assert lab.namespaces == []  # refused before anything was made
    finally:
        lab.close()


def test_closing_the_lab_leaves_nothing(lab):
    # (`lab` only for the skip; this test makes and closes its own)
    mine = netlab.Lab("roam")
    try:
        build(mine, *default_layout(3))
        made = list(mine.namespaces)
        assert len(made) == 1 + 1 + 3 + 2 + 1
        assert set(made) <= set(netlab.list_lab_namespaces("roam"))
    finally:
        mine.close()
    left = [n for n in netlab.list_lab_namespaces("roam") if n.endswith(mine.suffix)]
    assert left == []


def test_roam_lab_up_status_down(lab, tmp_path, capsys):
    from tools.cli import main

    if netlab.list_lab_namespaces(LAB_PREFIX):
        pytest.skip("a `roam lab` is already up on this machine; not touching it")
    state = str(tmp_path)
    made: list[str] = []
    try:
        assert main(["lab", "up", "--sites", "2", "--json", "--state-dir", state]) == 0
        desc = json.loads(capsys.readouterr().out)
        made = desc["namespaces"]
        assert set(made) == set(netlab.list_lab_namespaces(LAB_PREFIX))
        assert os.path.exists(os.path.join(state, f"lab-{desc['suffix']}.json"))
        # a second one is refused, with a message saying what to do
        assert main(["lab", "up", "--state-dir", state]) == 1
        assert "already up" in capsys.readouterr().err
        # the lab is usable from outside this process's Lab object: the VM reaches a peer
        peer_ns = desc["peers"]["peer1"]["ns"]
        probe = netlab.Lab(LAB_PREFIX)
        probe.namespaces.append(desc["vm"])  # borrow the namespace for one ping (not closed by probe)
        try:
            assert probe.ping(desc["vm"], desc["peers"]["peer1"]["address"], count=1) == 1
        finally:
            probe.namespaces.clear()
            probe.close()
        assert peer_ns in made
        assert main(["lab", "status", "--json", "--state-dir", state]) == 0
        st = json.loads(capsys.readouterr().out)
        assert [x["name"] for x in st["labs"]] == [desc["suffix"]] and not st["labs"][0]["missing"]
        assert main(["lab", "down", "--state-dir", state]) == 0
        capsys.readouterr()
        assert netlab.list_lab_namespaces(LAB_PREFIX) == []
        assert not os.listdir(state)
        assert main(["lab", "down", "--state-dir", state]) == 1  # nothing left: says so
        assert "no lab is up" in capsys.readouterr().err
    finally:
        remove_namespaces([n for n in made if n in netlab.list_lab_namespaces(LAB_PREFIX)])


def test_remove_refuses_foreign_names():
    removed, errors = remove_namespaces(["someone-elses-netns", "roam-inet-p1x0000"])
    assert removed == [] and len(errors) == 2


def test_a_move_within_one_host_keeps_that_hosts_side_of_the_vm_network(lab):
    """The netns backend's VM moved to the host it is on: that host keeps its routed address on the VM's
    link, so its neighbour entry for the VM survives the move, as a hypervisor's own end of a VM network
    does.  (Removing an interface's last address flushes its neighbour entries: the lab's router then
    resolved the VM afresh during the pause, failed, and dropped the answers due at the resume, where the
    simulator's router, like a real one, still knew the VM: campaign scenario 8, nat.)"""
    from sim.scenario_toml import load_scenario
    from tools.lab.vmlink import netns_topology

    sc = load_scenario(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "scenarios", "basic.toml"))
    topo = netns_topology(lab, sc)
    try:
        host = topo.vm_host
        ns = topo.host_ns(host)
        topo.plug_routed("198.18.0.1/24")
        topo.vm_readdress("198.18.0.10/24", "198.18.0.1")
        assert lab.ping(ns, "198.18.0.10", count=1) == 1  # the host has resolved the VM

        def known() -> bool:
            return any(n.get_attr("NDA_DST") == "198.18.0.10" and n["state"] & 0x1e  # REACHABLE..PROBE
                       for n in lab.ipr(ns).get_neighbours(family=2))
        assert known()
        topo.cut()
        topo.pause([])
        topo.move_vm(host)
        topo.plug_routed("198.18.0.1/24")
        assert known()  # kept through the move
        topo.resume()
        assert lab.ping(ns, "198.18.0.10", count=1) == 1
    finally:
        topo.close()
