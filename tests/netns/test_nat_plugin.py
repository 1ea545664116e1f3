"""`roam nat` on real packets: VM namespace -> host namespace running the plugin -> internet.

Topology (all inside namespaces made by tools.lab.netlab):

    vm  [vm0 198.18.0.2/24] -- [hv0 198.18.0.1/24] host [ext0 203.0.113.1/24] -- [inet0 203.0.113.2/24] inet

The host forwards with a stateful firewall (conntrack matches in FORWARD), so the
kernel's own connection tracker is active and must stay consistent with the NAT.
``Site(v6=True)`` adds NAT66 beside it (dual stack; the peer has no route to the VM's
network, so only translated packets can reach it):

    vm  [vm0 2001:db8:1::2/64] -- [hv0 2001:db8:1::1/64] host [ext0 2001:db8:ff::1/64] -- [inet0 2001:db8:ff::2/64] inet
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conntrack.errors import Malformed
from conntrack.pcap import CaptureError, read_pcap, record_packet
from nat.netfilter.kernelpath import ALIVE_FOR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXT, PEER, VM = "203.0.113.1", "203.0.113.2", "198.18.0.2"
INTERNAL = ipaddress.ip_network("198.18.0.0/15")
#: roam's rules on the per-packet path (--no-offload): in, out and the two hairpin halves
RULES_PER_PACKET = 4
#: ... and with offload (one internal network, hairpinning on): mangle PREROUTING -i EXT and
#: hairpin-dst, mangle POSTROUTING -o EXT and hairpin-src (each: no connection / no mark),
#: raw PREROUTING: SYN and echo request inbound and outbound (marked), hairpin SYN, the queue
#: ... and the kernel path's (one internal network): nat POSTROUTING SET, SET, MASQUERADE for TCP
#: and for UDP; raw ACCEPT; mangle POSTROUTING TCP connmark; two TCP (raw) and two UDP (mangle)
#: qualifying rules: not held, or kept
RULES_OFFLOAD = 14 + 12
CONF = "[host]\nip = 198.18.0.1\nnetmask = 255.255.255.0\n[incomingtcp]\n8080 = 198.18.0.2:80\n"
EXT6, PEER6, VM6 = "2001:db8:ff::1", "2001:db8:ff::2", "2001:db8:1::2"
INTERNAL6 = ipaddress.ip_network("2001:db8:1::/64")
CONF6 = CONF + "[host]\nnatIp6Enable = 1\nnatIp6Prefix = 2001:db8:1::/64\n[incomingtcp]\n8080 = [2001:db8:1::2]:80\n"


def ours(line: str) -> bool:
    """Whether a `conntrack -L` line is one of roam's entries: its mark has roam's bit (0x20000000;
    with the kernel path's, 0x10000000, if the kernel NATed the flow on roam's behalf)."""
    m = re.search(r"mark=(\d+)", line)
    return bool(m and int(m.group(1)) & 0x20000000)

def _wait(pred, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def _captured_records(path):
    """Records in a capture tcpdump -U is still writing: none until its header is there, and
    a last record cut short (being written now) is not there yet."""
    if not os.path.exists(path) or os.path.getsize(path) < 24:
        return []
    out = []
    with open(path, "rb") as f:
        try:
            for rec in read_pcap(f):
                out.append(rec)
        except CaptureError as exc:
            if exc.reason != Malformed.BAD_CAPTURE_RECORD:
                raise
    return out


class Site:
    def __init__(self, lab, tmp_path, offload: bool = True, v6: bool = False):
        self.lab, self.dir = lab, str(tmp_path)
        self.offload = offload
        self.rule_count = RULES_OFFLOAD if offload else RULES_PER_PACKET
        self.conf = os.path.join(self.dir, "nat.conf")
        with open(self.conf, "w") as f:
            f.write(CONF6 if v6 else CONF)
        self.vm, self.host, self.inet = lab.ns("vm"), lab.ns("host"), lab.ns("inet")
        lab.veth(self.vm, "vm0", self.host, "hv0")
        lab.veth(self.host, "ext0", self.inet, "inet0")
        lab.addr(self.vm, "vm0", "198.18.0.2/24")
        lab.route(self.vm, "default", "198.18.0.1")
        lab.addr(self.host, "hv0", "198.18.0.1/24")
        lab.addr(self.host, "ext0", "203.0.113.1/24")
        lab.addr(self.inet, "inet0", "203.0.113.2/24")
        lab.sysctl(self.host, "net.ipv4.ip_forward", "1")
        self._firewall("iptables-legacy", VM)
        if v6:
            self._v6()
        self.proc = None
        self.log = os.path.join(self.dir, "nat.log")
        self.status_file = os.path.join(self.dir, "nat-q3.status.json")
        self.snapshot_file = os.path.join(self.dir, "nat-q3.snapshot.json")

    def _v6(self):
        """NAT66 beside NAT44: addresses (DAD off: lab.addr), forwarding, the same stateful firewall."""
        lab = self.lab
        lab.sysctl(self.host, "net.ipv6.conf.all.forwarding", "1")
        lab.addr(self.vm, "vm0", f"{VM6}/64")
        lab.route(self.vm, "default", "2001:db8:1::1")
        lab.addr(self.host, "hv0", "2001:db8:1::1/64")
        lab.addr(self.host, "ext0", f"{EXT6}/64")
        lab.addr(self.inet, "inet0", f"{PEER6}/64")  # and no route back to 2001:db8:1::/64
        self._firewall("ip6tables-legacy", VM6)

    def _firewall(self, tool, vm):
        """A stateful firewall: makes the kernel track these flows (its entries must stay consistent)."""
        for rule in (["-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"],
                     ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                     ["-A", "FORWARD", "-i", "hv0", "-j", "ACCEPT"],
                     ["-A", "FORWARD", "-i", "ext0", "-m", "conntrack", "--ctstate", "NEW", "-d", vm, "-j", "ACCEPT"],
                     ["-P", "FORWARD", "DROP"]):
            self.lab.run(self.host, [tool, *rule])

    def rules6(self):
        return self.lab.run(self.host, ["ip6tables-legacy-save"]).stdout

    def start(self, internal="hv0", extra=()):
        with open(self.log, "a") as log:
            self.proc = self.lab.popen(self.host, [sys.executable, "-m", "tools.cli", "-v", "nat", "--config", self.conf,
                                                  "--external", "ext0", "--internal", internal, "--queue", "3",
                                                  "--state-dir", self.dir]
                                       + ([] if self.offload else ["--no-offload"]) + list(extra),
                                       stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        pid = self.proc.pid

        def ready():
            st = self.status()
            # the child of `ip netns exec` is the plugin (exec'd): same pid
            return st is not None and st["pid"] == pid and self.proc.poll() is None
        _wait(ready, 15, "roam nat to start (log: %s)" % self.log)

    def status(self):
        try:
            with open(self.status_file) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    def counter(self, name):
        st = self.status()
        return st["engine"]["counters"].get(name, 0) if st else 0

    def queued_out(self):
        """Packets the NAT's outbound rules (mangle POSTROUTING -o ext0 -j NFQUEUE) have matched."""
        out = self.lab.run(self.host, ["iptables-legacy", "-t", "mangle", "-L", "POSTROUTING", "-v", "-x", "-n"]).stdout
        return sum(int(l.split()[0]) for l in out.splitlines()
                   if "NFQUEUE" in l and len(l.split()) > 6 and l.split()[6] == "ext0")

    def rules(self):
        return self.lab.run(self.host, ["iptables-legacy-save"]).stdout

    def sets(self) -> dict[str, list[str]]:
        """The host namespace's roam IP sets: {name: members} (as ``ipset list`` prints them)."""
        out = self.lab.run(self.host, ["ipset", "list"], check=False).stdout
        sets: dict[str, list[str]] = {}
        name, members = None, False
        for line in out.splitlines():
            if line.startswith("Name: "):
                name, members = line[6:].strip(), False
                sets[name] = []
            elif line.startswith("Members:"):
                members = True
            elif members and line.strip() and name is not None:
                sets[name].append(line.split()[0])
        return {k: v for k, v in sets.items() if k.startswith("roam-")}

    def sock(self, ns, kind=socket.SOCK_STREAM, family=socket.AF_INET):
        s = self.lab.socket(ns, family, kind)
        s.settimeout(5)
        return s

    def tcp(self, server_ns, bind, client_ns, to, src=None, family=socket.AF_INET):
        """A listener in ``server_ns`` on ``bind``, a client in ``client_ns`` connected to ``to`` (from
        ``src``), and the connection accepted: (listener, client, accepted, the address it came from)."""
        srv = self.sock(server_ns, family=family)
        srv.bind(bind)
        srv.listen()
        c = self.sock(client_ns, family=family)
        if src is not None:
            c.bind(src)
        c.connect(to)
        conn, addr = srv.accept()
        return srv, c, conn, addr


