"""NAT66 on real packets: `roam nat` with ``natIp6Enable = 1`` beside NAT44 (test_nat_plugin's
``Site(v6=True)``: the peer has no route to the VM's IPv6 network, so only translated packets
reach it).  IPv6 takes the per-packet path (not offloaded) whatever the mode."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sys
import threading

import pytest

from conntrack.pcap import record_packet

from .test_nat_plugin import (EXT6, ours, INTERNAL6, PEER6, VM6, Site, _capture_addresses, _captured_records,
                              _wait)


def _addresses_seen6(site, pcap, dump):
    """The addresses in the peer's IPv6 capture once a marker the peer sends last is in it (so
    tcpdump has written all before it); the capture stopped."""
    with site.sock(site.inet, socket.SOCK_DGRAM, socket.AF_INET6) as marker:
        marker.sendto(b"marker", (EXT6, 9999))
    _wait(lambda: any(record_packet(r) is not None and record_packet(r).dport == 9999
                      for r in _captured_records(pcap)), 10, "the marker in the capture")
    site.lab.stop_tcpdump(dump)
    return _capture_addresses(pcap)


@pytest.mark.parametrize("mode", ["offload", "no_offload"])
def test_nat66_outbound_inbound_ping_icmp_error_and_no_rule_left(lab, tmp_path, mode):
    """NAT66 on real packets, beside NAT44, offloaded to the kernel's conntrack or per packet."""
    site = Site(lab, tmp_path, offload=mode == "offload", v6=True)
    pcap = os.path.join(site.dir, "ext6.pcap")
    dump = lab.tcpdump(site.inet, ["-i", "inet0", "-w", pcap, "ip6"])
    site.start()
    rules6 = site.rules6()
    assert "-A PREROUTING -i ext0 -m comment --comment \"roam-nat q3 pid" in rules6, rules6
    assert "-A POSTROUTING -o ext0 -m comment --comment \"roam-nat q3 pid" in rules6, rules6
    assert f"-A PREROUTING -s 2001:db8:1::/64 -d {EXT6}/128 ! -i ext0" in rules6, rules6  # hairpin, first half
    assert "--queue-bypass" not in rules6  # fail-closed
    v6 = socket.AF_INET6
    # TCP: the peer sees the external IPv6 address and the VM's own port
    srv, c, conn, peer_addr = site.tcp(site.inet, (PEER6, 7000), site.vm, (PEER6, 7000), family=v6)
    assert peer_addr[0] == EXT6 and peer_addr[1] == c.getsockname()[1]
    c.sendall(b"hello")
    assert conn.recv(10) == b"hello"
    conn.sendall(b"world")
    assert c.recv(10) == b"world"
    # UDP, both ways
    us = site.sock(site.inet, socket.SOCK_DGRAM, v6)
    us.bind((PEER6, 5300))
    uc = site.sock(site.vm, socket.SOCK_DGRAM, v6)
    uc.sendto(b"q", (PEER6, 5300))
    data, src = us.recvfrom(100)
    assert data == b"q" and src[0] == EXT6
    us.sendto(b"a", src[:2])
    assert uc.recvfrom(100)[0] == b"a"
    # ping6
    assert lab.ping(site.vm, PEER6, count=2) == 2
    # an ICMPv6 error about a translated flow reaches the VM (UDP to a closed port of the peer)
    with pytest.raises(ConnectionRefusedError):
        uc2 = site.sock(site.vm, socket.SOCK_DGRAM, v6)
        uc2.connect((PEER6, 9))
        uc2.send(b"x")
        uc2.recv(10)
    # the inbound mapping to the VM's IPv6 address
    vs, ic, vc, addr = site.tcp(site.vm, (VM6, 80), site.inet, (EXT6, 8080), family=v6)
    assert addr[0] == PEER6
    vc.sendall(b"hi")
    assert ic.recv(10) == b"hi"
    ct = lab.run(site.host, ["conntrack", "-L", "-f", "ipv6", "-p", "tcp"], check=False).stdout
    line = next(l for l in ct.splitlines() if "dport=7000" in l)
    if site.offload:  # the kernel's entry carries roam's NAT (and mark): it translates the flow
        eport = c.getsockname()[1]
        assert f"src={VM6} dst={PEER6} sport={eport} dport=7000" in line, line
        assert f"src={PEER6} dst={EXT6} sport=7000 dport={eport}" in line and ours(line), line
    else:  # the kernel's tracker saw only internal-side tuples, both ways
        assert f"src={VM6} dst={PEER6}" in line and f"src={PEER6} dst={VM6}" in line, line
    assert "ESTABLISHED" in line
    _wait(lambda: site.counter("flows_opened") >= 5, 5, "status counters")
    out = lab.run(site.host, [sys.executable, "-m", "tools.cli", "nat", "status", "--queue", "3",
                              "--state-dir", site.dir, "--mappings"], check=False)
    assert f"NAT66: external {EXT6}" in out.stdout, out.stdout
    assert ("offloaded" if site.offload else "per-packet") in out.stdout.split("NAT66:")[1], out.stdout
    assert f"[{VM6}]:80" in out.stdout and f"[{EXT6}]:8080" in out.stdout, out.stdout
    # SIGTERM removes every rule, IPv6's too
    assert lab.stop(site.proc) == 0
    assert "roam-nat" not in site.rules6() and "roam-nat" not in site.rules()
    addrs = _addresses_seen6(site, pcap, dump)
    assert ipaddress.ip_address(EXT6) in addrs
    assert not [a for a in addrs if a in INTERNAL6], addrs  # nothing internal reached the peer
    for s in (srv, conn, c, us, uc, vs, ic, vc):
        s.close()


