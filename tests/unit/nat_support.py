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



# ----------------------------------------------------------------------------- NAT66
EXT6 = "2001:db8:ff::1"
VM6 = "2001:db8:1::2"
VM6B = "2001:db8:1::3"
PEER6 = "2001:db8:2::9"
PEER6B = "2001:db8:2::10"

BASE6_TOML = BASE_TOML + 'nat66 = true\ninternal6 = ["2001:db8:1::/64"]\n'


def engine6(extra: str = "", ext6: str | None = EXT6, seed: int = 7) -> NatEngine:
    return NatEngine(parse_toml(BASE6_TOML + extra), EXT, seed=seed, external_ip6=ext6)


def tcp6(src, dst, sport, dport, flags="S", payload=b"") -> bytes:
    from scapy.layers.inet6 import IPv6
    return raw(IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=1000,
                                            ack=0 if flags == "S" else 1) / payload)


def udp6(src, dst, sport, dport, payload=b"x") -> bytes:
    from scapy.layers.inet6 import IPv6
    return raw(IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload)


def ping6(src, dst, ident, reply=False) -> bytes:
    from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
    echo = ICMPv6EchoReply if reply else ICMPv6EchoRequest
    return raw(IPv6(src=src, dst=dst) / echo(id=ident, seq=1, data=b"abcdefgh"))


def checksums_ok6(data: bytes) -> bool:
    """The transport (TCP, UDP, ICMPv6) checksum of an IPv6 packet without extension headers,
    recomputed by scapy's ``in6_chksum``; for an ICMPv6 error, the quoted packet's too when the
    quote is whole."""
    from scapy.layers.inet6 import IPv6, in6_chksum
    nh, plen = data[6], int.from_bytes(data[4:6], "big")
    at = {6: 16, 17: 6, 58: 2}[nh]
    seg = bytearray(data[40:40 + plen])
    stored = int.from_bytes(seg[at:at + 2], "big")
    seg[at:at + 2] = b"\0\0"
    want = in6_chksum(nh, IPv6(data[:40]), bytes(seg))
    if nh == 17 and want == 0:
        want = 0xFFFF
    if stored != want:
        return False
    if nh == 58 and data[40] < 128:  # an error: its quote
        quote = data[48:40 + plen]
        if len(quote) >= 40 and 40 + int.from_bytes(quote[4:6], "big") == len(quote):
            return checksums_ok6(quote)
    return True