@pytest.fixture
def site(lab, tmp_path):
    return Site(lab, tmp_path)


#: the tests about the per-packet path run both ways: offloaded (default) and --no-offload
both = pytest.mark.parametrize("mode", ["offload", "no_offload"])


@pytest.fixture
def msite(lab, tmp_path, mode):
    return Site(lab, tmp_path, offload=mode == "offload")


def _capture_addresses(path):
    """Every IPv4 address in IP headers of the capture, quoted ones in ICMP errors included."""
    seen = set()
    with open(path, "rb") as f:
        for rec in read_pcap(f):
            pkt = record_packet(rec)
            while pkt is not None:
                seen.add(ipaddress.ip_address(pkt.src))
                seen.add(ipaddress.ip_address(pkt.dst))
                pkt = pkt.inner
    return seen


@both
def test_outbound_tcp_udp_ping_nothing_internal_leaves(msite):
    site = msite
    lab = site.lab
    pcap = os.path.join(site.dir, "ext.pcap")
    dump = lab.tcpdump(site.inet, ["-i", "inet0", "-w", pcap])
    site.start()
    rules = site.rules()
    assert "-A PREROUTING -i ext0 -m comment --comment \"roam-nat q3 pid" in rules
    assert "-A POSTROUTING -o ext0 -m comment --comment \"roam-nat q3 pid" in rules
    assert "--queue-bypass" not in rules  # fail-closed
    assert f"-A PREROUTING -s 198.18.0.0/24 -d {EXT}/32 ! -i ext0 -m comment" in rules  # hairpin, first half
    assert "-A POSTROUTING -s 198.18.0.0/24 ! -o ext0 -m comment" in rules  # hairpin, second half

    # TCP
    srv, c, conn, peer_addr = site.tcp(site.inet, (PEER, 7000), site.vm, (PEER, 7000))
    assert peer_addr[0] == EXT and peer_addr[1] == c.getsockname()[1]  # port preserved
    c.sendall(b"hello")
    assert conn.recv(10) == b"hello"
    conn.sendall(b"world")
    assert c.recv(10) == b"world"
    # UDP
    us = site.sock(site.inet, socket.SOCK_DGRAM)
    us.bind((PEER, 5300))
    uc = site.sock(site.vm, socket.SOCK_DGRAM)
    uc.sendto(b"q", (PEER, 5300))
    data, src = us.recvfrom(100)
    assert data == b"q" and src[0] == EXT
    us.sendto(b"a", src)
    assert uc.recvfrom(100)[0] == b"a"
    # ping
    assert lab.ping(site.vm, PEER, count=2) == 2
    # an ICMP error about a translated flow reaches the VM (UDP to a closed port on the peer)
    uc.sendto(b"x", (PEER, 9))
    with pytest.raises(ConnectionRefusedError):
        uc2 = site.sock(site.vm, socket.SOCK_DGRAM)
        uc2.connect((PEER, 9))
        uc2.send(b"x")
        uc2.recv(10)

    ct = lab.run(site.host, ["conntrack", "-L", "-p", "tcp"], check=False).stdout
    line = next(l for l in ct.splitlines() if "dport=7000" in l)
    if site.offload:
        # the kernel's entry carries roam's NAT (and mark) and roam's lifetime, and moved on its own
        eport = c.getsockname()[1]
        assert f"src={VM} dst={PEER} sport={eport} dport=7000" in line, line
        assert f"src={PEER} dst={EXT} sport=7000 dport={eport}" in line and ours(line), line
        assert int(line.split()[2]) > 7000, line  # TCP established: 7440 s, not the kernel's 5 days
    else:
        # the kernel's tracker saw only internal-side tuples, both ways, and did no NAT of its own
        assert f"src={VM} dst={PEER}" in line and f"src={PEER} dst={VM}" in line, line
    assert "ESTABLISHED" in line and "[ASSURED]" in line

    _wait(lambda: site.counter("translated_in") >= 4, 5, "status counters")
    out = lab.run(site.host, [sys.executable, "-m", "tools.cli", "nat", "status", "--queue", "3",
                              "--state-dir", site.dir, "--mappings"], check=False)
    assert out.returncode == 0 and "running" in out.stdout and "mappings live" in out.stdout, out
    rows = [l.split() for l in out.stdout.splitlines()]
    # one mapping, two flows (to 5300 and to the closed port 9): endpoint-independent mapping
    assert ["udp", f"{VM}:{uc.getsockname()[1]}", "->", f"{EXT}:{src[1]}", "flows", "2"] in rows, out.stdout
    assert ["tcp", f"{VM}:80", "->", f"{EXT}:8080", "flows", "0", "(inbound", "mapping)"] in rows, out.stdout

    # fail-closed: kill -9, the rules stay, and what the VM sends now is dropped, not leaked
    lab.stop(site.proc, sig=signal.SIGKILL)
    assert "roam-nat q3" in site.rules()
    assert lab.ping(site.vm, PEER, count=1, timeout=1.0) == 0
    queued = site.queued_out()
    if site.offload:
        # offloaded flows go on in the kernel, translated, while the plugin is down ...
        uc.sendto(b"still", (PEER, 5300))
        assert us.recvfrom(100) == (b"still", src)
        c.sendall(b"still")
        assert conn.recv(10) == b"still"
        # ... and new flows wait, once the kernel path's liveness entry lapses (until then the kernel
        # NATs a new flow that keeps its port, as roam would: translated, never leaked) -- their
        # first packets reach the dead queue (two new UDP flows)
        n = site.sock(site.vm, socket.SOCK_DGRAM)
        n.sendto(b"early", (PEER, 5304))
        n.close()
        time.sleep(ALIVE_FOR + 0.5)
        for port in (5301, 5302):
            n = site.sock(site.vm, socket.SOCK_DGRAM)
            n.sendto(b"leak?", (PEER, port))
            n.close()
    else:
        uc.sendto(b"leak?", (PEER, 5300))
        c.sendall(b"leak?")
    # Both attempts reached the NAT's (dead) queue: the rule's packet counter moved ...
    _wait(lambda: site.queued_out() >= queued + 2, 10, "the leak attempts to reach the NFQUEUE rule")
    # ... and whatever got past it is on the wire before a marker the peer sends afterwards:
    # once the marker is in the file, tcpdump has written everything before it; then stop cleanly.
    with site.sock(site.inet, socket.SOCK_DGRAM) as marker:
        marker.sendto(b"marker", (EXT, 9999))
    _wait(lambda: any(record_packet(r) is not None and record_packet(r).dport == 9999
                      for r in _captured_records(pcap)), 10, "the marker in the capture")
    lab.stop_tcpdump(dump)
    addrs = _capture_addresses(pcap)
    assert ipaddress.ip_address(EXT) in addrs
    assert not [a for a in addrs if a in INTERNAL], addrs
    for s in (srv, conn, c, us, uc):
        s.close()