def test_nat66_kill9_leaks_nothing_and_a_restart_keeps_established_tcp(lab, tmp_path):
    """Fail-closed for IPv6 too: after kill -9 the ip6tables rules stay (new flows wait at the dead
    queue, none leaves untranslated) while the offloaded flow goes on in the kernel; a restart
    replaces the rules and carries the flow on."""
    site = Site(lab, tmp_path, v6=True)
    pcap = os.path.join(site.dir, "ext6.pcap")
    dump = lab.tcpdump(site.inet, ["-i", "inet0", "-w", pcap, "ip6"])
    site.start()
    v6 = socket.AF_INET6
    srv, c, conn, _ = site.tcp(site.inet, (PEER6, 7001), site.vm, (PEER6, 7001), family=v6)
    c.sendall(b"before")
    assert conn.recv(10) == b"before"

    def snapped():
        try:
            with open(site.snapshot_file) as f:
                return any(len(fl["original"]) == 74 and fl["state"] == 3 for fl in json.load(f)["flows"])
        except (FileNotFoundError, ValueError):
            return False
    _wait(snapped, 5, "a snapshot holding the established IPv6 flow")
    lab.stop(site.proc, sig=signal.SIGKILL)
    assert "roam-nat q3" in site.rules6()
    assert lab.ping(site.vm, PEER6, count=1, timeout=1.0) == 0  # waits at the dead queue
    with site.sock(site.vm, socket.SOCK_DGRAM, v6) as u:
        u.sendto(b"leak?", (PEER6, 5300))
    c.sendall(b"during")  # offloaded: the kernel translates it while the plugin is down
    conn.settimeout(5)
    assert conn.recv(10) == b"during"
    site.start()
    with open(site.log) as f:
        log = f.read()
    assert "replaced" in log and "restored" in log
    pid = site.proc.pid
    mine = [l for l in site.rules6().splitlines() if "roam-nat q3" in l]
    assert mine and all(f"pid {pid}" in l for l in mine), mine  # the dead run's are gone, ours are in
    conn.sendall(b"after")
    assert c.recv(10) == b"after"
    assert lab.stop(site.proc) == 0
    assert "roam-nat" not in site.rules6()
    assert not [a for a in _addresses_seen6(site, pcap, dump) if a in INTERNAL6]
    for s in (srv, conn, c):
        s.close()


