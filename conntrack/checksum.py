"""The Internet checksum (RFC 1071), for the engines and tools that build or fix packets.

One big-integer step instead of a loop over words: 2**16 = 1 (mod 0xFFFF), so a byte
string's value mod 0xFFFF is its one's complement word sum (with 0xFFFF standing for
the zero residue of a non-zero sum, as end-around carry gives it).
"""
from __future__ import annotations


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The folded, not inverted, one's complement sum of ``data`` (zero-padded) plus ``initial``."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    n = int.from_bytes(data, "big") + initial
    return n % 0xFFFF or (0xFFFF if n else 0)


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The checksum of ``data`` plus an unfolded partial sum (e.g. a pseudo-header's)."""
    return ~ones_sum(data, initial) & 0xFFFF
