"""pcapng and gzip-compressed captures: read as they come, damage named by block and offset.

The stored captures were written by Wireshark's own tools (editcap, mergecap) and gzip,
independently of conntrack.pcap (see tests/captures/README.md); the big-endian and
unusual blocks are built by hand here, straight from the pcapng spec.
"""
from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import pytest
from scapy.all import IP, TCP, UDP, IPv6, raw, rdpcap

from conntrack import Malformed
from conntrack.pcap import CaptureError, LinkType, open_capture, read_pcap, record_packet, write_capture, write_pcap

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
PKTS = [
    raw(IP(src="192.0.2.1", dst="198.51.100.2") / TCP(sport=1, dport=2, flags="S")),
    raw(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=3, dport=4) / b"payload"),
    raw(IP(src="198.51.100.2", dst="192.0.2.1") / TCP(sport=2, dport=1, flags="SA")),
]
TIMES = [1700000000.0, 1700000000.25, 1700000001.999999]


def records(path: Path | bytes):
    data = path if isinstance(path, bytes) else path.read_bytes()
    return list(read_pcap(io.BytesIO(data)))


def fields(recs):
    return [(r.number, r.time, r.linktype, r.data, r.orig_len) for r in recs]


class OneByteAtATime(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.pos >= len(self.data) or len(b) == 0:
            return 0
        b[0] = self.data[self.pos]
        self.pos += 1
        return 1


# ------------------------------------------------------------------ hand-built blocks
def block(order: str, btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack(order + "II", btype, len(body) + 12) + body + struct.pack(order + "I", len(body) + 12)


def shb(order: str, major: int = 1) -> bytes:
    return block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, major, 0, -1))


def idb(order: str, linktype: int, resol: int | None = None, tsoffset: int | None = None, snaplen: int = 0) -> bytes:
    opts = b""
    if resol is not None:
        opts += struct.pack(order + "HHB3x", 9, 1, resol)
    if tsoffset is not None:
        opts += struct.pack(order + "HHq", 14, 8, tsoffset)
    if opts:
        opts += struct.pack(order + "HH", 0, 0)
    return block(order, 1, struct.pack(order + "HHI", linktype, 0, snaplen) + opts)


def epb(order: str, ifid: int, stamp: int, data: bytes, orig: int | None = None) -> bytes:
    return block(order, 6, struct.pack(order + "IIIII", ifid, stamp >> 32, stamp & 0xFFFFFFFF, len(data),
                                       len(data) if orig is None else orig) + data)


def spb(order: str, data: bytes) -> bytes:
    return block(order, 3, struct.pack(order + "I", len(data)) + data)


def opb(order: str, ifid: int, stamp: int, data: bytes) -> bytes:
    return block(order, 2, struct.pack(order + "HHIIII", ifid, 0, stamp >> 32, stamp & 0xFFFFFFFF, len(data),
                                       len(data)) + data)


# ------------------------------------------------------------------ stored captures
@pytest.mark.parametrize("resolution", ["usec", "nsec"])
def test_reads_wireshark_pcapng(resolution):
    """editcap's pcapng of a scapy pcap: the same packets at the same times, as scapy reads them too."""
    ng = CAPTURES / f"test_reads_wireshark_pcapng_{resolution}.pcapng"
    ours = records(ng)
    same = records(CAPTURES / f"test_reads_scapy_capture_le_{resolution}.pcap")
    assert fields(ours) == fields(same) and len(ours) == 6
    assert [r.data for r in ours] == [raw(p) for p in rdpcap(str(ng))]
    if resolution == "nsec":
        assert ours[2].time == pytest.approx(1700000001.123456789, abs=1e-7)
    packets = [record_packet(r) for r in ours]
    assert packets[3] is None and [p.sport for p in packets if p is not None] == [40000, 80, 40000, 5, 7]
    cap = open_capture(io.BytesIO(ng.read_bytes()))
    assert (cap.format, cap.compressed) == ("pcapng", False)


def test_reads_wireshark_pcapng_two_interfaces():
    """mergecap of an Ethernet microsecond pcap and a raw-IP nanosecond pcap: two interfaces,
    each with its own link type and timestamp resolution."""
    recs = records(CAPTURES / "test_reads_wireshark_pcapng_two_interfaces.pcapng")
    assert [r.linktype for r in recs] == [1, 101, 1, 1, 1, 1, 101, 1]
    assert [r.number for r in recs] == list(range(1, 9))
    assert recs[1].time == pytest.approx(1700000000.250000001, abs=1e-7)
    assert recs[6].time == pytest.approx(1700000003.000000999, abs=1e-7)
    assert recs[0].time == pytest.approx(1700000000.000001, abs=1e-7)
    raw_ip = [record_packet(r) for r in recs if r.linktype == LinkType.RAW]
    assert [(p.sport, p.dport, p.l3) for p in raw_ip] == [(41000, 443, 0), (53, 5353, 0)]


