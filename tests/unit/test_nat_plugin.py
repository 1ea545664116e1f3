"""The plugin's one dispatch, without a kernel: both queue clients (NetfilterQueue's
callback and roam's own --gso client) hand packets to ``Plugin._answer`` and apply what it
returns; here fake packets and a fake queue stand in for the netlink ends."""
from __future__ import annotations

import logging
import threading

from scapy.all import IP, UDP, raw

from nat import NatEngine, parse_toml
from nat.netfilter.plugin import HOOK_POSTROUTING, HOOK_PREROUTING, Plugin
from nat.netfilter.queue import NF_ACCEPT, NF_DROP, QueuedPacket

from .nat_support import EXT, PEER, VM, checksums_ok, udp

EXT_IF, INT_IF = 5, 2


def _plugin() -> Plugin:
    p = object.__new__(Plugin)  # no interfaces, rules or queue here: only what _answer needs
    p.engine = NatEngine(parse_toml('internal = ["198.18.0.0/24"]\n'), EXT, seed=1)
    p._process = p.engine.process
    p.ext_index, p.clock, p._lock = EXT_IF, lambda: 1.0, threading.Lock()
    p.bugs = p.csum_filled = p.largest_packet = p.gso_packets = p.queued = 0
    p.offload, p.offloader, p.routes = False, None, None  # the per-packet path (offload: tests/netns/test_nat_offload.py)
    return p


class FakeNfqPacket:
    """NetfilterQueue's packet: payload in, one verdict out."""

    def __init__(self, hook, indev, outdev, payload):
        self.hook, self.indev, self.outdev, self._payload = hook, indev, outdev, payload
        self.verdict = None
        self.set = None

    def get_payload(self):
        return self._payload

    def set_payload(self, data):
        self.set = bytes(data)

    def accept(self):
        self.verdict = "accept"

    def drop(self):
        self.verdict = "drop"


class FakeQueue:
    def __init__(self):
        self.verdicts = []

    def verdict(self, pid, verdict, payload=None):
        self.verdicts.append((pid, verdict, None if payload is None else bytes(payload)))


# (hook, indev, outdev, packet): outbound, its reply inbound, an unmapped inbound, and a
# hairpin-stage packet that is no hairpin (between internal hosts: passed as it is)
CASES = [(HOOK_POSTROUTING, INT_IF, EXT_IF, udp(VM, PEER, 5000, 53)),
         (HOOK_PREROUTING, EXT_IF, 0, udp(PEER, EXT, 53, 5000)),
         (HOOK_PREROUTING, EXT_IF, 0, udp(PEER, EXT, 53, 6000)),
         (HOOK_POSTROUTING, INT_IF, INT_IF, udp(VM, "198.18.0.3", 1, 2))]


def test_both_queue_clients_take_the_same_decisions():
    nfq_plugin, gso_plugin = _plugin(), _plugin()
    q = FakeQueue()
    nfq_seen = []
    for i, (hook, indev, outdev, pkt) in enumerate(CASES):
        p = FakeNfqPacket(hook, indev, outdev, pkt)
        nfq_plugin._on_packet(p)
        nfq_seen.append((p.verdict, p.set))
        gso_plugin._gso_verdict(q, QueuedPacket(i, hook, indev, outdev, pkt, 0))
    out, back, unmapped, passed = nfq_seen
    assert out[0] == "accept" and IP(out[1]).src == EXT and checksums_ok(out[1])
    assert back[0] == "accept" and IP(back[1]).dst == VM
    assert unmapped == ("drop", None)
    assert passed == ("accept", None)  # no new payload: the packet as it came
    as_gso = [("accept" if v == NF_ACCEPT else "drop" if v == NF_DROP else v, data) for _, v, data in q.verdicts]
    assert as_gso == nfq_seen
    assert nfq_plugin.engine.status() == gso_plugin.engine.status()


def test_unfinished_checksums_are_completed():
    """NFQA_SKB_CSUMNOTREADY: the L4 field held only the pseudo-header sum; the verdict's
    payload carries a complete one."""
    p = _plugin()
    pkt = bytearray(udp(VM, PEER, 5000, 53, b"hello"))
    pkt[26:28] = b"\x12\x34"  # not a finished checksum
    out = p._answer(HOOK_POSTROUTING, INT_IF, EXT_IF, bytes(pkt), 1)
    assert IP(out).src == EXT and checksums_ok(bytes(out)) and p.csum_filled == 1
    assert IP(out)[UDP].chksum != 0


