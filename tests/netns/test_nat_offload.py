"""Offload (issue 10, section 2) on the real kernel: roam decides each flow, the kernel's
conntrack entry carries the NAT, and later packets never reach user space.

The topology and the plugin runner are test_nat_plugin.py's (``Site``); offload is the
default.  The kernel's own conntrack (``conntrack -L``) is the witness."""
from __future__ import annotations

import ipaddress
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conntrack.pcap import read_pcap, record_packet

from .test_nat_plugin import EXT, INTERNAL, PEER, RULES_OFFLOAD, VM, Site, _captured_records, _wait, ours

PEER2 = "203.0.113.3"


@pytest.fixture
def site(lab, tmp_path):
    return Site(lab, tmp_path)


def _entries(site, *args) -> list[str]:
    return [l for l in site.lab.run(site.host, ["conntrack", "-L", *args], check=False).stdout.splitlines() if l]


def _sysctl(lab, ns, key) -> int:
    return int(lab.run(ns, ["sysctl", "-n", key]).stdout.strip())


def _off(site) -> dict:
    return (site.status() or {}).get("offload") or {}


def _queued(site) -> int:
    return (site.status() or {}).get("queued_packets", 0)


def _settled(site, seconds: float = 2.5) -> int:
    """The queued-packet count once the status file was rewritten after now."""
    t = time.time()
    _wait(lambda: (site.status() or {}).get("written_at", 0) > t + 1.1, seconds + 3, "a fresh status")
    return _queued(site)


def _bulk(site, size: int = 4 << 20) -> int:
    """``size`` bytes VM -> peer over TCP; the bytes received."""
    srv = site.sock(site.inet)
    srv.bind((PEER, 7100))
    srv.listen()
    got = []

    def recv():
        conn, _ = srv.accept()
        n = 0
        while True:
            b = conn.recv(1 << 16)
            if not b:
                break
            n += len(b)
        got.append(n)
        conn.close()
    t = threading.Thread(target=recv)
    t.start()
    c = site.sock(site.vm)
    c.connect((PEER, 7100))
    c.sendall(b"x" * size)
    c.close()
    t.join(20)
    srv.close()
    return got[0] if got else -1


def test_only_new_flows_reach_the_queue_the_kernel_translates_the_rest(site):
    """4 MiB of TCP and 300 UDP datagrams each way: a handful of packets queued; the kernel's
    entries carry roam's NAT and mark; mapping and filtering endpoint-independent, ports kept."""
    lab = site.lab
    lab.addr(site.inet, "inet0", f"{PEER2}/24")
    site.start()
    base = _settled(site)
    assert _bulk(site) == 4 << 20
    us = site.sock(site.inet, socket.SOCK_DGRAM)
    us.bind((PEER, 5300))
    uc = site.sock(site.vm, socket.SOCK_DGRAM)
    uc.bind((VM, 41234))
    for i in range(300):
        uc.sendto(b"q%d" % i, (PEER, 5300))
        data, src = us.recvfrom(100)
        us.sendto(data, src)
        assert uc.recvfrom(100)[0] == data
    assert src == (EXT, 41234)  # the source port preserved
    queued = _settled(site) - base
    assert queued <= 10, queued  # the SYN, the first datagram (and a stray or two): not 2 x 300 + 4 MiB
    line = next(l for l in _entries(site, "-p", "udp") if "dport=5300" in l)
    assert f"src={VM} dst={PEER} sport=41234 dport=5300" in line and ours(line), line
    assert f"src={PEER} dst={EXT} sport=5300 dport=41234" in line, line
    # endpoint-independent mapping: another destination, the same external endpoint ...
    us2 = site.sock(site.inet, socket.SOCK_DGRAM)
    us2.bind((PEER2, 5400))
    uc.sendto(b"other", (PEER2, 5400))
    assert us2.recvfrom(100) == (b"other", (EXT, 41234))
    # ... and endpoint-independent filtering: a third endpoint may send in through it
    us3 = site.sock(site.inet, socket.SOCK_DGRAM)
    us3.bind((PEER, 6000))
    us3.sendto(b"unsolicited", (EXT, 41234))
    assert uc.recvfrom(100) == (b"unsolicited", (PEER, 6000))
    _wait(lambda: _off(site).get("flows", 0) >= 4, 5, "four offloaded flows in the status")
    out = lab.run(site.host, [sys.executable, "-m", "tools.cli", "nat", "status", "--queue", "3",
                              "--state-dir", site.dir, "--mappings"], check=False)
    assert out.returncode == 0, out
    m = re.search(r"queued packets (\d+); offloaded flows (\d+)", out.stdout)
    assert m and int(m.group(2)) >= 4, out.stdout
    rows = [l.split() for l in out.stdout.splitlines()]
    assert ["udp", f"{VM}:41234", "->", f"{EXT}:41234", "flows", "3"] in rows, out.stdout
    for s in (us, uc, us2, us3):
        s.close()


