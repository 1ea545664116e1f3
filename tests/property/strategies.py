"""Hypothesis strategies that build packets and frames as bytes (with scapy).

Shared by the conntrack, NAT and tunnel property tests.  Everything here returns
``bytes`` (what NFQUEUE, a TAP device or a capture would hand over), so a test never
depends on scapy objects.  Strategies that take a ``pool`` draw addresses and ports
from a small set, so generated traffic collides on flows the way real traffic does.

Main entry points:

* ``ipv4_packets()``, ``ipv6_packets()``, ``ip_packets()``: valid TCP/UDP/ICMP(v6)
  packets; IPv4 may carry options, IPv6 an extension-header chain.
* ``icmp_errors()``: an ICMP/ICMPv6 error quoting a packet, cut the way routers cut it.
* ``ipv4_fragments()``: the fragments of one IPv4 packet, in order.
* ``ethernet_frames(payloads)``: Ethernet II with 0, 1 or 2 VLAN tags (802.1Q, 802.1ad),
  padded to the 60-byte minimum as a NIC would.
* ``mutated(valid)``: a valid packet cut, bit-flipped, spliced with random bytes.
* ``flows()`` / ``packet_and_reply()``: a flow's parameters, and one packet each way.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from hypothesis import strategies as st
from scapy.all import (  # noqa: F401 - re-exported for tests building their own
    ICMP, IP, TCP, UDP, Dot1AD, Dot1Q, Ether, ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest,
    ICMPv6PacketTooBig, ICMPv6TimeExceeded, IPOption_NOP, IPOption_RR, IPv6, IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, Raw, fragment, raw,
)
from scapy.layers.ipsec import AH

# ------------------------------------------------------------------ addresses and ports
#: Documentation and benchmarking ranges only (see DESIGN.md).
V4_POOL = ("192.0.2.1", "192.0.2.2", "198.51.100.7", "203.0.113.9", "198.18.0.5", "198.19.255.254")
V6_POOL = ("2001:db8::1", "2001:db8::2", "2001:db8:1::7", "2001:db8:ffff::9")
PORT_POOL = (53, 80, 443, 1024, 40000, 65535)


def ipv4_addresses(pool: bool = False) -> st.SearchStrategy[str]:
    if pool:
        return st.sampled_from(V4_POOL)
    return st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))


def ipv6_addresses(pool: bool = False) -> st.SearchStrategy[str]:
    if pool:
        return st.sampled_from(V6_POOL)
    return st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))


def ports(pool: bool = False) -> st.SearchStrategy[int]:
    return st.sampled_from(PORT_POOL) if pool else st.integers(0, 65535)


#: TCP flag combinations that occur on the wire (and a few that should not).
TCP_FLAGS = ("S", "SA", "A", "PA", "F", "FA", "R", "RA", "", "SF", "FPU")
ICMP4_QUERY = {8: 0, 13: 14, 15: 16, 17: 18}
ICMP6_QUERY = {128: 129}

payloads = st.binary(max_size=48)


# ------------------------------------------------------------------ flows
@dataclass(frozen=True)
class Flow:
    """Enough to build a packet of a flow in either direction."""

    family: int
    proto: str  # "tcp", "udp", "icmp" (ICMP or ICMPv6 echo-like query)
    src: str
    dst: str
    sport: int  # ICMP: the query identifier
    dport: int  # ICMP: the request type

    def reversed(self) -> "Flow":
        if self.proto == "icmp":
            return self
        return Flow(self.family, self.proto, self.dst, self.src, self.dport, self.sport)


@st.composite
def flows(draw, family: int | None = None, protos=("tcp", "udp", "icmp"), pool: bool = False) -> Flow:
    fam = family or draw(st.sampled_from((4, 6)))
    addr = ipv4_addresses(pool) if fam == 4 else ipv6_addresses(pool)
    proto = draw(st.sampled_from(protos))
    if proto == "icmp":
        qtype = draw(st.sampled_from(sorted(ICMP4_QUERY if fam == 4 else ICMP6_QUERY)))
        return Flow(fam, proto, draw(addr), draw(addr), draw(ports(pool)), qtype)
    return Flow(fam, proto, draw(addr), draw(addr), draw(ports(pool)), draw(ports(pool)))


def build(flow: Flow, reply: bool = False, flags: str = "S", payload: bytes = b"", ident: int = 1,
          ipv4_options=None, ext=()) -> bytes:
    """One packet of ``flow``; ``reply`` sends it the other way (ICMP: the reply type)."""
    src, dst = (flow.dst, flow.src) if reply else (flow.src, flow.dst)
    if flow.family == 4:
        ip = IP(src=src, dst=dst, id=ident, options=ipv4_options or [])
    else:
        ip = IPv6(src=src, dst=dst)
        for hdr in ext:
            ip = ip / hdr
    if flow.proto == "tcp":
        sport, dport = (flow.dport, flow.sport) if reply else (flow.sport, flow.dport)
        l4 = TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=2000 if "A" in flags else 0)
    elif flow.proto == "udp":
        sport, dport = (flow.dport, flow.sport) if reply else (flow.sport, flow.dport)
        l4 = UDP(sport=sport, dport=dport)
    elif flow.family == 4:
        itype = ICMP4_QUERY[flow.dport] if reply else flow.dport
        l4 = ICMP(type=itype, id=flow.sport, seq=1)
    else:
        l4 = (ICMPv6EchoReply if reply else ICMPv6EchoRequest)(id=flow.sport, seq=1)
    return raw(ip / l4 / Raw(payload)) if payload else raw(ip / l4)


@st.composite
def packet_and_reply(draw, family: int | None = None, pool: bool = False) -> tuple[bytes, bytes]:
    """A packet that can open a flow, and a packet the other way on the same flow."""
    flow = draw(flows(family, pool=pool))
    return (build(flow, False, "S", draw(payloads)), build(flow, True, "SA", draw(payloads)))


# ------------------------------------------------------------------ IP packets
def ipv4_option_lists() -> st.SearchStrategy[list]:
    return st.sampled_from([
        [],
        [IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_NOP()],
        [IPOption_RR(routers=["192.0.2.1", "192.0.2.2"])],
        [IPOption_RR(routers=["0.0.0.0"] * 9)],  # 40 bytes of options: IHL 15
    ])


@st.composite
def ipv6_ext_chains(draw) -> list:
    """Hop-by-hop (first, as the RFC requires), then routing / destination / AH in any order."""
    chain = []
    if draw(st.booleans()):
        chain.append(IPv6ExtHdrHopByHop())
    rest = draw(st.lists(st.sampled_from(("routing", "dest", "ah")), max_size=3))
    for name in rest:
        if name == "routing":
            chain.append(IPv6ExtHdrRouting(addresses=["2001:db8::99"]))
        elif name == "dest":
            chain.append(IPv6ExtHdrDestOpt())
        else:
            chain.append(ah_header())
    return chain


def ah_header() -> AH:
    """An AH header for IPv6 with a 12-byte ICV (scapy does not fill nh/length itself)."""
    return AH(spi=0x1000, seq=1, icv=b"\x00" * 12, payloadlen=4)


def link_ext_chain(chain: list, upper: int) -> list:
    """Set each AH header's next-header field (scapy leaves it 0) to what follows it."""
    for i, hdr in enumerate(chain):
        if isinstance(hdr, AH):
            nxt = chain[i + 1] if i + 1 < len(chain) else None
            hdr.nh = _ext_number(nxt) if nxt is not None else upper
    return chain


