"""NAT speed: the engine alone in-process (established-flow translations/s), and in a namespace
lab (VM -> host -> internet) kernel MASQUERADE, a bare NFQUEUE accept-all loop (with
MASQUERADE doing the NAT) and `roam nat`, each measured with iperf3 (TCP throughput and
64-byte UDP packets/s received). Every figure is also given as a ratio to kernel MASQUERADE
(lab) or to a bare parse loop (engine). Printed, never asserted."""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
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
def bench_engine(flows: int, packets: int, seed: int) -> list[list]:
    from conntrack import parse_ip
    from nat import NatEngine, Side, parse_toml

    rng = random.Random(seed)
    eng = NatEngine(parse_toml('internal = ["198.18.0.0/16"]'), "203.0.113.1", seed=seed)
    ext = bytes([203, 0, 113, 1])
    outs, ins = [], []
    for i in range(flows):
        vm = bytes([198, 18, i >> 8 & 0xFF, i & 0xFF or 1])
        peer = bytes([192, 0, 2, rng.randrange(1, 255)])
        sport = 10000 + i
        p = udp(vm, peer, sport, 53, b"x" * 18)  # 46-byte packets
        a = eng.process(p, Side.INTERNAL, 0.0)
        eport = struct.unpack_from("!H", a.data, 20)[0]
        outs.append(p)
        ins.append(udp(peer, ext, 53, eport, b"y" * 18))
        eng.process(ins[-1], Side.EXTERNAL, 0.0)  # now established (seen both ways)
    work = [(outs[i % flows], Side.INTERNAL) if i & 1 else (ins[i % flows], Side.EXTERNAL) for i in range(packets)]
    proc = eng.process
    t0 = time.perf_counter()
    for data, side in work:
        proc(data, side, 1.0)
    t_engine = time.perf_counter() - t0
    t0 = time.perf_counter()
    for data, side in work:
        parse_ip(data)
    t_parse = time.perf_counter() - t0
    t0 = time.perf_counter()
    for data, side in work:
        bytearray(data)
    t_copy = time.perf_counter() - t0
    ok = eng.counters["translated_out"] + eng.counters["translated_in"]
    assert ok >= packets, "bench workload was not translated"
    t_tcp = _bench_engine_tcp(flows, packets, seed)
    ref = packets / t_parse
    return [["conntrack.parse_ip alone (reference)", ref, 1.0],
            ["bytearray copy alone", packets / t_copy, packets / t_copy / ref],
            ["NatEngine.process (established UDP, both ways)", packets / t_engine, packets / t_engine / ref],
            ["NatEngine.process (established TCP, data out, ACK in)", packets / t_tcp, packets / t_tcp / ref]]


def _bench_engine_tcp(flows: int, packets: int, seed: int) -> float:
    """Seconds to translate `packets` segments of established TCP flows (100-byte data out, ACKs in)."""
    from nat import Action, NatEngine, Side, parse_toml

    rng = random.Random(seed)
    eng = NatEngine(parse_toml('internal = ["198.18.0.0/16"]'), "203.0.113.1", seed=seed)
    ext = bytes([203, 0, 113, 1])
    outs, ins = [], []
    for i in range(flows):
        vm = bytes([198, 18, i >> 8 & 0xFF, i & 0xFF or 1])
        peer = bytes([192, 0, 2, rng.randrange(1, 255)])
        sport = 10000 + i
        a = eng.process(tcp(vm, peer, sport, 80, 1, 0, 0x02), Side.INTERNAL, 0.0)
        eport = struct.unpack_from("!H", a.data, 20)[0]
        eng.process(tcp(peer, ext, 80, eport, 1, 2, 0x12), Side.EXTERNAL, 0.0)
        eng.process(tcp(vm, peer, sport, 80, 2, 2, 0x10), Side.INTERNAL, 0.0)
        outs.append(tcp(vm, peer, sport, 80, 2, 2, 0x18, b"x" * 100))
        ins.append(tcp(peer, ext, 80, eport, 2, 102, 0x10))
    work = [(outs[i % flows], Side.INTERNAL) if i & 1 else (ins[i % flows], Side.EXTERNAL) for i in range(packets)]
    proc = eng.process
    t0 = time.perf_counter()
    for data, side in work:
        proc(data, side, 1.0)
    t = time.perf_counter() - t0
    assert proc(outs[0], Side.INTERNAL, 1.0).action == Action.ACCEPT, "TCP bench workload was not translated"
    return t


# ----------------------------------------------------------------------------- lab
_BARE = ("import sys\nfrom netfilterqueue import NetfilterQueue\nq = NetfilterQueue()\n"
         "q.bind(int(sys.argv[1]), lambda p: p.accept(), max_len=4096)\n"
         "try:\n    q.run()\nexcept KeyboardInterrupt:\n    pass\n")


def _iperf(lab, vm, seconds: float, udp: bool) -> float:
    argv = ["iperf3", "-c", "203.0.113.2", "-t", str(seconds), "-J"]
    if udp:
        argv += ["-u", "-l", "64", "-b", "0"]
    cp = lab.run(vm, argv, timeout=seconds + 30, check=False)
    try:
        d = json.loads(cp.stdout)
        s = d["end"]["sum"] if udp else d["end"]["sum_received"]
    except (ValueError, KeyError):
        return float("nan")
    if udp:
        return (s["packets"] - s["lost_packets"]) / s["seconds"]
    return s["bits_per_second"] / 1e6