@pytest.mark.parametrize("mode", ["offload", "no_offload"])
def test_nat66_hairpin_between_two_vms(lab, tmp_path, mode):
    site = Site(lab, tmp_path, offload=mode == "offload", v6=True)
    vm2 = lab.ns("vm2")
    lab.veth(vm2, "vm0", site.host, "hv1")
    lab.addr(vm2, "vm0", "2001:db8:1:1::2/64")
    lab.route(vm2, "default", "2001:db8:1:1::1")
    lab.addr(site.host, "hv1", "2001:db8:1:1::1/64")
    lab.run(site.host, ["ip6tables-legacy", "-I", "FORWARD", "3", "-i", "hv1", "-j", "ACCEPT"])
    with open(site.conf, "a") as f:
        f.write("[host]\nnatIp6Prefix = 2001:db8:1::/48\n")  # both VMs' networks
    site.start()
    srv = site.sock(site.vm, family=socket.AF_INET6)
    srv.bind((VM6, 80))
    srv.listen()
    c = site.sock(vm2, family=socket.AF_INET6)
    c.bind(("2001:db8:1:1::2", 41000))
    c.connect((EXT6, 8080))  # VM2 reaches VM's service through the NAT's external address
    conn, peer = srv.accept()
    assert peer[:2] == (EXT6, 41000)  # RFC 4787 REQ-9: the external source address and port
    conn.sendall(b"ping")
    assert c.recv(10) == b"ping"
    assert c.getpeername()[:2] == (EXT6, 8080)
    ct = lab.run(site.host, ["conntrack", "-L", "-f", "ipv6", "-p", "tcp"], check=False).stdout
    line = next(l for l in ct.splitlines() if "sport=41000" in l)
    if site.offload:  # one kernel entry with both halves of the NAT
        assert f"src=2001:db8:1:1::2 dst={EXT6} sport=41000 dport=8080" in line, line
        assert f"src={VM6} dst={EXT6} sport=80 dport=41000" in line and "ESTABLISHED" in line, line
        _wait(lambda: (site.status() or {}).get("offload", {}).get("flows", 0) >= 1, 5, "the offloaded flow")
    else:  # the kernel tracked the half-way tuple, consistently in both directions
        assert f"src=2001:db8:1:1::2 dst={VM6}" in line and f"src={VM6} dst=2001:db8:1:1::2" in line, line
        _wait(lambda: site.counter("hairpin_half") >= 3, 5, "hairpin counters")
    for s in (srv, conn, c):
        s.close()