def _ext_number(hdr) -> int:
    if isinstance(hdr, IPv6ExtHdrHopByHop):
        return 0
    if isinstance(hdr, IPv6ExtHdrRouting):
        return 43
    if isinstance(hdr, IPv6ExtHdrFragment):
        return 44
    if isinstance(hdr, IPv6ExtHdrDestOpt):
        return 60
    if isinstance(hdr, AH):
        return 51
    raise TypeError(hdr)


_UPPER = {"tcp": 6, "udp": 17}


@st.composite
def ipv4_packets(draw, pool: bool = False, options: bool = True, protos=("tcp", "udp", "icmp")) -> bytes:
    flow = draw(flows(4, protos, pool))
    opts = draw(ipv4_option_lists()) if options else []
    return build(flow, draw(st.booleans()), draw(st.sampled_from(TCP_FLAGS)), draw(payloads),
                 draw(st.integers(0, 65535)), opts)


@st.composite
def ipv6_packets(draw, pool: bool = False, ext: bool = True, protos=("tcp", "udp", "icmp")) -> bytes:
    flow = draw(flows(6, protos, pool))
    chain = draw(ipv6_ext_chains()) if ext else []
    link_ext_chain(chain, _UPPER.get(flow.proto, 58))
    return build(flow, draw(st.booleans()), draw(st.sampled_from(TCP_FLAGS)), draw(payloads), ext=chain)


def ip_packets(pool: bool = False) -> st.SearchStrategy[bytes]:
    return st.one_of(ipv4_packets(pool), ipv6_packets(pool), icmp_errors(pool))


def quote(packet: bytes) -> bytes:
    """What a router quotes of ``packet`` in an ICMP error: the IP header and 8 bytes."""
    if packet[0] >> 4 == 4:
        return packet[: (packet[0] & 0x0F) * 4 + 8]
    return packet[:48]


@st.composite
def icmp_errors(draw, pool: bool = False, full_quote: bool | None = None) -> bytes:
    """An ICMP(v6) error from a router about a TCP/UDP/ICMP packet of some flow."""
    fam = draw(st.sampled_from((4, 6)))
    flow = draw(flows(fam, pool=pool))
    offending = build(flow, draw(st.booleans()), "S", draw(payloads))
    full = draw(st.booleans()) if full_quote is None else full_quote
    body = offending if full else quote(offending)
    router = draw(ipv4_addresses(pool) if fam == 4 else ipv6_addresses(pool))
    if fam == 4:
        kind = draw(st.sampled_from([(3, 3), (3, 4), (11, 0), (12, 0), (4, 0), (5, 1)]))
        return raw(IP(src=router, dst=flow.src) / ICMP(type=kind[0], code=kind[1]) / Raw(body))
    err = draw(st.sampled_from([ICMPv6DestUnreach(code=4), ICMPv6PacketTooBig(mtu=1280),
                                ICMPv6TimeExceeded()]))
    return raw(IPv6(src=router, dst=flow.src) / err / Raw(body))


