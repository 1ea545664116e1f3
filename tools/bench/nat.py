"""NAT speed: the engine alone in-process (established-flow translations/s), and in a namespace
lab (two VMs -> host -> internet), in one run: kernel MASQUERADE, `roam nat` (offloaded, with the
kernel path: the defaults), `roam nat --workers 2`, `roam nat --no-kernel-path`, the same with
`--workers 2`, `roam nat --no-offload` and `--no-offload --gso`, each measured the same way: iperf3
TCP throughput, 64-byte UDP packets/s received (one iperf3 client per core, so one sender is
not the bottleneck) and new TCP connections/s (the same connect/close clients and accepting
servers against each), from one VM and from two (whose kernels pick source ports on their own).
Every figure is also given as a ratio to kernel MASQUERADE (lab) or to a bare parse loop
(engine); new connections with --workers 2 also to one process's rate; whether roam learned
the kernel path's flows as fast as the kernel made them; and how many of the two VMs' flows
roam still had to decide itself. Printed, never asserted."""
from __future__ import annotations

import argparse
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time

from conntrack.build import tcp, udp

from .table import render

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flows", type=int, default=1000, help="established flows in the engine run (default %(default)s)")
    p.add_argument("--packets", type=int, default=200_000, help="packets in the engine run (default %(default)s)")
    p.add_argument("--seconds", type=float, default=3.0, help="iperf3 run length per measurement (default %(default)s)")
    p.add_argument("--engine-only", action="store_true", help="skip the lab (no root needed)")
    p.add_argument("--seed", type=int, default=1)


# ----------------------------------------------------------------------------- engine alone
def _established(flows: int, seed: int, open_flow):
    """An engine holding ``flows`` established flows, and the workload over them: outbound and
    inbound packets alternating.  ``open_flow(engine, vm, peer, sport, ext)`` sets one flow up
    and returns its (outbound, inbound) packet."""
    from nat import NatEngine, parse_toml

    rng = random.Random(seed)
    eng = NatEngine(parse_toml('internal = ["198.18.0.0/16"]'), "203.0.113.1", seed=seed)
    ext = bytes([203, 0, 113, 1])
    outs, ins = [], []
    for i in range(flows):
        vm = bytes([198, 18, i >> 8 & 0xFF, i & 0xFF or 1])
        peer = bytes([192, 0, 2, rng.randrange(1, 255)])
        out, inb = open_flow(eng, vm, peer, 10000 + i, ext)
        outs.append(out)
        ins.append(inb)
    return eng, outs, ins


def _workload(outs: list, ins: list, packets: int) -> list:
    from nat import Side

    n = len(outs)
    return [(outs[i % n], Side.INTERNAL) if i & 1 else (ins[i % n], Side.EXTERNAL) for i in range(packets)]


def _seconds(fn, work: list) -> float:
    t0 = time.perf_counter()
    for data, side in work:
        fn(data, side, 1.0)
    return time.perf_counter() - t0


def _open_udp(eng, vm: bytes, peer: bytes, sport: int, ext: bytes) -> tuple[bytes, bytes]:
    from nat import Side

    out = udp(vm, peer, sport, 53, b"x" * 18)  # 46-byte packets
    eport = struct.unpack_from("!H", eng.process(out, Side.INTERNAL, 0.0).data, 20)[0]
    inb = udp(peer, ext, 53, eport, b"y" * 18)
    eng.process(inb, Side.EXTERNAL, 0.0)  # now established (seen both ways)
    return out, inb


def _open_tcp(eng, vm: bytes, peer: bytes, sport: int, ext: bytes) -> tuple[bytes, bytes]:
    """A handshake, then a 100-byte data segment out and its ACK in."""
    from nat import Side

    a = eng.process(tcp(vm, peer, sport, 80, 1, 0, 0x02), Side.INTERNAL, 0.0)
    eport = struct.unpack_from("!H", a.data, 20)[0]
    eng.process(tcp(peer, ext, 80, eport, 1, 2, 0x12), Side.EXTERNAL, 0.0)
    eng.process(tcp(vm, peer, sport, 80, 2, 2, 0x10), Side.INTERNAL, 0.0)
    return tcp(vm, peer, sport, 80, 2, 2, 0x18, b"x" * 100), tcp(peer, ext, 80, eport, 2, 102, 0x10)