def test_a_dead_kernel_entry_frees_its_mapping(site):
    """The engine's table stays the one truth: the mapping lives while the kernel's entry
    does, and goes with it (DESTROY event); the next packet opens the flow again."""
    lab = site.lab
    site.start()
    us = site.sock(site.inet, socket.SOCK_DGRAM)
    us.bind((PEER, 5300))
    uc = site.sock(site.vm, socket.SOCK_DGRAM)
    uc.bind((VM, 42000))
    uc.sendto(b"1", (PEER, 5300))
    assert us.recvfrom(10) == (b"1", (EXT, 42000))

    def live():
        return (site.status() or {}).get("engine", {}).get("mappings_live", -1)
    _wait(lambda: live() == 1, 5, "the mapping in the status")
    ended = _off(site).get("offload_ended", 0)
    lab.run(site.host, ["conntrack", "-D", "-p", "udp", "--orig-port-src", "42000"])
    _wait(lambda: live() == 0 and _off(site).get("offload_ended", 0) == ended + 1, 5,
          "the mapping to go with the kernel's entry")
    assert not [l for l in _entries(site, "-p", "udp") if "sport=42000" in l]
    uc.sendto(b"2", (PEER, 5300))
    assert us.recvfrom(10) == (b"2", (EXT, 42000))
    _wait(lambda: live() == 1, 5, "the mapping back")
    us.close()
    uc.close()


def test_idle_udp_outlives_the_kernel_default_and_configured_lifetimes_hold(site):
    """The kernel's defaults (30 s unreplied, 120 s stream) would end an idle UDP flow long
    before RFC 4787's 300 s: the namespace's conntrack timeouts are roam's."""
    lab = site.lab
    site.start()
    # the kernel's defaults, in a namespace roam never touched
    assert _sysctl(lab, site.inet, "net.netfilter.nf_conntrack_udp_timeout") == 30
    assert _sysctl(lab, site.inet, "net.netfilter.nf_conntrack_udp_timeout_stream") == 120
    assert _sysctl(lab, site.host, "net.netfilter.nf_conntrack_udp_timeout") == 300
    assert _sysctl(lab, site.host, "net.netfilter.nf_conntrack_udp_timeout_stream") == 300
    assert _sysctl(lab, site.host, "net.netfilter.nf_conntrack_tcp_timeout_established") == 7440
    assert _sysctl(lab, site.host, "net.netfilter.nf_conntrack_tcp_timeout_syn_sent") == 240
    us = site.sock(site.inet, socket.SOCK_DGRAM)
    us.bind((PEER, 5300))
    uc = site.sock(site.vm, socket.SOCK_DGRAM)
    uc.bind((VM, 43000))
    uc.sendto(b"1", (PEER, 5300))
    _, src = us.recvfrom(10)
    us.sendto(b"r", src)
    assert uc.recvfrom(10)[0] == b"r"
    time.sleep(3)  # idle
    line = next(l for l in _entries(site, "-p", "udp") if "sport=43000" in l)
    left = int(line.split()[2])
    assert left >= 290 and left > 120 + 30, line  # the kernel's default would leave at most 117
    # shortened, as a configuration may: the flow ends when idle that long, in the kernel and here
    lab.stop(site.proc)
    with open(site.conf, "a") as f:
        f.write("[udp]\ntimeout = 4\n")
    site.start()
    assert _sysctl(lab, site.host, "net.netfilter.nf_conntrack_udp_timeout") == 4
    uc2 = site.sock(site.vm, socket.SOCK_DGRAM)
    uc2.bind((VM, 43001))
    uc2.sendto(b"1", (PEER, 5300))
    _, src2 = us.recvfrom(10)
    time.sleep(2)  # idle, less than 4 s: alive
    assert [l for l in _entries(site, "-p", "udp") if "sport=43001" in l]
    rows = lambda: [m for m in (site.status() or {}).get("mappings", []) if m["internal"] == f"{VM}:43001"]
    assert rows()
    _wait(lambda: not rows(), 12, "the idle flow's mapping to end with its kernel entry")
    assert not [l for l in _entries(site, "-p", "udp") if "sport=43001" in l]
    for s in (us, uc, uc2):
        s.close()