@st.composite
def ipv4_fragments(draw, pool: bool = False) -> list[bytes]:
    """The fragments of one UDP/TCP/ICMP IPv4 packet big enough to need several.

    Fragments carry at least 24 bytes, so the first holds a whole TCP header (a
    smaller first fragment is the RFC 1858 tiny-fragment attack, rejected as BAD_FRAGMENT).
    """
    flow = draw(flows(4, pool=pool))
    size = draw(st.integers(20, 64)) * 8  # always more than one fragment
    whole = IP(build(flow, draw(st.booleans()), "PA", bytes(size), draw(st.integers(1, 65535))))
    return [raw(f) for f in fragment(whole, fragsize=draw(st.sampled_from((24, 64, 128))))]


# ------------------------------------------------------------------ Ethernet
MACS = ("02:00:00:00:00:01", "02:00:00:00:00:02", "52:54:00:12:34:56")


@st.composite
def ethernet_frames(draw, payload: st.SearchStrategy[bytes] | None = None, max_vlans: int = 2) -> bytes:
    """An Ethernet II frame (0..max_vlans VLAN tags) carrying an IP packet, padded to 60 bytes."""
    pkt = draw(payload if payload is not None else ip_packets())
    ethertype = 0x0800 if pkt and pkt[0] >> 4 == 4 else 0x86DD
    n = draw(st.integers(0, max_vlans))
    frame = Ether(src=draw(st.sampled_from(MACS)), dst=draw(st.sampled_from(MACS)))
    vids = draw(st.lists(st.integers(1, 4094), min_size=n, max_size=n))
    if n == 2:  # QinQ: the outer tag is 802.1ad
        frame = frame / Dot1AD(vlan=vids[0]) / Dot1Q(vlan=vids[1], type=ethertype)
    elif n == 1:
        frame = frame / Dot1Q(vlan=vids[0], type=ethertype)
    else:
        frame.type = ethertype
    data = raw(frame) + pkt
    return data + bytes(max(0, 60 - len(data)))


# ------------------------------------------------------------------ damage
@st.composite
def mutated(draw, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid packet damaged: cut, bits flipped, random bytes spliced in or appended."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(("cut", "flip", "splice", "overwrite", "append")))
        pos = draw(st.integers(0, len(data)))
        if op == "cut":
            data = data[:pos]
        elif op == "flip" and data:
            i = min(pos, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "splice":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "overwrite" and data:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos : pos + len(chunk)] = chunk
        elif op == "append":
            data += draw(st.binary(max_size=16))
    return bytes(data)


# ------------------------------------------------------------------ traffic over time
@st.composite
def traffic(draw, max_flows: int = 6, max_steps: int = 40, max_gap: float = 50.0) -> list[tuple[float, bytes]]:
    """A timed packet sequence over a few flows (pool addresses): (seconds since the last, bytes).

    Packets go both ways with any TCP flags, so handshakes, resets, reopenings and invalid
    segments all occur; ICMP errors quote the flows' packets; some packets are IPv4 fragments.
    Gaps are fractional and sometimes long, so timeouts expire in between.
    """
    pool = draw(st.lists(flows(pool=True), min_size=1, max_size=max_flows))
    gaps = st.one_of(st.just(0.0), st.floats(0, 2, allow_nan=False), st.floats(0, max_gap, allow_nan=False))
    out: list[tuple[float, bytes]] = []
    for _ in range(draw(st.integers(1, max_steps))):
        flow = draw(st.sampled_from(pool))
        reply = draw(st.booleans())
        kind = draw(st.sampled_from(("packet",) * 6 + ("error", "fragments")))
        pkt = build(flow, reply, draw(st.sampled_from(TCP_FLAGS)), draw(st.binary(max_size=8)),
                    ident=draw(st.integers(0, 3)))
        if kind == "error":
            if flow.family == 4:
                pkt = raw(IP(src="203.0.113.254", dst=flow.src) / ICMP(type=3, code=1) / Raw(quote(pkt)))
            else:
                pkt = raw(IPv6(src="2001:db8:ff::fe", dst=flow.src) / ICMPv6DestUnreach() / Raw(quote(pkt)))
        if kind == "fragments" and flow.family == 4:
            big = build(flow, reply, "PA", bytes(200), ident=draw(st.integers(0, 3)))
            frags = [raw(f) for f in fragment(IP(big), fragsize=64)]
            if draw(st.booleans()):
                frags = draw(st.permutations(frags))
            out.append((draw(gaps), frags[0]))
            out.extend((0.0, f) for f in frags[1:])
            continue
        out.append((draw(gaps), pkt))
    return out
