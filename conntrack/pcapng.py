"""pcapng (Wireshark's and tshark's default format): a small reader and writer of its blocks.

A pcapng file is a run of blocks, each ``type, total length, body, total length``.  A
section header block (SHB) sets the byte order (by its byte-order magic) and starts a new
list of interfaces; an interface description block (IDB) gives one interface its link
type and timestamp resolution (``if_tsresol``) and offset (``if_tsoffset``); enhanced (EPB),
simple (SPB) and obsolete (OPB) packet blocks carry the packets.  Every other block
(name resolution, statistics, decryption secrets, custom) is skipped whole.

Damage is one :class:`~conntrack.pcap.CaptureError` naming the block (1-based) and its
byte offset, as the pcap reader names records; a packet's ``Record.number`` counts packets.
"""
from __future__ import annotations

import struct
from typing import Iterable, Iterator

from .errors import Malformed
from .pcap import MAX_SNAPLEN, PCAPNG_MAGIC, CaptureError, LinkType, Reader, Record, Writer

SHB, IDB, OPB, SPB, EPB = 0x0A0D0D0A, 1, 2, 3, 6
BOM = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}  # 0x1A2B3C4D as each order stores it
MAX_BLOCK = 1 << 24  # no packet needs more; bounds what a damaged length makes us read
OPT_END, IF_TSRESOL, IF_TSOFFSET = 0, 9, 14
_HEAD, _BLOCK = Malformed.BAD_CAPTURE_HEADER, Malformed.BAD_CAPTURE_BLOCK


class _Iface:
    """What a packet block needs of its interface: link type, snap length and clock."""

    __slots__ = ("linktype", "snaplen", "units", "binary", "offset")

    def __init__(self, linktype: int, snaplen: int, resol: int, offset: int) -> None:
        self.linktype, self.snaplen, self.offset = linktype, snaplen, offset
        self.binary = bool(resol & 0x80)  # if_tsresol: 2^-n when the top bit is set, else 10^-n
        self.units = 1 << (resol & 0x7F) if self.binary else 10 ** resol

    def time(self, stamp: int) -> float:
        sec, frac = divmod(stamp, self.units)
        return self.offset + sec + frac / self.units


def _err(block: int, offset: int, reason: Malformed, detail: str) -> CaptureError:
    return CaptureError(reason, detail, block, offset, "block")


def read_pcapng(f: Reader, head: bytes = b"") -> Iterator[Record]:
    """The packets of a pcapng stream; ``head`` is its first bytes if already read."""
    offset = block = number = 0
    order = "<"
    ifaces: list[_Iface] = []
    last_time = 0.0
    while True:
        hdr = head + f.read(8 - len(head)) if len(head) < 8 else head
        head = b""
        if not hdr:
            return
        block += 1
        if len(hdr) < 8:
            raise _err(block, offset, _BLOCK, f"block header cut short ({len(hdr)} of 8 bytes)")
        if hdr[:4] == PCAPNG_MAGIC:  # a new section: its byte order comes from its body
            bom = f.read(4)
            if len(bom) < 4:
                raise _err(block, offset, _HEAD, f"section header cut short ({8 + len(bom)} of 12 bytes)")
            if bom not in BOM:
                raise _err(block, offset, _HEAD, f"bad byte-order magic {bom.hex()}")
            order, prefix = BOM[bom], bom
            btype, length = SHB, struct.unpack(order + "I", hdr[4:])[0]
        else:
            btype, length = struct.unpack(order + "II", hdr)
            prefix = b""
        if length < 12 or length % 4:
            raise _err(block, offset, _BLOCK, f"block length {length} is not a multiple of 4 of at least 12")
        if length > MAX_BLOCK:
            raise _err(block, offset, _BLOCK, f"block length {length} exceeds {MAX_BLOCK}")
        rest = f.read(length - 8 - len(prefix))
        if len(rest) < length - 8 - len(prefix):
            raise _err(block, offset, _BLOCK, f"block cut short ({8 + len(prefix) + len(rest)} of {length} bytes)")
        body = prefix + rest[:-4]
        trailer = struct.unpack(order + "I", rest[-4:])[0]
        if trailer != length:
            raise _err(block, offset, _BLOCK, f"block length {length} at its start but {trailer} at its end")
        if btype == EPB:
            if len(body) < 20:
                raise _err(block, offset, _BLOCK, f"enhanced packet block body of {len(body)} bytes, under 20")
            ifid, hi, lo, incl, orig = struct.unpack_from(order + "IIIII", body)
            if ifid >= len(ifaces):
                raise _err(block, offset, _BLOCK, f"interface {ifid} is not described ({len(ifaces)} in this section)")
            if incl > len(body) - 20:
                raise _err(block, offset, _BLOCK, f"captured length {incl} runs past the block ({len(body) - 20} bytes of data)")
            iface = ifaces[ifid]
            number += 1
            last_time = iface.time(hi << 32 | lo)
            yield Record(number, last_time, iface.linktype, body[20:20 + incl], orig)
        elif btype == IDB:
            ifaces.append(_interface(body, order, block, offset))
        elif btype == SPB:
            if not ifaces:
                raise _err(block, offset, _BLOCK, "simple packet block before any interface description")
            if len(body) < 4:
                raise _err(block, offset, _BLOCK, f"simple packet block body of {len(body)} bytes, under 4")
            orig = struct.unpack_from(order + "I", body)[0]
            snap = ifaces[0].snaplen
            incl = min(orig, snap) if snap else orig
            if incl > len(body) - 4:
                raise _err(block, offset, _BLOCK, f"packet length {incl} runs past the block ({len(body) - 4} bytes of data)")
            number += 1  # no timestamp of its own: it keeps the last packet's
            yield Record(number, last_time, ifaces[0].linktype, body[4:4 + incl], orig)
        elif btype == OPB:
            if len(body) < 20:
                raise _err(block, offset, _BLOCK, f"packet block body of {len(body)} bytes, under 20")
            ifid, _, hi, lo, incl, orig = struct.unpack_from(order + "HHIIII", body)
            if ifid >= len(ifaces):
                raise _err(block, offset, _BLOCK, f"interface {ifid} is not described ({len(ifaces)} in this section)")
            if incl > len(body) - 20:
                raise _err(block, offset, _BLOCK, f"captured length {incl} runs past the block ({len(body) - 20} bytes of data)")
            number += 1
            last_time = ifaces[ifid].time(hi << 32 | lo)
            yield Record(number, last_time, ifaces[ifid].linktype, body[20:20 + incl], orig)
        elif btype == SHB:
            if len(body) < 16:
                raise _err(block, offset, _HEAD, f"section header body of {len(body)} bytes, under 16")
            major, minor = struct.unpack_from(order + "HH", body, 4)
            if major != 1:
                raise _err(block, offset, _HEAD, f"pcapng version {major}.{minor} (1.x is read)")
            ifaces = []
        offset += length


