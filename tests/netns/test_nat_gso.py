"""`roam nat --gso` on real packets: our own NFQUEUE client with NFQA_CFG_F_GSO.

Same lab as tests/netns/test_nat_plugin.py (its Site is reused, started with --gso):

    vm  [vm0 198.18.0.2/24] -- [hv0 198.18.0.1/24] host [ext0 203.0.113.1/24] -- [inet0 203.0.113.2/24] inet

Checks: multi-megabyte TCP transfers both ways arrive intact (SHA-256 of the data), UDP
and ping work, the peer's kernel counts no checksum errors (Tcp/Udp InCsumErrors in
/proc/net/snmp of the inet namespace), and super-packets (> 1500 bytes) were really queued
(--no-offload: the per-packet path); with offload (the default) the same transfers take the
kernel's path and only a handful of packets reach the queue.
"""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading

import pytest

from tests.netns.test_nat_plugin import EXT, PEER, ROOT, VM, Site, _wait

SIZE = 8 << 20


class GsoSite(Site):
    def start(self, internal="hv0"):
        with open(self.log, "a") as log:
            self.proc = self.lab.popen(self.host, [sys.executable, "-m", "tools.cli", "-v", "nat", "--config", self.conf,
                                                  "--external", "ext0", "--internal", internal, "--queue", "3",
                                                  "--state-dir", self.dir, "--gso"]
                                       + ([] if self.offload else ["--no-offload"]), stdout=log,
                                       stderr=subprocess.STDOUT, cwd=ROOT)
        pid = self.proc.pid
        _wait(lambda: (st := self.status()) is not None and st["pid"] == pid and self.proc.poll() is None,
              15, "roam nat --gso to start (log: %s)" % self.log)


def _csum_errors(site) -> dict:
    """InCsumErrors of Tcp and Udp in the peer's namespace."""
    lines = site.lab.run(site.inet, ["cat", "/proc/net/snmp"]).stdout.splitlines()
    out = {}
    for names, values in zip(lines[::2], lines[1::2]):
        proto = names.split(":")[0]
        if proto in ("Tcp", "Udp"):
            row = dict(zip(names.split()[1:], values.split()[1:]))
            out[proto] = int(row["InCsumErrors"])
    return out


def _transfer(site, sender_ns, receiver_ns, bind, connect) -> tuple[str, str]:
    """Send SIZE random bytes over one TCP connection; (sha256 sent, sha256 received)."""
    data = os.urandom(SIZE)
    srv = site.sock(receiver_ns)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(bind)
    srv.listen(1)
    got = hashlib.sha256()
    box = {}

    def receive():
        try:
            conn, _ = srv.accept()
            conn.settimeout(10)
            n = 0
            while True:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                got.update(chunk)
                n += len(chunk)
            box["n"] = n
            conn.close()
        except OSError as exc:
            box["error"] = exc

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    c = site.sock(sender_ns)
    c.settimeout(10)
    c.connect(connect)
    try:
        c.sendall(data)
    except OSError as exc:
        with open(site.log) as f:
            raise AssertionError(f"send failed: {exc}; plugin status {site.status()}; log {f.read()[-2000:]}")
    c.shutdown(socket.SHUT_WR)
    t.join(30)
    c.close()
    srv.close()
    assert not t.is_alive(), "receiver did not finish"
    assert "error" not in box, box.get("error")
    assert box["n"] == SIZE
    return hashlib.sha256(data).hexdigest(), got.hexdigest()


@pytest.fixture
def gsite(lab, tmp_path, mode):
    return GsoSite(lab, tmp_path, offload=mode == "offload")


@pytest.mark.parametrize("mode", ["no_offload", "offload"])
def test_gso_tcp_udp_ping_intact(gsite):
    site = gsite
    before = _csum_errors(site)
    site.start()
    qc = site.status()["queue_client"]
    assert qc["gso"] is True

    # TCP VM -> peer (outbound: the VM's TSO packets reach the queue as super-packets)
    sent, got = _transfer(site, site.vm, site.inet, (PEER, 5001), (PEER, 5001))
    assert sent == got
    # TCP peer -> VM through the inbound mapping 8080 -> 198.18.0.2:80
    sent, got = _transfer(site, site.inet, site.vm, (VM, 80), (EXT, 8080))
    assert sent == got

    # UDP both ways (non-GSO CSUMNOTREADY packets: checksums we fill in)
    u_peer = site.sock(site.inet, socket.SOCK_DGRAM)
    u_peer.bind((PEER, 5353))
    u_vm = site.sock(site.vm, socket.SOCK_DGRAM)
    for i in range(5):
        msg = b"roam-gso-%d-" % i + os.urandom(600)
        u_vm.sendto(msg, (PEER, 5353))
        data, addr = u_peer.recvfrom(2048)
        assert data == msg and addr[0] == EXT
        u_peer.sendto(data[::-1], addr)
        back, baddr = u_vm.recvfrom(2048)
        assert back == msg[::-1] and baddr == (PEER, 5353)
    u_peer.close()
    u_vm.close()

    # ping
    assert site.lab.ping(site.vm, PEER, count=3) >= 1

    if site.offload:
        # 16 MiB of TCP and the UDP exchange went by in the kernel: only first packets queued
        _wait(lambda: site.status()["offload"]["offloaded"] + site.status()["offload"]["kernel_flows"] >= 3, 5,
              "the offloaded flows in the status (installed by roam, or NATed by the kernel path)")
        assert site.status()["queued_packets"] < 100, site.status()
    else:
        def seen():
            st = site.status()["queue_client"]
            return st if st["largest_packet"] > 1500 and st["checksums_filled"] > 0 else None
        qc = _wait(seen, 5, "status to show super-packets and filled checksums")
        assert qc["gso_packets"] > 0
    after = _csum_errors(site)
    assert after == before, f"checksum errors at the peer: {before} -> {after}"
    assert site.status()["internal_errors"] == 0
    site.lab.stop(site.proc)
