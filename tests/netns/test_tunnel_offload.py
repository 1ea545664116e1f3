"""Fast by default, on the real kernel: offload negotiated without any flag, super-frames cut into UDP
segments that fit the path (UDP GSO out, UDP GRO in), never IP fragments.

The lab is the tunnel lab of tests/netns/test_tunnel_lab.py (every namespace removed, also on failure).
"""
from __future__ import annotations

import hashlib
import socket
import struct
import threading

from tests.netns.test_tunnel_lab import PEER_IP, PORT, PROXY_IP, VM_IP, VM_MAC, TunnelLab, wait_for

BULK_PORT = 5011
SIZE = 24 << 20


def _pattern(size: int) -> bytes:
    """Bytes that are not all alike (a shifted block would show), the same on both sides."""
    block = hashlib.sha256(b"roam").digest() * 2048  # 64 KiB
    return b"".join(block[i % 31:] + block[:i % 31] for i in range(-(-size // len(block))))[:size]


def _transfer(lab, src_ns: str, dst_ns: str, dst_ip: str, data: bytes) -> str:
    """Send ``data`` over one TCP connection; the sha256 of what arrived."""
    srv = lab.socket(dst_ns)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((dst_ip, BULK_PORT))
    srv.listen(1)
    srv.settimeout(30)
    digest = hashlib.sha256()
    done = threading.Event()

    def drain():
        try:
            conn, _ = srv.accept()
            conn.settimeout(30)
            with conn:
                while chunk := conn.recv(1 << 16):
                    digest.update(chunk)
        finally:
            done.set()

    th = threading.Thread(target=drain, daemon=True)
    th.start()
    try:
        with lab.socket(src_ns) as cli:
            cli.settimeout(30)
            cli.connect((dst_ip, BULK_PORT))
            cli.sendall(data)
        done.wait(60)
    finally:
        srv.close()
    return digest.hexdigest()


def _snmp_ip(lab, ns: str) -> dict[str, int]:
    """The namespace's IP counters (/proc/net/snmp): FragCreates, ReasmReqds..."""
    out = lab.run(ns, ["cat", "/proc/net/snmp"]).stdout
    lines = [ln.split() for ln in out.splitlines() if ln.startswith("Ip:")]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])}


def _udp_payloads(pcap: bytes) -> list[tuple[int, bytes]]:
    """(IPv4 fragment field, UDP payload head) of every IPv4 packet in a classic pcap (Ethernet)."""
    magic = struct.unpack_from("<I", pcap)[0]
    end = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    out, off = [], 24
    while off + 16 <= len(pcap):
        caplen = struct.unpack_from(end + "I", pcap, off + 8)[0]
        pkt = pcap[off + 16: off + 16 + caplen]
        off += 16 + caplen
        if len(pkt) < 34 or pkt[12:14] != b"\x08\x00":
            continue
        ihl = (pkt[14] & 0x0F) * 4
        frag = struct.unpack_from("!H", pkt, 20)[0] & 0x3FFF
        out.append((frag, pkt[14 + ihl + 8:] if pkt[23] == 17 else b""))
    return out


def test_default_udp_tunnel_negotiates_offload_and_sends_segments_not_ip_fragments(lab, tmp_path):
    t = TunnelLab(lab, tmp_path, "udp")
    ns = t.ns
    pcap = tmp_path / "underlay.pcap"
    dump = None
    try:
        proxy = t.start_proxy()  # no --offload anywhere: the default
        wait_for(lambda: t.status(proxy), 20, "proxy to start")
        host_a = t.start_host("hosta")
        st = wait_for(lambda: t.attached(host_a), 20, "host end A to attach")
        assert st["offload"] is True and st["offload_capable"] is True and st["segment_size"] == 1500 - 28, st
        pst = t.status(proxy)
        assert [s["offload"] for s in pst["sessions"]] == [True], pst
        assert lab.ping(ns["vm"], PEER_IP, count=2) == 2
        # The underlay of host A, as captured: headers only (and enough to read a segment's header).
        dump = lab.tcpdump(ns["hosta"], ["-i", "ai", "-s", "96", "-w", str(pcap), "ip"])
        before = {n: _snmp_ip(lab, ns[n]) for n in ("hosta", "home", "inet")}
        data = _pattern(SIZE)
        want = hashlib.sha256(data).hexdigest()
        assert _transfer(lab, ns["vm"], ns["peer"], PEER_IP, data) == want  # VM -> peer: host end cuts
        assert _transfer(lab, ns["peer"], ns["vm"], VM_IP, data) == want  # peer -> VM: the proxy cuts
        after = {n: _snmp_ip(lab, ns[n]) for n in ("hosta", "home", "inet")}
        lab.stop_tcpdump(dump)
        dump = None
        # No IP fragment anywhere on the way: none made, none reassembled, none on the wire.
        for n in after:
            for k in ("FragCreates", "FragOKs", "ReasmReqds"):
                assert after[n][k] == before[n][k], (n, k, before[n], after[n])
        packets = _udp_payloads(pcap.read_bytes())
        assert packets and all(frag == 0 for frag, _ in packets)
        segments = [p for _, p in packets if len(p) >= 18 and p[0] == 2 and p[1] == 9]
        assert len(segments) > 100, len(segments)  # super-frames crossed as tunnel segments
        hst = wait_for(lambda: (lambda s: s if s and s["counters"].get("tx_bytes", 0) >= SIZE else None)(
            t.status(host_a)), 20, "the host end's status to show the transfer")
        assert hst["counters"]["tx_segmented"] > 0 and hst["counters"]["tx_largest_frame"] > 8 * 1514, hst
        pst = wait_for(lambda: (lambda s: s if s and s["sessions"][0]["counters"].get("tx_bytes", 0) >= SIZE
                                else None)(t.status(proxy)), 20, "the proxy's status to show the transfer")
        assert pst["sessions"][0]["counters"]["tx_segmented"] > 0, pst
        assert hst["offload"] is True and not hst["drops"].get("auth_failed") and not pst["drops"].get("auth_failed")
    except BaseException:
        print(t.dump_logs())
        raise
    finally:
        if dump is not None:
            lab.stop(dump)


def test_an_end_given_no_offload_makes_the_session_plain_and_traffic_still_flows(lab, tmp_path):
    t = TunnelLab(lab, tmp_path, "udp")
    ns = t.ns
    try:
        proxy = t.start_proxy()
        wait_for(lambda: t.status(proxy), 20, "proxy to start")
        host_a = t.roam(ns["hosta"], "host", "--proxy", f"{PROXY_IP}:{PORT}", "--tap", "rt0", "--bridge", "brvm",
                        "--mac", VM_MAC, "--no-offload", log="hosta")
        st = wait_for(lambda: t.attached(host_a), 20, "host end A to attach")
        assert st["offload"] is False and st["offload_capable"] is False, st
        wait_for(lambda: t.status(proxy) and t.status(proxy)["sessions"], 20, "the proxy's session")
        assert [s["offload"] for s in t.status(proxy)["sessions"]] == [False]
        data = _pattern(4 << 20)
        want = hashlib.sha256(data).hexdigest()
        assert _transfer(lab, ns["vm"], ns["peer"], PEER_IP, data) == want
        assert _transfer(lab, ns["peer"], ns["vm"], VM_IP, data) == want  # the proxy's TAP segments for it
        assert t.status(proxy)["offload"] is True  # the proxy could: the host end's choice decided
    except BaseException:
        print(t.dump_logs())
        raise
