"""roam tunnel vs OpenVPN vs kernel VXLAN vs direct, in one namespace lab; and moves of the VM.

One run builds a lab (home LAN bridge with a peer, an internet namespace, two remote
hosts, a VM namespace), then measures between the VM and the home peer, one way of
attaching after another:

* direct:       the VM's link on the home bridge itself (the LAN path, no tunnel);
* vxlan:        kernel VXLAN from host A to the home site (the limit for L2 over UDP);
* roam-udp:     `roam tunnel` with its defaults: UDP, the suite negotiated (AES-256-GCM where both CPUs
                have AES instructions, else ChaCha20-Poly1305), offload negotiated (the TAPs
                carry IFF_VNET_HDR and TCP GSO super-frames of up to ~64 KiB, the VM's own TSO
                output, each sealed once and cut into UDP segments that fit the path, sent with
                UDP GSO and read with UDP GRO);
* roam-tcp:     the same over TCP (one framed message per super-frame);
* roam-plain:   the defaults with --plaintext (no crypto: the cost of Python and the kernel alone);
* roam-*-nooffload: the same with `--no-offload` (1500-byte frames, one AEAD call each);
* openvpn-aes:  OpenVPN 2.6 in tap mode, UDP, static key, AES-256-CBC + HMAC-SHA256 (static-key mode
                has no AEAD ciphers; ChaCha20-Poly1305 needs its TLS mode), if `openvpn` is installed;
* openvpn-none: the same with --cipher none --auth none.

Throughput is iperf3 TCP (VM -> peer; ``--streams N`` iperf3 processes at once, so that
the load generator, single-threaded before iperf3 3.16, is not the bottleneck), RTT is a UDP echo (median and 99th
percentile of N round trips), and "tunnel CPU" the user+system CPU seconds the
tunnel's own processes (both ends) spent per GB delivered, read from /proc: on a
shared machine that figure moves much less with the load than throughput does.
With ``--repeat N`` the paths are measured round robin N times and medians
reported.  Every figure stands next to a reference measured in the same run
(direct, openvpn-aes), and a last table states which of the issue's targets are met.

Then the moves, the way operators run the tunnel (issue 11: agents already running on both
hosts, no MAC given): ``--moves N`` moves of the VM in the namespace lab, its link kept up on
both hosts and re-patched at once (:mod:`tools.bench.tunnel_moves`); ``--qemu-moves N`` the
same with a real guest live-migrated by QEMU (:mod:`tools.bench.tunnel_qemu`).  The older
measurement that moved the VM's veth between namespaces is gone: that flaps its carrier and
the kernel holds the VM's frames for up to a second (a lab artifact, issue 11), and its
"cold" case gave a freshly started host end the VM's MAC, which agents are no longer told.
Last, the proxy engine's cost at scale, 100 host ends and 1,000 VM MACs in memory
(:mod:`tools.bench.tunnel_scale`; ``--scale-only`` runs just that, without the lab;
``--no-scale`` skips it).  Printed only; never asserted anywhere.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tools.bench.table import render
from tools.bench.tunnel_moves import measure_moves, report_moves
from tools.bench import tunnel_scale
from tools.lab.topology import (
    TUNNEL_PEER_IP, TUNNEL_PROXY_IP, TUNNEL_VM_IP, TUNNEL_VM_MAC, enslave, tunnel_lab,
)

ROOT = Path(__file__).resolve().parents[2]
VM_MAC, VM_IP, PEER_IP, PROXY_IP = TUNNEL_VM_MAC, TUNNEL_VM_IP, TUNNEL_PEER_IP, TUNNEL_PROXY_IP
PORT = 4789


PATHS = ("direct", "vxlan", "roam-udp", "roam-tcp", "roam-plain", "roam-udp-nooffload", "roam-tcp-nooffload",
         "openvpn-aes", "openvpn-none")
#: Targets (issue 11, "fast by default"): each a roam path against a reference measured in the same run.
THROUGHPUT_TARGETS = (
    # (roam path, reference path, factor it must reach)
    ("roam-udp", "vxlan", 0.5),
    ("roam-udp", "openvpn-aes", 5.0),
)
#: Added RTT (median UDP echo minus the direct path's): roam's defaults no more than OpenVPN's.
RTT_PATHS = ("roam-udp",)
RTT_REFERENCE = "openvpn-aes"
_WARM_UP = 20  # UDP echoes before the RTTs that count


def add_arguments(parser) -> None:
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per iperf3 run (default 4)")
    parser.add_argument("--streams", type=int, default=2,
                        help="iperf3 client processes at once, each its own TCP stream (default 2)")
    parser.add_argument("--pings", type=int, default=200, help="UDP echo round trips per path (default 200)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure every path this many times, round robin, and report medians (default 1); "
                        "on a shared machine 3 or more evens out load that comes and goes")
    parser.add_argument("--only", action="append", default=[],
                        help="measure only these paths (" + ", ".join(PATHS) + "; 'openvpn' means both OpenVPN "
                        "paths); repeatable")
    parser.add_argument("--no-migration", action="store_true",
                        help="skip the moves of the VM (both --moves and --qemu-moves)")
    parser.add_argument("--moves", type=int, default=20, metavar="N",
                        help="moves of the VM between two hosts whose agents run from the start, no MAC given "
                        "(medians and worst of the gaps; default 20)")
    parser.add_argument("--qemu-moves", type=int, default=20, metavar="N",
                        help="moves of a real guest live-migrated by QEMU, agents running on both hosts (the qemu "
                        "backend of `roam replay`; about 3 s each on TCG; default 20, the fewest issue 11 judges "
                        "on; each direction's stall printed less QEMU's downtime and less the guest's pause; "
                        "skipped with --no-qemu, --no-migration or without QEMU)")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU live migrations")
    parser.add_argument("--no-scale", action="store_true",
                        help="skip the proxy engine's figures at scale (N host ends, M VM MACs, in memory)")
    parser.add_argument("--scale-only", action="store_true",
                        help="only the proxy engine's figures at scale: no lab, no root needed")
    tunnel_scale.add_arguments(parser)


def run(args) -> int:
    from tools.lab.netlab import Lab, probe

    if args.scale_only:
        print(tunnel_scale.run_scale(args))
        return 0
    why = probe()
    if why:
        print(f"roam bench tunnel: cannot build the lab: {why}", file=sys.stderr)
        return 2
    wanted = set(args.only) or set(PATHS)
    if "openvpn" in wanted:
        wanted |= {"openvpn-aes", "openvpn-none"}
    if not shutil.which("openvpn") and wanted & {"openvpn-aes", "openvpn-none"}:
        print("openvpn: not installed (apt install openvpn): skipped", file=sys.stderr)
        wanted -= {"openvpn-aes", "openvpn-none"}
    order = [p for p in PATHS if p in wanted]
    runs: dict[str, list[tuple[float, float, float, float | None]]] = {p: [] for p in order}
    moves = None
    tmp = Path(tempfile.mkdtemp(prefix="roam-bench-tunnel-"))
    try:
        with Lab("roambench") as lab:
            b = _Bench(lab, tmp, args)
            for _ in range(max(1, args.repeat)):
                for name in order:
                    runs[name].append(b.measure(name))
            if not args.no_migration:
                moves = measure_moves(b, args.moves)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = {name: tuple(_median(v[i] for v in vs) for i in range(4)) for name, vs in runs.items() if vs}
    print(report(rows, max(1, args.repeat)))
    if moves:
        print()
        print(report_moves(moves))
    if not args.no_migration and not args.no_qemu:
        print()
        print(_qemu_moves(args.qemu_moves))
    if not args.no_scale:
        print()
        print(tunnel_scale.run_scale(args))
    return 0


def _qemu_moves(n: int) -> str:
    from tools.bench.tunnel_qemu import measure_qemu_moves, report_qemu_moves
    from tools.lab.qemu import qemu_missing

    why = qemu_missing()
    if why:
        return f"QEMU moves: skipped: {why}"
    print(f"QEMU moves: {n} live migrations...", file=sys.stderr)
    return report_qemu_moves(measure_qemu_moves(n))


def _median(values) -> float | None:
    vs = [v for v in values if v is not None and v == v]
    return statistics.median(vs) if vs else None


def report(rows: dict[str, tuple], repeat: int) -> str:
    """The tables: every figure next to a reference measured in the same run, and the targets."""
    out = []
    direct = rows.get("direct")
    ovpn = rows.get("openvpn-aes")
    table = []
    for name, (mbps, med, p99, cpu) in rows.items():
        table.append([
            name, mbps,
            f"{mbps / direct[0]:.3f}" if direct and direct[0] else "-",
            f"{mbps / ovpn[0]:.2f}" if ovpn and ovpn[0] else "-",
            f"{med * 1000:.3f}", f"{p99 * 1000:.3f}",
            f"{(med - direct[1]) * 1000:+.3f}" if direct else "-",
            "-" if cpu is None else f"{cpu:.2f}",
            f"{cpu / ovpn[3]:.2f}" if cpu is not None and ovpn and ovpn[3] else "-",
        ])
    out.append(render(["path (VM -> home peer)", "iperf3 Mbit/s", "x direct", "x openvpn-aes", "RTT median ms",
                       "RTT p99 ms", "added RTT ms", "tunnel CPU s/GB", "CPU x openvpn-aes"], table))
    out.append(f"(medians of {repeat} round-robin run(s); 'added RTT' = RTT median minus the direct path's; "
               "'tunnel CPU' = user+system CPU seconds of the tunnel's own processes, both ends, per GB received)")
    targets = []
    for path, ref, factor in THROUGHPUT_TARGETS:
        if path in rows and ref in rows and rows[ref][0]:
            ratio = rows[path][0] / rows[ref][0]
            targets.append([f"throughput {path} >= {factor:g} x {ref}", f"{ratio:.2f} x", _met(ratio >= factor)])
    rtt_ref = rows.get(RTT_REFERENCE)
    if direct and rtt_ref:
        limit = (rtt_ref[1] - direct[1]) * 1000
        for path in RTT_PATHS:
            if path in rows:
                added = (rows[path][1] - direct[1]) * 1000
                targets.append([f"added RTT {path} <= {RTT_REFERENCE}'s ({limit:.3f} ms; median vs direct)",
                                f"{added:.3f} ms", _met(added <= limit)])
    for path in RTT_PATHS:
        if path in rows and rows[path][3] is not None:
            targets.append([f"tunnel CPU {path} (both ends, per GB delivered)", f"{rows[path][3]:.2f} s/GB",
                            "printed"])
    if targets:
        out.append("")
        out.append(render(["target (issue 11 'fast by default')", "measured (same run)",
                           "met?"], targets))
    return "\n".join(out)


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def _cpu_seconds(pids: list[int]) -> float | None:
    """user + system CPU seconds of these processes so far (None if any is gone)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