@pytest.mark.parametrize("kernel_path", [True, False], ids=["kernel-path", "queued"])
def test_an_address_change_removes_every_offloaded_entry_at_once(site, kernel_path):
    """Flows roam decided are removed by roam (at once, by mark); flows the kernel path NATed
    (MASQUERADE) by the kernel itself when the address goes, their DESTROYs ending them in roam."""
    lab = site.lab
    site.start(extra=() if kernel_path else ["--no-kernel-path"])
    us = site.sock(site.inet, socket.SOCK_DGRAM)
    us.bind(("0.0.0.0", 5301))
    socks = []
    for port in (44000, 44001, 44002):
        uc = site.sock(site.vm, socket.SOCK_DGRAM)
        uc.bind((VM, port))
        uc.sendto(b"1", (PEER, 5301))
        assert us.recvfrom(10)[1] == (EXT, port)
        socks.append(uc)
    assert len([l for l in _entries(site) if ours(l)]) == 3
    lab.flush_addr(site.host, "ext0")
    lab.addr(site.host, "ext0", "203.0.113.5/24")
    _wait(lambda: (site.status() or {}).get("engine", {}).get("external_ip") == "203.0.113.5", 10,
          "the plugin to see the new address")
    assert not [l for l in _entries(site) if ours(l) and f"dst={EXT} " in l]
    if kernel_path:
        _wait(lambda: _off(site)["kernel_flows"] == 3 and _off(site)["flows"] == 0, 5,
              "the kernel's DESTROYs to end the kernel path's three flows in roam")
    else:
        assert site.counter("flows_killed_by_address_change") == 3
    socks[0].sendto(b"2", (PEER, 5301))
    assert us.recvfrom(10)[1] == ("203.0.113.5", 44000)
    for s in socks + [us]:
        s.close()


def test_icmp_errors_of_offloaded_flows_are_translated_by_the_kernel(site):
    site.start()
    us = site.sock(site.inet, socket.SOCK_DGRAM)
    us.bind((PEER, 5302))
    uc = site.sock(site.vm, socket.SOCK_DGRAM)
    uc.connect((PEER, 5302))
    for i in range(3):
        uc.send(b"%d" % i)
        us.recvfrom(10)
    _wait(lambda: _off(site).get("flows", 0) >= 1, 5, "the flow offloaded")
    before = _settled(site)
    us.close()  # the peer's port closes: its kernel answers port unreachable, quoting EXT:port
    uc.send(b"again")
    with pytest.raises(ConnectionRefusedError):
        uc.recv(10)
    assert _settled(site) == before  # neither the datagram nor the ICMP error reached user space
    uc.close()


_STREAM = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("198.18.0.2", 46100))
end = time.monotonic() + float(sys.argv[1])
n = 0
while time.monotonic() < end:
    try:
        s.sendto(n.to_bytes(4, "big"), ("203.0.113.2", 5500))
    except OSError:
        pass
    n += 1
    time.sleep(0.002)
