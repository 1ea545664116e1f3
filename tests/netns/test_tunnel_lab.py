"""The layer-2 tunnel on the real kernel: a VM keeps its home address across a migration.

Lab (every namespace made by tools.lab.netlab, removed also on failure)::

    peer (198.18.0.10) --- [br0 198.18.0.1 + proxy TAP] home 192.0.2.1 --- inet --- 198.51.100.1 hosta [brvm + host TAP]
                                                                              \\-- 203.0.113.1  hostb [brvm + host TAP]
    vm (198.18.0.50, MAC 02:00:00:00:00:50): its link "vmport" sits in hosta's brvm, then moves to hostb's.

The VM, whose only link ends on a remote host, holds its home-LAN address; the
tunnel carries its frames to the proxy on the home LAN; home routes to the
internet namespace ("beyond" the LAN).  Survival is judged by
what the sockets see: bytes arriving in order, no reset, echoes coming back.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tunnel import AeadCipher, HostEnd
from tools.lab.topology import (
    TUNNEL_PEER_IP, TUNNEL_PROXY_IP, TUNNEL_VM_IP, TUNNEL_VM_MAC, enslave, tunnel_lab,
)
from tunnel.crypto import Key, seal_parts
from tunnel.wire import MsgType

ROOT = Path(__file__).resolve().parents[2]
VM_MAC, VM_IP, PEER_IP, PROXY_IP = TUNNEL_VM_MAC, TUNNEL_VM_IP, TUNNEL_PEER_IP, TUNNEL_PROXY_IP
PORT = 4789
STREAM_PORT, ECHO_PORT = 5001, 2222
BEYOND = "192.0.2.254"  # the internet namespace, reached through the home LAN's router


def wait_for(pred, timeout: float, what: str, step: float = 0.05):
    """Poll ``pred`` until it returns something truthy; bounded in time (not a timing assertion)."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}")
        time.sleep(step)


class TunnelLab:
    def __init__(self, lab, tmp: Path, transport: str) -> None:
        self.lab, self.tmp, self.transport = lab, tmp, transport
        self.status_dir = tmp / "status"
        self.logs: list[Path] = []
        ns = self.ns = tunnel_lab(lab)
        # The home LAN's router (198.18.0.1 on br0) leads "beyond", to the internet namespace.
        lab.addr(ns["home"], "br0", "198.18.0.1/24")
        lab.sysctl(ns["home"], "net.ipv4.ip_forward", "1")
        lab.route(ns["inet"], "198.18.0.0/24", "192.0.2.1")
        lab.route(ns["vm"], "default", "198.18.0.1")
        key = subprocess.run([sys.executable, "-m", "tools.cli", "tunnel", "genkey"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30, check=True).stdout
        self.key = tmp / "tunnel.key"
        self.key.write_text(key)
        self.key.chmod(0o600)

    def enslave(self, host: str, ifname: str) -> None:
        enslave(self.lab, self.ns[host], ifname, "brvm")

    def roam(self, ns: str, *args: str, log: str) -> subprocess.Popen:
        path = self.tmp / f"{log}.log"
        self.logs.append(path)
        f = open(path, "ab")
        argv = [sys.executable, "-m", "tools.cli", "-v", "tunnel", *args, "--status-dir", str(self.status_dir)]
        if args[0] != "status":
            argv += ["--key-file", str(self.key), "--transport", self.transport]
        return self.lab.popen(ns, argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)

    def start_proxy(self) -> subprocess.Popen:
        return self.roam(self.ns["home"], "proxy", "--listen", f"{PROXY_IP}:{PORT}", "--bridge", "br0",
                         "--session-timeout", "30", log="proxy")

    def start_host(self, host: str) -> subprocess.Popen:
        return self.roam(self.ns[host], "host", "--proxy", f"{PROXY_IP}:{PORT}", "--tap", "rt0", "--bridge", "brvm",
                         "--mac", VM_MAC, "--keepalive", "1", "--dead-after", "5", log=host)

    def status(self, p: subprocess.Popen) -> dict | None:
        try:
            return json.loads((self.status_dir / f"{'proxy' if 'proxy' in p.args else 'host'}-{p.pid}.json").read_text())
        except (OSError, ValueError):
            return None

    def attached(self, p: subprocess.Popen) -> dict | None:
        st = self.status(p)
        return st if st and st.get("state") == "ATTACHED" else None

    def dump_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs if p.exists())