class _Bench:
    def __init__(self, lab, tmp: Path, args) -> None:
        self.lab, self.tmp, self.args = lab, tmp, args
        ns = self.ns = tunnel_lab(lab)
        self.where = "hosta"
        self.key = tmp / "tunnel.key"
        from tunnel.crypto import generate_key_text
        self.key.write_text(generate_key_text() + "\n")
        self.key.chmod(0o600)
        # UDP echo on the peer, for RTT.
        self.echo = lab.socket(ns["peer"], socket.AF_INET, socket.SOCK_DGRAM)
        self.echo.bind((PEER_IP, 7))
        self.echo.settimeout(0.5)
        self._echo_stop = threading.Event()
        threading.Thread(target=self._echo_loop, daemon=True).start()

    def _echo_loop(self) -> None:
        while not self._echo_stop.is_set():
            try:
                data, addr = self.echo.recvfrom(2048)
                self.echo.sendto(data, addr)
            except socket.timeout:
                continue
            except OSError:
                return

    def _enslave(self, host: str, ifname: str, bridge: str) -> None:
        enslave(self.lab, self.ns[host], ifname, bridge)

    def _move_vm(self, to_ns: str, bridge: str) -> None:
        cur = self.where
        if cur != to_ns:
            self.lab.move_link(self.ns[cur], "vmport", self.ns[to_ns])
            self.where = to_ns
        self._enslave(to_ns, "vmport", bridge)

    def _roam(self, ns: str, *argv: str, log: str) -> subprocess.Popen:
        f = open(self.tmp / f"{log}.log", "ab")
        return self.lab.popen(ns, [sys.executable, "-m", "tools.cli", "tunnel", *argv,
                                   "--status-dir", str(self.tmp / "status")], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)

    def _status(self, p: subprocess.Popen) -> dict | None:
        for role in ("host", "proxy"):
            path = self.tmp / "status" / f"{role}-{p.pid}.json"
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        return None

    def _wait(self, pred, timeout: float):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = pred()
            if v:
                return v
            time.sleep(0.005)
        raise RuntimeError("timed out waiting for the lab")

    # -- paths ----------------------------------------------------------------------------------

    def measure(self, name: str):
        procs, cleanup = [], []
        lab, ns = self.lab, self.ns
        if name == "direct":
            self._move_vm("home", "br0")
        elif name == "vxlan":
            self._move_vm("hosta", "brvm")
            for n, local, remote, br in (("hosta", "198.51.100.1", PROXY_IP, "brvm"), ("home", PROXY_IP, "198.51.100.1", "br0")):
                lab.ipr(ns[n]).link("add", ifname="vx0", kind="vxlan", vxlan_id=42, vxlan_local=local,
                                    vxlan_group=remote, vxlan_port=4790)
                self._enslave(n, "vx0", br)
                cleanup.append((n, "vx0"))
        elif name.startswith("openvpn"):
            self._move_vm("hosta", "brvm")
            procs = self._openvpn("none" if name == "openvpn-none" else "AES-256-CBC",
                                  "none" if name == "openvpn-none" else "SHA256")
        else:
            self._move_vm("hosta", "brvm")
            extra = ["--transport", "tcp"] if name.startswith("roam-tcp") else []
            extra += ["--no-offload"] if name.endswith("-nooffload") else []  # else the defaults: offload
            extra += ["--plaintext"] if name.startswith("roam-plain") else ["--key-file", str(self.key)]
            proxy = self._roam(ns["home"], "proxy", "--listen", f"{PROXY_IP}:{PORT}", "--bridge", "br0", *extra, log=f"{name}-proxy")
            self._wait(lambda: self._status(proxy), 20)
            host = self._roam(ns["hosta"], "host", "--proxy", f"{PROXY_IP}:{PORT}", "--tap", "rt0", "--bridge", "brvm",
                              "--mac", VM_MAC, *extra, log=f"{name}-host")
            self._wait(lambda: (self._status(host) or {}).get("state") == "ATTACHED", 20)
            procs = [host, proxy]
        try:
            self._wait(lambda: lab.ping(ns["vm"], PEER_IP, count=1, timeout=0.5) == 1, 20)
            rtts = self._rtts(self.args.pings)
            pids = [p.pid for p in procs]
            cpu0 = _cpu_seconds(pids) if pids else None
            mbps, nbytes = self._iperf(self.args.duration)
            cpu1 = _cpu_seconds(pids) if pids else None
            cpu = (cpu1 - cpu0) / (nbytes / 1e9) if cpu0 is not None and cpu1 is not None and nbytes else None
        finally:
            for p in procs:
                lab.stop(p)
            for n, ifname in cleanup:
                lab.delete_link(ns[n], ifname)
        rtts.sort()
        med = statistics.median(rtts) if rtts else float("nan")
        p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] if rtts else float("nan")
        print(f"  {name}: {mbps:.0f} Mbit/s, RTT median {med * 1e6:.0f} us"
              + (f", tunnel CPU {cpu:.2f} s/GB" if cpu is not None else ""), file=sys.stderr)
        return mbps, med, p99, cpu

    def _openvpn(self, cipher: str, auth: str) -> list[subprocess.Popen]:
        key = self.tmp / "openvpn.key"
        if not key.exists():
            subprocess.run(["openvpn", "--genkey", "secret", str(key)], check=True, capture_output=True, timeout=30)
        procs = []
        for n, local, remote, br in (("home", PROXY_IP, "198.51.100.1", "br0"), ("hosta", "198.51.100.1", PROXY_IP, "brvm")):
            argv = ["openvpn", "--dev", "ovtap", "--dev-type", "tap", "--proto", "udp", "--secret", str(key),
                    "--cipher", cipher, "--auth", auth, "--local", local, "--lport", "1194", "--remote", remote, "1194",
                    "--verb", "1"]
            procs.append(self.lab.popen(self.ns[n], argv, stdout=open(self.tmp / f"openvpn-{n}.log", "ab"),
                                        stderr=subprocess.STDOUT))
            self._wait(lambda: self.lab.ipr(self.ns[n]).link_lookup(ifname="ovtap"), 20)
            self._enslave(n, "ovtap", br)
        return procs

    def _rtts(self, n: int) -> list[float]:
        """``n`` UDP echo round trips, after _WARM_UP unrecorded ones (the first of a path pay for
        its caches, ARP and the processes' first wake-ups: a direct path once read 46 us, not 9)."""
        out = []
        with self.lab.socket(self.ns["vm"], socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1.0)
            s.connect((PEER_IP, 7))
            for i in range(-_WARM_UP, n):
                msg = i.to_bytes(4, "big", signed=True) * 8
                t0 = time.perf_counter()
                s.send(msg)
                try:
                    while s.recv(2048) != msg:
                        pass
                except socket.timeout:
                    continue
                if i >= 0:
                    out.append(time.perf_counter() - t0)
        return out

    def _iperf(self, duration: float) -> tuple[float, int]:
        """``--streams`` iperf3 clients at once (each its own process and server): the sum."""
        n = max(1, getattr(self.args, "streams", 1))
        ports = [5201 + i for i in range(n)]
        servers = [self.lab.popen(self.ns["peer"], ["iperf3", "-s", "-1", "-B", PEER_IP, "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for port in ports]
        try:
            for port in ports:  # every server listening before any client starts
                self._wait(lambda port=port: self.lab.run(self.ns["peer"], ["ss", "-Hltn", f"sport = :{port}"],
                                                          check=False).stdout.strip(), 10)
            clients = [self.lab.popen(self.ns["vm"], ["iperf3", "-c", PEER_IP, "-p", str(port), "-t", str(duration),
                                                      "-J"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                       for port in ports]
            mbps, nbytes = 0.0, 0
            for c in clients:
                out, _ = c.communicate(timeout=duration + 30)
                try:
                    got = json.loads(out)["end"]["sum_received"]
                except (ValueError, KeyError):
                    return float("nan"), 0
                mbps += got["bits_per_second"] / 1e6
                nbytes += got["bytes"]
            return mbps, nbytes
        finally:
            for srv in servers:
                self.lab.stop(srv)