print(n)
"""


def test_restart_at_a_random_instant_keeps_offloaded_flows_and_leaks_nothing(site):
    """A UDP stream (~500 packets/s) and a TCP session run; roam nat is killed with -9 at a
    random instant, three times: both go on in the kernel meanwhile, new flows wait, the
    restart takes the flows back, and not one packet leaves with an internal source."""
    lab = site.lab
    pcap = os.path.join(site.dir, "ext.pcap")
    dump = lab.tcpdump(site.inet, ["-i", "inet0", "-w", pcap])
    site.start()
    srv, c, conn, _ = site.tcp(site.inet, (PEER, 7200), site.vm, (PEER, 7200))
    rx = site.sock(site.inet, socket.SOCK_DGRAM)
    rx.bind((PEER, 5500))
    rx.settimeout(0.2)
    sender = lab.popen(site.vm, [sys.executable, "-c", _STREAM, "14"], stdout=subprocess.PIPE, text=True)
    rng = random.Random()
    during = 0
    try:
        time.sleep(1.0)
        for _ in range(3):
            time.sleep(rng.uniform(0.1, 1.5))
            lab.stop(site.proc, sig=signal.SIGKILL)
            t_end = time.monotonic() + 1.0  # down for a second: the offloaded flows go on
            while time.monotonic() < t_end:
                try:
                    rx.recvfrom(10)
                    during += 1
                except socket.timeout:
                    pass
            c.sendall(b"down")
            assert conn.recv(10) == b"down"
            assert lab.ping(site.vm, PEER, count=1, timeout=0.5) == 0  # a new flow waits
            site.start()
            _wait(lambda: _off(site).get("flows", 0) >= 2, 10, "the flows taken back after the restart")
            c.sendall(b"up")
            assert conn.recv(10) == b"up"
            assert lab.ping(site.vm, PEER, count=1) == 1  # new flows again
        sent = int(sender.communicate(timeout=30)[0].strip())
    finally:
        lab.stop(sender)
    assert during > 100, during  # ~500/s for three seconds of downtime
    with site.sock(site.inet, socket.SOCK_DGRAM) as marker:
        marker.sendto(b"marker", (EXT, 9999))
    _wait(lambda: any(record_packet(r) is not None and record_packet(r).dport == 9999
                      for r in _captured_records(pcap)), 10, "the marker in the capture")
    lab.stop_tcpdump(dump)
    inside = translated = 0
    with open(pcap, "rb") as f:
        for rec in read_pcap(f):
            pkt = record_packet(rec)
            while pkt is not None:
                inside += ipaddress.ip_address(pkt.src) in INTERNAL or ipaddress.ip_address(pkt.dst) in INTERNAL
                pkt = pkt.inner
            p = record_packet(rec)
            translated += p is not None and p.dport == 5500 and p.src == socket.inet_aton(EXT)
    assert sent > 2000 and translated > sent // 2, (sent, translated)
    assert inside == 0, f"{inside} packets with an internal address on the external wire"
    for s in (srv, c, conn, rx):
        s.close()


def test_sighup_gives_the_kernel_the_new_lifetimes_and_flows_go_on(site):
    lab = site.lab
    site.start()
    assert _sysctl(lab, site.host, "net.netfilter.nf_conntrack_udp_timeout") == 300
    srv, c, conn, _ = site.tcp(site.vm, (VM, 80), site.inet, (EXT, 8080))
    with open(site.conf, "a") as f:
        f.write("[udp]\ntimeout = 600\n")
    os.kill(site.proc.pid, signal.SIGHUP)
    _wait(lambda: _sysctl(lab, site.host, "net.netfilter.nf_conntrack_udp_timeout") == 600, 10, "the new timeout")
    c.sendall(b"still")
    assert conn.recv(10) == b"still"
    for s in (srv, c, conn):
        s.close()


def test_the_hosts_own_traffic_stays_the_kernels_beside_offloaded_flows(site):
    """The host's own connections (from and to its external address) are tracked by the
    kernel as its own: no roam mark, no NAT; the VM's beside them are offloaded."""
    site.start()
    hs, h, hc, addr = site.tcp(site.inet, (PEER, 7300), site.host, (PEER, 7300))
    assert addr == (EXT, h.getsockname()[1])
    sshd, r, rc, _ = site.tcp(site.host, (EXT, 2222), site.inet, (EXT, 2222))
    v = site.sock(site.vm)
    v.connect((PEER, 7300))
    vc, vaddr = hs.accept()
    assert vaddr[0] == EXT
    for a, b in ((h, hc), (r, rc), (v, vc)):
        a.sendall(b"x")
        assert b.recv(1) == b"x"
    lines = _entries(site, "-p", "tcp")
    host_lines = [l for l in lines if f"src={EXT} dst={PEER} sport={h.getsockname()[1]} dport=7300" in l
                  or f"src={PEER} dst={EXT} sport={r.getsockname()[1]} dport=2222" in l]
    vm_line = next(l for l in lines if f"src={VM} dst={PEER}" in l)
    assert ours(vm_line), vm_line
    assert len(host_lines) == 2 and not [l for l in host_lines if ours(l)], lines
    for s in (hs, h, hc, sshd, r, rc, v, vc):
        s.close()


