"""Internet checksum arithmetic: incremental updates (RFC 1624) and a from-scratch sum.

Updates use RFC 1624 equation 3, ``HC' = ~(~HC + ~m + m')``, word by word, so a
rewrite never needs to read the payload.  A UDP checksum of zero means "none"
(RFC 768) and stays zero; a computed zero is sent as 0xFFFF.
"""
from __future__ import annotations

import struct

from conntrack.checksum import internet_checksum, ones_sum  # noqa: F401 (ones_sum: nat.rewrite uses it from here)

_H = struct.Struct("!H")


def fold(x: int) -> int:
    """Fold a sum into 16 bits with end-around carry."""
    while x > 0xFFFF:
        x = (x & 0xFFFF) + (x >> 16)
    return x


checksum = internet_checksum  # the from-scratch sum, under the name this package uses


def word_sum(b: bytes) -> int:
    """Sum of the 16-bit words of a 2- or 4- or 16-byte field (no folding)."""
    if len(b) == 4:
        return (b[0] << 8 | b[1]) + (b[2] << 8 | b[3])
    if len(b) == 2:
        return b[0] << 8 | b[1]
    return sum(struct.unpack(f"!{len(b) // 2}H", b))


def adjust(csum: int, old_sum: int, new_sum: int) -> int:
    """RFC 1624 eqn 3 over many words at once: old/new are plain sums of the changed words."""
    # ~HC + sum(~m) + sum(m'), where sum(~m) == n*0xFFFF - sum(m) == -sum(m) in one's complement
    # (0xFFFF * 32 - old_sum) is sum(~m) padded with unchanged words (~0 + 0): exactly eqn 3
    # for up to 32 changed words per call.
    x = (~csum & 0xFFFF) + new_sum + 0x1FFFE0 - old_sum
    return ~fold(x) & 0xFFFF


def update(csum: int, old: bytes, new: bytes) -> int:
    """Checksum ``csum`` after the aligned field ``old`` became ``new`` (equal lengths)."""
    return adjust(csum, word_sum(old), word_sum(new))


def update16(csum: int, old: int, new: int) -> int:
    return adjust(csum, old, new)


def udp_update(csum: int, old_sum: int, new_sum: int) -> int:
    """As :func:`adjust` for a UDP checksum: zero (no checksum) stays zero, 0 is sent as 0xFFFF."""
    if csum == 0:
        return 0
    c = adjust(csum, old_sum, new_sum)
    return c or 0xFFFF
