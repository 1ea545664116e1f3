"""Netlink attributes (TLVs), the one codec the NFQUEUE and ctnetlink clients share."""
from __future__ import annotations

import struct

NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_NLA = struct.Struct("=HH")


def attr(kind: int, data: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    n = _NLA.size + len(data)
    return _NLA.pack(n, kind) + data + b"\0" * (-n & 3)


def nest(kind: int, *parts: bytes) -> bytes:
    """A nested attribute holding ``parts``."""
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def parse_attrs(buf, start: int, end: int) -> dict:
    """Netlink attributes in ``buf[start:end]`` as {type: (offset, length)}; a malformed one ends the list."""
    out = {}
    off = start
    while off + 4 <= end:
        n, kind = _NLA.unpack_from(buf, off)
        if n < 4 or off + n > end:
            break
        out[kind & NLA_TYPE_MASK] = (off + 4, n - 4)
        off += (n + 3) & ~3
    return out