def test_no_offload_queues_every_packet_and_leaves_no_kernel_nat(lab, tmp_path):
    site = Site(lab, tmp_path, offload=False)
    site.start()
    base = _settled(site)
    us = site.sock(site.inet, socket.SOCK_DGRAM)
    us.bind((PEER, 5300))
    uc = site.sock(site.vm, socket.SOCK_DGRAM)
    for i in range(50):
        uc.sendto(b"q", (PEER, 5300))
        data, src = us.recvfrom(10)
        us.sendto(b"a", src)
        uc.recvfrom(10)
    assert _settled(site) - base >= 100  # every packet, both ways
    assert (site.status() or {}).get("offload") is None
    assert not [l for l in _entries(site) if ours(l)]
    for s in (us, uc):
        s.close()


def test_hairpinned_udp_and_internal_to_internal_traffic(site):
    """A hairpinned UDP flow's first packet takes the two halves in user space, its entry
    carries both NATs and the rest stays in the kernel; traffic between two internal networks
    is never NATed."""
    lab = site.lab
    with open(site.conf, "a") as f:
        f.write("[incomingudp]\n5353 = 198.18.0.2:53\n")
    vm2 = lab.ns("vm2")
    lab.veth(vm2, "vm0", site.host, "hv1")
    lab.addr(vm2, "vm0", "198.18.1.2/24")
    lab.route(vm2, "default", "198.18.1.1")
    lab.addr(site.host, "hv1", "198.18.1.1/24")
    lab.run(site.host, ["iptables-legacy", "-I", "FORWARD", "3", "-i", "hv1", "-j", "ACCEPT"])
    site.start(internal="198.18.0.0/15")
    srv = site.sock(site.vm, socket.SOCK_DGRAM)
    srv.bind((VM, 53))
    c = site.sock(vm2, socket.SOCK_DGRAM)
    c.bind(("198.18.1.2", 41000))
    base = _settled(site)
    for i in range(50):
        c.sendto(b"h%d" % i, (EXT, 5353))
        data, peer = srv.recvfrom(10)
        assert peer == (EXT, 41000)  # RFC 4787 REQ-9: the external source address and port
        srv.sendto(data, peer)
        assert c.recvfrom(10) == (data, (EXT, 5353))
    assert _settled(site) - base <= 4  # the first packet's two halves (and a stray), not 100
    line = next(l for l in _entries(site, "-p", "udp") if "sport=41000" in l)
    assert f"src=198.18.1.2 dst={EXT} sport=41000 dport=5353" in line and ours(line), line
    assert f"src={VM} dst={EXT} sport=53 dport=41000" in line, line
    # VM to VM directly (two internal networks): not NATed, by no path
    t, d, tc, addr = site.tcp(site.vm, (VM, 7400), vm2, (VM, 7400))
    assert addr == ("198.18.1.2", d.getsockname()[1])
    assert lab.ping(vm2, VM, count=1) == 1
    for s in (srv, c, t, d, tc):
        s.close()


def test_what_the_host_routes_elsewhere_is_not_natted(site):
    """Offload decides a new TCP flow before routing; a destination the host routes out of
    another interface than the external one is not NATed (as MASQUERADE -o EXT, as
    --no-offload): the route is looked up, and followed when it changes."""
    lab = site.lab
    mgmt = lab.ns("mgmt")
    lab.veth(site.host, "mg0", mgmt, "mg0")
    lab.addr(site.host, "mg0", "192.0.2.1/24")
    lab.addr(mgmt, "mg0", "192.0.2.2/24")
    lab.route(mgmt, "198.18.0.0/24", "192.0.2.1")
    site.start()
    srv, c, conn, addr = site.tcp(mgmt, ("192.0.2.2", 7500), site.vm, ("192.0.2.2", 7500))
    assert addr == (VM, c.getsockname()[1])  # not NATed
    assert lab.ping(site.vm, "192.0.2.2", count=1) == 1
    assert not [l for l in _entries(site) if ours(l) and "192.0.2.2" in l]
    # the route moves to the external side: from now on such flows are NATed there
    lab.flush_addr(site.host, "mg0")
    lab.addr(site.inet, "inet0", "192.0.2.2/32")
    lab.route(site.host, "192.0.2.2/32", dev="ext0")
    lab.route(site.inet, "198.18.0.0/24", "203.0.113.1")
    srv2 = site.sock(site.inet)
    srv2.bind(("192.0.2.2", 7501))
    srv2.listen()
    time.sleep(0.5)  # the route event reaches the plugin
    c2 = site.sock(site.vm)
    c2.connect(("192.0.2.2", 7501))
    conn2, addr2 = srv2.accept()
    assert addr2[0] == EXT
    for s in (srv, c, conn, srv2, c2, conn2):
        s.close()


