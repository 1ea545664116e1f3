"""A small ctnetlink client over a plain netlink socket: the kernel's conntrack entries.

Why not pyroute2's NFCTSocket: it knows CTA_NAT_SRC/CTA_NAT_DST, but every call runs
an asyncio round of its own (milliseconds), and creating one entry per new flow is on
the path of the new-connection rate.  This is one sendmsg and one recv per request.
Constants from linux include/uapi/linux/netfilter/nfnetlink_conntrack.h.

What roam needs: create an entry carrying the NAT (``create``), delete one (``delete``),
list its own (``dump`` by mark, with packet counters), hear the kernel destroy them
(:class:`Events`, group NFNLGRP_CONNTRACK_DESTROY) and, for the kernel path, make them
(NFNLGRP_CONNTRACK_NEW).  An entry is a :class:`KEntry`.
IPv4 and IPv6 (NAT66) alike: a tuple's family is its addresses' length.
"""
from __future__ import annotations

import errno
import socket
import struct
from typing import NamedTuple

from .netlink import NLA_F_NESTED, attr as _attr, attr_spans, error_code, messages, nest as _nest, netfilter_socket

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
MSG_NEW, MSG_GET, MSG_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | 0, (NFNL_SUBSYS_CTNETLINK << 8) | 1, \
    (NFNL_SUBSYS_CTNETLINK << 8) | 2
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 1, 2, 4, 0x200, 0x400
NLM_F_DUMP = 0x300
NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY = 1, 3
# enum ctattr_type
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO, CTA_NAT_SRC, CTA_TIMEOUT, CTA_MARK = 1, 2, 3, 4, 6, 7, 8
CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_NAT_DST, CTA_MARK_MASK = 9, 10, 13, 21
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE = 7, 8, 9
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT, CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = \
    1, 2, 3, 4, 5, 6
CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP, CTA_NAT_PROTO, CTA_NAT_V6_MINIP, CTA_NAT_V6_MAXIP = 1, 2, 3, 4, 5
CTA_PROTONAT_PORT_MIN, CTA_PROTONAT_PORT_MAX = 1, 2
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY = 4, 5
CTA_COUNTERS_PACKETS = 1
IP_CT_TCP_FLAG_BE_LIBERAL = 0x08
IPS_SEEN_REPLY, IPS_ASSURED = 1 << 1, 1 << 2
TCP_CONNTRACK_SYN_SENT, TCP_CONNTRACK_ESTABLISHED = 1, 3

_NLH = struct.Struct("=IHHII")
_NFG = struct.Struct("!BBH")
_PORT = struct.Struct("!H").pack


class Tuple(NamedTuple):
    """One direction of an entry: (proto, src, dst, sport, dport), addresses packed (4 or 16
    bytes); for ICMP ``sport`` is the identifier and ``dport`` the type (8, ICMPv6 128: echo request)."""

    proto: int
    src: bytes
    dst: bytes
    sport: int
    dport: int


class KEntry(NamedTuple):
    """A kernel conntrack entry as roam reads it."""

    original: Tuple
    reply: Tuple
    mark: int
    packets_orig: int
    packets_reply: int
    status: int = 0  # IPS_* bits
    tcp_state: int = 0  # TCP_CONNTRACK_* (roam's TcpState numbers)
    timeout: int = 0  # seconds left
    born: bool = False  # (an event) the kernel made it, rather than destroyed it


def inverse(t: Tuple) -> Tuple:
    """The tuple a reply to ``t`` travels on (an echo request's answer is an echo reply)."""
    if t.proto == 1:
        return Tuple(1, t.dst, t.src, t.sport, {8: 0, 13: 14, 15: 16, 17: 18}.get(t.dport, t.dport))
    if t.proto == 58:
        return Tuple(58, t.dst, t.src, t.sport, {128: 129, 139: 140}.get(t.dport, t.dport))
    return Tuple(t.proto, t.dst, t.src, t.dport, t.sport)


# an IPv4 TCP/UDP tuple and an IPv4 NAT range in one pack each (a new flow's create builds three:
# attribute by attribute it was a third of the create's time); the same bytes as the nested
# attr()/nest() build below (tests/unit/test_nat_offload.py)
_TUPLE4 = struct.Struct("=HH HH HH4s HH4s HH HHB3x HH2s2x HH2s2x")
_NAT4 = struct.Struct("=HH HH4s HH4s HH HH2s2x HH2s2x")
_N = NLA_F_NESTED


