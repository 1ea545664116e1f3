"""conntrack.pcap: reader and writer, checked against scapy's own pcap code."""
from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from scapy.all import IP, TCP, UDP, Ether, IPv6, raw, rdpcap, wrpcap

from conntrack import ParseError, Malformed
from conntrack.pcap import CaptureError, LinkType, read_pcap, record_packet, write_pcap

CAPTURES = Path(__file__).resolve().parent.parent / "captures"

PKTS = [
    raw(IP(src="192.0.2.1", dst="198.51.100.2") / TCP(sport=1, dport=2, flags="S")),
    raw(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=3, dport=4) / b"payload"),
    raw(IP(src="198.51.100.2", dst="192.0.2.1") / TCP(sport=2, dport=1, flags="SA")),
]
TIMES = [1700000000.0, 1700000000.25, 1700000001.999999]


def written(records=None, linktype=LinkType.RAW) -> bytes:
    f = io.BytesIO()
    n = write_pcap(f, records if records is not None else list(zip(TIMES, PKTS)), linktype)
    assert n == len(records if records is not None else PKTS)
    return f.getvalue()


class OneByteAtATime(io.RawIOBase):
    """A raw stream that hands out one byte per read (as a slow pipe may)."""

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


# ------------------------------------------------------------------ round trip
def test_round_trip():
    recs = list(read_pcap(io.BytesIO(written())))
    assert [r.number for r in recs] == [1, 2, 3]
    assert [r.data for r in recs] == PKTS and [r.orig_len for r in recs] == [len(p) for p in PKTS]
    assert [r.time for r in recs] == pytest.approx(TIMES, abs=1e-6)
    assert {r.linktype for r in recs} == {LinkType.RAW}


def test_round_trip_rounds_to_the_next_second():
    (rec,) = read_pcap(io.BytesIO(written([(5.9999996, PKTS[0])])))
    assert rec.time == 6.0


def test_scapy_reads_what_we_write(tmp_path):
    path = tmp_path / "ours.pcap"
    path.write_bytes(written())
    theirs = rdpcap(str(path))
    assert [raw(p) for p in theirs] == PKTS
    assert [float(p.time) for p in theirs] == pytest.approx(TIMES, abs=1e-6)


def test_empty_capture_has_no_records():
    assert list(read_pcap(io.BytesIO(written([])))) == []


@pytest.mark.parametrize("variant", ["le_usec", "be_usec", "le_nsec", "be_nsec"])
def test_reads_scapy_capture(variant):
    path = CAPTURES / f"test_reads_scapy_capture_{variant}.pcap"
    with path.open("rb") as f:
        ours = list(read_pcap(f))
    theirs = rdpcap(str(path))
    assert len(ours) == len(theirs) == 6
    assert [r.data for r in ours] == [raw(p) for p in theirs]
    assert [r.time for r in ours] == pytest.approx([float(p.time) for p in theirs], abs=1e-9)
    assert all(r.linktype == LinkType.ETHERNET for r in ours)
    if variant.endswith("nsec"):
        assert ours[2].time == pytest.approx(1700000001.123456789, abs=1e-7)
    # and the packets in it
    packets = [record_packet(r) for r in ours]
    assert packets[3] is None  # ARP
    assert [p.sport for p in packets if p is not None] == [40000, 80, 40000, 5, 7]


def test_reader_whole_byte_by_byte_and_with_trailing_data():
    data = written()
    whole = list(read_pcap(io.BytesIO(data)))
    slow = list(read_pcap(io.BufferedReader(OneByteAtATime(data), buffer_size=1)))
    assert slow == whole
    # trailing bytes that do not make a record are damage, named as the next record
    for extra in (b"\x00", bytes(15), struct.pack("<IIII", 0, 0, 10, 10) + b"abc"):
        it = read_pcap(io.BytesIO(data + extra))
        assert list(next(it) for _ in range(3)) == whole
        with pytest.raises(CaptureError) as e:
            next(it)
        assert e.value.record == 4 and e.value.offset == len(data)