@pytest.mark.parametrize("kernel_path", [True, False], ids=["kernel-path", "queued"])
def test_an_address_changed_while_down_leaves_no_entry_on_the_old_one(site, kernel_path):
    """Killed with offloaded flows on the old address, restarted on a new one: what the new run
    cannot take over is removed from the kernel, not left translating to a gone address (the
    kernel path's MASQUERADEd entries: by the kernel, as the address goes)."""
    lab = site.lab
    extra = () if kernel_path else ["--no-kernel-path"]
    site.start(extra=extra)
    us = site.sock(site.inet, socket.SOCK_DGRAM)
    us.bind(("0.0.0.0", 5303))
    uc = site.sock(site.vm, socket.SOCK_DGRAM)
    uc.bind((VM, 45000))
    uc.sendto(b"1", (PEER, 5303))
    assert us.recvfrom(10)[1] == (EXT, 45000)
    lab.stop(site.proc, sig=signal.SIGKILL)
    assert [l for l in _entries(site) if ours(l) and f"dst={EXT} " in l]  # still there, and working
    lab.flush_addr(site.host, "ext0")
    lab.addr(site.host, "ext0", "203.0.113.5/24")
    site.start(extra=extra)
    assert not [l for l in _entries(site) if ours(l) and f"dst={EXT} " in l]
    with open(site.log) as f:
        assert kernel_path or "removed the kernel's entry of an earlier run" in f.read()
    uc.sendto(b"2", (PEER, 5303))
    assert us.recvfrom(10)[1] == ("203.0.113.5", 45000)
    for s in (us, uc):
        s.close()


def _total_retrans(s: socket.socket) -> int:
    """tcp_info.tcpi_total_retrans: the segments this socket sent again."""
    import struct

    return struct.unpack_from("=I", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 100)[0]


def test_the_first_mid_stream_packet_of_a_connection_the_kernel_never_saw_goes_out(lab, tmp_path):
    """A migrated VM: an established TCP connection whose next packet reaches a freshly started
    roam nat with no conntrack entry for it (made with --no-offload, then the host's table
    flushed).  That first mid-stream packet is queued after conntrack, which made an entry for
    it: roam's offloaded entry must not clash with it (the kernel dropped the packet). It goes
    out translated, at once (no retransmission), and the flow is offloaded after it."""
    site = Site(lab, tmp_path, offload=False)
    site.start()
    srv, c, conn, _ = site.tcp(site.inet, (PEER, 7300), site.vm, (PEER, 7300), src=(VM, 43210))
    c.sendall(b"before")
    assert conn.recv(10) == b"before"
    lab.stop(site.proc)  # a clean stop: the snapshot holds the flow (the new host's state, migrated)
    lab.run(site.host, ["conntrack", "-F"], check=False)  # the kernel never saw the connection
    assert not [l for l in _entries(site) if "dport=7300" in l]
    site.offload, site.rule_count = True, RULES_OFFLOAD
    pcap = os.path.join(site.dir, "mid.pcap")
    dump = lab.tcpdump(site.inet, ["-i", "inet0", "-w", pcap, "tcp", "port", "7300"])
    site.start()
    retrans = _total_retrans(c)
    c.sendall(b"first")
    conn.settimeout(10)
    assert conn.recv(10) == b"first"
    c.sendall(b"second")
    assert conn.recv(10) == b"second"
    _wait(lambda: any(p is not None and p.payload_len == 6 for p in map(record_packet, _captured_records(pcap))),
          5, "the second segment in the capture")
    lab.stop_tcpdump(dump)
    data = [p for p in map(record_packet, _captured_records(pcap)) if p is not None and p.payload_len]
    assert [(p.src, p.sport, p.payload_len) for p in data] == [(socket.inet_aton(EXT), 43210, 5),
                                                              (socket.inet_aton(EXT), 43210, 6)], data
    assert _total_retrans(c) == retrans  # the first one went out: nothing was sent twice
    line = next(l for l in _entries(site, "-p", "tcp") if "dport=7300" in l)
    assert ours(line) and f"src={PEER} dst={EXT} sport=7300 dport=43210" in line, line  # offloaded after it
    for s in (srv, conn, c):
        s.close()


