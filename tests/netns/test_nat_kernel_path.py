"""The kernel path (issue 10, new connections): a new outbound flow keeping its own port is NATed
by the kernel alone, guided by roam's IP sets; everything else still comes to roam.  On the
real kernel in namespaces; the kernel's conntrack and ipset listings are the witnesses."""
from __future__ import annotations

import signal
import socket
import sys
import time

from nat.netfilter.kernelpath import ALIVE_FOR

from .test_nat_plugin import EXT, PEER, VM, _wait, site  # noqa: F401  (site: the fixture)

VM2 = "198.18.0.3"
KERNEL_MARK = 0x30000000  # roam's bit and the kernel path's: the entry's connmark


def _of(sets: dict, suffix: str) -> list[str]:
    return next(v for k, v in sets.items() if k.endswith(suffix))


def _conntrack(site, *args) -> list[str]:
    return site.lab.run(site.host, ["conntrack", "-L", *args], check=False).stdout.splitlines()


def _off(site) -> dict:
    return (site.status() or {}).get("offload") or {}


def _queued(site) -> int:
    return (site.status() or {}).get("queued_packets", 0)


def _two_vms_and_a_flow(site, server_port: int, port: int):
    """A second VM address beside VM's, roam running, and a UDP flow from VM's ``port`` (its own,
    through the kernel path) to a peer socket on ``server_port``: (peer socket, VM's socket)."""
    site.lab.addr(site.vm, "vm0", f"{VM2}/24")
    site.start()
    us = site.sock(site.inet, socket.SOCK_DGRAM)
    us.bind(("0.0.0.0", server_port))
    a = site.sock(site.vm, socket.SOCK_DGRAM)
    a.bind((VM, port))
    a.sendto(b"a", (PEER, server_port))
    assert us.recvfrom(10)[1] == (EXT, port)
    return us, a


def test_flows_keeping_their_port_never_reach_roam_and_roam_still_knows_them(site):
    """TCP and UDP from the VM's own ports: not one packet queued, the kernel's entries carry the
    kernel path's mark, the sets hold port and endpoint, roam's table holds the mappings (status),
    and a third party may send in through one (endpoint-independent filtering, judged by roam)."""
    lab = site.lab
    site.start()
    _wait(lambda: site.sets(), 5, "the kernel path's sets")
    before = _queued(site)
    srv, c, conn, addr = site.tcp(site.inet, (PEER, 7100), site.vm, (PEER, 7100), src=(VM, 43100))
    assert addr == (EXT, 43100)
    uc = site.sock(site.vm, socket.SOCK_DGRAM)
    uc.bind((VM, 43101))
    us = site.sock(site.inet, socket.SOCK_DGRAM)
    us.bind((PEER, 5600))
    for i in range(20):
        uc.sendto(b"%d" % i, (PEER, 5600))
        assert us.recvfrom(10)[1] == (EXT, 43101)
    c.sendall(b"x" * 100000)
    got = 0
    while got < 100000:
        got += len(conn.recv(65536))
    lines = [l for l in _conntrack(site) if "sport=43100" in l or "sport=43101" in l]
    assert len(lines) == 2 and all(f"mark={KERNEL_MARK}" in l for l in lines), lines
    sets = site.sets()
    assert "43100" in _of(sets, "-tcp") and "43101" in _of(sets, "-udp"), sets
    assert f"{VM},tcp:43100" in _of(sets, "-keep") and f"{VM},udp:43101" in _of(sets, "-keep"), sets
    _wait(lambda: _off(site).get("kernel_flows", 0) >= 2, 5, "roam to learn both flows")
    assert _queued(site) == before  # (a status written after both) not even the SYN or the first datagram
    out = lab.run(site.host, [sys.executable, "-m", "tools.cli", "nat", "status", "--queue", "3",
                              "--state-dir", site.dir, "--mappings"], check=False).stdout
    rows = [l.split()[:4] for l in out.splitlines()]
    assert ["tcp", f"{VM}:43100", "->", f"{EXT}:43100"] in rows and ["udp", f"{VM}:43101", "->", f"{EXT}:43101"] in rows, out
    third = site.sock(site.inet, socket.SOCK_DGRAM)
    third.bind((PEER, 5601))
    third.sendto(b"hello", (EXT, 43101))
    assert uc.recvfrom(10) == (b"hello", (PEER, 5601))
    # the liveness entry is renewed while roam runs: past its timeout, a new flow still takes the path
    time.sleep(ALIVE_FOR + 1.5)
    before = _queued(site)
    late = site.sock(site.vm, socket.SOCK_DGRAM)
    late.bind((VM, 43102))
    late.sendto(b"late", (PEER, 5600))
    assert us.recvfrom(10) == (b"late", (EXT, 43102))
    _wait(lambda: _off(site).get("kernel_flows", 0) >= 3, 5, "roam to learn the late flow")
    assert _queued(site) == before
    for s in (srv, c, conn, uc, us, third, late):
        s.close()


def test_a_port_another_endpoint_holds_is_queued_and_mapped_elsewhere(site):
    """VM2 sends from the port VM holds: roam decides (another port, no port overloading), and
    VM2's next flow from that endpoint keeps roam's mapping (endpoint-independent), not the port."""
    lab = site.lab
    us, a = _two_vms_and_a_flow(site, 5700, 44000)
    _wait(lambda: "44000" in _of(site.sets(), "-udp"), 5, "the port in the held set")
    before = _queued(site)
    b = site.sock(site.vm, socket.SOCK_DGRAM)
    b.bind((VM2, 44000))
    b.sendto(b"b", (PEER, 5700))
    _, src = us.recvfrom(10)
    assert src[0] == EXT and src[1] != 44000, src
    _wait(lambda: _queued(site) == before + 1, 5, "roam to have decided it (one packet queued)")
    assert f"{VM2},udp:44000" in _of(site.sets(), "-moved")
    us2 = site.sock(site.inet, socket.SOCK_DGRAM)
    lab.addr(site.inet, "inet0", "203.0.113.3/24")
    us2.bind(("203.0.113.3", 5701))
    b.sendto(b"b2", ("203.0.113.3", 5701))
    assert us2.recvfrom(10)[1] == src  # the same mapping to another destination
    a.sendto(b"a2", ("203.0.113.3", 5701))
    assert us2.recvfrom(10)[1] == (EXT, 44000)
    assert _off(site).get("kernel_clashes", 0) == 0
    for s in (us, us2, a, b):
        s.close()


_DROP_HELD = """
import socket, sys
from nat.netfilter import ipset
w = ipset.SetWriter()
w.change(False, sys.argv[1], ipset.member(port=int(sys.argv[2])))
w.send()
"""


def test_a_clash_is_removed_counted_and_the_endpoint_queued_from_then_on(site):
    """A held port missing from the kernel's set (a stand-in for two endpoints taking one port in
    the same instant, which cannot be staged at will): the kernel NATs VM2 onto VM's port, roam
    cannot take that flow -- it removes the entry, counts the clash, and queues VM2's endpoint,
    whose retry gets a port of its own; VM's mapping is untouched."""
    lab = site.lab
    us, a = _two_vms_and_a_flow(site, 5800, 45000)
    _wait(lambda: _off(site).get("kernel_flows", 0) >= 1, 5, "roam to learn VM's flow")
    held = next(k for k in site.sets() if k.endswith("-udp"))
    lab.run(site.host, [sys.executable, "-c", _DROP_HELD, held, "45000"])
    b = site.sock(site.vm, socket.SOCK_DGRAM)
    b.bind((VM2, 45000))
    b.sendto(b"b1", ("203.0.113.2", 5801))  # the kernel NATs it onto VM's port (another destination)
    _wait(lambda: _off(site).get("kernel_clashes", 0) == 1, 5, "the clash to be counted")
    assert not [l for l in _conntrack(site, "-p", "udp") if f"src={VM2}" in l and "dport=5801" in l]
    assert f"{VM2},udp:45000" in _of(site.sets(), "-moved")
    b.sendto(b"b2", (PEER, 5800))
    data, src = us.recvfrom(10)
    assert data == b"b2" and src[0] == EXT and src[1] != 45000, src
    us.sendto(b"r", (EXT, 45000))  # VM's mapping still VM's
    assert a.recvfrom(10) == (b"r", (PEER, 5800))
    for s in (us, a, b):
        s.close()


def test_sets_go_with_a_stop_and_a_restart_removes_a_killed_runs(site):
    """kill -9 leaves the sets with the rules (fail-closed: they hold what the dead run knew); the
    next run makes its own, removes the dead run's once its rules are gone, and a SIGTERM
    removes everything."""
    lab = site.lab
    site.start()
    first = set(site.sets())
    assert len(first) == 5 and all(f"-p{site.proc.pid}-" in k for k in first), first
    lab.stop(site.proc, sig=signal.SIGKILL)
    assert set(site.sets()) == first
    site.start()
    second = set(site.sets())
    assert len(second) == 5 and not second & first, (first, second)
    site.proc.send_signal(signal.SIGTERM)
    site.proc.wait(15)
    assert site.sets() == {} and "roam-nat" not in site.rules()


def test_no_kernel_path_queues_every_new_flow(site):
    site.start(extra=["--no-kernel-path"])
    assert site.sets() == {} and " kernel" not in site.rules()
    before = _queued(site)
    srv, c, conn, addr = site.tcp(site.inet, (PEER, 7101), site.vm, (PEER, 7101), src=(VM, 43200))
    assert addr == (EXT, 43200)
    _wait(lambda: _queued(site) > before, 5, "the SYN at roam")
    assert _off(site).get("kernel_flows", 0) == 0
    for s in (srv, c, conn):
        s.close()