@pytest.mark.parametrize("name, fmt, plain", [
    ("test_reads_gzip_capture_pcap.pcap.gz", "pcap", "test_reads_scapy_capture_le_usec.pcap"),
    ("test_reads_gzip_capture_pcapng.pcapng.gz", "pcapng", "test_reads_wireshark_pcapng_nsec.pcapng"),
])
def test_reads_gzip_capture(name, fmt, plain):
    data = (CAPTURES / name).read_bytes()
    assert data[:2] == b"\x1f\x8b"
    cap = open_capture(io.BytesIO(data))
    assert (cap.format, cap.compressed) == (fmt, True)
    assert fields(cap) == fields(records(CAPTURES / plain))
    slow = list(read_pcap(io.BufferedReader(OneByteAtATime(data), buffer_size=1)))
    assert fields(slow) == fields(records(CAPTURES / plain))


def test_gzip_members_concatenated_and_zero_padding():
    whole = (CAPTURES / "test_reads_scapy_capture_le_usec.pcap").read_bytes()
    two = gzip.compress(whole[:100], mtime=0) + gzip.compress(whole[100:], mtime=0) + bytes(7)
    assert fields(records(two)) == fields(records(whole))


# ------------------------------------------------------------------ hand-built: both orders, every block
@pytest.mark.parametrize("order", ["<", ">"])
def test_hand_built_sections_every_packet_block(order):
    other = ">" if order == "<" else "<"
    data = (shb(order)
            + idb(order, LinkType.RAW)  # default resolution: microseconds
            + idb(order, LinkType.ETHERNET, resol=0x80 | 20, tsoffset=1_700_000_000)  # 2^-20 s, offset
            + block(order, 5, bytes(20))  # interface statistics: skipped
            + epb(order, 0, 1_700_000_000_250_000, PKTS[0])
            + epb(order, 1, 3 << 19, b"\x02" * 6 + b"\x01" * 6 + b"\x08\x00" + PKTS[2])  # 1.5 s after the offset
            + spb(order, PKTS[1])  # no timestamp: keeps the last one
            + opb(order, 0, 1_700_000_002_000_000, PKTS[2])
            + shb(other)  # a new section, the other byte order: interfaces start again
            + idb(other, LinkType.IPV6, resol=9)
            + epb(other, 0, 1_700_000_003_123_456_789, PKTS[1], orig=1500))
    recs = records(data)
    assert [r.number for r in recs] == [1, 2, 3, 4, 5]
    assert [r.linktype for r in recs] == [101, 1, 101, 101, 229]
    assert [r.time for r in recs] == pytest.approx(
        [1700000000.25, 1700000001.5, 1700000001.5, 1700000002.0, 1700000003.123456789], abs=1e-7)
    assert recs[4].orig_len == 1500 and recs[4].data == PKTS[1]
    assert [record_packet(r).dport for r in recs] == [2, 1, 4, 1, 4]


def test_simple_packet_block_cut_to_the_snap_length():
    data = shb("<") + idb("<", LinkType.RAW, snaplen=20) + block("<", 3, struct.pack("<I", len(PKTS[0])) + PKTS[0][:20])
    (rec,) = records(data)
    assert rec.data == PKTS[0][:20] and rec.orig_len == len(PKTS[0])


# ------------------------------------------------------------------ writing
@pytest.mark.parametrize("nano", [False, True])
def test_write_pcapng_round_trip_and_scapy_reads_it(tmp_path, nano):
    buf = io.BytesIO()
    assert write_capture(buf, list(zip(TIMES, PKTS)), LinkType.RAW, "pcapng", nanosecond=nano) == 3
    recs = records(buf.getvalue())
    assert [r.data for r in recs] == PKTS and {r.linktype for r in recs} == {LinkType.RAW}
    assert [r.time for r in recs] == pytest.approx(TIMES, abs=1e-6)
    path = tmp_path / "ours.pcapng"
    path.write_bytes(buf.getvalue())
    theirs = rdpcap(str(path))
    assert [raw(p) for p in theirs] == PKTS
    assert [float(p.time) for p in theirs] == pytest.approx(TIMES, abs=1e-6)


