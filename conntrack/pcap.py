"""Captures as they come: pcap (both byte orders, micro- and nanosecond stamps), pcapng
(:mod:`conntrack.pcapng`), and either of them gzip-compressed.

``open_capture`` looks at the first bytes and picks the reader, so every command that
takes a capture (``roam conntrack``, ``roam nat translate``, a scenario's ``[[capture]]``)
reads them all; ``read_pcap`` is its iterator.  A reader reports damage as one
:class:`CaptureError` naming the record (pcap) or block (pcapng) and its byte offset
(of the decompressed data for gzip) instead of raising from deep inside.  Records come
out as (timestamp, linktype, bytes); ``record_packet`` turns them into parsed IP packets
whatever the link type.  ``write_pcap``/``write_capture`` write them back.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable, Iterator, Protocol

from .errors import Malformed, ParseError
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


class Reader(Protocol):
    """What a capture is read from: an open binary file, or the gzip reader around one."""

    def read(self, n: int, /) -> bytes: ...


class Writer(Protocol):
    """What a capture is written to: an open binary file, or a gzip writer around one."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"  # a pcapng section header block's type, in either byte order
GZIP_MAGIC = b"\x1f\x8b"


class CaptureError(ParseError):
    """A damaged capture; names the record (pcap) or block (pcapng), 1-based, and its byte offset."""

    def __init__(self, reason: Malformed, detail: str, record: int = 0, offset: int = 0,
                 unit: str = "record") -> None:
        self.record = record
        self.offset = offset
        self.unit = unit
        where = f"{unit} {record} at byte {offset}: " if record else ""
        super().__init__(reason, where + detail)


@dataclass(frozen=True, slots=True)
class Record:
    number: int
    time: float
    linktype: int
    data: bytes
    orig_len: int


class Capture:
    """An open capture: iterate it for its :class:`Record` s.  ``format`` (\"pcap\" or
    \"pcapng\"), ``compressed`` and ``nanosecond`` say what was read, so that a tool that
    rewrites a capture can write the same kind back (``write_capture(..., like=capture)``)."""

    __slots__ = ("format", "compressed", "nanosecond", "_records")

    def __init__(self, fmt: str, compressed: bool, nanosecond: bool, records: Iterator[Record]) -> None:
        self.format, self.compressed, self.nanosecond, self._records = fmt, compressed, nanosecond, records

    def __iter__(self) -> Iterator[Record]:
        return self._records


def open_capture(f: Reader) -> Capture:
    """Read the file header of a pcap or pcapng capture, gzip-compressed or not.

    Raises CaptureError for a file that is none of these; the records are read as iterated."""
    head = f.read(4)
    gz = None
    if head[:2] == GZIP_MAGIC:
        gz = _Gunzip(head, f)
        f, head = gz, gz.read(4)
    if head == PCAPNG_MAGIC:
        from .pcapng import read_pcapng  # pcapng builds on this module's Record and CaptureError

        records, nano = read_pcapng(f, head), False
        fmt = "pcapng"
    else:
        head += f.read(24 - len(head)) if len(head) == 4 else b""
        records, nano = _read_pcap(f, head, gz)
        fmt = "pcap"
    if gz is not None:
        records = _gunzipped(records, gz)
    return Capture(fmt, gz is not None, nano, records)


def read_pcap(f: Reader) -> Iterator[Record]:
    """The records of a capture in any format ``open_capture`` reads (the name is historical)."""
    return iter(open_capture(f))


def _read_pcap(f: Reader, head: bytes, gz: "_Gunzip | None") -> tuple[Iterator[Record], bool]:
    if len(head) < 24:
        raise _gunzip_error(gz) or CaptureError(
            Malformed.BAD_CAPTURE_HEADER, f"file header needs 24 bytes, have {len(head)}")
    if head[:4] not in _MAGIC:
        raise CaptureError(Malformed.BAD_CAPTURE_HEADER, f"not a pcap file (magic {head[:4].hex()}); "
                           "pcap, pcapng and gzip-compressed pcap or pcapng are read")
    order, scale = _MAGIC[head[:4]]
    _, _, _, _, _, linktype = struct.unpack(order + "HHiIII", head[4:])
    return _pcap_records(f, order, scale, linktype & 0x0FFFFFFF), scale < 1e-6


def _pcap_records(f: Reader, order: str, scale: float, linktype: int) -> Iterator[Record]:
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


