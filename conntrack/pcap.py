"""pcap files (libpcap format, both byte orders, micro- and nanosecond stamps).

A reader that reports damage by record number instead of raising from deep inside,
and a writer.  Records come out as (timestamp, linktype, bytes); ``ip_packets``
turns them into parsed IP packets whatever the link type.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import BinaryIO, Iterator

from .errors import ParseError, Malformed
from .packet import Packet, parse_frame, parse_ip


class LinkType(IntEnum):
    NULL = 0  # BSD loopback: 4-byte address family
    ETHERNET = 1
    RAW = 101  # raw IP
    LINUX_SLL = 113
    LINUX_SLL2 = 276
    IPV4 = 228
    IPV6 = 229


_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
MAX_SNAPLEN = 262144


class CaptureError(ParseError):
    """A damaged capture; names the record (1-based) and its byte offset."""

    def __init__(self, reason: Malformed, detail: str, record: int = 0, offset: int = 0) -> None:
        self.record = record
        self.offset = offset
        where = f"record {record} at byte {offset}: " if record else ""
        super().__init__(reason, where + detail)


@dataclass(frozen=True, slots=True)
class Record:
    number: int
    time: float
    linktype: int
    data: bytes
    orig_len: int


def read_pcap(f: BinaryIO) -> Iterator[Record]:
    head = f.read(24)
    if len(head) < 24:
        raise CaptureError(Malformed.BAD_CAPTURE_HEADER, f"file header needs 24 bytes, have {len(head)}")
    if head[:4] == b"\x0a\x0d\x0d\x0a":
        raise CaptureError(Malformed.BAD_CAPTURE_HEADER, "pcapng is not supported; convert with "
                           "`tcpdump -r in.pcapng -w out.pcap` or capture with `tcpdump -w` (pcap)")
    if head[:4] not in _MAGIC:
        raise CaptureError(Malformed.BAD_CAPTURE_HEADER, f"not a pcap file (magic {head[:4].hex()})")
    order, scale = _MAGIC[head[:4]]
    _, _, _, _, _, linktype = struct.unpack(order + "HHiIII", head[4:])
    linktype &= 0x0FFFFFFF
    rec = struct.Struct(order + "IIII")
    offset, number = 24, 0
    while True:
        hdr = f.read(16)
        if not hdr:
            return
        number += 1
        if len(hdr) < 16:
            raise CaptureError(Malformed.BAD_CAPTURE_RECORD, f"record header cut short ({len(hdr)} of 16 bytes)",
                               number, offset)
        sec, frac, incl, orig = rec.unpack(hdr)
        if incl > MAX_SNAPLEN:
            raise CaptureError(Malformed.BAD_CAPTURE_RECORD, f"record length {incl} exceeds {MAX_SNAPLEN}",
                               number, offset)
        data = f.read(incl)
        if len(data) < incl:
            raise CaptureError(Malformed.BAD_CAPTURE_RECORD, f"record data cut short ({len(data)} of {incl} bytes)",
                               number, offset)
        yield Record(number, sec + frac * scale, linktype, data, orig)
        offset += 16 + incl


def write_pcap(f: BinaryIO, records, linktype: int = LinkType.RAW) -> int:
    """Write (time, bytes) pairs as a microsecond pcap; returns the count."""
    f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, MAX_SNAPLEN, linktype))
    n = 0
    for t, data in records:
        sec = int(t)
        usec = int(round((t - sec) * 1e6))
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        f.write(struct.pack("<IIII", sec, usec, len(data), len(data)))
        f.write(data)
        n += 1
    return n


def ip_offset(linktype: int, data: bytes) -> int | None:
    """Where the IP packet starts in a record of this link type, or None if not IP."""
    if linktype in (LinkType.RAW, LinkType.IPV4, LinkType.IPV6, 12, 14):
        return 0
    if linktype == LinkType.NULL:
        return 4
    if linktype == LinkType.LINUX_SLL:
        return 16 if len(data) >= 16 and data[14:16] in (b"\x08\x00", b"\x86\xdd") else None
    if linktype == LinkType.LINUX_SLL2:
        return 20 if len(data) >= 20 and data[0:2] in (b"\x08\x00", b"\x86\xdd") else None
    raise CaptureError(Malformed.UNSUPPORTED_LINKTYPE, f"link type {linktype}")


def record_packet(rec: Record) -> Packet | None:
    """The IP packet in a record (None for non-IP frames such as ARP)."""
    if rec.linktype == LinkType.ETHERNET:
        return parse_frame(rec.data).packet
    off = ip_offset(rec.linktype, rec.data)
    return None if off is None else parse_ip(rec.data, off)