@both
def test_inbound_mapping_and_unmapped_dropped(msite):
    site = msite
    site.start()
    lab = site.lab
    srv, c, conn, addr = site.tcp(site.vm, (VM, 80), site.inet, (EXT, 8080))
    assert addr[0] == PEER  # the VM sees the real peer
    conn.sendall(b"hi")
    assert c.recv(10) == b"hi"
    if site.offload:  # the kernel's entry carries the inbound mapping's destination NAT
        ct = site.lab.run(site.host, ["conntrack", "-L", "-p", "tcp", "--dport", "8080"], check=False).stdout
        line = next(l for l in ct.splitlines() if f"src={PEER} dst={EXT}" in l)
        assert f"src={VM} dst={PEER} sport=80 dport={c.getsockname()[1]}" in line and "ESTABLISHED" in line, line
    else:  # the kernel tracked it with the internal address, consistently both ways
        ct = site.lab.run(site.host, ["conntrack", "-L", "-p", "tcp", "--dport", "80"], check=False).stdout
        line = next(l for l in ct.splitlines() if f"src={PEER} dst={VM}" in l)
        assert f"src={VM} dst={PEER} sport=80" in line and "ESTABLISHED" in line, line
    # no mapping: not the VM's but the host's, as under MASQUERADE (issue 10: it used to be
    # dropped and the host locked out); nothing listens there on the host: its stack refuses
    c2 = site.sock(site.inet)
    c2.settimeout(1.0)
    with pytest.raises(ConnectionRefusedError):
        c2.connect((EXT, 8081))
    _wait(lambda: site.counter("host_flows_in") >= 1, 5, "the host flow to be counted")
    assert site.counter("dropped_no_mapping") == 0
    # the host's own connections from the external address keep working beside the NAT
    hs, h, hc, haddr = site.tcp(site.inet, (PEER, 7002), site.host, (PEER, 7002))
    assert haddr == (EXT, h.getsockname()[1])
    hc.sendall(b"host")
    assert h.recv(10) == b"host"
    for s in (hs, h, hc):
        s.close()
    # SIGTERM removes the rules; the established flow survives in the snapshot
    assert lab.stop(site.proc) == 0
    assert "roam-nat" not in site.rules()
    with open(site.snapshot_file) as f:
        assert len(json.load(f)["flows"]) >= 1
    for s in (srv, conn, c, c2):
        s.close()


