"""Shared helpers for the NAT tests: scapy builders and independent checksum checks.

(A helper, not a test file: its self-check is in test_nat_engine.py.)
"""
from __future__ import annotations

from scapy.all import ICMP, IP, TCP, UDP, raw
from scapy.layers.inet import IPerror, TCPerror, UDPerror, ICMPerror

from nat import NatEngine, Side, parse_toml

EXT = "203.0.113.1"
VM = "198.18.0.2"
VM2 = "198.18.0.3"
PEER = "192.0.2.9"
PEER2 = "192.0.2.10"

BASE_TOML = 'internal = ["198.18.0.0/24"]\n'


def engine(extra: str = "", ext: str | None = EXT, seed: int = 7) -> NatEngine:
    return NatEngine(parse_toml(BASE_TOML + extra), ext, seed=seed)


def tcp(src, dst, sport, dport, flags="S", payload=b"", **kw) -> bytes:
    return raw(IP(src=src, dst=dst, **kw) / TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=0 if flags == "S" else 1) / payload)


def udp(src, dst, sport, dport, payload=b"x", chksum=None) -> bytes:
    u = UDP(sport=sport, dport=dport)
    if chksum is not None:
        u.chksum = chksum
    return raw(IP(src=src, dst=dst) / u / payload)


def ping(src, dst, ident, reply=False) -> bytes:
    return raw(IP(src=src, dst=dst) / ICMP(type=0 if reply else 8, id=ident, seq=1) / b"abcdefgh")


def out(e: NatEngine, data: bytes, now: float = 0.0):
    return e.process(data, Side.INTERNAL, now)


def inn(e: NatEngine, data: bytes, now: float = 0.0):
    return e.process(data, Side.EXTERNAL, now)


def checksums_ok(data: bytes) -> bool:
    """Recompute every checksum with scapy from scratch and compare with what is in ``data``."""
    p = IP(data)
    fresh = IP(data)
    layers = []
    for layer in (IP, TCP, UDP, ICMP, IPerror, TCPerror, UDPerror, ICMPerror):
        if layer in p:
            layers.append(layer)
    for layer in layers:
        if layer in (IPerror, TCPerror, UDPerror, ICMPerror):
            continue  # quoted headers: checked separately (they may be cut short)
        if layer is UDP and p[UDP].chksum == 0:
            continue  # no checksum
        del fresh[layer].chksum
    fresh = IP(raw(fresh))
    for layer in layers:
        if layer in (IPerror, TCPerror, UDPerror, ICMPerror):
            continue
        if p[layer].chksum != fresh[layer].chksum:
            return False
    return True

