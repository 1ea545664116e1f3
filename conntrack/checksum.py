"""The Internet checksum (RFC 1071), for the engines and tools that build packets."""
from __future__ import annotations

import struct


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The checksum of ``data`` plus an unfolded partial sum (e.g. a pseudo-header's)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data)) + initial
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