def _tuple(kind: int, t: Tuple) -> bytes:
    if (t.proto == 6 or t.proto == 17) and len(t.src) == 4:
        return _TUPLE4.pack(52, kind | _N, 20, CTA_TUPLE_IP | _N, 8, CTA_IP_V4_SRC, t.src, 8, CTA_IP_V4_DST, t.dst,
                            28, CTA_TUPLE_PROTO | _N, 5, CTA_PROTO_NUM, t.proto, 6, CTA_PROTO_SRC_PORT,
                            _PORT(t.sport), 6, CTA_PROTO_DST_PORT, _PORT(t.dport))
    return _tuple_nested(kind, t)


def _tuple_nested(kind: int, t: Tuple) -> bytes:
    if t.proto == 1:
        proto = (_attr(CTA_PROTO_NUM, bytes([1])) + _attr(CTA_PROTO_ICMP_ID, struct.pack("!H", t.sport))
                 + _attr(CTA_PROTO_ICMP_TYPE, bytes([t.dport])) + _attr(CTA_PROTO_ICMP_CODE, b"\0"))
    elif t.proto == 58:
        proto = (_attr(CTA_PROTO_NUM, bytes([58])) + _attr(CTA_PROTO_ICMPV6_ID, struct.pack("!H", t.sport))
                 + _attr(CTA_PROTO_ICMPV6_TYPE, bytes([t.dport])) + _attr(CTA_PROTO_ICMPV6_CODE, b"\0"))
    else:
        proto = (_attr(CTA_PROTO_NUM, bytes([t.proto])) + _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", t.sport))
                 + _attr(CTA_PROTO_DST_PORT, struct.pack("!H", t.dport)))
    s, d = (CTA_IP_V4_SRC, CTA_IP_V4_DST) if len(t.src) == 4 else (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    return _nest(kind, _nest(CTA_TUPLE_IP, _attr(s, t.src), _attr(d, t.dst)), _nest(CTA_TUPLE_PROTO, proto))


def _nat(kind: int, ip: bytes, port: int) -> bytes:
    if len(ip) == 4:
        pr = _PORT(port)
        return _NAT4.pack(40, kind | _N, 8, CTA_NAT_V4_MINIP, ip, 8, CTA_NAT_V4_MAXIP, ip, 20, CTA_NAT_PROTO | _N,
                          6, CTA_PROTONAT_PORT_MIN, pr, 6, CTA_PROTONAT_PORT_MAX, pr)
    return _nat_nested(kind, ip, port)


def _nat_nested(kind: int, ip: bytes, port: int) -> bytes:
    pr = struct.pack("!H", port)
    lo, hi = (CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP) if len(ip) == 4 else (CTA_NAT_V6_MINIP, CTA_NAT_V6_MAXIP)
    return _nest(kind, _attr(lo, ip), _attr(hi, ip),
                 _nest(CTA_NAT_PROTO, _attr(CTA_PROTONAT_PORT_MIN, pr), _attr(CTA_PROTONAT_PORT_MAX, pr)))


_U16, _U32, _U64 = struct.Struct("!H").unpack_from, struct.Struct("!I").unpack_from, struct.Struct("!Q").unpack_from


def _parse_tuple(buf, span) -> Tuple | None:
    a = attr_spans(buf, *span)
    if CTA_TUPLE_IP not in a or CTA_TUPLE_PROTO not in a:
        return None
    ip = attr_spans(buf, *a[CTA_TUPLE_IP])
    pr = attr_spans(buf, *a[CTA_TUPLE_PROTO])
    if CTA_PROTO_NUM not in pr:
        return None
    if CTA_IP_V4_SRC in ip and CTA_IP_V4_DST in ip:
        (s, e), (d, _) = ip[CTA_IP_V4_SRC], ip[CTA_IP_V4_DST]
    elif CTA_IP_V6_SRC in ip and CTA_IP_V6_DST in ip:
        (s, e), (d, _) = ip[CTA_IP_V6_SRC], ip[CTA_IP_V6_DST]
    else:
        return None
    src, dst = bytes(buf[s:e]), bytes(buf[d:d + e - s])
    proto = buf[pr[CTA_PROTO_NUM][0]]
    if proto == 1 or proto == 58:
        kid, ktype = (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE) if proto == 1 else \
            (CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE)
        return Tuple(proto, src, dst, _U16(buf, pr[kid][0])[0] if kid in pr else 0,
                     buf[pr[ktype][0]] if ktype in pr else 0)
    sp, dp = pr.get(CTA_PROTO_SRC_PORT), pr.get(CTA_PROTO_DST_PORT)
    return Tuple(proto, src, dst, _U16(buf, sp[0])[0] if sp else 0, _U16(buf, dp[0])[0] if dp else 0)


def _packets(buf, span) -> int:
    c = attr_spans(buf, *span) if span else {}
    return _U64(buf, c[CTA_COUNTERS_PACKETS][0])[0] if CTA_COUNTERS_PACKETS in c else 0


def parse_entry(buf, off: int, end: int, born: bool = False, marked: int = 0) -> KEntry | None:
    """The entry in one ctnetlink message (``off`` at its nlmsghdr): dumps and events parse
    thousands a second, so one dict per nesting level and no helpers per field.  ``marked``:
    None unless the entry's mark has one of these bits (the rest is not even parsed)."""
    a = attr_spans(buf, off + _NLH.size + _NFG.size, end)
    if CTA_TUPLE_ORIG not in a or CTA_TUPLE_REPLY not in a:
        return None
    mark = a.get(CTA_MARK)
    mark = _U32(buf, mark[0])[0] if mark else 0
    if marked and not mark & marked:
        return None
    o, r = _parse_tuple(buf, a[CTA_TUPLE_ORIG]), _parse_tuple(buf, a[CTA_TUPLE_REPLY])
    if o is None or r is None:
        return None
    get = a.get
    status, left = get(CTA_STATUS), get(CTA_TIMEOUT)
    state = 0
    if CTA_PROTOINFO in a:
        tcp = attr_spans(buf, *a[CTA_PROTOINFO]).get(CTA_PROTOINFO_TCP)
        st = attr_spans(buf, *tcp).get(CTA_PROTOINFO_TCP_STATE) if tcp else None
        if st:
            state = buf[st[0]]
    return KEntry(o, r, mark, _packets(buf, get(CTA_COUNTERS_ORIG)),
                  _packets(buf, get(CTA_COUNTERS_REPLY)), _U32(buf, status[0])[0] if status else 0, state,
                  _U32(buf, left[0])[0] if left else 0, born)


_MIDDLE: dict[tuple, bytes] = {}  # create's timeout, mark, status and TCP info: a few values, built once


def _middle(key: tuple) -> bytes:
    timeout, mark, status, tcp_state = key
    parts = [_attr(CTA_TIMEOUT, struct.pack("!I", timeout)), _attr(CTA_MARK, struct.pack("!I", mark))]
    if status:
        parts.append(_attr(CTA_STATUS, struct.pack("!I", status)))
    if tcp_state:  # TCP: liberal (no window checks), roam's tracker judged the segments
        lib = struct.pack("BB", IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL)
        parts.append(_nest(CTA_PROTOINFO, _nest(CTA_PROTOINFO_TCP, _attr(CTA_PROTOINFO_TCP_STATE, bytes([tcp_state])),
                                                _attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, lib),
                                                _attr(CTA_PROTOINFO_TCP_FLAGS_REPLY, lib))))
    if len(_MIDDLE) > 1024:  # (bounded: timeouts come from the config, marks and states are few)
        _MIDDLE.clear()
    out = _MIDDLE[key] = b"".join(parts)
    return out


