"""`roam nat translate` over a capture holding both directions."""

from scapy.all import ICMP, IP, TCP, UDP, Ether, raw

from conntrack.pcap import LinkType, read_pcap, write_pcap
from tools.cli import main

from .nat_support import EXT, PEER, VM, VM2, checksums_ok

CONF = """\
[host]
ip = 198.18.0.1
netmask = 255.255.255.0
[incomingtcp]
8080 = 198.18.0.2:80
"""


def _capture(path, packets, linktype=LinkType.RAW):
    with open(path, "wb") as f:
        write_pcap(f, [(1000.0 + i * 0.01, p) for i, p in enumerate(packets)], linktype)


def _read(path):
    with open(path, "rb") as f:
        return [r.data for r in read_pcap(f)]


def test_translate_both_directions(tmp_path, capsys):
    conf = tmp_path / "nat.conf"
    conf.write_text(CONF)
    pkts = [
        raw(IP(src=VM, dst=PEER) / TCP(sport=40000, dport=80, flags="S")),
        raw(IP(src=PEER, dst=EXT) / TCP(sport=80, dport=40000, flags="SA")),
        raw(IP(src=PEER, dst=EXT) / TCP(sport=1, dport=2222, flags="S")),  # unmapped: dropped
        raw(IP(src=VM2, dst=PEER) / UDP(sport=5000, dport=53) / b"q"),
        raw(IP(src=PEER, dst=EXT) / TCP(sport=3333, dport=8080, flags="S")),
        raw(IP(src=VM, dst=PEER) / ICMP(id=5) / b"ping"),
        b"\x45\x00\x00",  # malformed
    ]
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    _capture(a, pkts)
    rc = main(["nat", "translate", "--config", str(conf), "--in", str(a), "--out", str(b), "--external-ip", EXT])
    assert rc == 0
    got = [IP(d) for d in _read(b)]
    assert [(p.src, p.dst) for p in got] == [(EXT, PEER), (PEER, VM), (EXT, PEER), (PEER, VM), (EXT, PEER)]
    assert got[3][TCP].dport == 80
    assert all(checksums_ok(raw(p)) for p in got)
    err = capsys.readouterr().err
    assert "7 records, 5 written" in err and "1 no_mapping" in err and "1 malformed_truncated" in err


def test_translate_ethernet_keeps_frames(tmp_path):
    conf = tmp_path / "nat.toml"
    conf.write_text('internal = ["198.18.0.0/24"]\nexternal_ip = "203.0.113.1"\n')
    f = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=VM, dst=PEER) /
            UDP(sport=5000, dport=53) / b"q")
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    _capture(a, [f], LinkType.ETHERNET)
    assert main(["nat", "translate", "--config", str(conf), "--in", str(a), "--out", str(b)]) == 0
    (out,) = _read(b)
    e = Ether(out)
    assert e.src == "02:00:00:00:00:01" and e[IP].src == EXT and checksums_ok(raw(e[IP]))


def test_translate_needs_an_external_address(tmp_path, capsys):
    conf = tmp_path / "nat.conf"
    conf.write_text(CONF)
    a = tmp_path / "a.pcap"
    _capture(a, [])
    assert main(["nat", "translate", "--config", str(conf), "--in", str(a), "--out", str(tmp_path / "b")]) == 1
    assert "--external-ip" in capsys.readouterr().err


def test_translate_config_error_names_line(tmp_path, capsys):
    conf = tmp_path / "bad.conf"
    conf.write_text("[incomingtcp]\n80 = nowhere\n")
    a = tmp_path / "a.pcap"
    _capture(a, [])
    try:
        main(["nat", "translate", "--config", str(conf), "--in", str(a), "--out", str(tmp_path / "b"),
              "--external-ip", EXT, "--internal", "198.18.0.0/24"])
    except SystemExit as exc:
        assert f"{conf}:2" in str(exc.code)
    else:
        raise AssertionError("a bad config must stop the run")


def test_translate_writes_the_format_it_read_gzip_pcapng(tmp_path, capsys):
    """Issue 12: a gzip'd pcapng in gives a gzip'd pcapng out (it used to be plain pcap)."""
    import gzip

    from conntrack.pcap import open_capture, write_capture

    conf = tmp_path / "nat.toml"
    conf.write_text('internal = ["198.18.0.0/24"]\nexternal_ip = "203.0.113.1"\n')
    pkts = [(1000.5, raw(IP(src=VM, dst=PEER) / UDP(sport=5000, dport=53) / b"q"), LinkType.RAW),
            (1000.75, raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=PEER, dst=EXT) /
                          UDP(sport=53, dport=5000) / b"a"), LinkType.ETHERNET)]
    a, b = tmp_path / "a.pcapng.gz", tmp_path / "b.pcapng.gz"
    with open(a, "wb") as f:
        write_capture(f, pkts, LinkType.RAW, fmt="pcapng", compressed=True)
    assert main(["nat", "translate", "--config", str(conf), "--in", str(a), "--out", str(b)]) == 0
    assert open(b, "rb").read(2) == b"\x1f\x8b"
    assert gzip.open(b).read(4) == b"\x0a\x0d\x0d\x0a"  # a pcapng section header inside
    with open(b, "rb") as f:
        cap = open_capture(f)
        recs = list(cap)
    assert (cap.format, cap.compressed) == ("pcapng", True)
    assert [(r.time, r.linktype) for r in recs] == [(1000.5, LinkType.RAW), (1000.75, LinkType.ETHERNET)]
    assert IP(recs[0].data).src == EXT and Ether(recs[1].data)[IP].dst == VM
    assert checksums_ok(recs[0].data) and checksums_ok(raw(Ether(recs[1].data)[IP]))
    assert "2 records, 2 written" in capsys.readouterr().err


