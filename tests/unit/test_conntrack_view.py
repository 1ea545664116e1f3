"""`roam conntrack`: conntrack-tools' layouts, filters, count, events and clean errors.

The expected lines are written out whole, in libnetfilter_conntrack's layout
(``%-8s %u`` names and numbers, ``%9s`` event tags, ``[SEC.USEC]\\t`` stamps); the
netns test tests/netns/test_conntrack_cli.py checks the same layouts against the real
``conntrack`` on the kernel's table.
"""
from __future__ import annotations

import gzip
import io
import json

import pytest
from scapy.all import ICMP, IP, TCP, UDP, IPv6, raw

from conntrack.pcap import LinkType, write_capture
from tools.cli import main

C, S, C6, S6 = "198.18.0.2", "203.0.113.2", "2001:db8:18::2", "2001:db8:113::2"
T0 = 1700000000.0


def _tcp(src, dst, sport, dport, flags, payload=b""):
    return raw(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / payload)


PACKETS = [
    (T0 + 0.000001, _tcp(C, S, 40000, 80, "S")),
    (T0 + 0.1, _tcp(S, C, 80, 40000, "SA")),
    (T0 + 0.2, _tcp(C, S, 40000, 80, "A")),
    (T0 + 0.3, _tcp(C, S, 40000, 80, "PA", b"GET /")),
    (T0 + 1.0, raw(IP(src=C, dst=S) / UDP(sport=5000, dport=53) / b"q")),
    (T0 + 1.5, raw(IP(src=S, dst=C) / UDP(sport=53, dport=5000) / b"answer")),
    (T0 + 2.0, raw(IP(src=C, dst=S, id=7) / ICMP(id=77, seq=1) / b"ping")),
    (T0 + 3.0, raw(IPv6(src=C6, dst=S6) / UDP(sport=6000, dport=123) / b"ntp")),
]
L = [len(p) for _, p in PACKETS]


@pytest.fixture()
def capture(tmp_path):
    path = tmp_path / "cap.pcap"
    with path.open("wb") as f:
        write_capture(f, PACKETS, LinkType.RAW)
    return str(path)