def _family(t: Tuple) -> int:
    return socket.AF_INET if len(t.src) == 4 else socket.AF_INET6


class CtSocket:
    """Requests to the kernel's conntrack table (one socket, answers read in line)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self._seq = 0
        self._buf = bytearray(1 << 16)

    def _send(self, kind: int, flags: int, body: bytes, family: int = socket.AF_INET) -> int:
        """One request; ``family`` picks the entries of a family (AF_UNSPEC: both, for dumps)."""
        self._seq += 1
        nfg = _NFG.pack(family, 0, 0)
        self.sock.send(_NLH.pack(_NLH.size + len(nfg) + len(body), kind, NLM_F_REQUEST | flags, self._seq, 0)
                       + nfg + body)
        return self._seq

    def _ack(self, seq: int) -> int:
        """Wait for the answer to ``seq``: 0 or the errno."""
        while True:
            n = self.sock.recv_into(self._buf)
            for off, _, kind, mseq in messages(self._buf, n):
                if kind == NLMSG_ERROR and mseq == seq:
                    return error_code(self._buf, off)

    def create(self, original: Tuple, timeout: int, mark: int, snat: tuple | None = None,
               dnat: tuple | None = None, tcp_state: int = 0, status: int = 0) -> int:
        """Create an entry (0, or the errno: EEXIST when the kernel has one).  ``snat``/``dnat``
        are (address, port) the kernel rewrites to.  The reply tuple given is the original's
        inverse: the kernel's NAT set-up derives the translated one from it (given already
        translated, it would see nothing to do and set no NAT).  TCP entries are liberal (no
        window checks): roam's tracker judged the segments."""
        key = (max(1, int(timeout)), mark, status, (tcp_state or 1) if original.proto == 6 else 0)
        body = [_tuple(CTA_TUPLE_ORIG, original), _tuple(CTA_TUPLE_REPLY, inverse(original)),
                _MIDDLE.get(key) or _middle(key)]
        if dnat is not None:
            body.append(_nat(CTA_NAT_DST, *dnat))
        if snat is not None:
            body.append(_nat(CTA_NAT_SRC, *snat))
        return self._ack(self._send(MSG_NEW, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, b"".join(body), _family(original)))

    def get(self, original: Tuple) -> KEntry | None:
        """The kernel's entry for ``original`` (None if it has none)."""
        seq = self._send(MSG_GET, NLM_F_ACK, _tuple(CTA_TUPLE_ORIG, original), _family(original))
        found = None
        while True:
            n = self.sock.recv_into(self._buf)
            for off, length, kind, mseq in messages(self._buf, n):
                if mseq == seq:
                    if kind == NLMSG_ERROR:
                        return found
                    if kind == MSG_NEW:
                        found = parse_entry(self._buf, off, off + length)

    def delete(self, original: Tuple) -> int:
        return self._ack(self._send(MSG_DELETE, NLM_F_ACK, _tuple(CTA_TUPLE_ORIG, original), _family(original)))

    def flush(self, mark: int, mask: int) -> int:
        """Delete every entry whose mark & ``mask`` == ``mark``, of either family (0, or the errno)."""
        return self._ack(self._send(MSG_DELETE, NLM_F_ACK, _attr(CTA_MARK, struct.pack("!I", mark))
                                    + _attr(CTA_MARK_MASK, struct.pack("!I", mask))))

    def dump(self, mark: int, mask: int) -> list[KEntry]:
        """Every entry whose mark & ``mask`` == ``mark`` (a dump also reaps expired entries)."""
        seq = self._send(MSG_GET, NLM_F_DUMP, _attr(CTA_MARK, struct.pack("!I", mark))
                         + _attr(CTA_MARK_MASK, struct.pack("!I", mask)), socket.AF_UNSPEC)
        out: list[KEntry] = []
        buf = bytearray(1 << 20)
        while True:
            n = self.sock.recv_into(buf)
            for off, length, kind, mseq in messages(buf, n):
                if mseq == seq:
                    if kind == NLMSG_DONE:
                        return out
                    if kind == NLMSG_ERROR:
                        err = error_code(buf, off)
                        if err:
                            raise OSError(err, f"conntrack dump: {errno.errorcode.get(err, err)}")
                        return out
                    e = parse_entry(buf, off, off + length)
                    if e is not None and e.mark & mask == mark:
                        out.append(e)

    def close(self) -> None:
        self.sock.close()


