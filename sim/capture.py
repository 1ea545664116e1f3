"""Scenario connections from a capture of the VM's traffic (a scenario's ``[[capture]]``).

Each TCP or UDP flow in the pcap becomes one connection: the side that sent the
first packet (or the SYN) is the client, its mean request and response sizes and
its pace become the connection's.
"""
from __future__ import annotations

import ipaddress
from collections import Counter

from conntrack import ParseError, Proto, TcpFlag
from conntrack.flow import FlowTuple

from .scenario import ConnSpec, PeerSpec


def read_capture(path: str) -> list:
    """``(time, packet)`` for every IPv4 TCP/UDP packet of the pcap at ``path`` (others skipped).

    Raises OSError, or conntrack.pcap.CaptureError for a file that is not a capture."""
    from conntrack.pcap import CaptureError, read_pcap, record_packet

    packets = []
    with open(path, "rb") as f:
        for rec in read_pcap(f):
            try:
                pkt = record_packet(rec)
            except CaptureError:
                raise
            except ParseError:
                continue
            if pkt is not None and pkt.family == 4 and pkt.proto in (Proto.TCP, Proto.UDP) and pkt.l4 >= 0:
                packets.append((rec.time, pkt))
    return packets


def flows_from_capture(packets, vm_addr, offset, latency, limit, min_interval, peers, taken, duration, prefix):
    """Group packets into flows; the side that sent the first packet (or the SYN) is the client."""
    if vm_addr is None:  # the address in most flows is the VM's
        seen: Counter[bytes] = Counter()
        for _, p in packets:
            seen[p.src] += 1
            seen[p.dst] += 1
        vm = seen.most_common(1)[0][0]
    else:
        vm = ipaddress.IPv4Address(vm_addr).packed
    t0 = packets[0][0]
    flows: dict[bytes, dict] = {}
    for t, p in packets:
        if vm not in (p.src, p.dst):
            continue
        ft = FlowTuple(p.proto, p.src, p.dst, p.sport, p.dport)
        key = min(ft.key(), ft.reversed().key())
        f = flows.get(key)
        if f is None:
            if len(flows) >= limit:
                continue
            client_is_src = True
            if p.proto == Proto.TCP and p.tcp_flags & TcpFlag.SYN and p.tcp_flags & TcpFlag.ACK:
                client_is_src = False
            f = flows[key] = {"first": t, "last": t, "client": (p.src, p.sport) if client_is_src else (p.dst, p.dport),
                              "server": (p.dst, p.dport) if client_is_src else (p.src, p.sport), "proto": p.proto,
                              "cbytes": [], "sbytes": []}
        f["last"] = t
        if p.payload_len:
            (f["cbytes"] if (p.src, p.sport) == f["client"] else f["sbytes"]).append(p.payload_len)
    by_addr = {ipaddress.IPv4Address(p.address).packed: p.name for p in peers}
    out = []
    for n, f in enumerate(flows.values(), 1):
        outbound = f["client"][0] == vm
        other = f["server"][0] if outbound else f["client"][0]
        name = by_addr.get(other)
        if name is None:
            name = "peer-" + str(ipaddress.IPv4Address(other)).replace(".", "-")
            peers.append(PeerSpec(name, str(ipaddress.IPv4Address(other)), latency))
            by_addr[other] = name
        requests = max(1, len(f["cbytes"]))
        span = f["last"] - f["first"]
        interval = max(min_interval, span / requests) if span > 0 else min_interval
        start = offset + (f["first"] - t0)
        if start >= duration:
            continue
        cid = f"{prefix}-{n}"
        while cid in taken:
            cid += "'"
        taken.add(cid)
        req = int(min(1400, max(1, sum(f["cbytes"]) / len(f["cbytes"])))) if f["cbytes"] else 100
        resp = int(min(1400, max(1, sum(f["sbytes"]) / len(f["sbytes"])))) if f["sbytes"] else 100
        out.append(ConnSpec(cid, "outbound" if outbound else "inbound", f["proto"], name, f["server"][1],
                            round(start, 6), round(interval, 6), req, resp))
    return out