@pytest.mark.parametrize("mode", ["offload", "no_offload"])
def test_nat66_address_change_moves_only_its_family_and_bulk_tcp(lab, tmp_path, mode):
    """A new external IPv6 address ends the IPv6 flows only (IPv4's keep their mapping and their
    kernel entry), and the other way round; new flows leave from the new address, the hairpin
    rule follows; a bulk transfer goes through intact (per packet: GSO super-packets from the
    VM's veth, checksums filled)."""
    from .test_nat_plugin import EXT, PEER
    site = Site(lab, tmp_path, offload=mode == "offload", v6=True)
    site.start()
    v6 = socket.AF_INET6
    us4 = site.sock(site.inet, socket.SOCK_DGRAM)
    us4.bind((PEER, 5301))
    uc4 = site.sock(site.vm, socket.SOCK_DGRAM)
    uc4.sendto(b"1", (PEER, 5301))
    assert us4.recvfrom(10)[1][0] == EXT
    us = site.sock(site.inet, socket.SOCK_DGRAM, v6)
    us.bind((PEER6, 5301))
    uc = site.sock(site.vm, socket.SOCK_DGRAM, v6)
    uc.sendto(b"1", (PEER6, 5301))
    assert us.recvfrom(10)[1][0] == EXT6
    new6 = "2001:db8:ff::5"
    lab.addr(site.host, "ext0", f"{new6}/64")  # first the new one, then the old one goes
    lab.run(site.host, ["ip", "-6", "addr", "del", f"{EXT6}/64", "dev", "ext0"])
    _wait(lambda: (site.status() or {}).get("engine", {}).get("external_ip6") == new6, 10,
          "the plugin to see the new IPv6 address")
    assert site.counter("flows_killed_by_address_change") == 1  # the IPv6 flow alone
    if site.offload:
        ct4 = lab.run(site.host, ["conntrack", "-L", "-f", "ipv4", "-p", "udp"], check=False).stdout
        assert any("dport=5301" in l and ours(l) for l in ct4.splitlines()), ct4  # IPv4's stays
    assert (site.status() or {})["engine"]["external_ip"] == EXT
    assert f"-d {new6}/128" in site.rules6() and f"-d {EXT6}/128" not in site.rules6()
    uc.sendto(b"2", (PEER6, 5301))
    _, src = us.recvfrom(10)
    assert src[0] == new6
    us.sendto(b"r", src[:2])
    assert uc.recvfrom(10)[0] == b"r"
    uc4.sendto(b"2", (PEER, 5301))
    assert us4.recvfrom(10)[1][0] == EXT
    # and the other way round: a new IPv4 address leaves the IPv6 flow and its kernel entry alone
    lab.run(site.host, ["ip", "-4", "addr", "del", f"{EXT}/24", "dev", "ext0"])
    lab.addr(site.host, "ext0", "203.0.113.5/24")
    _wait(lambda: (site.status() or {}).get("engine", {}).get("external_ip") == "203.0.113.5", 10,
          "the plugin to see the new IPv4 address")
    # the IPv4 flow alone: killed by roam, or (the kernel path's) by the kernel's MASQUERADE as the address went
    off = (site.status() or {}).get("offload") or {}
    assert site.counter("flows_killed_by_address_change") == 2 or off.get("kernel_flows", 0) == 1 \
        and site.counter("flows_killed_by_address_change") == 1
    if site.offload:
        ct6 = lab.run(site.host, ["conntrack", "-L", "-f", "ipv6", "-p", "udp"], check=False).stdout
        assert any("dport=5301" in l and ours(l) for l in ct6.splitlines()), ct6
    uc.sendto(b"3", (PEER6, 5301))
    assert us.recvfrom(10) == (b"3", src)  # the same mapping
    uc4.sendto(b"3", (PEER, 5301))
    assert us4.recvfrom(10)[1][0] == "203.0.113.5"
    # bulk TCP over IPv6, every byte checked
    srv, c, conn, addr = site.tcp(site.inet, (PEER6, 7003), site.vm, (PEER6, 7003), family=v6)
    assert addr[0] == new6
    blob = os.urandom(1 << 20)
    c.settimeout(30)
    sender = threading.Thread(target=c.sendall, args=(blob,), daemon=True)
    sender.start()
    got = bytearray()
    conn.settimeout(15)
    while len(got) < len(blob):
        chunk = conn.recv(1 << 16)
        assert chunk, "the connection closed early"
        got += chunk
    sender.join(30)
    assert bytes(got) == blob
    assert lab.stop(site.proc) == 0
    assert "roam-nat" not in site.rules6()
    for s in (us4, uc4, us, uc, srv, c, conn):
        s.close()


def test_a_run_without_nat66_removes_a_dead_nat66_runs_ipv6_rules(lab, tmp_path):
    """NAT66 turned off in the config, then a restart after kill -9: the dead run's ip6tables rules
    are stale like its iptables ones (else they would queue IPv6 to a run that drops it all)."""
    site = Site(lab, tmp_path, v6=True)
    site.start()
    dead = site.proc.pid
    lab.stop(site.proc, sig=signal.SIGKILL)
    assert f"pid {dead}" in site.rules6()
    with open(site.conf) as f:
        conf = f.read()
    with open(site.conf, "w") as f:
        f.write(conf.replace("natIp6Enable = 1", "natIp6Enable = 0"))
    site.start()
    assert "roam-nat" not in site.rules6() and f"pid {site.proc.pid}" in site.rules()
    assert lab.stop(site.proc) == 0
    assert "roam-nat" not in site.rules() and "roam-nat" not in site.rules6()