def bench_lab(seconds: float) -> list[list]:
    from tools.netlab import Lab, probe

    why = probe()
    if why:
        print(f"roam bench nat: lab part skipped: {why}", file=sys.stderr)
        return []
    with tempfile.TemporaryDirectory(prefix="roam-bench-nat-") as d:
        return _bench_lab(Lab, d, seconds)


def _bench_lab(Lab, d: str, seconds: float) -> list[list]:
    conf = os.path.join(d, "nat.conf")
    with open(conf, "w") as f:
        f.write("[host]\nip = 198.18.0.1\nnetmask = 255.255.255.0\n")
    rows = []
    with Lab("roam") as lab:
        vm, host, inet = lab.ns("benchvm"), lab.ns("benchhost"), lab.ns("benchinet")
        lab.veth(vm, "vm0", host, "hv0")
        lab.veth(host, "ext0", inet, "inet0")
        lab.addr(vm, "vm0", "198.18.0.2/24")
        lab.route(vm, "default", "198.18.0.1")
        lab.addr(host, "hv0", "198.18.0.1/24")
        lab.addr(host, "ext0", "203.0.113.1/24")
        lab.addr(inet, "inet0", "203.0.113.2/24")
        lab.sysctl(host, "net.ipv4.ip_forward", "1")
        srv = lab.popen(inet, ["iperf3", "-s", "-B", "203.0.113.2"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        masq = ["-t", "nat", "-A", "POSTROUTING", "-o", "ext0", "-j", "MASQUERADE"]
        results = {}
        # 1. kernel MASQUERADE
        lab.run(host, ["iptables-legacy", *masq])
        results["kernel MASQUERADE"] = (_iperf(lab, vm, seconds, False), _iperf(lab, vm, seconds, True))
        # 2. bare NFQUEUE accept-all on the same hooks as roam nat, MASQUERADE doing the NAT
        q = ["-j", "NFQUEUE", "--queue-num", "7"]
        lab.run(host, ["iptables-legacy", "-t", "raw", "-A", "PREROUTING", "-i", "ext0", *q])
        lab.run(host, ["iptables-legacy", "-t", "mangle", "-A", "POSTROUTING", "-o", "ext0", *q])
        bare = lab.popen(host, [sys.executable, "-c", _BARE, "7"])
        time.sleep(0.5)
        results["bare NFQUEUE accept loop"] = (_iperf(lab, vm, seconds, False), _iperf(lab, vm, seconds, True))
        lab.stop(bare, sig=signal.SIGINT)
        lab.run(host, ["iptables-legacy", "-t", "raw", "-F"])
        lab.run(host, ["iptables-legacy", "-t", "mangle", "-F"])
        lab.run(host, ["iptables-legacy", "-t", "nat", "-F"])
        # 3. roam nat
        nat = lab.popen(host, [sys.executable, "-m", "tools.cli", "nat", "--config", conf, "--external", "ext0",
                               "--queue", "8", "--state-dir", d, "--no-restore"], cwd=ROOT,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not os.path.exists(os.path.join(d, "nat-q8.status.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
        results["roam nat"] = (_iperf(lab, vm, seconds, False), _iperf(lab, vm, seconds, True))
        lab.stop(nat)
        # 4. roam nat --gso: our own NFQUEUE client, GSO super-packets (NFQA_CFG_F_GSO)
        gd = os.path.join(d, "gso")
        os.makedirs(gd)
        nat = lab.popen(host, [sys.executable, "-m", "tools.cli", "nat", "--config", conf, "--external", "ext0",
                               "--queue", "9", "--state-dir", gd, "--no-restore", "--gso"], cwd=ROOT,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not os.path.exists(os.path.join(gd, "nat-q9.status.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
        results["roam nat --gso"] = (_iperf(lab, vm, seconds, False), _iperf(lab, vm, seconds, True))
        lab.stop(nat)
        lab.stop(srv)
        ref_t, ref_u = results["kernel MASQUERADE"]
        for name, (t, u) in results.items():
            rows.append([name, t, t / ref_t if ref_t else float("nan"), u, u / ref_u if ref_u else float("nan")])
        bt, bu = results["bare NFQUEUE accept loop"]
        rt, ru = results["roam nat"]
        rows.append(["roam nat / bare loop", "", rt / bt if bt else float("nan"), "", ru / bu if bu else float("nan")])
        gt, gu = results["roam nat --gso"]
        rows.append(["roam nat --gso / bare loop", "", gt / bt if bt else float("nan"), "",
                     gu / bu if bu else float("nan")])
    return rows


def run(args: argparse.Namespace) -> int:
    rows = bench_engine(args.flows, args.packets, args.seed)
    print(f"NAT engine alone, one core, {args.flows} established UDP flows, {args.packets:,} packets "
          "(target 500,000 translations/s)")
    print(render(["loop", "packets/s", "ratio to parse"], rows))
    if not args.engine_only:
        lab = bench_lab(args.seconds)
        if lab:
            print()
            print(f"Lab: VM -> host -> internet, iperf3 {args.seconds:g} s per figure (2-core machine: noisy)")
            print(render(["path", "TCP Mbit/s", "x MASQUERADE", "UDP 64 B pkt/s", "x MASQUERADE"], lab))
    return 0