def test_kill9_restart_keeps_established_tcp(site):
    site.start()
    lab = site.lab
    srv, c, conn, _ = site.tcp(site.inet, (PEER, 7001), site.vm, (PEER, 7001))
    c.sendall(b"before")
    assert conn.recv(10) == b"before"

    def snapped():
        try:
            with open(site.snapshot_file) as f:
                return any(fl["proto"] == 6 and fl["state"] == 3 for fl in json.load(f)["flows"])
        except (FileNotFoundError, ValueError):
            return False
    _wait(snapped, 5, "a snapshot holding the established flow")
    lab.stop(site.proc, sig=signal.SIGKILL)
    c.sendall(b"during")  # dropped at the queue: TCP retransmits it
    site.start()
    with open(site.log) as f:
        log = f.read()
    assert f"replaced {site.rule_count} stale rules" in log and "restored" in log
    assert site.rules().count("roam-nat q3") == site.rule_count  # in, out, and the two hairpin halves (per packet)
    conn.settimeout(15)
    assert conn.recv(10) == b"during"
    conn.sendall(b"after")
    assert c.recv(10) == b"after"
    for s in (srv, conn, c):
        s.close()


def test_external_address_change_kills_old_mappings(site):
    site.start()
    lab = site.lab
    us = site.sock(site.inet, socket.SOCK_DGRAM)
    us.bind(("0.0.0.0", 5301))
    uc = site.sock(site.vm, socket.SOCK_DGRAM)
    uc.sendto(b"1", (PEER, 5301))
    _, src = us.recvfrom(10)
    assert src[0] == EXT
    lab.flush_addr(site.host, "ext0")
    lab.addr(site.host, "ext0", "203.0.113.5/24")
    _wait(lambda: (site.status() or {}).get("engine", {}).get("external_ip") == "203.0.113.5", 10,
          "the plugin to see the new address")
    # roam killed the flow, or (the kernel path's) the kernel's MASQUERADE did as the address went
    off = (site.status() or {}).get("offload") or {}
    assert site.counter("flows_killed_by_address_change") >= 1 or off.get("kernel_flows", 0) >= 1
    rules = site.rules()
    assert "-d 203.0.113.5/32" in rules and f"-d {EXT}/32" not in rules  # the hairpin rule moved along
    uc.sendto(b"2", (PEER, 5301))
    _, src2 = us.recvfrom(10)
    assert src2[0] == "203.0.113.5"
    us.sendto(b"r", src2)
    assert uc.recvfrom(10)[0] == b"r"
    for s in (us, uc):
        s.close()