def test_write_pcapng_one_interface_per_link_type():
    buf = io.BytesIO()
    eth = b"\x02" * 12 + b"\x08\x00" + PKTS[0]
    write_capture(buf, [(1.0, PKTS[0], LinkType.RAW), (2.0, eth, LinkType.ETHERNET), (3.0, PKTS[2])], fmt="pcapng")
    assert [(r.linktype, r.data) for r in records(buf.getvalue())] == [(101, PKTS[0]), (1, eth), (101, PKTS[2])]


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
@pytest.mark.parametrize("compressed", [False, True])
def test_write_capture_like_what_was_read(fmt, compressed):
    src = io.BytesIO()
    write_capture(src, list(zip(TIMES, PKTS)), fmt=fmt, compressed=compressed, nanosecond=True)
    cap = open_capture(io.BytesIO(src.getvalue()))
    assert (cap.format, cap.compressed, cap.nanosecond) == (fmt, compressed, fmt == "pcap")
    recs = list(cap)
    out = io.BytesIO()
    write_capture(out, [(r.time, r.data) for r in recs], like=cap)
    again = open_capture(io.BytesIO(out.getvalue()))
    assert (again.format, again.compressed) == (fmt, compressed)
    assert fields(again) == fields(recs)


def test_nanosecond_pcap_keeps_nanoseconds():
    buf = io.BytesIO()
    write_pcap(buf, [(1700000001.123456789, PKTS[0])], nanosecond=True)
    assert buf.getvalue()[:4] == b"\x4d\x3c\xb2\xa1"
    (rec,) = records(buf.getvalue())
    assert rec.time == pytest.approx(1700000001.123456789, abs=3e-7)


# ------------------------------------------------------------------ damage
def _blocks(data: bytes) -> list[tuple[int, int]]:
    """(start, length) of each block of a little-endian pcapng, read by the spec alone."""
    out, pos = [], 0
    while pos < len(data):
        length = struct.unpack_from("<I", data, pos + 4)[0]
        out.append((pos, length))
        pos += length
    return out


def _expected_cut_error(blocks, cut: int) -> str | None:
    """The exact error for the file cut at ``cut`` (None: cut on a block boundary)."""
    if cut < 4:
        return f"bad_capture_header: file header needs 24 bytes, have {cut}"
    for n, (start, length) in enumerate(blocks, 1):
        if start == cut:
            return None
        if start < cut < start + length:
            inside = cut - start
            where = f"block {n} at byte {start}: "
            if inside < 8:
                return f"bad_capture_block: {where}block header cut short ({inside} of 8 bytes)"
            if n == 1 and inside < 12:
                return f"bad_capture_header: {where}section header cut short ({inside} of 12 bytes)"
            return f"bad_capture_block: {where}block cut short ({inside} of {length} bytes)"
    raise AssertionError(cut)


def test_truncated_pcapng_names_the_block_at_every_cut():
    data = (CAPTURES / "test_reads_wireshark_pcapng_usec.pcapng").read_bytes()
    blocks = _blocks(data)
    assert len(blocks) >= 8  # SHB, IDB, 6 EPBs (and whatever else editcap adds)
    whole = records(data)
    for cut in range(len(data)):
        want = _expected_cut_error(blocks, cut)
        if want is None:
            packets_before = sum(1 for start, _ in blocks if start < cut and
                                 struct.unpack_from("<I", data, start)[0] in (2, 3, 6))
            assert fields(records(data[:cut])) == fields(whole[:packets_before]), cut
            continue
        with pytest.raises(CaptureError) as e:
            records(data[:cut])
        assert str(e.value) == want, cut


def test_truncated_gzip_names_the_record_and_the_cause():
    plain = (CAPTURES / "test_reads_scapy_capture_le_usec.pcap").read_bytes()
    data = (CAPTURES / "test_reads_gzip_capture_pcap.pcap.gz").read_bytes()
    seen = set()
    for cut in range(2, len(data)):
        with pytest.raises(CaptureError) as e:
            records(data[:cut])
        err = e.value
        assert err.reason is Malformed.BAD_CAPTURE_COMPRESSION, (cut, str(err))
        text = str(err)
        if err.record:
            assert text == (f"bad_capture_compression: record {err.record} at byte {err.offset}: "
                            "gzip data cut short (offsets are of the uncompressed data)"), cut
            seen.add("record")
        else:
            assert text.startswith("bad_capture_compression: gzip data cut short after "), cut
            assert text.endswith(" bytes of capture") and int(text.split()[-4]) <= len(plain)
            seen.add("whole")
    assert seen == {"record", "whole"}
    # the trailer alone missing (CRC and length): the data is all there, still an error
    with pytest.raises(CaptureError, match="gzip data cut short after 449 bytes of capture"):
        records(data[:-8])