class Stream:
    """A long-running TCP stream from the VM to the home peer: numbered bytes, checked in order."""

    def __init__(self, lab, vm_ns: str, peer_ns: str) -> None:
        self.srv = lab.socket(peer_ns)
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind((PEER_IP, STREAM_PORT))
        self.srv.listen(1)
        self.srv.settimeout(10)
        self.cli = lab.socket(vm_ns)
        self.cli.settimeout(10)
        self.cli.connect((PEER_IP, STREAM_PORT))
        self.conn, _ = self.srv.accept()
        self.conn.settimeout(60)
        self.received = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True), threading.Thread(target=self._recv, daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        n = 0
        try:
            for _ in range(200_000):  # bounded: at most ~ 200k chunks
                if self.stop.is_set():
                    break
                chunk = bytes((n + i) & 0xFF for i in range(512))
                self.cli.sendall(chunk)
                n += 512
                time.sleep(0.002)
            self.cli.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.errors.append(f"sender: {exc!r}")

    def _recv(self) -> None:
        try:
            while True:
                data = self.conn.recv(65536)
                if not data:
                    return
                expect = bytes((self.received + i) & 0xFF for i in range(len(data)))
                if data != expect:
                    self.errors.append(f"receiver: bytes out of order at offset {self.received}")
                    return
                self.received += len(data)
        except OSError as exc:
            self.errors.append(f"receiver: {exc!r}")

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        for s in (self.cli, self.conn, self.srv):
            s.close()


def echo(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line)
    got = b""
    while len(got) < len(line):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_vm_keeps_home_address_and_connections_across_migration(lab, tmp_path, transport):
    t = TunnelLab(lab, tmp_path, transport)
    ns = t.ns
    try:
        proxy = t.start_proxy()
        wait_for(lambda: t.status(proxy), 20, "proxy to start")
        host_a = t.start_host("hosta")
        st = wait_for(lambda: t.attached(host_a), 20, "host end A to attach")
        assert st["local"] == "198.51.100.1"

        # The VM, on host A, holds its home address and reaches the home peer, and beyond the home router.
        assert lab.ping(ns["vm"], PEER_IP, count=3) == 3
        assert lab.ping(ns["vm"], BEYOND, count=2) == 2
        # An interactive session *to* the VM (socat echo), and a long-running stream from it.
        lab.popen(ns["vm"], ["socat", f"TCP-LISTEN:{ECHO_PORT},bind={VM_IP},reuseaddr,fork", "EXEC:cat"])
        session = wait_for(lambda: _connect(lab, ns["peer"], VM_IP, ECHO_PORT), 10, "socat in the VM")
        assert echo(session, b"before migration\n") == b"before migration\n"
        stream = Stream(lab, ns["vm"], ns["peer"])
        wait_for(lambda: stream.received > 20_000, 20, "the stream to flow")

        # Migrate: the host end on A stops, the VM's link moves to host B, the host end starts there.
        lab.stop(host_a)
        lab.move_link(ns["hosta"], "vmport", ns["hostb"])
        t.enslave("hostb", "vmport")
        at_move = stream.received
        host_b = t.start_host("hostb")
        wait_for(lambda: t.attached(host_b), 20, "host end B to attach")
        wait_for(lambda: stream.received > at_move + 20_000, 30, "the stream to continue after the move")

        # The interactive session survived; new inbound connections reach the VM's home address.
        assert echo(session, b"after migration\n") == b"after migration\n"
        fresh = _connect(lab, ns["peer"], VM_IP, ECHO_PORT)
        assert fresh is not None and echo(fresh, b"new after\n") == b"new after\n"
        fresh.close()
        session.close()
        assert lab.ping(ns["vm"], PEER_IP, count=2) == 2
        assert lab.ping(ns["vm"], BEYOND, count=2) == 2
        stream.finish()
        assert stream.errors == [], stream.errors  # no reset, no gap, nothing out of order

        # The proxy moved the VM's MAC to B's session and dropped A's (detached) session.
        pst = t.status(proxy)
        sessions = pst["sessions"]
        assert len(sessions) == 1 and "203.0.113.1" in sessions[0]["endpoint"], sessions
        assert pst["macs"][VM_MAC] == f"session {sessions[0]['session']}"
        assert pst["counters"]["sessions_closed"] >= 1

        # `roam tunnel status` shows them.
        out = subprocess.run([sys.executable, "-m", "tools.cli", "tunnel", "status", "--status-dir", str(t.status_dir)],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "203.0.113.1" in out.stdout and VM_MAC in out.stdout
        # Clean shutdown removes the devices it made.
        lab.stop(host_b)
        lab.stop(proxy)
        assert lab.ipr(ns["hostb"]).link_lookup(ifname="rt0") == []
        assert lab.ipr(ns["home"]).link_lookup(ifname=f"roamp{PORT}") == []
        assert not list(t.status_dir.glob("*.json"))
    except BaseException:
        print(t.dump_logs())
        raise


def _connect(lab, ns: str, ip: str, port: int) -> socket.socket | None:
    s = lab.socket(ns)
    s.settimeout(5)
    try:
        s.connect((ip, port))
        return s
    except OSError:
        s.close()
        return None


class IcmpCounter:
    """Counts ICMP echo requests from the VM's address that reach the home peer's link."""

    def __init__(self, lab, ns: str, ifname: str) -> None:
        self.sock = lab.socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.2)
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        vm = socket.inet_aton(VM_IP)
        while not self.stop.is_set():
            try:
                f = self.sock.recv(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if len(f) >= 35 and f[12:14] == b"\x08\x00" and f[23] == 1 and f[26:30] == vm and f[34] == 8:
                self.count += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def test_forged_and_replayed_frames_are_rejected_and_change_nothing(lab, tmp_path):
    from scapy.layers.inet import IP, UDP
    from scapy.utils import rdpcap

    t = TunnelLab(lab, tmp_path, "udp")
    ns = t.ns
    try:
        proxy = t.start_proxy()
        wait_for(lambda: t.status(proxy), 20, "proxy to start")
        host_a = t.start_host("hosta")
        wait_for(lambda: t.attached(host_a), 20, "host end A to attach")
        cap = tmp_path / "tunnel.pcap"
        dump = lab.tcpdump(ns["inet"], ["-i", "ia", "-w", str(cap), "udp", "port", str(PORT)])
        assert lab.ping(ns["vm"], PEER_IP, count=4) == 4
        # -U writes each packet as it comes: wait (bounded) until the four requests are in the file,
        # then stop tcpdump cleanly (SIGINT: it flushes and closes the file) and read it whole.
        wait_for(lambda: len(_captured(cap, rdpcap, IP, UDP)) >= 4, 10, "captured tunnel messages")
        lab.stop_tcpdump(dump)
        captured = _captured(cap, rdpcap, IP, UDP, complete=True)
        assert len(captured) >= 4  # the echo requests, at least

        before = t.status(proxy)
        (sess,) = before["sessions"]
        counter = IcmpCounter(lab, ns["peer"], "p0")
        # An endpoint without the key: junk, a wrong-key attach naming the VM's MAC, wrong-key data,
        # tampered copies of real messages; then every captured message replayed from there.
        stranger = HostEnd(AeadCipher(Key(os.urandom(32))), [bytes.fromhex(VM_MAC.replace(":", ""))])
        started = stranger.start(0.0)
        # (a host end seals no frame before the proxy's EPOCH: the stranger's DATA is sealed by hand)
        sent = seal_parts(stranger.cipher, MsgType.DATA, 0, stranger.session, 1,
                          b"\xff" * 6 + bytes.fromhex(VM_MAC.replace(":", "")) + b"\x08\x06" + bytes(28))
        wrong_key = [m for _, m in started.sends] + [sent]
        # tampered: a fresh sequence number written into the header (the header is authenticated)
        tampered = [m[:8] + (int.from_bytes(m[8:16], "big") + 100_000 + i).to_bytes(8, "big") + m[16:]
                    for i, m in enumerate(captured)]
        junk = [b"", b"\x01", os.urandom(100)]
        with lab.socket(ns["inet"], socket.AF_INET, socket.SOCK_DGRAM) as evil:
            evil.bind(("192.0.2.254", 0))
            for m in junk + wrong_key + tampered + captured:
                evil.sendto(m, (PROXY_IP, PORT))
        expected = len(junk) + len(wrong_key) + len(tampered) + len(captured)

        def all_counted():
            st = t.status(proxy)
            return st if st and sum(st["drops"].values()) - sum(before["drops"].values()) >= expected else None

        after = wait_for(all_counted, 10, "the proxy to count every injected message")
        # The proxy handled every injected message before counting it, so anything it would have put
        # on the LAN is already in its TAP.  Two genuine pings now take the same path behind them:
        # once the counter has seen those two, it has seen everything the replays could have sent.
        assert lab.ping(ns["vm"], PEER_IP, count=2) == 2
        wait_for(lambda: counter.count >= 2, 10, "the genuine echo requests to reach the peer's link")
        counter.close()
        drops = {k: after["drops"].get(k, 0) - before["drops"].get(k, 0) for k in after["drops"]}
        assert drops.get("replayed", 0) == len(captured), drops
        # the stranger's ATTACH fails authentication; its data names a session nobody attached
        assert drops.get("auth_failed", 0) == 1 + len(tampered), drops
        assert drops.get("unknown_session", 0) == len(wrong_key) - 1, drops
        assert sum(drops.values()) == expected, drops
        # Nothing changed: same session, same endpoint, the VM's MAC still behind it; no frame re-delivered.
        (sess_after,) = after["sessions"]
        assert (sess_after["session"], sess_after["endpoint"]) == (sess["session"], sess["endpoint"])
        assert after["macs"][VM_MAC] == before["macs"][VM_MAC]
        assert after["counters"].get("sessions_opened") == before["counters"].get("sessions_opened")
        assert counter.count == 2  # only the genuine ones: the replayed echo requests never reached the peer
    except BaseException:
        print(t.dump_logs())
        raise


def _captured(cap: Path, rdpcap, IP, UDP, complete: bool = False) -> list[bytes]:
    """Whole (unfragmented) tunnel messages the host end sent to the proxy.

    While tcpdump still runs (``complete=False``) a file without its 24-byte header yet (tcpdump
    writes it with the first packet) means "nothing captured yet"; once it has stopped, the file
    must be there and readable, and any error reading it fails the test."""
    if not complete and (not cap.exists() or cap.stat().st_size < 24):
        return []
    pkts = rdpcap(str(cap))
    out = []
    for p in pkts:
        if IP in p and UDP in p and p[IP].src == "198.51.100.1" and p[UDP].dport == PORT and p[IP].frag == 0 \
                and not p[IP].flags.MF:
            out.append(bytes(p[UDP].payload))
    return out


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_host_address_change_reattaches_and_stream_survives(lab, tmp_path, transport):
    t = TunnelLab(lab, tmp_path, transport)
    ns = t.ns
    try:
        proxy = t.start_proxy()
        wait_for(lambda: t.status(proxy), 20, "proxy to start")
        host_a = t.start_host("hosta")
        wait_for(lambda: t.attached(host_a), 20, "host end A to attach")
        stream = Stream(lab, ns["vm"], ns["peer"])
        wait_for(lambda: stream.received > 20_000, 20, "the stream to flow")
        # Host A's public address changes (new lease): add the new one, remove the old.
        lab.sysctl(ns["hosta"], "net.ipv4.conf.ai.promote_secondaries", "1")
        lab.addr(ns["hosta"], "ai", "198.51.100.7/24")
        ipr = lab.ipr(ns["hosta"])
        ipr.addr("del", index=lab.index(ns["hosta"], "ai"), address="198.51.100.1", prefixlen=24)
        if not ipr.get_default_routes(family=socket.AF_INET):
            lab.route(ns["hosta"], "default", "198.51.100.254")
        at_change = stream.received
        wait_for(lambda: (t.status(host_a) or {}).get("local") == "198.51.100.7", 10, "host end to see its new address")
        wait_for(lambda: stream.received > at_change + 20_000, 30, "the stream to continue from the new address")
        stream.finish()
        assert stream.errors == [], stream.errors
        (sess,) = t.status(proxy)["sessions"]
        assert "198.51.100.7" in sess["endpoint"]
        assert t.status(proxy)["counters"]["endpoint_changes"] >= 1
    except BaseException:
        print(t.dump_logs())
        raise


def test_two_hosts_two_vms_reach_each_other_and_the_lan_through_one_proxy(lab, tmp_path):
    """Several host ends and VMs at once: VM1 on host A, VM2 on host B (its MAC learned, not given)."""
    t = TunnelLab(lab, tmp_path, "udp")
    ns = t.ns
    vm2 = lab.ns("vm2")
    lab.veth(vm2, "eth0", ns["hostb"], "vm2port")
    lab.addr(vm2, "eth0", "198.18.0.51/24")
    t.enslave("hostb", "vm2port")
    try:
        proxy = t.start_proxy()
        wait_for(lambda: t.status(proxy), 20, "proxy to start")
        host_a = t.start_host("hosta")
        host_b = t.roam(ns["hostb"], "host", "--proxy", f"{PROXY_IP}:{PORT}", "--tap", "rt0", "--bridge", "brvm",
                        log="hostb")
        wait_for(lambda: t.attached(host_a) and t.attached(host_b), 20, "both host ends to attach")
        assert lab.ping(ns["vm"], PEER_IP, count=2) == 2
        assert lab.ping(vm2, PEER_IP, count=2) == 2
        assert lab.ping(ns["vm"], "198.18.0.51", count=2) == 2  # VM to VM: host A -> proxy -> host B
        assert lab.ping(ns["peer"], "198.18.0.51", count=2) == 2
        vm2_mac = lab.ipr(vm2).get_links(lab.index(vm2, "eth0"))[0].get_attr("IFLA_ADDRESS")
        # the status file follows events within 0.1 s (tunnel.io.loop.STATUS_SOONEST)
        wait_for(lambda: vm2_mac in t.status(proxy).get("macs", {}), 5, "the proxy's status to show VM 2's MAC")
        pst = t.status(proxy)
        assert len(pst["sessions"]) == 2
        b_sess = next(s for s in pst["sessions"] if "203.0.113.1" in s["endpoint"])
        assert pst["macs"][vm2_mac] == f"session {b_sess['session']}"
        # learned from the VM's first frames and named (its status file follows within 0.1 s too)
        wait_for(lambda: vm2_mac in (t.status(host_b) or {}).get("macs", {}), 5, "host B's status to show VM 2's MAC")
    except BaseException:
        print(t.dump_logs())
        raise


def test_offload_mode_carries_gso_frames_over_tcp(lab, tmp_path):
    """--offload: TAPs with IFF_VNET_HDR (frames carry a virtio-net header, GSO allowed); a stream arrives intact."""
    t = TunnelLab(lab, tmp_path, "tcp")
    ns = t.ns
    try:
        proxy = t.roam(ns["home"], "proxy", "--listen", f"{PROXY_IP}:{PORT}", "--bridge", "br0", "--offload", log="proxy")
        wait_for(lambda: t.status(proxy), 20, "proxy to start")
        host_a = t.roam(ns["hosta"], "host", "--proxy", f"{PROXY_IP}:{PORT}", "--tap", "rt0", "--bridge", "brvm",
                        "--mac", VM_MAC, "--offload", log="hosta")
        wait_for(lambda: t.attached(host_a), 20, "host end A to attach")
        # what the VM's stack said before the session was up (IPv6 chatter as its link came up) is a counted
        # not_attached drop; from here on nothing may be dropped
        dropped = dict(t.status(host_a)["drops"])
        assert set(dropped) <= {"not_attached"}, dropped
        assert lab.ping(ns["vm"], PEER_IP, count=2) == 2
        stream = Stream(lab, ns["vm"], ns["peer"])
        wait_for(lambda: stream.received > 500_000, 30, "the stream to flow")
        stream.finish()
        assert stream.errors == [], stream.errors
        st = t.status(host_a)
        assert st["offload"] is True and st["drops"] == dropped, st
        # A bulk transfer: the VM's TCP hands its veth 40-odd-segment GSO frames; they must cross the
        # bridge into the TAP whole (a TAP limit that made the kernel cut them up went unnoticed once).
        before = st["counters"]
        sent = _bulk(lab, ns["vm"], ns["peer"], 4_000_000)
        assert sent == 4_000_000
        after = wait_for(lambda: _counters_past(t.status(host_a), before, "tx_bytes", sent), 20,
                         "the host end's status to show the bulk transfer")
        # The largest frame, not the mean: how big the VM's GSO frames get depends on its TCP's rate
        # (TSO autosizing), so on a loaded machine the mean drops; a frame cut to segments cannot grow.
        assert after["tx_largest_frame"] > 8 * 1514, (before, after)
    except BaseException:
        print(t.dump_logs())
        raise


def _counters_past(st: dict | None, before: dict, key: str, amount: int) -> dict | None:
    c = (st or {}).get("counters") or {}
    return c if c.get(key, 0) - before.get(key, 0) >= amount else None


def _bulk(lab, src_ns: str, dst_ns: str, size: int) -> int:
    """Send ``size`` bytes from ``src_ns`` to the home peer in one stream; returns what the peer received."""
    srv = lab.socket(dst_ns)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((PEER_IP, STREAM_PORT + 1))
    srv.listen(1)
    srv.settimeout(20)
    got = [0]

    def drain():
        conn, _ = srv.accept()
        conn.settimeout(20)
        with conn:
            while data := conn.recv(1 << 16):
                got[0] += len(data)

    th = threading.Thread(target=drain, daemon=True)
    th.start()
    with lab.socket(src_ns) as cli:
        cli.settimeout(20)
        cli.connect((PEER_IP, STREAM_PORT + 1))
        cli.sendall(bytes(size))
    th.join(timeout=30)
    srv.close()
    return got[0]


def test_proxy_restart_host_reattaches_and_stream_survives(lab, tmp_path):
    """The proxy stops (DETACHing its hosts) and starts again with a new epoch: the host end
    re-attaches under a new session and the VM's TCP stream carries on."""
    t = TunnelLab(lab, tmp_path, "udp")
    ns = t.ns
    try:
        proxy = t.start_proxy()
        wait_for(lambda: t.status(proxy), 20, "proxy to start")
        host_a = t.start_host("hosta")
        first = wait_for(lambda: t.attached(host_a), 20, "host end A to attach")
        old_epoch = t.status(proxy)["epoch"]
        stream = Stream(lab, ns["vm"], ns["peer"])
        wait_for(lambda: stream.received > 20_000, 20, "the stream to flow")
        lab.stop(proxy)
        proxy2 = t.start_proxy()
        st2 = wait_for(lambda: t.status(proxy2), 20, "proxy to start again")
        assert st2["epoch"] != old_epoch
        at_restart = stream.received
        again = wait_for(lambda: (lambda s: s if s and s["state"] == "ATTACHED" and s["session"] != first["session"]
                                  else None)(t.status(host_a)), 20, "host end to re-attach under a new session")
        assert again["proxy_epoch"] == st2["epoch"]
        wait_for(lambda: stream.received > at_restart + 20_000, 30, "the stream to continue through the new proxy")
        stream.finish()
        assert stream.errors == [], stream.errors
        assert lab.ping(ns["peer"], VM_IP, count=2) == 2
    except BaseException:
        print(t.dump_logs())
        raise


def test_sighup_rotates_the_key_in_both_ends_and_a_killed_proxy_is_rejoined_at_once(lab, tmp_path):
    """Deployment-shaped: SIGHUP after writing a new key file reloads it in the running proxy and host
    end (neither stops, the session stays); then the proxy is killed with SIGKILL (no DETACH) and
    restarted: the host end, whose dead timer is 60 s, re-attaches at its next keepalive, told by
    the new proxy's RESET; `roam tunnel status` marks the killed proxy's file as not running."""
    from tools.cmd_tunnel import read_status_dir
    t = TunnelLab(lab, tmp_path, "udp")
    ns = t.ns
    try:
        proxy = t.start_proxy()
        wait_for(lambda: t.status(proxy), 20, "proxy to start")
        host = t.roam(ns["hosta"], "host", "--proxy", f"{PROXY_IP}:{PORT}", "--tap", "rt0", "--bridge", "brvm",
                      "--mac", VM_MAC, "--keepalive", "1", "--dead-after", "60", log="hosta")
        first = wait_for(lambda: t.attached(host), 20, "host end to attach")
        assert stat.S_IMODE(os.stat(t.status_dir).st_mode) == 0o700
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in t.status_dir.iterdir())
        new_key = subprocess.run([sys.executable, "-m", "tools.cli", "tunnel", "genkey"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=30, check=True).stdout
        t.key.write_text(new_key)
        os.kill(proxy.pid, signal.SIGHUP)
        os.kill(host.pid, signal.SIGHUP)
        rotated = wait_for(lambda: (lambda p, h: (p, h) if p and h and p["key"] != first["key"]
                                    and h["key"] == p["key"] else None)(t.status(proxy), t.status(host)),
                           20, "both ends to reload the key")
        assert proxy.poll() is None and host.poll() is None
        assert rotated[1]["session"] == first["session"] and rotated[1]["state"] == "ATTACHED"
        lab.stop(proxy, sig=signal.SIGKILL)
        stale = [st for st in read_status_dir(str(t.status_dir)) if st["role"] == "proxy"]
        assert stale and not any(st["alive"] for st in stale)
        proxy2 = t.start_proxy()
        wait_for(lambda: t.status(proxy2), 20, "proxy to start again")
        again = wait_for(lambda: (lambda s: s if s and s["state"] == "ATTACHED" and s["session"] != first["session"]
                                  else None)(t.status(host)), 20, "host end to re-attach (before its 60 s dead timer)")
        assert again["counters"].get("resets_received", 0) >= 1 and again["previous"] == first["session"]
        assert lab.ping(ns["peer"], VM_IP, count=2) == 2
    except BaseException:
        print(t.dump_logs())
        raise


# -- the TCP proxy under a flood of connections that never authenticate -----------------------------

FLOOD_IP = "192.0.2.2"  # the host end's (and the flooder's) address on the small lab's one link


class TcpFloodLab:
    """Two namespaces: home (bridge br0, the TCP proxy on 192.0.2.1) and hosta (192.0.2.2: a real
    host end, attached, and the raw connections of a flooder that has no key)."""

    def __init__(self, lab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.t = TunnelLab.__new__(TunnelLab)  # reuse its process/status helpers on a smaller lab
        self.t.lab, self.t.tmp, self.t.transport = lab, tmp, "tcp"
        self.t.status_dir = tmp / "status"
        self.t.logs = []
        self.home, self.hosta = lab.ns("home"), lab.ns("hosta")
        self.t.ns = {"home": self.home, "hosta": self.hosta}
        lab.veth(self.home, "hi", self.hosta, "ai")
        lab.addr(self.home, "hi", f"{PROXY_IP}/24")
        lab.addr(self.hosta, "ai", f"{FLOOD_IP}/24")
        lab.bridge(self.home, "br0")
        key = subprocess.run([sys.executable, "-m", "tools.cli", "tunnel", "genkey"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30, check=True).stdout
        self.t.key = tmp / "tunnel.key"
        self.t.key.write_text(key)
        self.t.key.chmod(0o600)
        self.raw: list[socket.socket] = []

    def start(self, *proxy_args: str) -> tuple[subprocess.Popen, subprocess.Popen, dict]:
        proxy = self.t.roam(self.home, "proxy", "--listen", f"{PROXY_IP}:{PORT}", "--bridge", "br0", *proxy_args,
                            log="proxy")
        wait_for(lambda: self.t.status(proxy), 20, "proxy to start")
        host = self.t.roam(self.hosta, "host", "--proxy", f"{PROXY_IP}:{PORT}", "--tap", "rt0", "--mac", VM_MAC,
                           "--keepalive", "0.3", "--dead-after", "10", log="hosta")
        st = wait_for(lambda: self.t.attached(host), 20, "the host end to attach")
        return proxy, host, st

    def flood(self, n: int) -> list[socket.socket]:
        """``n`` raw TCP connections to the proxy, each connected (the listen backlog holds what is not accepted)."""
        for _ in range(n):
            s = self.lab.socket(self.hosta)
            s.settimeout(10)
            s.connect((PROXY_IP, PORT))
            self.raw.append(s)
        return self.raw[-n:]

    def tcp(self, proxy) -> dict:
        st = self.t.status(proxy) or {}
        return {**(st.get("driver") or {}), **(st.get("tcp") or {})}

    def still_served(self, proxy, host, before_host: dict, sid: str) -> None:
        """The authenticated host end keeps its session, and keepalives keep being answered."""
        n0 = before_host["counters"].get("rx_messages", 0)
        wait_for(lambda: (self.t.status(host) or {}).get("counters", {}).get("rx_messages", 0) >= n0 + 5, 20,
                 "the proxy to keep answering the authenticated host end")
        hst = self.t.attached(host)
        assert hst is not None and hst["session"] == sid, hst
        (sess,) = self.t.status(proxy)["sessions"]
        assert sess["session"] == sid and sess["state"] == "ATTACHED", sess

    def close(self) -> None:
        for s in self.raw:
            s.close()


def _closed_by_proxy(s: socket.socket) -> bool:
    """True if the proxy closed this connection (EOF or reset); a live, silent one raises socket.timeout."""
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return True
            # the proxy never sends anything to a connection that sent nothing authentic
            raise AssertionError(f"the proxy sent {len(data)} bytes to an unauthenticated connection")
    except ConnectionResetError:
        return True


def _still_open(s: socket.socket) -> bool:
    """Non-blocking: no EOF and no error pending (the proxy still holds it); no waiting involved."""
    s.setblocking(False)
    try:
        data = s.recv(1)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.settimeout(10)
    return bool(data)


def test_tcp_proxy_caps_connections_evicting_unauthenticated_ones(lab, tmp_path):
    """At the limit a new connection evicts the oldest one that never authenticated; the host end's stays."""
    f = TcpFloodLab(lab, tmp_path)
    try:
        proxy, host, hst = f.start("--transport", "tcp", "--max-tcp-connections", "8", "--tcp-auth-timeout", "120")
        raw = f.flood(20)
        # The host end's connection + 7 raw ones fit; the 13 oldest raw ones were evicted, in order.
        st = wait_for(lambda: (lambda d: d if d.get("tcp_accepted", 0) >= 21 and d.get("tcp_evicted", 0) >= 13
                               else None)(f.tcp(proxy)), 20, "the proxy to accept every connection")
        assert st["tcp_evicted"] == 13 and st["connections"] == 8 and st["unauthenticated"] == 7, st
        assert all(_closed_by_proxy(s) for s in raw[:13])
        assert all(_still_open(s) for s in raw[13:])
        f.still_served(proxy, host, hst, hst["session"])
        assert proxy.poll() is None and host.poll() is None
    except BaseException:
        print(f.t.dump_logs())
        raise
    finally:
        f.close()


def test_tcp_proxy_times_out_unauthenticated_connections_and_drops_junk(lab, tmp_path):
    """Raw connections that send nothing, half a message, junk in valid framing, or a bad length: the
    bad length is closed at once, the others after the authentication timeout; the host end is served."""
    from tunnel.stream import encode

    f = TcpFloodLab(lab, tmp_path)
    try:
        proxy, host, hst = f.start("--transport", "tcp", "--tcp-auth-timeout", "1")
        before = f.t.status(proxy)
        raw = f.flood(24)
        kinds = ["silent", "half", "framed_junk", "bad_length"] * 6
        for s, kind in zip(raw, kinds):
            if kind == "half":
                s.sendall(b"\x00\x40" + os.urandom(10))  # a 64-byte message announced, 10 bytes sent
            elif kind == "framed_junk":
                s.sendall(encode(b"\x7f" + os.urandom(59)) * 3)  # three well-framed messages of junk
            elif kind == "bad_length":
                s.sendall(b"\xff\xff" + os.urandom(30))  # beyond any message: the stream cannot be read on
        st = wait_for(lambda: (lambda d: d if d.get("tcp_accepted", 0) >= 25 and d.get("connections") == 1 else None)(
            f.tcp(proxy)), 30, "the proxy to close every unauthenticated connection")
        assert st["unauthenticated"] == 0, st
        assert st.get("tcp_bad_framing", 0) == kinds.count("bad_length"), st
        assert st.get("tcp_auth_timeouts", 0) == len(raw) - kinds.count("bad_length"), st
        assert not st.get("tcp_evicted") and not st.get("tcp_errors"), st
        assert all(_closed_by_proxy(s) for s in raw)
        after = f.t.status(proxy)
        drops = {k: v - before["drops"].get(k, 0) for k, v in after["drops"].items()}
        assert sum(drops.values()) == 3 * kinds.count("framed_junk") + kinds.count("bad_length"), drops
        assert drops.get("bad_length", 0) == kinds.count("bad_length"), drops
        assert after["counters"].get("sessions_opened") == before["counters"].get("sessions_opened")
        f.still_served(proxy, host, hst, hst["session"])
        assert proxy.poll() is None and host.poll() is None
    except BaseException:
        print(f.t.dump_logs())
        raise
    finally:
        f.close()


def test_tcp_proxy_survives_running_out_of_descriptors(lab, tmp_path):
    """RLIMIT_NOFILE lowered on the running proxy to a few above what it holds: accept() fails with
    EMFILE; the proxy counts it, pauses accepting, frees descriptors by the timeout, and goes on."""
    import resource

    f = TcpFloodLab(lab, tmp_path)
    try:
        proxy, host, hst = f.start("--transport", "tcp", "--tcp-auth-timeout", "1")
        held = len(os.listdir(f"/proc/{proxy.pid}/fd"))  # `ip netns exec` exec'd the proxy: same pid
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (held + 4, held + 4))
        raw = f.flood(30)
        st = wait_for(lambda: (lambda d: d if d.get("tcp_accepted", 0) >= 31 and d.get("connections") == 1 else None)(
            f.tcp(proxy)), 60, "the proxy to accept, and time out, every connection despite EMFILE")
        assert st.get("tcp_accept_errors", 0) >= 1, st  # it did run out of descriptors
        assert st.get("tcp_auth_timeouts", 0) == len(raw), st
        assert all(_closed_by_proxy(s) for s in raw)
        assert proxy.poll() is None
        f.still_served(proxy, host, hst, hst["session"])
        assert "Too many open files" in (tmp_path / "proxy.log").read_text()  # logged, not raised
    except BaseException:
        print(f.t.dump_logs())
        raise
    finally:
        f.close()


def test_host_end_counts_network_errors_and_attaches_once_it_has_a_route(lab, tmp_path):
    """UDP host end started with no address (so no route) toward the proxy: every send fails with
    ENETUNREACH, counted and logged, the process lives; given its address, it attaches."""
    f = TcpFloodLab(lab, tmp_path)
    t = f.t
    t.transport = "udp"
    try:
        lab.flush_addr(f.hosta, "ai")
        proxy = t.roam(f.home, "proxy", "--listen", f"{PROXY_IP}:{PORT}", "--bridge", "br0", log="proxy")
        wait_for(lambda: t.status(proxy), 20, "proxy to start")
        host = t.roam(f.hosta, "host", "--proxy", f"{PROXY_IP}:{PORT}", "--tap", "rt0", "--mac", VM_MAC, log="hosta")
        st = wait_for(lambda: (lambda s: s if s and s["driver"].get("udp_tx_errors", 0) >= 3 else None)(t.status(host)),
                      20, "the host end to count failed sends")
        assert st["state"] == "ATTACHING" and st["local"] is None, st
        assert host.poll() is None
        lab.addr(f.hosta, "ai", f"{FLOOD_IP}/24")
        st = wait_for(lambda: t.attached(host), 20, "the host end to attach once it has a route")
        assert st["local"] == FLOOD_IP
        assert "Network is unreachable" in (tmp_path / "hosta.log").read_text()
    except BaseException:
        print(t.dump_logs())
        raise