def test_sighup_reloads_inbound_mappings_keeping_flows(site):
    site.start()
    srv, c, conn, _ = site.tcp(site.vm, (VM, 80), site.inet, (EXT, 8080))
    with open(site.conf, "w") as f:
        f.write(CONF.replace("8080 = ", "9090 = "))
    os.kill(site.proc.pid, signal.SIGHUP)
    _wait(lambda: "reloaded: 1 inbound mappings" in open(site.log).read(), 10, "the reload")
    c.sendall(b"still")  # the flow opened through 8080 goes on
    assert conn.recv(10) == b"still"
    c2 = site.sock(site.inet)
    c2.connect((EXT, 9090))
    conn2, _ = srv.accept()
    c2.sendall(b"new")
    assert conn2.recv(10) == b"new"
    c3 = site.sock(site.inet)
    c3.settimeout(1.0)
    with pytest.raises(ConnectionRefusedError):  # gone for new flows: the host's own, which refuses
        c3.connect((EXT, 8080))  # (the VM still listens on 80: through a mapping it would connect)
    srv.settimeout(0.5)
    with pytest.raises(socket.timeout):
        srv.accept()  # nothing reached the VM
    for s in (srv, conn, c, c2, conn2, c3):
        s.close()


def test_malformed_packets_are_counted_drops(site):
    import struct

    site.start()
    raw_sock = site.lab.socket(site.inet, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    # UDP whose length field claims more than the packet holds; TCP with a data offset past its end
    bad_udp = struct.pack("!HHHH", 1000, 2000, 400, 0) + b"abc"
    bad_tcp = struct.pack("!HHIIBBHHH", 1000, 2000, 1, 0, 0xF0, 0x02, 100, 0, 0)
    for proto, l4 in ((17, bad_udp), (6, bad_tcp)):
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                         socket.inet_aton(PEER), socket.inet_aton(EXT))
        raw_sock.sendto(ip + l4, (EXT, 0))
    raw_sock.close()
    _wait(lambda: (site.status() or {}).get("engine", {}).get("parse_errors") == {"bad_udp_length": 1,
                                                                                 "bad_tcp_offset": 1},
          5, "both malformed packets to be counted")
    assert site.counter("dropped_malformed") == 2
    assert site.proc.poll() is None  # still running
    assert site.lab.ping(site.vm, PEER, count=1) == 1


