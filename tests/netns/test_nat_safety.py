"""`roam nat` safe on a real host (issue 10, section 1), on real packets in namespaces:
the host keeps its own services, restarts after ``kill -9`` leak nothing, a signal at any
instant of start-up leaves no rule and no queue, one NAT per interface.

The topology and the plugin runner are test_nat_plugin.py's (``Site``)."""
from __future__ import annotations

import ipaddress
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from conntrack.pcap import read_pcap, record_packet

from .test_nat_plugin import CONF, EXT, INTERNAL, PEER, ROOT, VM, Site, _captured_records, _wait


@pytest.fixture
def site(lab, tmp_path):
    return Site(lab, tmp_path)


def _queues(site) -> list[str]:
    """The NFQUEUE bindings of the host namespace (/proc/net/netfilter/nfnetlink_queue)."""
    out = site.lab.run(site.host, ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout
    return [l for l in out.splitlines() if l.strip()]


def test_the_host_keeps_its_own_services(site):
    """A ping and a TCP connection to the host's own external address, and a refused port:
    as under MASQUERADE, while the VM's traffic is NATed beside them."""
    site.start()
    lab = site.lab
    sshd = site.sock(site.host)  # an sshd stand-in in the NAT host's own stack
    sshd.bind((EXT, 2222))
    sshd.listen()
    assert lab.ping(site.inet, EXT, count=2) == 2
    c = site.sock(site.inet)
    c.connect((EXT, 2222))
    conn, addr = sshd.accept()
    assert addr == (PEER, c.getsockname()[1])  # not rewritten
    c.sendall(b"SSH-2.0-client")
    assert conn.recv(20) == b"SSH-2.0-client"
    conn.sendall(b"SSH-2.0-host")
    assert c.recv(20) == b"SSH-2.0-host"
    r = site.sock(site.inet)
    with pytest.raises(ConnectionRefusedError):  # a closed port answers RST, as the host would
        r.connect((EXT, 2223))
    # the VM is NATed as before, and the inbound mapping still reaches it
    assert lab.ping(site.vm, PEER, count=1) == 1
    web, w, wc, _ = site.tcp(site.vm, (VM, 80), site.inet, (EXT, 8080))
    wc.sendall(b"vm")
    assert w.recv(10) == b"vm"
    _wait(lambda: site.counter("host_flows_in") >= 3, 5, "host flows counted")
    assert site.counter("dropped_no_mapping") == 0
    for s in (sshd, c, conn, r, web, w, wc):
        s.close()


_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("198.18.0.2", 46000))
end = time.monotonic() + float(sys.argv[1])
n = 0
nxt = time.monotonic()
while time.monotonic() < end:
    try:
        s.sendto(n.to_bytes(4, "big"), ("203.0.113.2", 5400))
    except OSError:
        pass
    n += 1
    nxt += 0.001
    d = nxt - time.monotonic()
    if d > 0:
        time.sleep(d)
print(n)
"""


def test_restarts_after_kill9_under_a_udp_stream_leak_nothing(site):
    """~1,000 packets/s from the VM while the plugin is killed with -9 and restarted again and
    again: not one packet with an internal source on the external wire (a restart used to
    remove the dead run's rules before installing its own: 4-9 packets out each time)."""
    lab = site.lab
    pcap = os.path.join(site.dir, "ext.pcap")
    dump = lab.tcpdump(site.inet, ["-i", "inet0", "-w", pcap, "udp"])
    site.start()
    restarts = 8
    sender = lab.popen(site.vm, [sys.executable, "-c", _SENDER, str(2.0 * restarts + 8)],
                       stdout=subprocess.PIPE, text=True)
    rng = random.Random()
    try:
        time.sleep(0.5)
        for _ in range(restarts):
            lab.stop(site.proc, sig=signal.SIGKILL)
            time.sleep(rng.uniform(0.05, 0.3))  # stale rules only: everything dropped
            site.start()
            time.sleep(rng.uniform(0.2, 0.5))
        sent = int(sender.communicate(timeout=60)[0].strip())
    finally:
        lab.stop(sender)
    with site.sock(site.inet, socket.SOCK_DGRAM) as marker:
        marker.sendto(b"marker", (EXT, 9999))
    _wait(lambda: any(record_packet(r) is not None and record_packet(r).dport == 9999
                      for r in _captured_records(pcap)), 10, "the marker in the capture")
    lab.stop_tcpdump(dump)
    inside = translated = 0
    with open(pcap, "rb") as f:
        for rec in read_pcap(f):
            pkt = record_packet(rec)
            if pkt is None or pkt.dport != 5400:
                continue
            src = ipaddress.ip_address(pkt.src)
            inside += src in INTERNAL
            translated += str(src) == EXT
    assert sent > 5000 and translated > sent // 4, (sent, translated)  # the stream went through meanwhile
    assert inside == 0, f"{inside} of {sent} packets left with an internal source"
    with open(site.log) as f:
        assert f.read().count(f"replaced {site.rule_count} stale rules") == restarts
    assert site.rules().count("roam-nat q3") == site.rule_count


def _start_only(site):
    with open(site.log, "a") as log:
        return site.lab.popen(site.host, [sys.executable, "-m", "tools.cli", "-v", "nat", "--config", site.conf,
                                          "--external", "ext0", "--internal", "hv0", "--queue", "3",
                                          "--state-dir", site.dir], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def test_a_signal_at_any_instant_of_start_up_leaves_no_rule_and_no_queue(site):
    lab = site.lab
    t0 = time.monotonic()
    site.start()  # how long a start-up takes here, to draw instants within it
    startup = time.monotonic() - t0
    assert lab.stop(site.proc) == 0 and "roam-nat" not in site.rules()
    rng = random.Random()
    tries = []
    for i in range(8):
        sig = (signal.SIGTERM, signal.SIGINT)[i % 2]
        proc = _start_only(site)
        if i < 6:
            delay = rng.uniform(0, startup * 1.2)
            time.sleep(delay)
        else:  # right as the rules appear (the instant the old order lost)
            delay = -1.0
            _wait(lambda: "roam-nat q3" in site.rules() or proc.poll() is not None, 15, "rules to appear")
        tries.append((sig.name, round(delay, 3)))
        lab.stop(proc, wait=15, sig=sig)
        assert proc.returncode is not None
        left = site.rules()
        assert "roam-nat" not in left, (tries, left)
        assert not [q for q in _queues(site) if q.split()[0] == "3"], (tries, _queues(site))
    # and the host forwards again as its own firewall says (nothing queued to a dead queue)
    assert lab.ping(site.vm, "198.18.0.1", count=1) == 1


def _roam_rules(site) -> list[str]:
    return [l for l in site.rules().splitlines() if "roam-nat" in l]


def test_one_nat_per_interface_whatever_the_queue(site):
    site.start()
    first = _roam_rules(site)
    assert len(first) == site.rule_count
    for queue in ("3", "4"):
        cp = site.lab.run(site.host, [sys.executable, "-m", "tools.cli", "nat", "--config", site.conf,
                                      "--external", "ext0", "--internal", "hv0", "--queue", queue,
                                      "--state-dir", os.path.join(site.dir, "second")], check=False, timeout=30)
        assert cp.returncode == 1, cp
        assert f"roam nat pid {site.proc.pid}" in cp.stderr, cp.stderr
        assert ("is in use by" if queue == "3" else "already NATed by") in cp.stderr, cp.stderr
        assert _roam_rules(site) == first  # the running one's rules untouched
    assert site.proc.poll() is None and site.lab.ping(site.vm, PEER, count=1) == 1
