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