def test_an_engine_bug_drops_the_packet_and_is_counted(caplog):
    p = _plugin()

    def broken(*args):
        raise RuntimeError("a bug")

    p._process = broken
    caplog.set_level(logging.ERROR)
    assert p._answer(HOOK_POSTROUTING, INT_IF, EXT_IF, udp(VM, PEER, 1, 2), 0) is None
    assert p._answer(HOOK_POSTROUTING, INT_IF, EXT_IF, udp(VM, PEER, 1, 2), 0) is None
    assert p._answer(HOOK_POSTROUTING, INT_IF, EXT_IF, udp(VM, PEER, 1, 2), 0) is None
    assert p.bugs == 3 and len(caplog.records) == 2  # logged at the 1st and 2nd, not the 3rd


def test_answer_events_are_logged_by_the_driver(caplog):
    p = _plugin()
    caplog.set_level(logging.DEBUG, logger="roam.nat")
    p._answer(HOOK_POSTROUTING, INT_IF, EXT_IF, raw(IP(src=VM, dst=PEER) / UDP(sport=7000, dport=53)), 0)
    assert [r.getMessage() for r in caplog.records] == [f"mapping created: UDP {VM}:7000 -> {EXT}:7000"]


class _RecordingRules:
    """Rules that record what the plugin asks, with the SIGTERM handler in force at each step."""

    def __init__(self, plugin, log):
        self.plugin, self.log = plugin, log

    def _note(self, what):
        import signal
        self.log.append((what, signal.getsignal(signal.SIGTERM) == self.plugin._sig_stop))

    def check_owners(self):
        self._note("check_owners")

    def install(self, external_ip):
        self._note("install")
        self.plugin._stop = True  # a SIGTERM right after the rules went in

    def remove_stale(self):
        self._note("remove_stale")
        return 0

    def remove(self):
        self._note("remove")
        return 4


class _FakeQueue:
    def __init__(self, queue, gso=True):
        import socket
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.batch = False
        self.closed = False

    def close(self):
        self.closed = True
        self.sock.close()


class _FakeAddressEvents:
    def close(self):
        pass


def test_signal_handlers_cover_every_instant_with_rules(monkeypatch, tmp_path):
    """Issue 10: a SIGTERM during start-up left drop-everything rules (installed before the
    handlers), and the handlers went back to the default before the rules came out.  The
    handlers must be the plugin's before the first rule and until the last one is gone;
    ours go in before a dead run's come out."""
    import signal

    from nat.netfilter import plugin as plugin_mod

    monkeypatch.setattr(plugin_mod, "NfQueue", _FakeQueue)
    monkeypatch.setattr(plugin_mod, "AddressEvents", _FakeAddressEvents)
    p = _plugin()
    log = []
    p.rules = _RecordingRules(p, log)
    p.restore, p.gso, p.queue, p.external, p.cfg = False, True, 3, "ext0", p.engine.config
    p.status_path, p.snapshot_path = str(tmp_path / "st.json"), str(tmp_path / "snap.json")
    p.wall, p._stop, p._reload, p._snap_mark = (lambda: 0.0), False, False, None
    p._stop_packets, p._packet_error = False, None
    p._refresh_address = lambda: None
    before = signal.getsignal(signal.SIGTERM)
    assert p.run() == 0
    assert log == [("check_owners", True), ("install", True), ("remove_stale", True), ("remove", True)]
    assert signal.getsignal(signal.SIGTERM) == before  # given back, after the rules went
    assert (tmp_path / "snap.json").exists()


def test_drop_log_lines_for_both_families():
    import json

    from scapy.all import IP, TCP, raw
    from scapy.layers.inet6 import IPv6

    from nat.netfilter.droplog import drop_line
    v4 = json.loads(drop_line(1.5, "no_mapping", raw(IP(src="192.0.2.9", dst="203.0.113.1") / TCP(sport=1, dport=2))))
    assert v4 == {"t": 1.5, "reason": "no_mapping", "proto": 6, "src": "192.0.2.9", "sport": 1,
                  "dst": "203.0.113.1", "dport": 2}
    v6 = json.loads(drop_line(2.0, "filtered", raw(IPv6(src="2001:db8:2::9", dst="2001:db8:ff::1") / TCP(sport=3, dport=4))))
    assert (v6["src"], v6["dst"], v6["sport"], v6["dport"], v6["proto"]) == ("2001:db8:2::9", "2001:db8:ff::1", 3, 4, 6)
    assert drop_line(0, "malformed", b"\x60" + bytes(10)) is None and drop_line(0, "malformed", b"") is None