# ---------------------------------------------------------------- gzip
class _Gunzip:
    """Decompresses gzip members (one or several, as ``cat a.gz b.gz`` makes) as they are read.

    Damage (cut short, bad data, bad CRC) does not raise here: the data just ends, and
    ``problem`` says why, so that the capture reader first names the record it was reading."""

    CHUNK = 1 << 16

    def __init__(self, head: bytes, f: Reader) -> None:
        self._f, self._pending = f, head
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._fed = False  # the current member has had input
        self._buf = bytearray()
        self._done = False
        self.problem: str | None = None
        self.total = 0  # decompressed bytes handed out

    def read(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) < n and not self._done:
            self._fill()
        out = bytes(buf[:n])
        del buf[:n]
        self.total += len(out)
        return out

    def _fill(self) -> None:
        z = self._z
        if z.unconsumed_tail:
            data = z.unconsumed_tail
        else:
            data, self._pending = self._pending or self._f.read(self.CHUNK), b""
            if not data:
                if self._fed and not z.eof:
                    self.problem = "gzip data cut short"
                self._done = True
                return
        try:
            self._buf += z.decompress(data, self.CHUNK)
        except zlib.error as exc:
            self.problem = f"gzip data damaged ({exc})"
            self._done = True
            return
        self._fed = True
        if z.eof:  # end of a member: another may follow (zero padding is allowed after the last)
            rest = z.unused_data.lstrip(b"\0")
            self._z, self._fed = zlib.decompressobj(16 + zlib.MAX_WBITS), False
            if rest:
                if rest[:1] != GZIP_MAGIC[:1] or rest[1:2] not in (b"", GZIP_MAGIC[1:]):
                    self.problem = "trailing bytes after the gzip data are not gzip"
                    self._done = True
                    return
                self._pending = rest


def _gunzip_error(gz: "_Gunzip | None", inner: CaptureError | None = None) -> CaptureError | None:
    """The error to raise for a capture whose gzip stream is damaged (None if it is not)."""
    if gz is None or gz.problem is None:
        return None
    if inner is not None and inner.record:
        return CaptureError(Malformed.BAD_CAPTURE_COMPRESSION, f"{gz.problem} (offsets are of the uncompressed data)",
                            inner.record, inner.offset, inner.unit)
    return CaptureError(Malformed.BAD_CAPTURE_COMPRESSION, f"{gz.problem} after {gz.total} bytes of capture")


def _gunzipped(records: Iterator[Record], gz: _Gunzip) -> Iterator[Record]:
    try:
        yield from records
    except CaptureError as exc:
        raise _gunzip_error(gz, exc) or exc from None
    err = _gunzip_error(gz)
    if err is not None:
        raise err


def write_pcap(f: Writer, records: Iterable, linktype: int = LinkType.RAW, nanosecond: bool = False) -> int:
    """Write (time, bytes) pairs as a micro- (or nano-) second pcap; returns the count."""
    magic, unit = (0xA1B23C4D, 1_000_000_000) if nanosecond else (0xA1B2C3D4, 1_000_000)
    f.write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, MAX_SNAPLEN, linktype))
    n = 0
    for t, data, *_ in records:
        sec = int(t)
        frac = int(round((t - sec) * unit))
        if frac >= unit:
            sec, frac = sec + 1, frac - unit
        f.write(struct.pack("<IIII", sec, frac, len(data), len(data)))
        f.write(data)
        n += 1
    return n


def write_capture(f: Writer, records: Iterable, linktype: int = LinkType.RAW, fmt: str = "pcap",
                  compressed: bool = False, nanosecond: bool = False, like: Capture | None = None) -> int:
    """Write (time, bytes) pairs as pcap or pcapng, gzip-compressed or not; ``like`` takes
    all three choices from a capture that was read.  Returns the count."""
    if like is not None:
        fmt, compressed, nanosecond = like.format, like.compressed, like.nanosecond
    if fmt not in ("pcap", "pcapng"):
        raise ValueError(f"capture format {fmt!r}: pcap or pcapng")
    if compressed:
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as z:
            return write_capture(z, records, linktype, fmt, False, nanosecond)
    if fmt == "pcapng":
        from .pcapng import write_pcapng

        return write_pcapng(f, records, linktype, nanosecond)
    return write_pcap(f, records, linktype, nanosecond)


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
