"""Regressions of issue 10 section 1 ("defects to fix first") in the engine: each test here
failed before its fix.  The plugin's (rules, signals, restarts, the host's own services on
real packets) are in tests/netns/test_nat_safety.py."""
from __future__ import annotations

import pytest
from scapy.all import ICMP, IP, TCP, UDP, raw

from conntrack.answer import Action
from conntrack.tcp_states import TcpState
from nat import NatEngine, NatReason, Side, parse_toml
from nat.events import PoolFull, Reclaimed

from .nat_support import BASE_TOML, EXT, PEER, PEER2, VM, VM2, checksums_ok, engine, inn, out, ping, tcp, udp

# From the issue: after SYN 198.18.0.2:40000 -> 192.0.2.9:443 from the inside, this RST
# (seq 2, before any reply) from the inside crashed the packet path with a TypeError.
ISSUE_RST = bytes.fromhex("45000028000100004006f2b1c6120002c00002099c4001bb00000002000000005004200069c50000")
FORWARD = '[[inbound]]\nproto = "tcp"\nport = 8080\nto = "198.18.0.2:80"\n'


@pytest.fixture(params=[True, False], ids=["fast", "general"])
def path(request, monkeypatch):
    """Every test here runs with the fast path on and off (both must hold)."""
    monkeypatch.setattr(NatEngine, "fast_path", request.param)
    return request.param


def _conn(e: NatEngine):
    (c,) = list(e.table)
    return c


# ----------------------------------------------------------------------------- RST before any reply
def test_outbound_rst_before_any_reply_is_translated_not_a_crash(path):
    e = engine()
    assert out(e, tcp(VM, PEER, 40000, 443), 0).action == Action.ACCEPT
    v = out(e, ISSUE_RST, 0.5)
    assert v.action == Action.ACCEPT and v.reason == NatReason.TRANSLATED
    p = IP(v.data)
    assert (p.src, p.dst, p[TCP].sport, p[TCP].flags) == (EXT, PEER, 40000, "R") and checksums_ok(v.data)
    assert e.status()["flows"] == 0 and e.status()["mappings_live"] == 0


def test_inbound_rst_before_any_reply_through_an_inbound_mapping(path):
    e = engine(FORWARD)
    assert inn(e, tcp(PEER, EXT, 3333, 8080), 0).action == Action.ACCEPT
    # the VM refuses: RST from the inside before any SYN-ACK; then the peer's own RST
    v = out(e, tcp(VM, PEER, 80, 3333, "RA"), 0.1)
    assert v.action == Action.ACCEPT and IP(v.data).src == EXT and IP(v.data)[TCP].sport == 8080
    assert inn(e, tcp(PEER, EXT, 3333, 8080, "R"), 0.2).action in (Action.ACCEPT, Action.DROP)
    assert e.status()["flows"] == 0
    assert inn(e, tcp(PEER, EXT, 3334, 8080), 0.3).action == Action.ACCEPT  # the mapping still works


def test_any_rst_sequence_never_raises(path):
    """Every pair of flags from either side after a SYN from either side: an answer, never an exception."""
    flags = ["R", "RA", "F", "FA", "A", "S", "SA", "PA"]
    for opener in ("out", "in"):
        for f1 in flags:
            for f2 in flags:
                e = engine(FORWARD)
                if opener == "out":
                    out(e, tcp(VM, PEER, 40000, 443), 0)
                    mine, theirs = tcp(VM, PEER, 40000, 443, f1), tcp(PEER, EXT, 443, 40000, f2)
                else:
                    inn(e, tcp(PEER, EXT, 3333, 8080), 0)
                    mine, theirs = tcp(VM, PEER, 80, 3333, f1), tcp(PEER, EXT, 3333, 8080, f2)
                for i, (side, pkt) in enumerate([(Side.INTERNAL, mine), (Side.EXTERNAL, theirs),
                                                 (Side.EXTERNAL, mine), (Side.INTERNAL, theirs)] * 2):
                    a = e.process(pkt, side, 0.1 * (i + 1))
                    assert a.action in (Action.ACCEPT, Action.DROP)


# ----------------------------------------------------------------------------- wrong side
def _established(e):
    out(e, tcp(VM, PEER, 40000, 443, "S"), 0)
    inn(e, tcp(PEER, EXT, 443, 40000, "SA"), 0.1)
    out(e, tcp(VM, PEER, 40000, 443, "A"), 0.2)
    assert _conn(e).tcp_state == TcpState.ESTABLISHED


def test_a_dropped_wrong_side_rst_changes_no_state(path):
    e = engine()
    _established(e)
    c = _conn(e)
    before = (c.state, c.deadline, c.orig_packets, c.reply_packets)
    v = inn(e, ISSUE_RST, 1.0)  # the inside's RST arriving from outside
    assert v.action == Action.DROP and v.reason == NatReason.WRONG_SIDE
    assert (c.state, c.deadline, c.orig_packets, c.reply_packets) == before
    assert c.tcp_state == TcpState.ESTABLISHED and e.status()["flows"] == 1
    assert out(e, tcp(VM, PEER, 40000, 443, "PA", b"more"), 2.0).action == Action.ACCEPT