# ------------------------------------------------------------------ damage
@pytest.mark.parametrize("cut", [0, 1, 4, 23])
def test_truncated_file_header(cut):
    with pytest.raises(CaptureError) as e:
        list(read_pcap(io.BytesIO(written()[:cut])))
    assert e.value.reason is Malformed.BAD_CAPTURE_HEADER and e.value.record == 0
    assert str(e.value) == f"bad_capture_header: file header needs 24 bytes, have {cut}"


def test_not_a_pcap_and_pcapng():
    with pytest.raises(CaptureError, match="not a pcap file"):
        list(read_pcap(io.BytesIO(b"GIF89a" + bytes(30))))
    # pcapng is read now (tests/unit/test_pcapng.py); a damaged one is named as such
    with pytest.raises(CaptureError) as e:
        list(read_pcap(io.BytesIO(b"\x0a\x0d\x0d\x0a" + bytes(40))))
    assert str(e.value) == "bad_capture_header: block 1 at byte 0: bad byte-order magic 00000000"


def test_truncated_record_names_the_record_at_every_cut():
    data = written()
    starts = [24]
    for p in PKTS:
        starts.append(starts[-1] + 16 + len(p))
    for cut in range(25, len(data)):
        number = max(i for i, s in enumerate(starts) if s <= cut) + 1  # the record being read
        if cut == starts[number - 1]:
            recs = list(read_pcap(io.BytesIO(data[:cut])))  # cut on a record boundary: whole records
            assert len(recs) == number - 1
            continue
        with pytest.raises(CaptureError) as e:
            list(read_pcap(io.BytesIO(data[:cut])))
        err = e.value
        assert (err.reason, err.record, err.offset) == (Malformed.BAD_CAPTURE_RECORD, number, starts[number - 1])
        assert str(err).startswith(f"bad_capture_record: record {number} at byte {starts[number - 1]}: ")
        inside = cut - starts[number - 1]
        if inside < 16:
            assert str(err).endswith(f"record header cut short ({inside} of 16 bytes)")
        else:
            size = len(PKTS[number - 1])
            assert str(err).endswith(f"record data cut short ({inside - 16} of {size} bytes)")


def test_absurd_record_length():
    data = bytearray(written())
    struct.pack_into("<I", data, 24 + 8, 10_000_000)
    with pytest.raises(CaptureError) as e:
        list(read_pcap(io.BytesIO(bytes(data))))
    assert (e.value.record, e.value.reason) == (1, Malformed.BAD_CAPTURE_RECORD) and "exceeds" in str(e.value)


def test_capture_error_is_the_one_parse_error():
    assert issubclass(CaptureError, ParseError) and issubclass(CaptureError, ValueError)


# ------------------------------------------------------------------ link types
def test_record_packet_per_link_type():
    ip = PKTS[0]
    cases = {
        LinkType.RAW: ip,
        LinkType.IPV4: ip,
        LinkType.NULL: struct.pack("<I", 2) + ip,
        LinkType.ETHERNET: raw(Ether(type=0x0800)) + ip,
        LinkType.LINUX_SLL: bytes(14) + b"\x08\x00" + ip,
        LinkType.LINUX_SLL2: b"\x08\x00" + bytes(18) + ip,
    }
    for lt, data in cases.items():
        (rec,) = read_pcap(io.BytesIO(written([(1.0, data)], lt)))
        p = record_packet(rec)
        assert (p.sport, p.dport, p.l3) == (1, 2, len(data) - len(ip)), lt


def test_non_ip_cooked_record_is_none_and_unknown_link_type_is_an_error():
    (rec,) = read_pcap(io.BytesIO(written([(1.0, bytes(14) + b"\x08\x06" + bytes(28))], LinkType.LINUX_SLL)))
    assert record_packet(rec) is None
    (rec,) = read_pcap(io.BytesIO(written([(1.0, PKTS[0])], 147)))  # USER0
    with pytest.raises(CaptureError) as e:
        record_packet(rec)
    assert e.value.reason is Malformed.UNSUPPORTED_LINKTYPE


def test_scapy_written_raw_ip_capture(tmp_path):
    path = tmp_path / "raw.pcap"
    wrpcap(str(path), [IP(p) for p in PKTS[::2]], linktype=101)
    with path.open("rb") as f:
        recs = list(read_pcap(f))
    assert [record_packet(r).dport for r in recs] == [2, 1]
