"""`roam bench tunnel`'s moves: agents already running on both hosts, no MAC given, the VM moved N times.

The way operators run the tunnel (issue 11): a `roam tunnel host` agent on each host
from the start, told nothing; the VM's link moves between the hosts while a TCP
stream runs each way (VM -> peer and peer -> VM, 256 bytes every millisecond), and
for every move the longest gap in delivery at each receiver is recorded.

The VM's link is never moved between namespaces: that flaps its carrier, and the
kernel then holds the VM's frames for up to a second (a lab artifact, measured in
issue 11).  Instead the VM's ``vmport`` sits in a *patch* namespace, cabled to a port
on each host's bridge (``va`` on A, ``vb`` on B), all of them up all the time, as a
QEMU TAP is up on the destination before the guest resumes; ``tc`` mirred redirects
patch the VM to one host at a time (the other side's frames toward the VM end in the
patch namespace's stack, which has no address: dropped, as by the stopped source).  A move re-patches at once; nothing in between.

Reported: medians and worst over the moves of each direction's longest gap, the same
figure over windows where nothing moves (the noise floor of this machine, same run:
a shared machine stalls a process now and then, moves or not), how many gaps passed
the target, and the proxy's move counters.  Printed only; never asserted.
"""
from __future__ import annotations

import socket
import sys
import threading
import time

from tools.bench.table import render

WINDOW = 0.9  # seconds after a move in which its gap is looked for (moves are 1 s apart)
TARGET_MS = 20.0
CHUNK = 256
EVERY = 0.001


class _Stream:
    """Numbered bytes from ``cli`` to ``conn``; arrival times kept (bounded by the run's length)."""

    def __init__(self, lab, src_ns: str, dst_ns: str, dst_ip: str, port: int) -> None:
        srv = lab.socket(dst_ns)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((dst_ip, port))
        srv.listen(1)
        srv.settimeout(10)
        self.cli = lab.socket(src_ns)
        self.cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.cli.settimeout(10)
        self.cli.connect((dst_ip, port))
        self.conn, _ = srv.accept()
        srv.close()
        self.conn.settimeout(30)
        self.arrivals: list[float] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._recv, daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        n = 0
        try:
            while not self.stop.is_set() and n < 1 << 31:
                self.cli.sendall(bytes((n + i) & 0xFF for i in range(CHUNK)))
                n += CHUNK
                time.sleep(EVERY)
            self.cli.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.errors.append(repr(exc))

    def _recv(self) -> None:
        got = 0
        try:
            while True:
                data = self.conn.recv(65536)
                if not data:
                    return
                if data != bytes((got + i) & 0xFF for i in range(len(data))):
                    self.errors.append("out of order")
                    return
                got += len(data)
                self.arrivals.append(time.monotonic())
        except OSError as exc:
            self.errors.append(repr(exc))

    def gap(self, start: float, end: float) -> float | None:
        return longest_gap(self.arrivals, start, end)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)
        for s in (self.cli, self.conn):
            s.close()


#: Every frame (u32 matching nothing in particular: the kernels this runs on may lack matchall).
_ALL = "pref 1 protocol all handle 800::800 u32 match u32 0 0"


def longest_gap(arrivals: list[float], start: float, end: float) -> float | None:
    """The longest time without delivery that overlaps [start, end], in ms (the arrivals just before and
    just after count); None when fewer than two arrivals bound it."""
    before = [t for t in arrivals if t < start][-1:]
    seq = before + [t for t in arrivals if start <= t <= end] + [t for t in arrivals if t > end][:1]
    if len(seq) < 2:
        return None
    return max(b - a for a, b in zip(seq, seq[1:])) * 1000


def _patch(lab, ns: str, to: str) -> None:
    """Redirect the VM's port to ``to`` (``pa`` or ``pb``) and back; the other side's frames dropped."""
    other = "pb" if to == "pa" else "pa"
    lab.run(ns, ["tc", "-force", "-batch", "-"], check=False, input="\n".join((
        f"filter replace dev vmport ingress {_ALL} action mirred egress redirect dev {to}",
        f"filter replace dev {to} ingress {_ALL} action mirred egress redirect dev vmport",
        f"filter del dev {other} ingress pref 1",  # its frames end in this namespace's stack: dropped
    )) + "\n")