def roam(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(["conntrack", *argv])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# The table at the last packet (T0 + 3.0); timeouts are Linux's defaults, whole seconds left.
TABLE = [
    f"tcp      6 431997 ESTABLISHED src={C} dst={S} sport=40000 dport=80 packets=3 bytes={L[0] + L[2] + L[3]} "
    f"src={S} dst={C} sport=80 dport=40000 packets=1 bytes={L[1]} [ASSURED] mark=0 use=1",
    f"udp      17 118 src={C} dst={S} sport=5000 dport=53 packets=1 bytes={L[4]} "
    f"src={S} dst={C} sport=53 dport=5000 packets=1 bytes={L[5]} [ASSURED] mark=0 use=1",
    f"icmp     1 29 src={C} dst={S} type=8 code=0 id=77 packets=1 bytes={L[6]} [UNREPLIED] "
    f"src={S} dst={C} type=0 code=0 id=77 packets=0 bytes=0 mark=0 use=1",
    f"udp      17 30 src={C6} dst={S6} sport=6000 dport=123 packets=1 bytes={L[7]} [UNREPLIED] "
    f"src={S6} dst={C6} sport=123 dport=6000 packets=0 bytes=0 mark=0 use=1",
]


def test_default_layout_is_conntrack_L(capsys, capture):
    code, out, err = roam(capsys, capture)
    assert code == 0 and out.splitlines() == TABLE
    assert err == "roam conntrack: 4 flow entries have been shown (8 records).\n"
    assert roam(capsys, capture, "-L")[1] == out


def test_extended_layout_prints_the_family_number_as_conntrack_does(capsys, capture):
    code, out, _ = roam(capsys, capture, "-o", "extended")
    lines = out.splitlines()
    assert [ln[:11] for ln in lines] == ["ipv4     2 "] * 3 + ["ipv6     10"]
    assert lines == [("ipv4     2 " if i < 3 else "ipv6     10 ") + t for i, t in enumerate(TABLE)]


@pytest.mark.parametrize("args, rows", [
    (["-p", "tcp"], [0]), (["-p", "17"], [1, 3]), (["-p", "UDP", "-f", "ipv6"], [3]),
    (["--state", "established"], [0]), (["--state", "TIME_WAIT"], []),
    (["-s", C], [0, 1, 2]), (["-s", "198.18.0.0/16"], [0, 1, 2]), (["-d", S6], [3]), (["-s", "2001:db8::/32"], [3]),
    (["-r", S], [0, 1, 2]), (["-q", C6], [3]), (["--sport", "40000"], [0]), (["--dport", "53"], [1]),
    (["--dport", "77"], []),  # the ICMP id is not a port
    (["-m", "0"], [0, 1, 2, 3]), (["-m", "1"], []), (["--mark", "0x10/0x0f"], [0, 1, 2, 3]),
    (["-p", "udp", "--dport", "123", "-d", S6], [3]), (["-p", "tcp", "-d", S6], []),
])
def test_filters(capsys, capture, args, rows):
    code, out, err = roam(capsys, capture, *args)
    assert code == 0 and out.splitlines() == [TABLE[i] for i in rows]
    assert f": {len(rows)} flow entries have been shown" in err
    code, out, err = roam(capsys, capture, "-C", *args)
    assert (code, out, err) == (0, f"{len(rows)}\n", "")


def test_json_kept_and_filtered(capsys, capture):
    code, out, _ = roam(capsys, capture, "--json", "-p", "icmp")
    (d,) = json.loads(out)
    assert (d["family"], d["l3protonum"], d["proto"], d["protonum"], d["mark"]) == ("ipv4", 2, "icmp", 1, 0)
    assert d["original"] == {"src": C, "dst": S, "sport": 77, "dport": 8, "packets": 1, "bytes": L[6],
                             "type": 8, "code": 0, "id": 77}
    assert d["unreplied"] and not d["assured"] and d["timeout"] == pytest.approx(29.0)


EVENTS = [
    f"[1700000000.000001]\t    [NEW] tcp      6 120 SYN_SENT src={C} dst={S} sport=40000 dport=80 [UNREPLIED] "
    f"src={S} dst={C} sport=80 dport=40000",
    f"[1700000000.100000]\t [UPDATE] tcp      6 60 SYN_RECV src={C} dst={S} sport=40000 dport=80 "
    f"src={S} dst={C} sport=80 dport=40000",
    f"[1700000000.200000]\t [UPDATE] tcp      6 432000 ESTABLISHED src={C} dst={S} sport=40000 dport=80 "
    f"src={S} dst={C} sport=80 dport=40000 [ASSURED]",
    f"[1700000001.000000]\t    [NEW] udp      17 30 src={C} dst={S} sport=5000 dport=53 [UNREPLIED] "
    f"src={S} dst={C} sport=53 dport=5000",
    f"[1700000001.500000]\t [UPDATE] udp      17 120 src={C} dst={S} sport=5000 dport=53 "
    f"src={S} dst={C} sport=53 dport=5000 [ASSURED]",
    f"[1700000002.000000]\t    [NEW] icmp     1 30 src={C} dst={S} type=8 code=0 id=77 [UNREPLIED] "
    f"src={S} dst={C} type=0 code=0 id=77",
    f"[1700000003.000000]\t    [NEW] udp      17 30 src={C6} dst={S6} sport=6000 dport=123 [UNREPLIED] "
    f"src={S6} dst={C6} sport=123 dport=6000",
]


def test_events_as_conntrack_E_o_timestamp(capsys, capture):
    code, out, err = roam(capsys, capture, "-E")
    assert code == 0 and out.splitlines() == EVENTS
    assert err == "roam conntrack: 7 flow events have been shown (8 records).\n"
    assert roam(capsys, capture, "-E", "-o", "timestamp")[1] == out
    code, out, _ = roam(capsys, capture, "-E", "-o", "extended,timestamp", "-p", "icmp")
    assert out.splitlines() == [EVENTS[5].replace("[NEW] icmp", "[NEW] ipv4     2 icmp")]


def test_destroy_events_stamped_when_the_entry_timed_out(capsys, capture):
    """With a 0.5 s ICMP timeout the echo entry dies at T0+2.5, found at the next packet (T0+3)."""
    code, out, _ = roam(capsys, capture, "-E", "-p", "icmp", "--timeout", "icmp=0.5")
    assert out.splitlines() == [
        EVENTS[5].replace(" 30 src", " 0 src"),
        f"[1700000002.500000]\t[DESTROY] icmp     1 src={C} dst={S} type=8 code=0 id=77 packets=1 bytes={L[6]} "
        f"[UNREPLIED] src={S} dst={C} type=0 code=0 id=77 packets=0 bytes=0",
    ]


def test_reset_before_reply_destroys_in_close(capsys, tmp_path):
    path = tmp_path / "rst.pcap"
    with path.open("wb") as f:
        write_capture(f, [(T0, _tcp(C, S, 1, 2, "S")), (T0 + 0.5, _tcp(S, C, 2, 1, "RA"))])
    code, out, _ = roam(capsys, str(path), "-E")
    assert out.splitlines()[1] == (
        f"[1700000000.500000]\t[DESTROY] tcp      6 CLOSE src={C} dst={S} sport=1 dport=2 packets=1 bytes=40 "
        f"[UNREPLIED] src={S} dst={C} sport=2 dport=1 packets=1 bytes=40")


@pytest.mark.parametrize("fmt, compressed", [("pcapng", False), ("pcap", True), ("pcapng", True)])
def test_reads_pcapng_and_gzip(capsys, tmp_path, fmt, compressed):
    path = tmp_path / "cap"
    with path.open("wb") as f:
        write_capture(f, PACKETS, LinkType.RAW, fmt, compressed)
    code, out, _ = roam(capsys, str(path))
    assert code == 0 and out.splitlines() == TABLE


def test_reads_standard_input(capsys, capture, monkeypatch):
    data = open(capture, "rb").read()

    class Stdin:
        buffer = io.BytesIO(gzip.compress(data))

    monkeypatch.setattr("sys.stdin", Stdin)
    code, out, _ = roam(capsys, "-")
    assert code == 0 and out.splitlines() == TABLE


@pytest.mark.parametrize("args, message", [
    (["--capacity", "0"], "argument --capacity: a whole number of at least 1, got '0'"),
    (["--capacity", "-5"], "argument --capacity: a whole number of at least 1, got '-5'"),
    (["-p", "nosuchproto"], "argument -p/--protonum: unknown protocol 'nosuchproto'"),
    (["-p", "300"], "argument -p/--protonum: protocol number 300 is not 0-255"),
    (["--state", "OPEN"], "argument --state: unknown TCP state 'OPEN'"),
    (["-s", "198.18.0.300"], "'198.18.0.300' is not an address or ADDRESS/PREFIX"),
    (["--dport", "70000"], "'70000' is not a port (0-65535)"),
    (["-m", "x"], "'x' is not MARK or MARK/MASK"),
    (["-o", "xml"], "-o 'xml': known here are extended, timestamp"),
    (["-E", "-C"], "argument -C/--count: not allowed with argument -E/--event"),
])
def test_usage_errors_are_clean(capsys, capture, args, message):
    code, out, err = roam(capsys, capture, *args)
    assert code == 2 and out == "" and message in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--timeout", "icmp=x"], "roam conntrack: --timeout wants NAME=SECONDS, got 'icmp=x'"),
    (["--timeout", "icmp=nan"], "roam conntrack: --timeout 'icmp=nan': seconds must be a finite number"),
    (["--timeout", "icmp=inf"], "roam conntrack: --timeout 'icmp=inf': seconds must be a finite number"),
    (["--timeout", "bogus=1"], "roam conntrack: unknown timeout(s): bogus"),
])
def test_timeout_errors_are_clean(capsys, capture, args, message):
    with pytest.raises(SystemExit) as e:
        main(["conntrack", capture, *args])
    assert str(e.value).startswith(message)


def test_bad_files_are_clean_errors(capsys, tmp_path):
    code, out, err = roam(capsys, str(tmp_path / "missing.pcap"))
    assert (code, out) == (1, "") and err.endswith("missing.pcap: No such file or directory\n")
    code, _, err = roam(capsys, str(tmp_path))
    assert code == 1 and "Is a directory" in err
    cut = tmp_path / "cut.pcapng"
    buf = io.BytesIO()
    write_capture(buf, PACKETS, LinkType.RAW, "pcapng")
    cut.write_bytes(buf.getvalue()[:-10])
    code, out, err = roam(capsys, str(cut))
    assert code == 1 and out == ""
    # SHB 28 bytes, IDB 32 (with if_tsresol), then one EPB per packet
    start = 28 + 32 + sum(32 + len(p) + (-len(p) % 4) for _, p in PACKETS[:-1])
    last = 32 + L[-1] + (-L[-1] % 4)
    assert err == (f"roam conntrack: {cut}: bad_capture_block: block 10 at byte {start}: "
                   f"block cut short ({last - 10} of {last} bytes)\n")