@both
def test_hairpin_between_two_vms(msite):
    site = msite
    lab = site.lab
    vm2 = lab.ns("vm2")
    lab.veth(vm2, "vm0", site.host, "hv1")
    lab.addr(vm2, "vm0", "198.18.1.2/24")
    lab.route(vm2, "default", "198.18.1.1")
    lab.addr(site.host, "hv1", "198.18.1.1/24")
    lab.run(site.host, ["iptables-legacy", "-I", "FORWARD", "3", "-i", "hv1", "-j", "ACCEPT"])
    site.start(internal="198.18.0.0/15")
    srv = site.sock(site.vm)
    srv.bind((VM, 80))
    srv.listen()
    c = site.sock(vm2)
    c.bind(("198.18.1.2", 41000))
    c.connect((EXT, 8080))  # VM2 reaches VM's service through the NAT's external address
    conn, peer = srv.accept()
    assert peer == (EXT, 41000)  # RFC 4787 REQ-9: the external source address and port
    conn.sendall(b"ping")
    assert c.recv(10) == b"ping"
    c.sendall(b"pong")
    assert conn.recv(10) == b"pong"
    assert c.getpeername() == (EXT, 8080)
    ct = lab.run(site.host, ["conntrack", "-L", "-p", "tcp"], check=False).stdout
    line = next(l for l in ct.splitlines() if "sport=41000" in l)
    if site.offload:  # one kernel entry with both halves of the NAT
        assert f"src=198.18.1.2 dst={EXT} sport=41000 dport=8080" in line, line
        assert f"src=198.18.0.2 dst={EXT} sport=80 dport=41000" in line and "ESTABLISHED" in line, line
        _wait(lambda: (site.status() or {}).get("offload", {}).get("flows", 0) >= 1, 5, "the offloaded flow")
    else:
        # the kernel tracked the half-way tuple, consistently in both directions
        assert "src=198.18.1.2 dst=198.18.0.2" in line and "src=198.18.0.2 dst=198.18.1.2" in line, line
        assert "ESTABLISHED" in line
        _wait(lambda: site.counter("hairpin_half") >= 3, 5, "hairpin counters")
    for s in (srv, conn, c):
        s.close()