def measure_moves(bench, moves: int) -> dict:
    """``bench``: the tunnel bench (its lab, namespaces, key and helpers).  The VM's link is taken into a
    patch namespace for the run and put back on host A after."""
    from tools.bench.tunnel import PEER_IP, PORT, PROXY_IP, VM_IP
    lab, ns = bench.lab, bench.ns
    patch = ns.get("patch") or lab.ns("patch")
    ns["patch"] = patch
    for key in ("default", "all"):  # the patch panel says nothing of its own on the VM's LAN
        lab.sysctl(patch, f"net.ipv6.conf.{key}.disable_ipv6", "1")
    cur = bench.where
    lab.move_link(ns[cur], "vmport", patch)
    bench.where = "patch"
    lab.veth(patch, "pa", ns["hosta"], "va")
    lab.veth(patch, "pb", ns["hostb"], "vb")
    for h, port in (("hosta", "va"), ("hostb", "vb")):
        bench._enslave(h, port, "brvm")
    for dev in ("vmport", "pa", "pb"):
        lab.run(patch, ["tc", "qdisc", "add", "dev", dev, "clsact"])
    _patch(lab, patch, "pa")
    common = ["--key-file", str(bench.key)]
    proxy = bench._roam(ns["home"], "proxy", "--listen", f"{PROXY_IP}:{PORT}", "--bridge", "br0",
                        *common, log="moves-proxy")
    procs = [proxy]
    streams: list[_Stream] = []
    result: dict = {}
    try:
        bench._wait(lambda: bench._status(proxy), 20)
        agents = [bench._roam(ns[h], "host", "--proxy", f"{PROXY_IP}:{PORT}", "--tap", "rt0",
                              "--bridge", "brvm", *common, log=f"moves-{h}") for h in ("hosta", "hostb")]
        procs += agents
        for a in agents:
            bench._wait(lambda a=a: (bench._status(a) or {}).get("state") == "ATTACHED", 20)
        lab.run(ns["vm"], ["ip", "neigh", "flush", "dev", "eth0"], check=False)
        streams = [_Stream(lab, ns["vm"], ns["peer"], PEER_IP, 5004),
                   _Stream(lab, ns["peer"], ns["vm"], VM_IP, 5005)]
        time.sleep(1.0)
        quiet = time.monotonic()
        time.sleep(WINDOW + 0.1)
        marks = []
        side = "pa"
        for _ in range(moves):
            side = "pb" if side == "pa" else "pa"
            t = time.monotonic()
            _patch(lab, patch, side)
            marks.append(t)
            time.sleep(1.0)
        time.sleep(0.2)
        pst = bench._status(proxy) or {}
        result = {
            "moves": moves,
            "vm_to_peer": [streams[0].gap(t, t + WINDOW) for t in marks],
            "peer_to_vm": [streams[1].gap(t, t + WINDOW) for t in marks],
            # the noise floor: the same measure where nothing moves (before the first move, and in the
            # last 0.4 s before each move), both directions
            "quiet": [s.gap(quiet, quiet + WINDOW) for s in streams]
            + [s.gap(t - 0.45, t - 0.05) for t in marks[1:] for s in streams],
            "errors": sum(len(s.errors) for s in streams),
            "proxy": {k: (pst.get("counters") or {}).get(k, 0) for k in (
                "presence_moves", "claim_moves", "claims_deferred", "mac_flaps", "resent_frames", "resends")},
        }
    finally:
        for s in streams:
            s.close()
        for p in procs:
            lab.stop(p)
        for dev in ("va", "vb"):
            h = "hosta" if dev == "va" else "hostb"
            try:
                lab.ipr(ns[h]).link("del", index=lab.index(ns[h], dev))
            except Exception:  # noqa: BLE001 - gone already with its pair
                pass
        lab.move_link(patch, "vmport", ns["hosta"])
        bench.where = "hosta"
        bench._enslave("hosta", "vmport", "brvm")
    print(f"  moves with agents: {moves} done", file=sys.stderr)
    return result


def report_moves(m: dict) -> str:
    def stats(vals):
        vs = sorted(v for v in vals if v is not None)
        if not vs:
            return "-", "-"
        return f"{vs[len(vs) // 2]:.1f}", f"{vs[-1]:.1f}"

    rows = []
    for key, what in (("vm_to_peer", "VM -> peer"), ("peer_to_vm", "peer -> VM")):
        med, worst = stats(m[key])
        rows.append([f"longest gap at the receiver, {what} (ms)", med, worst])
    med, worst = stats(m["quiet"])
    rows.append(["the same where nothing moves (ms; noise floor, same run)", med, worst])
    worst_all = max((v for k in ("vm_to_peer", "peer_to_vm") for v in m[k] if v is not None), default=None)
    lines = [render([f"{m['moves']} moves A <-> B, agents running, no MAC given (stream each way)", "median",
                     "worst"], rows)]
    over = sum(1 for k in ("vm_to_peer", "peer_to_vm") for v in m[k] if v is not None and v > TARGET_MS)
    lines.append(f"gaps over {TARGET_MS:g} ms: {over} of {2 * m['moves']}; proxy: "
                 + " ".join(f"{k}={v}" for k, v in m["proxy"].items()) + f"; stream errors {m['errors']}")
    if worst_all is not None:
        lines.append(f"target: longest gap <= {TARGET_MS:g} ms in the namespace lab: worst {worst_all:.1f} ms "
                     f"({'MET' if worst_all <= TARGET_MS else 'NOT MET'})")
    return "\n".join(lines)