def test_a_dropped_wrong_side_udp_packet_does_not_keep_the_flow_alive(path):
    e = engine()
    out(e, udp(VM, PEER, 5000, 53), 0)
    for t in (100, 200, 290):
        assert inn(e, udp(VM, PEER, 5000, 53), t).reason == NatReason.WRONG_SIDE
    e.expire(301)
    assert e.status()["flows"] == 0 and e.status()["mappings_live"] == 0


# ----------------------------------------------------------------------------- the host's own services
def test_unmapped_inbound_reaches_the_host_stack_as_under_masquerade(path):
    e = NatEngine(parse_toml(BASE_TOML + FORWARD), EXT, seed=7, host_stack=True)
    syn = tcp(PEER, EXT, 50000, 22)
    v = inn(e, syn, 0)
    assert v.action == Action.ACCEPT and v.reason == NatReason.HOST_FLOW and v.data == syn  # not rewritten
    synack = tcp(EXT, PEER, 22, 50000, "SA")
    a = out(e, synack, 0.1)  # the host's sshd answers out of the external interface
    assert a.action == Action.ACCEPT and a.data == synack  # a known flow's packet, as it is
    assert inn(e, tcp(PEER, EXT, 50000, 22, "A"), 0.2).data == tcp(PEER, EXT, 50000, 22, "A")
    echo = ping(PEER, EXT, 77)
    assert inn(e, echo, 0.3).data == echo  # the host answers pings
    assert out(e, ping(EXT, PEER, 77, reply=True), 0.4).data == ping(EXT, PEER, 77, reply=True)
    # an inbound mapping still goes to the VM; a stray echo reply is nobody's
    assert IP(inn(e, tcp(PEER, EXT, 3333, 8080), 0.5).data).dst == VM
    assert inn(e, ping(PEER, EXT, 78, reply=True), 0.6).reason == NatReason.NO_MAPPING
    assert e.counters["host_flows_in"] == 2 and e.counters["dropped_no_mapping"] == 1


def test_a_host_flow_holds_its_port_from_the_vms(path):
    e = NatEngine(parse_toml(BASE_TOML), EXT, seed=7, host_stack=True)
    assert inn(e, udp(PEER, EXT, 53, 40000), 0).reason == NatReason.HOST_FLOW
    v = out(e, udp(VM, PEER2, 40000, 53), 0.1)  # a VM asking for the host's port gets another
    assert IP(v.data)[UDP].sport != 40000
    # the answer to the host's flow is still the host's, not the VM's
    a = out(e, udp(EXT, PEER, 40000, 53), 0.2)
    assert a.action == Action.ACCEPT and a.data == udp(EXT, PEER, 40000, 53)


def test_without_a_host_stack_unmapped_inbound_is_still_dropped(path):
    e = engine()
    assert inn(e, tcp(PEER, EXT, 50000, 22), 0).reason == NatReason.NO_MAPPING


# ----------------------------------------------------------------------------- pool pressure
def test_a_pool_full_of_unreplied_udp_is_reclaimed_oldest_first_and_counted(path):
    e = engine('[ports]\nrange = "30000-30002"\n')
    out(e, udp(VM, PEER, 30000, 1), 0)  # answered: kept
    inn(e, udp(PEER, EXT, 1, 30000), 0.5)
    out(e, udp(VM, PEER, 30001, 1), 1)  # never answered, the oldest of those
    out(e, udp(VM, PEER2, 30002, 1), 2)  # never answered
    assert e.status()["pools"]["udp"]["used"] == 3
    v = out(e, udp(VM2, PEER, 40000, 9), 3)  # used to be POOL_FULL for 300 s
    assert v.action == Action.ACCEPT
    assert [type(ev) for ev in v.events if isinstance(ev, (PoolFull, Reclaimed))] == [Reclaimed]
    assert e.counters["reclaimed_unreplied"] == 2 and e.counters["pool_full"] == 0  # a batch: both
    assert inn(e, udp(PEER, EXT, 1, 30000), 4).action == Action.ACCEPT  # the answered flow lives
    assert IP(v.data)[UDP].sport in (30001, 30002)
    assert inn(e, udp(PEER, EXT, 1, 30001 if IP(v.data)[UDP].sport == 30002 else 30002), 4).action == Action.DROP


def test_a_pool_full_of_answered_flows_stays_full_and_is_not_rescanned_at_once(path):
    e = engine('[ports]\nrange = "30000-30000"\n')
    out(e, udp(VM, PEER, 30000, 1), 0)
    inn(e, udp(PEER, EXT, 1, 30000), 0)
    assert out(e, udp(VM2, PEER, 40000, 9), 1).reason == NatReason.POOL_FULL
    assert "reclaimed_unreplied" not in e.counters
    out(e, udp(VM2, PEER, 40001, 9), 3)  # a new unreplied flow cannot take what is not there
    assert e.counters["pool_full"] == 2
