"""The simulator's few helpers around packets: addresses and MACs between text and bytes, zero payloads.

Every packet the simulator sends is built by ``conntrack.build`` (the one packet
builder) and read by ``conntrack.parse_ip`` / ``parse_frame`` (the tracker's parser);
what is left here is only what a scenario's text needs to become bytes.
"""
from __future__ import annotations

import ipaddress

MSS = 1400
_ZEROS = bytes(MSS)


def zeros(n: int) -> bytes:
    """``n`` zero bytes of payload (at most :data:`MSS`)."""
    return _ZEROS[:n]


def addr(text: str) -> bytes:
    """Packed IPv4 address from text."""
    return ipaddress.IPv4Address(text).packed


def text(packed: bytes) -> str:
    return str(ipaddress.IPv4Address(packed))


def mac(text_mac: str) -> bytes:
    parts = text_mac.replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {text_mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_text(packed: bytes) -> str:
    return ":".join(f"{b:02x}" for b in packed)