def test_sigusr1_snapshots_the_kernels_state_of_offloaded_flows_and_it_carries(site):
    """A migration hook's snapshot (SIGUSR1) is taken at once and holds an offloaded TCP flow as
    the kernel has it, ESTABLISHED: its packets after the SYN passed the engine by, which
    alone would have carried it as SYN_SENT (or as whatever the last reconciliation read),
    and the new host's tracker then calls the flow's next segment INVALID (the campaign's
    nat+state gap).  Carried to another address, the next segment goes out there."""
    import json

    import nat as natmod
    from conntrack.answer import Action
    from conntrack.build import tcp
    from conntrack.tcp_states import TcpState

    site.start()
    srv, c, conn, _ = site.tcp(site.inet, (PEER, 7400), site.vm, (PEER, 7400))
    c.sendall(b"ask")
    assert conn.recv(10) == b"ask"
    conn.sendall(b"answer")
    assert c.recv(10) == b"answer"
    assert site.status()["snapshots_asked"] == 0
    os.kill(site.proc.pid, signal.SIGUSR1)  # the status counts it once the snapshot is written
    _wait(lambda: (site.status() or {}).get("snapshots_asked") == 1, 5, "the snapshot asked for")
    with open(site.snapshot_file) as f:
        snap = json.load(f)
    flow = next(f for f in snap["flows"] if f["proto"] == 6 and 7400 in f["fwd"])
    assert flow["state"] == TcpState.ESTABLISHED, flow
    # carried: a new host's engine restores it on its own address; the VM's next segment leaves there
    new_ext = "198.51.100.77"
    eng = natmod.NatEngine(natmod.NatConfig(internal=(INTERNAL,), external_ip=new_ext))
    assert eng.restore(snap, 0.0, rebind=True) >= 1
    seg = tcp(socket.inet_aton(VM), socket.inet_aton(PEER), c.getsockname()[1], 7400, 1000, 2000, 0x18, b"next")
    ans = eng.process(seg, natmod.Side.INTERNAL, 0.1)
    assert ans.action == Action.ACCEPT and ans.data[12:16] == socket.inet_aton(new_ext), (ans.action, ans.reason)
    for s in (srv, conn, c):
        s.close()


def _nstat(site, ns, name: str) -> int:
    out = site.lab.run(ns, ["nstat", "-az", name], check=False).stdout.split()
    return int(out[out.index(name) + 1]) if name in out else 0


def test_a_port_reused_while_its_kernel_entry_is_in_time_wait_connects_without_a_syn_retransmission(site):
    """The server closes first (it keeps TIME_WAIT, the VM keeps nothing), so the VM connects again
    from the same port at once, 60 times, each while the kernel's offloaded entry of the last one
    is closing or in TIME_WAIT.  Each SYN reopens the flow in roam, whose fresh entry goes in
    before the SYN reaches conntrack: no SYN is ever sent twice.  (Before: the engine, not knowing
    the kernel's state, let the SYN through on the old entry; conntrack killed that entry and made
    one of its own without roam's NAT, and the answer raced roam's repair: `roam bench nat`'s
    client lost 1.7% of its SYNs, each a 1 s wait.)"""
    site.start()
    srv = site.sock(site.inet)
    srv.bind((PEER, 7500))
    srv.listen(64)

    def serve():
        for _ in range(60):
            conn, _ = srv.accept()
            conn.close()
    t = threading.Thread(target=serve)
    t.start()
    before = _nstat(site, site.vm, "TcpExtTCPSynRetrans")
    for _ in range(60):
        c = site.sock(site.vm)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.bind((VM, 45000))
        c.settimeout(10)
        c.connect((PEER, 7500))
        assert c.recv(10) == b""  # the server's FIN
        c.close()
    t.join(10)
    srv.close()
    assert _nstat(site, site.vm, "TcpExtTCPSynRetrans") == before
    line = next(l for l in _entries(site, "-p", "tcp") if "sport=45000" in l)
    assert ours(line) and f"dst={EXT} sport=7500 dport=45000" in line, line  # the last one offloaded, its port kept