def test_damaged_gzip_data_and_crc():
    data = bytearray((CAPTURES / "test_reads_gzip_capture_pcapng.pcapng.gz").read_bytes())
    crc = bytearray(data)
    crc[-8] ^= 0xFF  # the CRC32 in the trailer
    with pytest.raises(CaptureError) as e:
        records(bytes(crc))
    assert str(e.value) == ("bad_capture_compression: gzip data damaged (Error -3 while decompressing data: "
                            "incorrect data check) after 0 bytes of capture")  # zlib keeps back the failing call's data
    junk = bytes(data) + b"not gzip"
    with pytest.raises(CaptureError, match="trailing bytes after the gzip data are not gzip"):
        records(junk)
    with pytest.raises(CaptureError) as e:
        records(b"\x1f\x8b" + bytes(30))
    assert e.value.reason is Malformed.BAD_CAPTURE_COMPRESSION and "gzip data damaged" in str(e.value)


def _one(data: bytes) -> str:
    with pytest.raises(CaptureError) as e:
        records(data)
    return str(e.value)


def test_damaged_blocks_exact_errors():
    head = shb("<") + idb("<", LinkType.RAW)
    at = len(head)
    good = epb("<", 0, 1, PKTS[0])
    # trailing length differs from the leading one
    bad = bytearray(good)
    struct.pack_into("<I", bad, len(bad) - 4, 12)
    assert _one(head + bytes(bad)) == (f"bad_capture_block: block 3 at byte {at}: block length {len(good)} "
                                       "at its start but 12 at its end")
    # a length that is not a multiple of 4, or too small, or absurd
    for length in (13, 8):
        bad = bytearray(good)
        struct.pack_into("<I", bad, 4, length)
        assert _one(head + bytes(bad)) == (f"bad_capture_block: block 3 at byte {at}: block length {length} "
                                           "is not a multiple of 4 of at least 12")
    bad = bytearray(good)
    struct.pack_into("<I", bad, 4, 1 << 28)
    assert _one(head + bytes(bad)) == f"bad_capture_block: block 3 at byte {at}: block length {1 << 28} exceeds 16777216"
    # an interface that was never described
    assert _one(head + epb("<", 1, 1, PKTS[0])) == (
        f"bad_capture_block: block 3 at byte {at}: interface 1 is not described (1 in this section)")
    # a captured length that runs past its block
    bad = bytearray(good)
    struct.pack_into("<I", bad, 8 + 12, 999)
    assert _one(head + bytes(bad)) == (f"bad_capture_block: block 3 at byte {at}: captured length 999 runs "
                                       f"past the block ({len(good) - 32} bytes of data)")
    # a simple packet block before any interface
    assert _one(shb("<") + spb("<", PKTS[0])) == (
        "bad_capture_block: block 2 at byte 28: simple packet block before any interface description")
    # a second section resets the interfaces
    assert _one(head + shb("<") + good) == (
        f"bad_capture_block: block 4 at byte {at + 28}: interface 0 is not described (0 in this section)")
    # section header: byte-order magic and version
    assert _one(b"\x0a\x0d\x0d\x0a" + struct.pack("<I", 28) + b"\x01\x02\x03\x04" + bytes(16)) == (
        "bad_capture_header: block 1 at byte 0: bad byte-order magic 01020304")
    assert _one(shb(">", major=2) + idb(">", 1)) == (
        "bad_capture_header: block 1 at byte 0: pcapng version 2.0 (1.x is read)")
    # an option that runs past its block
    bad_idb = block("<", 1, struct.pack("<HHI", 101, 0, 0) + struct.pack("<HH", 9, 40))
    assert _one(shb("<") + bad_idb) == "bad_capture_block: block 2 at byte 28: interface option 9 runs past the block"


def test_pcapng_errors_are_the_one_parse_error():
    from conntrack import ParseError

    with pytest.raises(ParseError):
        records(shb("<") + spb("<", PKTS[0]))


@pytest.mark.parametrize("name", ["test_reads_gzip_capture_pcapng.pcapng.gz", "test_reads_gzip_capture_pcap.pcap.gz",
                                  "test_reads_wireshark_pcapng_two_interfaces.pcapng"])
def test_scenario_captures_read_every_format(name):
    """A scenario's [[capture]] goes through the same reader (sim.capture.read_capture)."""
    from sim.capture import read_capture

    got = read_capture(str(CAPTURES / name))
    # the IPv4 TCP/UDP packets of the stored captures: 3 TCP segments (+1 raw-IP SYN when merged)
    assert [p.sport for _, p in got] == ([40000, 41000, 80, 40000] if "two" in name else [40000, 80, 40000])
