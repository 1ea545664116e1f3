"""Connection tracker speed and memory: packets/s tracked from memory and from a pcap, and
bytes per entry at 1,000,000 entries, against references measured in the same run (a bare
parse-and-dict-lookup loop; the kernel's own nf_conntrack object size from /proc/slabinfo)."""
from __future__ import annotations

import argparse
import gc
import io
import os
import random
import struct
import sys
import time

from conntrack import ConnTable, parse_ip
from conntrack.build import tcp, udp
from conntrack.pcap import read_pcap, record_packet, write_pcap

from .table import render


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flows", type=int, default=2000, help="TCP flows in the speed workload (default %(default)s)")
    p.add_argument("--data", type=int, default=40, help="data segments per flow and direction (default %(default)s)")
    p.add_argument("--entries", type=int, default=1_000_000, help="entries for the memory figure (default %(default)s)")
    p.add_argument("--seed", type=int, default=1)


def workload(flows: int, data: int, seed: int) -> list[bytes]:
    """Interleaved TCP flows: handshake, data both ways, FIN teardown."""
    rng = random.Random(seed)
    per_flow = []
    for i in range(flows):
        a = bytes([198, 18, (i >> 8) & 0xFF, i & 0xFF])
        b = bytes([203, 0, 113, rng.randrange(1, 255)])
        sp, dp = 10000 + i % 50000, 80
        s = [tcp(a, b, sp, dp, 1, 0, 0x02, b""), tcp(b, a, dp, sp, 1, 2, 0x12, b""),
             tcp(a, b, sp, dp, 2, 2, 0x10, b"")]
        for k in range(data):
            s.append(tcp(a, b, sp, dp, 2 + k * 100, 2, 0x18, b"x" * 100))
            s.append(tcp(b, a, dp, sp, 2, 2 + (k + 1) * 100, 0x10, b""))
        s += [tcp(a, b, sp, dp, 9, 2, 0x11, b""), tcp(b, a, dp, sp, 2, 10, 0x11, b""),
              tcp(a, b, sp, dp, 10, 3, 0x10, b"")]
        per_flow.append(s)
    out = []
    cursors = [0] * flows
    live = list(range(flows))
    while live:  # interleave like a busy router would see them
        j = rng.randrange(len(live))
        f = live[j]
        out.append(per_flow[f][cursors[f]])
        cursors[f] += 1
        if cursors[f] == len(per_flow[f]):
            live[j] = live[-1]
            live.pop()
    return out


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def _bare(packets: list[bytes]) -> float:
    """Reference: parse and one dict lookup per packet, no state."""
    seen: dict[bytes, int] = {}
    t0 = time.perf_counter()
    for raw in packets:
        parse_ip(raw)
        k = raw[9:10] + raw[12:20] + raw[20:24]
        seen[k] = seen.get(k, 0) + 1
    return time.perf_counter() - t0


def _tracked(packets: list[bytes]) -> float:
    table = ConnTable(capacity=len(packets) + 1)
    table.journal = frozenset()
    t0 = time.perf_counter()
    now = 0.0
    for raw in packets:
        now += 1e-5
        table.track(parse_ip(raw), now)
    return time.perf_counter() - t0


def _from_capture(blob: bytes) -> tuple[float, int]:
    table = ConnTable()
    table.journal = frozenset()
    t0 = time.perf_counter()
    n = 0
    for rec in read_pcap(io.BytesIO(blob)):
        # the bench's own capture holds IP packets only; no check inside the timed loop
        table.track(record_packet(rec), rec.time)  # type: ignore[arg-type]
        n += 1
    return time.perf_counter() - t0, n


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory(entries: int) -> tuple[float, int]:
    """Bytes of resident memory per entry, tracking `entries` distinct one-packet UDP flows."""
    gc.collect()
    table = ConnTable(capacity=entries)
    table.journal = frozenset()
    head = bytearray(udp(bytes([198, 18, 0, 0]), bytes([203, 0, 113, 1]), 0, 53, checksum=False))
    before = _rss()
    step = max(1, entries // 20)
    for i in range(entries):
        head[14], head[15] = (i >> 8) & 0xFF, i & 0xFF  # 198.18.x.y, then the source port
        struct.pack_into("!H", head, 20, 1024 + (i >> 16))
        table.track(parse_ip(bytes(head)), 1.0)
        if i % step == 0 and sys.stderr.isatty():
            print(f"\r  filling table: {i * 100 // entries:3d}%", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print("\r  filling table: 100%", file=sys.stderr)
    gc.collect()
    used = _rss() - before
    return used / len(table), len(table)


def _kernel_entry_size() -> int | None:
    try:
        with open("/proc/slabinfo") as f:
            for row in f:
                if row.startswith("nf_conntrack "):
                    return int(row.split()[3])  # objsize (slab slot, bytes)
    except OSError:
        return None
    return None


def run(args: argparse.Namespace) -> int:
    print(f"building workload: {args.flows} TCP flows x {args.data} data segments each way ...", file=sys.stderr)
    packets = workload(args.flows, args.data, args.seed)
    buf = io.BytesIO()
    write_pcap(buf, ((i * 1e-5, p) for i, p in enumerate(packets)))
    blob = buf.getvalue()
    n = len(packets)
    print(f"timing {n:,} packets ...", file=sys.stderr)
    bare = min(_bare(packets) for _ in range(3))
    tracked = min(_tracked(packets) for _ in range(3))
    cap, _ = min(_from_capture(blob) for _ in range(3))
    rows = [
        ["parse + dict lookup (reference)", n, _rate(n, bare), 1.0],
        ["parse + track, from memory", n, _rate(n, tracked), bare / tracked],
        ["read pcap + parse + track", n, _rate(n, cap), bare / cap],
    ]
    print(render(["run", "packets", "packets/s", "ratio to reference"], rows))
    print()
    per_entry, count = _memory(args.entries)
    kernel = _kernel_entry_size()
    mrows = [["roam ConnTable (one-packet UDP flows)", count, per_entry, per_entry / kernel if kernel else "n/a"]]
    if kernel:
        mrows.append(["Linux nf_conntrack slab object (/proc/slabinfo)", "-", float(kernel), 1.0])
    print(render(["memory", "entries", "bytes/entry", "ratio to kernel"], mrows))
    print(f"\npython {sys.version.split()[0]}; one core; best of 3 for speed; memory is resident-set growth / entries.")
    return 0