class Events:
    """The kernel's DESTROY events, and with ``new`` (a mark bit) its NEW ones of entries with that
    mark (select()-able); ``read`` returns the entries that died and were made (``born``), in the
    kernel's order."""

    def __init__(self, rcvbuf: int = 4 << 20, new: int = 0) -> None:
        groups = 1 << (NFNLGRP_CONNTRACK_DESTROY - 1) | (1 << (NFNLGRP_CONNTRACK_NEW - 1) if new else 0)
        self.new = new
        self.sock = netfilter_socket(rcvbuf, groups)
        self.sock.setblocking(False)
        self.lost = 0  # ENOBUFS: events the kernel could not deliver (the reconciliation finds them)
        self._buf = bytearray(1 << 16)

    def fileno(self) -> int:
        return self.sock.fileno()

    #: the last read stopped at its limit: more events are waiting
    more = False

    def read(self, limit: int = 0) -> list[KEntry]:
        """The events waiting (at most ``limit`` datagrams -- an event each -- if given)."""
        out: list[KEntry] = []
        buf = self._buf
        self.more = False
        left = limit
        while True:
            if limit:
                if not left:
                    self.more = True
                    return out
                left -= 1
            try:
                n = self.sock.recv_into(buf)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.lost += 1
                    continue
                raise
            for off, length, kind, _ in messages(buf, n):
                if kind == MSG_DELETE:
                    e = parse_entry(buf, off, off + length)
                    if e is not None:
                        out.append(e)
                elif kind == MSG_NEW:
                    e = parse_entry(buf, off, off + length, True, self.new)
                    if e is not None:
                        out.append(e)

    def close(self) -> None:
        self.sock.close()