def bench_engine(flows: int, packets: int, seed: int) -> list[list]:
    from conntrack import parse_ip
    from nat import Action, Side

    eng, outs, ins = _established(flows, seed, _open_udp)
    work = _workload(outs, ins, packets)
    t_engine = _seconds(eng.process, work)
    t0 = time.perf_counter()
    for data, _ in work:  # the references run inline: a wrapper's call would slow them, not the engine
        parse_ip(data)
    t_parse = time.perf_counter() - t0
    t0 = time.perf_counter()
    for data, _ in work:
        bytearray(data)
    t_copy = time.perf_counter() - t0
    ok = eng.counters["translated_out"] + eng.counters["translated_in"]
    assert ok >= packets, "bench workload was not translated"
    eng_tcp, outs, ins = _established(flows, seed, _open_tcp)
    t_tcp = _seconds(eng_tcp.process, _workload(outs, ins, packets))
    assert eng_tcp.process(outs[0], Side.INTERNAL, 1.0).action == Action.ACCEPT, "TCP bench workload was not translated"
    ref = packets / t_parse
    return [["conntrack.parse_ip alone (reference)", ref, 1.0],
            ["bytearray copy alone", packets / t_copy, packets / t_copy / ref],
            ["NatEngine.process (established UDP, both ways)", packets / t_engine, packets / t_engine / ref],
            ["NatEngine.process (established TCP, data out, ACK in)", packets / t_tcp, packets / t_tcp / ref]]


# ----------------------------------------------------------------------------- lab
WORKERS = "roam nat --workers 2"
NO_KERNEL_PATH = "roam nat --no-kernel-path"
WORKERS_QUEUED = "roam nat --workers 2 --no-kernel-path"
_UDP_SENDERS = 2  # iperf3 3.12 runs one thread: one client process per core, each to its own server
_IN_FLIGHT = 64  # connects each client keeps going at once: the rate is the NAT's, not one round trip's
#: accepting processes per port (SO_REUSEPORT): one could not keep up with MASQUERADE (measured:
#: its accept queue overflowed, every connect in flight waited 1 s for a SYN retransmission, the
#: machine a third idle, 13-26k/s); with two the machine is saturated (0% idle, 45k/s, no overflow)
_CONN_SERVERS = 2
_CONN_CLIENT = """
import errno, selectors, socket, sys, time
port, seconds, width = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
sel = selectors.DefaultSelector()
done = failed = 0
end = time.monotonic() + seconds
def start():
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("203.0.113.2", port))
    except BlockingIOError:
        pass
    sel.register(s, selectors.EVENT_WRITE, time.monotonic())
for _ in range(width):
    start()
while time.monotonic() < end:
    for key, _ in sel.select(0.5):
        s = key.fileobj
        sel.unregister(s)
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            done += 1
        else:
            failed += 1
        s.close()
        start()
print(done, failed)
"""
_CONN_SERVER = """
import selectors, socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # _CONN_SERVERS of these share the port
srv.bind(("203.0.113.2", int(sys.argv[1])))
srv.listen(4096)
srv.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(srv, selectors.EVENT_READ)
while True:
    sel.select()
    while True:
        try:
            c, _ = srv.accept()
        except BlockingIOError:
            break
        c.close()
"""


def _iperf_tcp(lab, vm, seconds: float) -> float:
    cp = lab.run(vm, ["iperf3", "-c", "203.0.113.2", "-p", "5201", "-t", str(seconds), "-J"], timeout=seconds + 30,
                 check=False)
    try:
        return json.loads(cp.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError):
        return float("nan")


def _iperf_udp(lab, vm, seconds: float) -> float:
    """64-byte UDP datagrams/s received, summed over _UDP_SENDERS iperf3 clients at full rate
    (once more if a client failed: an iperf3 server still closing the last test refuses one)."""
    v = _iperf_udp_once(lab, vm, seconds)
    if v != v:
        print("roam bench nat: an iperf3 UDP client failed; once more", file=sys.stderr)
        time.sleep(1.0)
        v = _iperf_udp_once(lab, vm, seconds)
    return v


def _iperf_udp_once(lab, vm, seconds: float) -> float:
    procs = [lab.popen(vm, ["iperf3", "-c", "203.0.113.2", "-p", str(5202 + i), "-t", str(seconds), "-J", "-u",
                            "-l", "64", "-b", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for i in range(_UDP_SENDERS)]
    total = 0.0
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 30)
        try:
            s = json.loads(out)["end"]["sum"]
            total += (s["packets"] - s["lost_packets"]) / s["seconds"]
        except (ValueError, KeyError):
            return float("nan")
    return total


def _idle() -> tuple[int, int]:
    """The machine's idle and total CPU time so far (/proc/stat, in ticks)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)


def _conn_rate(lab, vms: list[str], port: int, seconds: float) -> tuple[float, float]:
    """New TCP connections/s: _UDP_SENDERS connect/close clients (one per core, dealt over
    ``vms``), each keeping _IN_FLIGHT connects going, for ``seconds``; connects that failed
    are not counted.  Also the share of the machine left idle meanwhile: none left, the
    generator shares the cores with the path; some left with the path's process at one core,
    that process is the limit."""
    i0, t0 = _idle()
    rate = _conn_count(lab, vms, port, seconds) / seconds
    i1, t1 = _idle()
    return rate, (i1 - i0) / max(1, t1 - t0)


def _conn_count(lab, vms: list[str], port: int, seconds: float) -> float:
    procs = [lab.popen(vms[i % len(vms)], [sys.executable, "-c", _CONN_CLIENT, str(port), str(seconds),
                                           str(_IN_FLIGHT)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       text=True) for i in range(_UDP_SENDERS)]
    n = 0
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 30)
        try:
            n += int(out.split()[0])
        except (ValueError, IndexError):
            return float("nan")
    return n


def bench_lab(seconds: float) -> list[list]:
    from tools.lab.netlab import Lab, probe

    why = probe()
    if why:
        print(f"roam bench nat: lab part skipped: {why}", file=sys.stderr)
        return []
    with tempfile.TemporaryDirectory(prefix="roam-bench-nat-") as d:
        return _bench_lab(Lab, d, seconds)


def _start_nat(lab, host, conf: str, d: str, queue: int, extra: list[str]):
    sd = os.path.join(d, f"q{queue}")
    os.makedirs(sd)
    nat = lab.popen(host, [sys.executable, "-m", "tools.cli", "nat", "--config", conf, "--external", "ext0",
                           "--queue", str(queue), "--state-dir", sd, "--no-restore", *extra], cwd=ROOT,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not os.path.exists(os.path.join(sd, f"nat-q{queue}.status.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    return nat


def _bench_lab(Lab, d: str, seconds: float) -> list[list]:
    conf = os.path.join(d, "nat.conf")
    with open(conf, "w") as f:
        f.write("[host]\nip = 198.18.0.1\nnetmask = 255.255.255.0\n")
    rows = []
    with Lab("roam") as lab:
        vm, vm2, host, inet = lab.ns("benchvm"), lab.ns("benchvm2"), lab.ns("benchhost"), lab.ns("benchinet")
        for v, port, ip in ((vm, "hv0", "198.18.0.2/24"), (vm2, "hv1", "198.18.0.3/24")):
            lab.veth(v, "vm0", host, port)
            lab.addr(v, "vm0", ip)
            lab.route(v, "default", "198.18.0.1")
            lab.sysctl(v, "net.ipv4.ip_local_port_range", "1024 65000")
        lab.bridge(host, "br0", ["hv0", "hv1"])
        lab.veth(host, "ext0", inet, "inet0")
        lab.addr(host, "br0", "198.18.0.1/24")
        lab.addr(host, "ext0", "203.0.113.1/24")
        lab.addr(inet, "inet0", "203.0.113.2/24")
        lab.sysctl(host, "net.ipv4.ip_forward", "1")
        servers = [lab.popen(inet, ["iperf3", "-s", "-B", "203.0.113.2", "-p", str(5201 + i)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(1 + _UDP_SENDERS)]
        ports = {}
        for i, name in enumerate(("kernel MASQUERADE", "roam nat", "roam nat --no-offload",
                                  "roam nat --no-offload --gso", WORKERS, NO_KERNEL_PATH, WORKERS_QUEUED)):
            ports[name] = 6000 + i  # a port each: no tuple of one run meets another's
            servers += [lab.popen(inet, [sys.executable, "-c", _CONN_SERVER, str(ports[name])],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(_CONN_SERVERS)]
        time.sleep(0.5)

        def measure(name, status=None):
            one = (_iperf_tcp(lab, vm, seconds), _iperf_udp(lab, vm, seconds),
                   *_conn_rate(lab, [vm], ports[name], seconds))
            if status:
                KEPT_UP.append(_kept_up(lab, host, status))
            before = _decided(status, settle=True)
            two, _ = _conn_rate(lab, [vm, vm2], ports[name], seconds)
            if status:
                TWO_VMS.append(_two_vms_line(two * seconds, _decided(status, settle=True) - before))
            return (*one, two)
        results = {}
        lab.run(host, ["iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-o", "ext0", "-j", "MASQUERADE"])
        results["kernel MASQUERADE"] = measure("kernel MASQUERADE")
        lab.run(host, ["iptables-legacy", "-t", "nat", "-F"])
        lab.run(host, ["conntrack", "-F"], check=False)
        for q, (name, extra) in zip((8, 9, 11, 14, 12, 13), (("roam nat", []), (WORKERS, ["--workers", "2"]),
                                                              (NO_KERNEL_PATH, ["--no-kernel-path"]),
                                                              (WORKERS_QUEUED, ["--workers", "2", "--no-kernel-path"]),
                                                          ("roam nat --no-offload", ["--no-offload"]),
                                                          ("roam nat --no-offload --gso", ["--no-offload", "--gso"]))):
            nat = _start_nat(lab, host, conf, d, q, extra)  # --workers 2 on queues 9 and 10, 14 and 15
            results[name] = measure(name, os.path.join(d, f"q{q}", f"nat-q{q}.status.json")
                                    if name == "roam nat" else None)
            lab.stop(nat)
            lab.run(host, ["conntrack", "-F"], check=False)
        for s in servers:
            lab.stop(s)
        ref = results["kernel MASQUERADE"]
        for name, vals in results.items():
            row: list = [name]
            for v, r in zip(vals[:3], ref):
                row += [v, v / r if r else float("nan")]
            rows.append(row + [round(100 * vals[3]), vals[4], vals[4] / ref[4] if ref[4] else float("nan")])
    return rows


#: (filled by bench_lab) how the default run's learning of the kernel path's flows went
KEPT_UP: list[str] = []
#: (filled by bench_lab) how many of the two VMs' new flows the default run queued and decided itself
TWO_VMS: list[str] = []


def _decided(status_path: str | None, settle: bool = False) -> int:
    """Flows roam decided itself (queued, not the kernel path's) per its status file; ``settle``:
    first wait for a status written 1.5 s after now (the count is from the queued packets, never
    behind the load, unlike the learning that _kept_up waits for)."""
    if not status_path:
        return 0
    after = time.time() + 1.5
    deadline = time.monotonic() + (10 if settle else 0)
    while True:
        try:
            fresh = os.stat(status_path).st_mtime > after
            with open(status_path) as f:
                n = (json.load(f).get("offload") or {}).get("offloaded", 0)
        except (OSError, ValueError):
            fresh, n = False, 0
        if fresh or time.monotonic() >= deadline:
            return n
        time.sleep(0.2)


def _two_vms_line(connections: float, decided: int) -> str:
    return (f"roam nat, new connections from two VMs whose kernels pick source ports independently: roam decided "
            f"{decided:,} of {connections:,.0f} new flows itself ({100 * decided / max(1, connections):.0f}%: a port "
            "another VM held, or an endpoint mapped elsewhere); the kernel path took the rest")


def _kept_up(lab, host: str, status_path: str) -> str:
    """Whether roam learned the kernel path's flows (from their NEW events) as fast as the kernel
    made them: the status (written every second, once roam's main loop is through its events)
    once three writes after the load agree (at most 60 s), beside the kernel's own count."""
    def read() -> tuple[float, dict]:
        try:
            with open(status_path) as f:
                return os.stat(status_path).st_mtime, json.load(f).get("offload") or {}
        except (OSError, ValueError):
            return 0.0, {}
    t0, wall = time.monotonic(), time.time()
    seen: list[int] = []
    st: dict = {}
    last = 0.0
    while time.monotonic() < t0 + 60 and not (len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]):
        time.sleep(0.5)
        mtime, fresh = read()
        if mtime > wall and mtime > last:
            last, st = mtime, fresh
            seen.append(st.get("flows", 0))
    settled = time.monotonic() - t0
    out = lab.run(host, ["conntrack", "-C"], check=False).stdout.strip()
    return (f"roam nat's kernel path after the new-connection load: roam holds {st.get('flows', 0):,} flows, the "
            f"kernel's table {out or '?'} entries (settled {settled:.1f} s after the load); flows the kernel NATed "
            f"and roam learned {st.get('kernel_flows', 0):,}, clashes {st.get('kernel_clashes', 0)}, event "
            f"losses {st.get('events_lost', 0)} (repaired by a reconciliation's dump), flows roam decided "
            f"{st.get('offloaded', 0):,}")


def workers_line(rows: list[list]) -> str:
    """New connections/s with two workers as ratios to one process (same run): with the kernel
    path (the defaults), and with every new flow queued (what workers share out)."""
    by = {r[0]: r for r in rows}
    parts = []
    for two, one in ((WORKERS, "roam nat"), (WORKERS_QUEUED, NO_KERNEL_PATH)):
        if two in by and one in by:
            w, o = by[two][5], by[one][5]
            parts.append(f"{two}: {w:,.0f} = {w / o if o else float('nan'):.2f}x one process ({one}, {o:,.0f}/s)")
    if not parts:
        return ""
    return "New TCP connections/s with two workers (target 1.6x one worker): " + "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    rows = bench_engine(args.flows, args.packets, args.seed)
    print(f"NAT engine alone, one core, {args.flows} established UDP flows, {args.packets:,} packets "
          "(target 500,000 translations/s)")
    print(render(["loop", "packets/s", "ratio to parse"], rows))
    if not args.engine_only:
        lab = bench_lab(args.seconds)
        if lab:
            print()
            print(f"Lab: VMs -> host -> internet, {args.seconds:g} s per figure (2-core machine: noisy). TCP: one "
                  f"iperf3 stream; UDP: {_UDP_SENDERS} iperf3 clients (one per core, -l 64 -b 0), packets received; "
                  f"new connections: {_UDP_SENDERS} Python connect/close clients with {_IN_FLIGHT} connects in "
                  f"flight each and {_CONN_SERVERS} accepting servers, the same against each, all in one VM and then "
                  "one client in each of two VMs; 'idle': the machine's idle share meanwhile (one VM; 0: the "
                  "generator and the path share saturated cores)")
            print(render(["path", "TCP Mbit/s", "x MASQ", "UDP 64 B pkt/s", "x MASQ", "new TCP conn/s", "x MASQ",
                          "idle %", "new conn/s, 2 VMs", "x MASQ"], lab))
            line = workers_line(lab)
            if line:
                print(line)
            for line in KEPT_UP + TWO_VMS:
                print(line)
    return 0