def _interface(body: bytes, order: str, block: int, offset: int) -> _Iface:
    if len(body) < 8:
        raise _err(block, offset, _BLOCK, f"interface description body of {len(body)} bytes, under 8")
    linktype, _, snaplen = struct.unpack_from(order + "HHI", body)
    resol, tsoffset = 6, 0
    pos = 8
    while pos + 4 <= len(body):
        code, size = struct.unpack_from(order + "HH", body, pos)
        if code == OPT_END:
            break
        value = body[pos + 4:pos + 4 + size]
        if len(value) < size:
            raise _err(block, offset, _BLOCK, f"interface option {code} runs past the block")
        if code == IF_TSRESOL and size >= 1:
            resol = value[0]
            if (resol & 0x7F) > (63 if resol & 0x80 else 18):
                raise _err(block, offset, _BLOCK, f"interface timestamp resolution {resol:#x} is finer than any clock")
        elif code == IF_TSOFFSET and size == 8:
            tsoffset = struct.unpack(order + "q", value)[0]
        pos += 4 + (size + 3) // 4 * 4
    if snaplen > MAX_SNAPLEN:
        snaplen = 0  # larger than any record we accept anyway: no limit
    return _Iface(linktype, snaplen, resol, tsoffset)


# ---------------------------------------------------------------- writing
def _block(btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


def write_pcapng(f: Writer, records: Iterable, linktype: int = LinkType.RAW, nanosecond: bool = False) -> int:
    """Write (time, bytes) pairs, or (time, bytes, linktype) triples, as one little-endian
    pcapng section with one interface per link type; returns the count."""
    f.write(_block(SHB, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)))
    resol = 9 if nanosecond else 6
    units = 10 ** resol
    ifaces: dict[int, int] = {}
    n = 0
    for t, data, *lt in records:
        lt = lt[0] if lt else linktype
        ifid = ifaces.get(lt)
        if ifid is None:
            ifid = ifaces[lt] = len(ifaces)
            opts = struct.pack("<HHB3x", IF_TSRESOL, 1, resol) + struct.pack("<HH", OPT_END, 0)
            f.write(_block(IDB, struct.pack("<HHI", lt, 0, MAX_SNAPLEN) + opts))
        stamp = int(t) * units + round((t - int(t)) * units)
        f.write(_block(EPB, struct.pack("<IIIII", ifid, stamp >> 32, stamp & 0xFFFFFFFF, len(data), len(data)) + data))
        n += 1
    if not ifaces:  # an empty capture still names its link type
        f.write(_block(IDB, struct.pack("<HHI", linktype, 0, MAX_SNAPLEN)))
    return n
