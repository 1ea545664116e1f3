"""Netlink attributes (TLVs), the one codec the NFQUEUE and ctnetlink clients share."""
from __future__ import annotations

import socket
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


def attr_spans(buf, start: int, end: int) -> dict:
    """Netlink attributes in ``buf[start:end]`` as {type: (start, end)} of their payloads; a malformed
    one ends the list (ctnetlink's dumps and events parse thousands a second: one dict, no copies)."""
    out = {}
    off = start
    unpack = _NLA.unpack_from
    while off + 4 <= end:
        n, kind = unpack(buf, off)
        if n < 4 or off + n > end:
            break
        out[kind & NLA_TYPE_MASK] = (off + 4, off + n)
        off += (n + 3) & ~3
    return out


_NLH = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_ERR = struct.Struct("=i")


def messages(buf, n: int):
    """(offset, length, type, seq) of each netlink message in ``buf[:n]``; a malformed header
    or a message cut short ends the list (the NFQUEUE client's per-packet loop inlines this)."""
    off = 0
    while off + _NLH.size <= n:
        length, kind, _, seq, _ = _NLH.unpack_from(buf, off)
        if length < _NLH.size or off + length > n:
            return
        yield off, length, kind, seq
        off += (length + 3) & ~3


def error_code(buf, off: int) -> int:
    """The errno an NLMSG_ERROR message at ``off`` carries (0: an acknowledgement)."""
    return -_ERR.unpack_from(buf, off + _NLH.size)[0]


SO_RCVBUFFORCE = 33


def netfilter_socket(rcvbuf: int, groups: int = 0):
    """A bound NETLINK_NETFILTER socket with a receive buffer of ``rcvbuf`` bytes (forced past
    the sysctl cap where root may; the capped size otherwise), closed again if binding fails."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    try:
        for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, rcvbuf)
                break
            except OSError:
                continue
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock
