"""The Internet checksum (RFC 1071) and its incremental update (RFC 1624): the one copy.

Every engine and tool that builds, rewrites or verifies a packet uses these; a fix here
reaches all of them.

From scratch, one big-integer step instead of a loop over words: 2**16 = 1 (mod 0xFFFF),
so a byte string's value mod 0xFFFF is its one's complement word sum (with 0xFFFF
standing for the zero residue of a non-zero sum, as end-around carry gives it).

Updates use RFC 1624 equation 3, ``HC' = ~(~HC + ~m + m')``, so a rewrite never reads
the payload.  A UDP checksum of zero means "none" (RFC 768) and stays zero; a computed
zero is sent as 0xFFFF.
"""
from __future__ import annotations

import struct

_PSEUDO4 = struct.Struct("!4s4sBBH")
_H = struct.Struct("!H")

# 32 * 0xFFFF: the complemented old words of up to 32 changed words, padded with ~0 + 0
# for the unchanged ones (see adjust); it keeps every delta positive.
ADJ = 0x1FFFE0


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The folded, not inverted, one's complement sum of ``data`` (zero-padded) plus ``initial``."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    n = int.from_bytes(data, "big") + initial
    return n % 0xFFFF or (0xFFFF if n else 0)


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The checksum of ``data`` plus an unfolded partial sum (e.g. a pseudo-header's)."""
    return ~ones_sum(data, initial) & 0xFFFF


def fold(x: int) -> int:
    """Fold a sum into 16 bits with end-around carry."""
    while x > 0xFFFF:
        x = (x & 0xFFFF) + (x >> 16)
    return x


def word_sum(b: bytes | bytearray | memoryview) -> int:
    """Plain (unfolded) sum of the 16-bit words of an even-length field: addresses, ports."""
    if len(b) == 4:
        return (b[0] << 8 | b[1]) + (b[2] << 8 | b[3])
    if len(b) == 2:
        return b[0] << 8 | b[1]
    return sum(struct.unpack(f"!{len(b) // 2}H", b))


def adjust(csum: int, old_sum: int, new_sum: int) -> int:
    """RFC 1624 eqn 3 over many words at once: ``old_sum``/``new_sum`` are plain sums of the
    changed words (at most 32 of them)."""
    # ~HC + sum(~m) + sum(m'), where sum(~m) == n*0xFFFF - sum(m): ADJ pads it to 32 words.
    return ~fold((~csum & 0xFFFF) + new_sum + ADJ - old_sum) & 0xFFFF


def update(csum: int, old: bytes, new: bytes) -> int:
    """Checksum ``csum`` after the aligned field ``old`` became ``new`` (equal lengths)."""
    return adjust(csum, word_sum(old), word_sum(new))


def udp_adjust(csum: int, old_sum: int, new_sum: int) -> int:
    """As :func:`adjust` for a UDP checksum: zero (no checksum) stays zero, 0 is sent as 0xFFFF."""
    if csum == 0:
        return 0
    return adjust(csum, old_sum, new_sum) or 0xFFFF


def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Unfolded sum of the IPv4 or IPv6 pseudo-header (RFC 793/768, RFC 8200 8.1)."""
    return word_sum(src) + word_sum(dst) + proto + (length & 0xFFFF) + (length >> 16)


def l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes | bytearray | memoryview) -> int:
    """The TCP/UDP/ICMPv6 checksum of ``segment`` (its checksum field zeroed) under the
    pseudo-header of ``src``/``dst``; UDP's computed zero is returned as 0xFFFF."""
    c = internet_checksum(segment, pseudo_sum(src, dst, proto, len(segment)))
    return c or 0xFFFF if proto == 17 else c
