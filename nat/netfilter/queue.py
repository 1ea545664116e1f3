"""A small NFQUEUE client over a plain netlink socket (no libnetfilter_queue).

Written for GSO super-packets: NetfilterQueue 1.1.0 copies at most 4016 bytes of a
packet, so ``NFQA_CFG_F_GSO`` (packets up to 64 KiB, unsegmented) cannot go through it.
Constants from linux include/uapi/linux/netfilter/nfnetlink_queue.h and nfnetlink.h.

Checksums with ``gso=True``: the kernel no longer completes CHECKSUM_PARTIAL packets
before queueing them; they come with ``NFQA_SKB_CSUMNOTREADY`` and their L4 checksum
field holds only the pseudo-header sum.  A verdict with a payload makes the kernel set
``ip_summed = CHECKSUM_NONE``; GSO TCP packets get their checksums recomputed when
segmented, every other CSUMNOTREADY packet needs a complete checksum from the caller
(:func:`conntrack.build.fill_l4_checksum`).
"""
from __future__ import annotations

import errno
import socket
import struct

from .netlink import NLA_TYPE_MASK
from .netlink import attr as _attr, error_code, messages, netfilter_socket

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
MSG_PACKET = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET
MSG_VERDICT = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT
MSG_CONFIG = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_CONFIG

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLM_F_REQUEST, NLM_F_ACK = 1, 4

# enum nfqnl_attr_type
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_MARK = 1, 2, 3
NFQA_IFINDEX_INDEV, NFQA_IFINDEX_OUTDEV = 5, 6
NFQA_PAYLOAD, NFQA_CAP_LEN, NFQA_SKB_INFO = 10, 13, 14
# enum nfqnl_attr_config
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_CONNTRACK, NFQA_CFG_F_GSO = 1, 2, 4
NFQA_SKB_CSUMNOTREADY, NFQA_SKB_GSO, NFQA_SKB_CSUM_NOTVERIFIED = 1, 2, 4
NF_DROP, NF_ACCEPT = 0, 1

_NLH = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFG = struct.Struct("!BBH")  # family, version, res_id (queue number)
_NLA = struct.Struct("=HH")
_PKT_HDR = struct.Struct("!IHB")
_U32 = struct.Struct("!I")
_VERDICT_HDR = struct.Struct("!II")
_VERDICT_LEN = _NLH.size + _NFG.size + 4 + _VERDICT_HDR.size
_RCVBUF = 8 << 20
_SEND_MAX = 96 << 10  # flush held-back verdicts beyond this (a datagram must fit the send buffer)
_RECV_SIZE = 0x10000 + 4096  # one 64 KiB packet and its attributes


class QueuedPacket:
    """One queued packet: id, hook, in/out ifindex, payload (bytes), skb info flags, packet mark."""

    __slots__ = ("id", "hook", "indev", "outdev", "payload", "skbinfo", "mark")

    def __init__(self, pid: int, hook: int, indev: int, outdev: int, payload: bytes, skbinfo: int,
                 mark: int = 0) -> None:
        self.id, self.hook, self.indev, self.outdev = pid, hook, indev, outdev
        self.payload, self.skbinfo, self.mark = payload, skbinfo, mark