def test_translate_rst_before_any_reply_no_traceback(tmp_path, capsys):
    """Issue 10: an RST before any reply (outbound, and inbound through a mapping) used to
    crash the packet path; translate printed a traceback."""
    conf = tmp_path / "nat.conf"
    conf.write_text(CONF)
    rst = bytes.fromhex("45000028000100004006f2b1c6120002c00002099c4001bb00000002000000005004200069c50000")
    pkts = [raw(IP(src=VM, dst=PEER) / TCP(sport=40000, dport=443, flags="S")), rst,
            raw(IP(src=PEER, dst=EXT) / TCP(sport=3333, dport=8080, flags="S")),
            raw(IP(src=VM, dst=PEER) / TCP(sport=80, dport=3333, flags="RA")),
            raw(IP(src=PEER, dst=EXT) / TCP(sport=3333, dport=8080, flags="R"))]
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    _capture(a, pkts)
    assert main(["nat", "translate", "--config", str(conf), "--in", str(a), "--out", str(b),
                 "--external-ip", EXT]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err and "5 records" in err
    got = [IP(d) for d in _read(b)]
    assert [(p.src, p.dst, str(p[TCP].flags)) for p in got[:4]] == [
        (EXT, PEER, "S"), (EXT, PEER, "R"), (PEER, VM, "S"), (EXT, PEER, "RA")]


def test_translate_an_ipv6_capture_with_nat66(tmp_path, capsys):
    from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoRequest, IPerror6, IPv6

    from .nat_support import EXT6, PEER6, VM6, checksums_ok6
    conf = tmp_path / "nat.conf"
    conf.write_text(CONF + "[host]\nnatIp6Enable = 1\nnatIp6Prefix = 2001:db8:1::/64\n"
                    "[incomingudp]\n5353 = [2001:db8:1::2]:53\n")
    out_syn = raw(IPv6(src=VM6, dst=PEER6) / TCP(sport=40000, dport=443, flags="S"))
    pkts = [
        out_syn,
        raw(IPv6(src=PEER6, dst=EXT6) / TCP(sport=443, dport=40000, flags="SA")),
        raw(IPv6(src=PEER6, dst=EXT6) / UDP(sport=7, dport=5353) / b"q"),  # the inbound mapping
        raw(IPv6(src=VM6, dst=PEER6) / ICMPv6EchoRequest(id=9)),
        raw(IPv6(src=PEER6, dst=EXT6) / TCP(sport=1, dport=2222, flags="S")),  # unmapped: dropped
        raw(IP(src=VM, dst=PEER) / UDP(sport=5000, dport=53) / b"q"),  # IPv4 beside it
        raw(IPv6(src=PEER6, dst=EXT6) / ICMPv6DestUnreach(code=4) / raw(IPv6(src=EXT6, dst=PEER6) /
                                                                        TCP(sport=40000, dport=443, flags="S"))),
    ]
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    _capture(a, pkts)
    rc = main(["nat", "translate", "--config", str(conf), "--in", str(a), "--out", str(b), "--external-ip", EXT,
               "--external-ip6", EXT6])
    assert rc == 0
    got = _read(b)
    assert len(got) == 6 and "1 no_mapping" in capsys.readouterr().err
    v6 = [IPv6(d) for d in got if d[0] >> 4 == 6]
    assert [(p.src, p.dst) for p in v6] == [(EXT6, PEER6), (PEER6, VM6), (PEER6, VM6), (EXT6, PEER6), (PEER6, VM6)]
    assert v6[2][UDP].dport == 53 and raw(v6[4][IPerror6]) == out_syn
    assert all(checksums_ok6(raw(p)) for p in v6)
    assert IP(got[4]).src == EXT


def test_translate_nat66_needs_an_external_ipv6_address(tmp_path, capsys):
    conf = tmp_path / "nat.conf"
    conf.write_text(CONF)
    a = tmp_path / "a.pcap"
    _capture(a, [])
    assert main(["nat", "translate", "--config", str(conf), "--in", str(a), "--out", str(tmp_path / "b"),
                 "--external-ip", EXT, "--internal", "2001:db8:1::/64"]) == 1
    assert "--external-ip6" in capsys.readouterr().err
    assert main(["nat", "translate", "--config", str(conf), "--in", str(a), "--out", str(tmp_path / "b"),
                 "--external-ip", EXT, "--internal", "2001:db8:1::/64", "--external-ip6", EXT]) == 1
    assert "is not an IPv6 address" in capsys.readouterr().err