class NfQueue:
    """A bound NFQUEUE (copy the whole packet; with ``gso`` unsegmented super-packets)."""

    def __init__(self, queue: int, gso: bool = True, rcvbuf: int = _RCVBUF) -> None:
        self.queue = queue
        self.gso = gso
        self.batch = False  # True: verdicts wait for flush() (the caller drains a burst first)
        self.overruns = 0  # ENOBUFS: the kernel dropped messages for us (counted, not fatal)
        self._seq = 0
        self._pending: list = []  # verdict messages not sent yet (see flush)
        self._pending_len = 0
        self.sock = netfilter_socket(rcvbuf)
        try:
            self._buf = bytearray(_RECV_SIZE)
            self._config(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)))
            self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0xFFFF, NFQNL_COPY_PACKET)))
            if gso:
                self._config(_attr(NFQA_CFG_FLAGS, _U32.pack(NFQA_CFG_F_GSO))
                             + _attr(NFQA_CFG_MASK, _U32.pack(NFQA_CFG_F_GSO)))
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def _msg(self, kind: int, flags: int, body: bytes) -> bytes:
        self._seq += 1
        nfg = _NFG.pack(socket.AF_UNSPEC, 0, self.queue)
        return _NLH.pack(_NLH.size + len(nfg) + len(body), kind, NLM_F_REQUEST | flags, self._seq, 0) + nfg + body

    def _config(self, attrs: bytes) -> None:
        """Send one config message with NLM_F_ACK and wait for its answer (OSError on refusal)."""
        self.sock.send(self._msg(MSG_CONFIG, NLM_F_ACK, attrs))
        seq = self._seq
        for _ in range(64):  # packets may already be queued ahead of the ack: bounded
            n = self.sock.recv_into(self._buf)
            for off, _, kind, mseq in messages(self._buf, n):
                if kind == NLMSG_ERROR and mseq == seq:
                    err = error_code(self._buf, off)
                    if err:
                        raise OSError(err, f"NFQUEUE {self.queue} config: {errno.errorcode.get(err, err)}")
                    return
        raise OSError(errno.ETIMEDOUT, f"NFQUEUE {self.queue} config: no acknowledgement")

    def receive(self, flags: int = 0) -> list[QueuedPacket]:
        """One recv: the packets in it (blocking per the socket's timeout unless ``flags`` has
        MSG_DONTWAIT; [] on ENOBUFS)."""
        try:
            n = self.sock.recv_into(self._buf, 0, flags)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.overruns += 1
                return []
            raise
        buf = self._buf
        out = []
        unpack_nla, unpack_hdr, unpack_u32 = _NLA.unpack_from, _PKT_HDR.unpack_from, _U32.unpack_from
        off = 0
        while off + _NLH.size <= n:
            length, kind, _, _, _ = _NLH.unpack_from(buf, off)
            if length < _NLH.size or off + length > n:
                break
            if kind == MSG_PACKET:
                # the attributes inline (per packet: no dict, no call)
                pid = hook = indev = outdev = info = mark = 0
                data = None
                at = off + 20  # nlmsghdr + nfgenmsg
                end = off + length
                while at + 4 <= end:
                    m, t = unpack_nla(buf, at)
                    if m < 4 or at + m > end:
                        break
                    t &= NLA_TYPE_MASK
                    if t == NFQA_PAYLOAD:
                        data = bytes(buf[at + 4:at + m])
                    elif t == NFQA_PACKET_HDR:
                        pid, _, hook = unpack_hdr(buf, at + 4)
                    elif t == NFQA_IFINDEX_INDEV:
                        indev = unpack_u32(buf, at + 4)[0]
                    elif t == NFQA_IFINDEX_OUTDEV:
                        outdev = unpack_u32(buf, at + 4)[0]
                    elif t == NFQA_SKB_INFO:
                        info = unpack_u32(buf, at + 4)[0]
                    elif t == NFQA_MARK:
                        mark = unpack_u32(buf, at + 4)[0]
                    at += (m + 3) & ~3
                if pid or data is not None:
                    out.append(QueuedPacket(pid, hook, indev, outdev, data or b"", info, mark))
            off += (length + 3) & ~3
        return out

    def verdict(self, pid: int, verdict: int, payload: bytes | bytearray | None = None) -> None:
        """Accept or drop packet ``pid``; with ``payload``, the packet is replaced by it."""
        self._seq += 1
        pending = self._pending
        if payload is None:
            pending.append(_NLH.pack(_VERDICT_LEN, MSG_VERDICT, NLM_F_REQUEST, self._seq, 0)
                           + _NFG.pack(socket.AF_UNSPEC, 0, self.queue) + _NLA.pack(12, NFQA_VERDICT_HDR)
                           + _VERDICT_HDR.pack(verdict, pid))
            self._pending_len += _VERDICT_LEN
        else:
            n = len(payload)
            pad = -n & 3
            pending.append(_NLH.pack(_VERDICT_LEN + 4 + n + pad, MSG_VERDICT, NLM_F_REQUEST, self._seq, 0)
                           + _NFG.pack(socket.AF_UNSPEC, 0, self.queue) + _NLA.pack(12, NFQA_VERDICT_HDR)
                           + _VERDICT_HDR.pack(verdict, pid) + _NLA.pack(4 + n, NFQA_PAYLOAD))
            pending.append(payload)  # no copy of the payload: sendmsg gathers it
            if pad:
                pending.append(b"\0" * pad)
            self._pending_len += _VERDICT_LEN + 4 + n + pad
        if not self.batch or self._pending_len > _SEND_MAX:
            self.flush()

    def flush(self) -> None:
        """Send the verdicts held back (several netlink messages in one datagram)."""
        if self._pending:
            pending = self._pending
            self._pending = []
            self._pending_len = 0
            self.sock.sendmsg(pending)

    def close(self) -> None:
        try:
            self._config(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_UNBIND, 0, socket.AF_INET)))
        except OSError:
            pass
        self.sock.close()
