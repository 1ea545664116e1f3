"""The NAT engine on scapy-built packets: mappings, filtering, hairpinning, lifetimes, ICMP."""
import json

import pytest
from scapy.all import ICMP, IP, TCP, UDP, raw
from scapy.layers.inet import IPerror, TCPerror, UDPerror

from conntrack.answer import Action, Answer
from nat import NatEngine, NatReason, Side, Stage
from nat.events import ConfigWarning, Reloaded
from nat.snapshot import load, save

from .nat_support import EXT, PEER, PEER2, VM, VM2, checksums_ok, engine, inn, out, ping, tcp, udp


def test_outbound_tcp_then_reply():
    e = engine()
    v = out(e, tcp(VM, PEER, 40000, 80))
    assert v.action == Action.ACCEPT and v.reason == NatReason.TRANSLATED
    p = IP(v.data)
    assert (p.src, p.dst, p[TCP].sport, p[TCP].dport) == (EXT, PEER, 40000, 80)  # port preserved
    assert checksums_ok(v.data)
    r = inn(e, tcp(PEER, EXT, 80, 40000, "SA"), 0.1)
    q = IP(r.data)
    assert (q.src, q.dst, q[TCP].sport, q[TCP].dport) == (PEER, VM, 80, 40000)
    assert checksums_ok(r.data)


def test_port_clash_gets_another_port_and_same_class():
    e = engine()
    a = IP(out(e, tcp(VM, PEER, 40000, 80)).data)
    b = IP(out(e, tcp(VM2, PEER, 40000, 80)).data)
    assert a[TCP].sport == 40000 and b[TCP].sport != 40000 and b[TCP].sport >= 1024
    c = IP(out(e, tcp(VM2, PEER, 700, 80)).data)
    d = IP(out(e, tcp(VM, PEER, 700, 80)).data)
    assert c[TCP].sport == 700 and 600 <= d[TCP].sport <= 1023 and d[TCP].sport != 700


def test_endpoint_independent_mapping():
    e = engine()
    a = IP(out(e, udp(VM, PEER, 5000, 53)).data)
    b = IP(out(e, udp(VM, PEER2, 5000, 99)).data)
    assert (a.src, a[UDP].sport) == (b.src, b[UDP].sport)
    assert e.status()["mappings_live"] == 1 and e.status()["flows"] == 2


@pytest.mark.parametrize("mode,same_addr_other_port,other_addr", [
    ("endpoint-independent", True, True),
    ("address-dependent", True, False),
    ("address-and-port-dependent", False, False),
])
def test_filtering(mode, same_addr_other_port, other_addr):
    e = engine(f'filtering = "{mode}"\n')
    eport = IP(out(e, udp(VM, PEER, 5000, 53)).data)[UDP].sport
    v1 = inn(e, udp(PEER, EXT, 54, eport))
    v2 = inn(e, udp(PEER2, EXT, 53, eport))
    assert (v1.action == Action.ACCEPT) == same_addr_other_port
    assert (v2.action == Action.ACCEPT) == other_addr
    if v1.action == Action.ACCEPT:
        assert IP(v1.data).dst == VM and IP(v1.data)[UDP].dport == 5000
    if v2.action == Action.DROP:
        assert v2.reason == NatReason.FILTERED
    # the exact flow always gets through
    assert inn(e, udp(PEER, EXT, 53, eport)).action == Action.ACCEPT


def test_unmapped_inbound_dropped_and_counted():
    e = engine()
    v = inn(e, tcp(PEER, EXT, 1234, 5555))
    assert v.action == Action.DROP and v.reason == NatReason.NO_MAPPING and v.data is None
    assert inn(e, ping(PEER, EXT, 7)).reason == NatReason.NO_MAPPING
    assert inn(e, tcp(PEER, "203.0.113.99", 1, 2)).reason == NatReason.NOT_EXTERNAL_ADDRESS
    assert e.counters["dropped_no_mapping"] == 2


def test_inbound_port_forward_and_reply():
    e = engine('[[inbound]]\nproto = "tcp"\nport = 8080\nto = "198.18.0.2:80"\n')
    v = inn(e, tcp(PEER, EXT, 3333, 8080))
    p = IP(v.data)
    assert (p.src, p.dst, p[TCP].sport, p[TCP].dport) == (PEER, VM, 3333, 80)
    r = IP(out(e, tcp(VM, PEER, 80, 3333, "SA")).data)
    assert (r.src, r.dst, r[TCP].sport, r[TCP].dport) == (EXT, PEER, 8080, 3333)
    assert checksums_ok(v.data) and checksums_ok(raw(r))


def test_icmp_echo_identifier_mapped():
    e = engine()
    a = IP(out(e, ping(VM, PEER, 77)).data)
    b = IP(out(e, ping(VM2, PEER, 77)).data)
    assert a[ICMP].id == 77 and b[ICMP].id != 77 and a.src == b.src == EXT
    r = inn(e, ping(PEER, EXT, b[ICMP].id, reply=True))
    q = IP(r.data)
    assert q.dst == VM2 and q[ICMP].id == 77 and checksums_ok(r.data)
    assert inn(e, ping(PEER, EXT, 9999, reply=True)).action == Action.DROP


def test_zero_udp_checksum_stays_zero():
    e = engine()
    v = out(e, udp(VM, PEER, 5000, 53, chksum=0))
    assert IP(v.data)[UDP].chksum == 0 and checksums_ok(v.data)


def test_full_pool_drops_new_flow_keeps_existing():
    e = engine('[ports]\nrange = "30000-30001"\n')
    a = out(e, udp(VM, PEER, 30000, 1))
    b = out(e, udp(VM2, PEER, 30000, 1))
    for v in (a, b):  # answered flows hold the pool: nothing to reclaim
        inn(e, udp(PEER, EXT, 1, IP(v.data)[UDP].sport))
    c = out(e, udp(VM2, PEER, 40000, 1))
    assert a.action == b.action == Action.ACCEPT
    assert c.action == Action.DROP and c.reason == NatReason.POOL_FULL
    assert e.counters["pool_full"] == 1
    eb = IP(b.data)[UDP].sport
    assert inn(e, udp(PEER, EXT, 1, eb)).action == Action.ACCEPT  # existing flows untouched
    assert e.status()["pools"]["udp"] == {"used": 2, "size": 2 + 424}


def test_hairpinning_uses_external_source():
    e = engine('[[inbound]]\nproto = "tcp"\nport = 8080\nto = "198.18.0.2:80"\n')
    v = out(e, tcp(VM2, EXT, 45000, 8080))
    assert v.reason == NatReason.HAIRPINNED
    p = IP(v.data)
    assert (p.src, p.dst, p[TCP].sport, p[TCP].dport) == (EXT, VM, 45000, 80)
    r = out(e, tcp(VM, EXT, 80, 45000, "SA"))
    q = IP(r.data)
    assert (q.src, q.dst, q[TCP].sport, q[TCP].dport) == (EXT, VM2, 8080, 45000)
    assert checksums_ok(v.data) and checksums_ok(r.data)
    off = engine('hairpinning = false\n[[inbound]]\nproto = "tcp"\nport = 8080\nto = "198.18.0.2:80"\n')
    assert out(off, tcp(VM2, EXT, 45000, 8080)).reason == NatReason.HAIRPIN_DISABLED
    assert off.status()["mappings_live"] == 0


def test_udp_lifetime_default_and_refresh():
    e = engine()
    eport = IP(out(e, udp(VM, PEER, 5000, 53), 0).data)[UDP].sport
    assert inn(e, udp(PEER, EXT, 53, eport), 299).action == Action.ACCEPT  # refreshed at 299
    out(e, udp(VM, PEER, 5000, 53), 500)  # refreshed at 500
    assert inn(e, udp(PEER, EXT, 53, eport), 799).action == Action.ACCEPT
    e.expire(1100)
    assert e.status()["mappings_live"] == 0 and e.status()["flows"] == 0
    assert inn(e, udp(PEER, EXT, 53, eport), 1101).reason == NatReason.NO_MAPPING


def test_config_timeout_wins():
    e = engine("[timeouts]\nudp = 60\n")
    assert any("below" in w for w in e.config.warnings)
    out(e, udp(VM, PEER, 5000, 53), 0)
    e.expire(61)
    assert e.status()["flows"] == 0


def test_tcp_established_lifetime_at_least_2h4m():
    e = engine()
    out(e, tcp(VM, PEER, 40000, 80, "S"), 0)
    inn(e, tcp(PEER, EXT, 80, 40000, "SA"), 0)
    out(e, tcp(VM, PEER, 40000, 80, "A"), 0)
    e.expire(7439)
    assert e.status()["flows"] == 1
    assert inn(e, tcp(PEER, EXT, 80, 40000, "A"), 7439).action == Action.ACCEPT
    e.expire(7439 + 7441)
    assert e.status()["flows"] == 0


def test_tcp_transitory_4_minutes():
    e = engine()
    out(e, tcp(VM, PEER, 40000, 80, "S"), 0)
    e.expire(239)
    assert e.status()["flows"] == 1
    e.expire(241)
    assert e.status()["flows"] == 0 and e.status()["pools"]["tcp"]["used"] == 0


def _icmp_error_in(orig: bytes, src=PEER, dst=EXT, code=3) -> bytes:
    return raw(IP(src=src, dst=dst) / ICMP(type=3, code=code) / orig[:28])


def test_icmp_error_inbound_translates_quote_and_keeps_mapping():
    e = engine()
    sent = out(e, udp(VM, PEER, 5000, 53), 0).data
    eport = IP(sent)[UDP].sport
    router = "198.51.100.1"
    err = inn(e, raw(IP(src=router, dst=EXT) / ICMP(type=11, code=0) / sent), 10)
    assert err.reason == NatReason.ICMP_ERROR_TRANSLATED
    p = IP(err.data)
    assert p.src == router and p.dst == VM
    assert (p[IPerror].src, p[IPerror].dst, p[UDPerror].sport, p[UDPerror].dport) == (VM, PEER, 5000, 53)
    # outer checksums and the ICMP checksum over the rewritten quote
    assert checksums_ok(err.data)
    # the quoted UDP checksum matches the packet the VM actually sent
    assert p[UDPerror].chksum == IP(udp(VM, PEER, 5000, 53))[UDP].chksum
    assert p[IPerror].chksum == IP(udp(VM, PEER, 5000, 53)).chksum
    # ICMP errors neither end nor refresh the mapping
    e.expire(299)
    assert inn(e, udp(PEER, EXT, 53, eport), 299).action == Action.ACCEPT


def test_icmp_error_truncated_quote():
    e = engine()
    sent = out(e, tcp(VM, PEER, 40000, 80), 0).data
    v = inn(e, _icmp_error_in(sent))  # 20 bytes IP + 8 bytes TCP: no TCP checksum in the quote
    p = IP(v.data)
    assert (p[IPerror].src, p[TCPerror].sport) == (VM, 40000) and checksums_ok(v.data)


def test_icmp_error_outbound_about_forwarded_flow():
    e = engine('[[inbound]]\nproto = "udp"\nport = 5353\nto = "198.18.0.2:53"\n')
    got = inn(e, udp(PEER, EXT, 999, 5353)).data  # delivered to the VM as PEER:999 -> VM:53
    err = out(e, raw(IP(src=VM, dst=PEER) / ICMP(type=3, code=3) / got))
    p = IP(err.data)
    assert p.src == EXT and p.dst == PEER
    assert (p[IPerror].src, p[IPerror].dst, p[UDPerror].sport, p[UDPerror].dport) == (PEER, EXT, 999, 5353)
    assert checksums_ok(err.data)


def test_icmp_error_unknown_flow_dropped():
    e = engine()
    v = inn(e, _icmp_error_in(udp(EXT, PEER, 1, 2)))
    assert v.reason == NatReason.ICMP_NO_FLOW


def test_external_address_change_kills_old_mappings():
    e = engine('[[inbound]]\nproto = "tcp"\nport = 8080\nto = "198.18.0.2:80"\n')
    eport = IP(out(e, udp(VM, PEER, 5000, 53)).data)[UDP].sport
    inn(e, tcp(PEER, EXT, 3333, 8080))
    assert e.set_external_address("203.0.113.7", 1) == 2
    assert e.status()["flows"] == 0 and e.status()["mappings_live"] == 0
    assert inn(e, udp(PEER, EXT, 53, eport), 2).reason == NatReason.NOT_EXTERNAL_ADDRESS
    assert inn(e, udp(PEER, "203.0.113.7", 53, eport), 2).reason == NatReason.NO_MAPPING
    v = IP(out(e, udp(VM, PEER, 5000, 53), 2).data)
    assert v.src == "203.0.113.7"
    # inbound mappings follow the new address
    assert inn(e, tcp(PEER, "203.0.113.7", 3333, 8080), 3).action == Action.ACCEPT
    assert e.set_external_address(None, 4) == 2
    assert out(e, udp(VM, PEER, 5000, 53), 5).reason == NatReason.NO_EXTERNAL_ADDRESS


def test_tcp_rst_before_reply_frees_mapping():
    e = engine()
    out(e, tcp(VM, PEER, 40000, 80, "S"), 0)
    v = inn(e, tcp(PEER, EXT, 80, 40000, "R"), 0.1)
    assert v.action == Action.ACCEPT and IP(v.data).dst == VM
    assert e.status()["mappings_live"] == 0 and e.status()["flows"] == 0


def test_wrong_side_and_spoofed_sources():
    e = engine()
    assert out(e, udp("10.9.9.9", PEER, 1, 2)).reason == NatReason.NOT_INTERNAL_SOURCE
    out(e, udp(VM, PEER, 5000, 53))
    # the VM's own tuple arriving from outside is not the VM
    assert inn(e, udp(VM, PEER, 5000, 53)).reason == NatReason.WRONG_SIDE


def test_malformed_and_other_protocols_are_counted_drops():
    e = engine()
    assert out(e, b"\x45\x00").reason == NatReason.MALFORMED
    assert e.parse_errors["truncated"] == 1
    assert out(e, raw(IP(src=VM, dst=PEER, proto=47) / b"gre!")).reason == NatReason.UNSUPPORTED_PROTOCOL
    v6 = bytes.fromhex("6000000000083b40") + bytes(32) + bytes(8)
    assert out(e, v6).reason == NatReason.NOT_IPV4


def test_fragments_follow_their_head():
    e = engine()
    from scapy.all import fragment
    frags = fragment(IP(src=VM, dst=PEER, id=4242) / UDP(sport=5000, dport=53) / (b"z" * 3000), fragsize=1000)
    outs = [out(e, raw(f), 0) for f in frags]
    assert all(v.action == Action.ACCEPT for v in outs)
    assert all(IP(v.data).src == EXT for v in outs)
    assert all(checksums_ok(v.data) for v in outs[1:])  # later fragments: IP header only
    # reassembled, the UDP checksum verifies
    from scapy.all import defragment
    whole = defragment([IP(v.data) for v in outs])[0]
    assert whole[UDP].sport == 5000 and checksums_ok(raw(whole))
    stray = raw(IP(src=PEER, dst=EXT, id=1, flags="MF", frag=100) / (b"x" * 8))
    assert inn(e, stray).reason == NatReason.FRAGMENT_WITHOUT_HEAD


def test_snapshot_restore_keeps_flows(tmp_path):
    e = engine('[[inbound]]\nproto = "tcp"\nport = 8080\nto = "198.18.0.2:80"\n')
    eport = IP(out(e, tcp(VM2, PEER, 40000, 80, "S"), 0).data)[TCP].sport
    inn(e, tcp(PEER, EXT, 80, eport, "SA"), 0)
    out(e, tcp(VM2, PEER, 40000, 80, "A"), 0)
    inn(e, tcp(PEER2, EXT, 3333, 8080), 1)
    path = tmp_path / "snap.json"
    save(str(path), e.snapshot(10))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".nat-snapshot-")]
    snap = load(str(path))
    assert snap["version"] == 1 and json.dumps(snap)
    e2 = engine('[[inbound]]\nproto = "tcp"\nport = 8080\nto = "198.18.0.2:80"\n', seed=99)
    assert e2.restore(snap, 5000) == 2
    v = inn(e2, tcp(PEER, EXT, 80, eport, "A"), 5001)
    assert v.action == Action.ACCEPT and IP(v.data).dst == VM2 and IP(v.data)[TCP].dport == 40000
    assert IP(out(e2, tcp(VM2, PEER, 40000, 80, "A"), 5002).data)[TCP].sport == eport
    # the port stays taken after restore: another VM cannot get it
    assert IP(out(e2, tcp(VM, PEER, eport, 80, "S"), 5003).data)[TCP].sport != eport
    # a snapshot from another external address restores nothing
    e3 = engine(ext="203.0.113.50")
    assert e3.restore(snap, 0) == 0
    with pytest.raises(ValueError, match="version"):
        e3.restore(dict(snap, version=99), 0)
    # a damaged address is a ValueError naming it (as a damaged snapshot is), never an OSError
    bad = dict(snap, mappings=[dict(m, internal_ip="198.18.0") for m in snap["mappings"]])
    with pytest.raises(ValueError, match="198.18.0"):
        engine(seed=99).restore(bad, 0)


def test_reload_keeps_established_and_changes_inbound():
    from nat import parse_toml
    e = engine('[[inbound]]\nproto = "tcp"\nport = 8080\nto = "198.18.0.2:80"\n')
    inn(e, tcp(PEER, EXT, 3333, 8080), 0)
    out(e, tcp(VM, PEER, 80, 3333, "SA"), 0)
    inn(e, tcp(PEER, EXT, 3333, 8080, "A"), 0)
    e.pop_events()
    e.reload(parse_toml('internal = ["198.18.0.0/24"]\n[[inbound]]\nproto = "tcp"\nport = 9090\n'
                        'to = "198.18.0.3:22"\n'), 1)
    notes = e.pop_events()
    assert Reloaded(1) in notes and any("reloaded" in str(n) for n in notes)
    assert not any(isinstance(n, ConfigWarning) for n in notes)
    assert inn(e, tcp(PEER, EXT, 3333, 8080, "A"), 2).action == Action.ACCEPT  # established goes on
    assert inn(e, tcp(PEER, EXT, 4444, 8080), 2).reason == NatReason.NO_MAPPING
    assert IP(inn(e, tcp(PEER, EXT, 4444, 9090), 2).data).dst == VM2


def test_two_engines_same_seed_same_ports():
    a, b = engine(seed=5), engine(seed=5)
    pa = [IP(out(a, udp(VM2, PEER, 5000 + i, 1)).data)[UDP].sport for i in range(3)]
    out(a, udp(VM, PEER, 1, 1))
    pb = [IP(out(b, udp(VM2, PEER, 5000 + i, 1)).data)[UDP].sport for i in range(3)]
    assert pa == pb
    assert isinstance(a, NatEngine)


def test_host_own_flows_pass_and_hold_their_port():
    e = engine('[ports]\nrange = "30000-30001"\n')
    v = out(e, udp(EXT, PEER, 30000, 53))
    assert v.reason == NatReason.HOST_FLOW and v.data == udp(EXT, PEER, 30000, 53)
    assert inn(e, udp(PEER, EXT, 53, 30000)).data == udp(PEER, EXT, 53, 30000)
    # a VM asking for the same port gets the other one
    assert IP(out(e, udp(VM, PEER, 30000, 53)).data)[UDP].sport == 30001
    # and a host flow on a port a VM mapping holds is refused
    assert out(e, udp(EXT, PEER, 30001, 53)).reason == NatReason.HOST_PORT_CLASH


def test_hairpin_in_two_halves_matches_full():
    conf = '[[inbound]]\nproto = "tcp"\nport = 8080\nto = "198.18.0.2:80"\n'
    e = engine(conf)
    full = engine(conf)
    syn = tcp(VM2, EXT, 45000, 8080)
    half = e.process(syn, Side.INTERNAL, 0, Stage.HAIRPIN_DST)
    p = IP(half.data)
    # first half: only the destination changed; the kernel sees VM2 -> VM between the halves
    assert (p.src, p.dst, p[TCP].sport, p[TCP].dport) == (VM2, VM, 45000, 80) and checksums_ok(half.data)
    done = e.process(half.data, Side.INTERNAL, 0, Stage.HAIRPIN_SRC)
    assert done.data == full.process(syn, Side.INTERNAL, 0).data
    # the answer, in two halves too
    ans = tcp(VM, EXT, 80, 45000, "SA")
    h2 = e.process(ans, Side.INTERNAL, 0, Stage.HAIRPIN_DST)
    assert (IP(h2.data).src, IP(h2.data).dst) == (VM, VM2)
    d2 = e.process(h2.data, Side.INTERNAL, 0, Stage.HAIRPIN_SRC)
    assert d2.data == full.process(ans, Side.INTERNAL, 0).data
    # what is no hairpin passes untouched: to the host's own ports, or between internal hosts
    other = tcp(VM2, EXT, 45001, 22)
    v = e.process(other, Side.INTERNAL, 0, Stage.HAIRPIN_DST)
    assert v.reason == NatReason.NOT_OURS and v.data == other
    plain = tcp(VM2, VM, 1, 2)
    assert e.process(plain, Side.INTERNAL, 0, Stage.HAIRPIN_SRC).data == plain
    # when the flow ends its half-way tuple is forgotten
    e.expire(10_000)
    assert e.process(half.data, Side.INTERNAL, 10_001, Stage.HAIRPIN_SRC).reason == NatReason.NOT_OURS


def test_restore_rebind_moves_flows_to_the_new_address():
    e = engine()
    eport = IP(out(e, udp(VM, PEER, 5000, 53), 0).data)[UDP].sport
    snap = e.snapshot(1)
    e2 = engine(ext="203.0.113.77")
    assert e2.restore(snap, 2) == 0
    assert e2.restore(snap, 2, rebind=True) == 1
    v = inn(e2, udp(PEER, "203.0.113.77", 53, eport), 3)
    assert v.action == Action.ACCEPT and IP(v.data).dst == VM and checksums_ok(v.data)
    w = IP(out(e2, udp(VM, PEER, 5000, 53), 4).data)
    assert (w.src, w[UDP].sport) == ("203.0.113.77", eport) and checksums_ok(raw(w))


def test_checksums_ok_detects_damage():
    good = tcp(VM, PEER, 1, 2)
    assert checksums_ok(good)
    bad = bytearray(good)
    bad[-1] ^= 1  # a flipped bit in the TCP header's last byte (urgent pointer)
    assert not checksums_ok(bytes(bad))


# ----------------------------------------------------------------------------- the answer's shape, events
def test_answer_shape_and_events_of_a_flow():
    from nat.events import MappingCreated, MappingFreed
    e = engine()
    a = out(e, udp(VM, PEER, 5000, 53), 0)
    assert isinstance(a, Answer) and a.sends == () and a.action == Action.ACCEPT
    (ev,) = a.events
    assert isinstance(ev, MappingCreated) and ev.mapping.internal_port == 5000 and ev.mapping.external_port == 5000
    assert "mapping created" in str(ev)
    assert out(e, udp(VM, PEER, 5000, 53), 1).events == ()  # the same mapping: nothing new
    d = inn(e, tcp(PEER, EXT, 1, 2), 1)
    assert d.action == Action.DROP and d.data is None and d.events == ()
    assert e.pop_events() == ()
    e.expire(1000)  # no packet caused this: the journal has it
    (freed,) = e.pop_events()
    assert freed == MappingFreed(ev.mapping) and e.pop_events() == ()


def test_pool_full_event_is_loud_at_powers_of_two():
    from nat.events import WARNING, PoolFull
    e = engine('[ports]\nrange = "30000-30000"\n')
    out(e, udp(VM, PEER, 30000, 1))
    inn(e, udp(PEER, EXT, 1, 30000))  # answered: not reclaimable
    levels = []
    for i in range(4):
        a = out(e, udp(VM2, PEER, 40000 + i, 1))
        (ev,) = a.events
        assert isinstance(ev, PoolFull) and ev.dropped == i + 1 and ev.internal_port == 40000 + i
        levels.append(ev.level == WARNING)
    assert levels == [True, True, False, True]


def test_address_change_and_reload_warnings_are_journal_events():
    from nat.events import AddressChanged, ConfigWarning
    from nat import parse_toml
    e = engine()
    out(e, udp(VM, PEER, 5000, 53))
    e.set_external_address("203.0.113.7", 1)
    ev = e.pop_events()
    assert ev[-1] == AddressChanged(EXT, "203.0.113.7", 1) and "1 flows dropped" in str(ev[-1])
    out(e, udp(VM, PEER, 5000, 53), 2)
    e.reload(parse_toml('internal = ["198.18.0.0/16"]\n'
                        '[[inbound]]\nproto = "udp"\nport = 5000\nto = "198.18.0.3:1"\n'), 3)
    warnings = [str(w) for w in e.pop_events() if isinstance(w, ConfigWarning)]
    assert len(warnings) == 2
    assert "only on restart" in warnings[0] and "UDP port 5000 is in use by a dynamic mapping" in warnings[1]


def test_the_engine_never_logs(caplog):
    import logging
    caplog.set_level(logging.DEBUG)
    e = engine('[ports]\nrange = "30000-30000"\n')
    out(e, udp(VM, PEER, 30000, 1))
    out(e, udp(VM2, PEER, 40000, 1))  # pool full: an event, not a log line
    out(e, b"\x45\x00")
    e.set_external_address(None, 1)
    e.expire(10_000)
    assert caplog.records == []


# ----------------------------------------------------------------------------- pinned mutants
def test_snapshot_round_trip_keeps_every_field():
    """restore(snapshot) then snapshot again gives the same data: state, status (ASSURED), ttl..."""
    e = engine('[[inbound]]\nproto = "tcp"\nport = 8080\nto = "198.18.0.2:80"\n')
    eport = IP(out(e, tcp(VM2, PEER, 40000, 80, "S"), 0).data)[TCP].sport
    inn(e, tcp(PEER, EXT, 80, eport, "SA"), 0)
    out(e, tcp(VM2, PEER, 40000, 80, "A"), 0)  # ESTABLISHED and ASSURED
    out(e, udp(VM, PEER, 5000, 53), 1)  # unreplied: neither
    inn(e, tcp(PEER2, EXT, 3333, 8080), 1)
    snap = e.snapshot(10)
    assert sorted(f["status"] for f in snap["flows"]) == [0, 0, 3]  # SEEN_REPLY | ASSURED on the TCP flow
    e2 = engine('[[inbound]]\nproto = "tcp"\nport = 8080\nto = "198.18.0.2:80"\n', seed=99)
    assert e2.restore(snap, 5000) == 3
    assert e2.snapshot(5000) == snap


def test_restored_flow_stays_assured():
    """A full table drops an unassured flow to make room, never a restored assured one."""
    conf = "capacity = 2\n"
    e = engine(conf)
    eport = IP(out(e, udp(VM, PEER, 5000, 53), 0).data)[UDP].sport
    inn(e, udp(PEER, EXT, 53, eport), 0)  # the reply assures it
    e2 = engine(conf)
    assert e2.restore(e.snapshot(1), 1) == 1
    out(e2, udp(VM2, PEER, 6000, 53), 2)  # unassured
    assert out(e2, udp(VM2, PEER, 6001, 53), 3).action == Action.ACCEPT  # the table makes room
    v = inn(e2, udp(PEER, EXT, 53, eport), 4)
    assert v.action == Action.ACCEPT and IP(v.data).dst == VM
    assert inn(e2, udp(PEER, EXT, 53, 6000), 4).reason == NatReason.NO_MAPPING  # the one dropped


@pytest.mark.parametrize("direction", ["out", "in"])
def test_fragments_of_an_established_tcp_flow(direction):
    """A first fragment of a known flow must be noted as its datagram's head (not taken by the
    fast path as a whole packet), or the later fragments are dropped as headless."""
    from scapy.all import defragment, fragment
    e = engine()
    out(e, tcp(VM, PEER, 40000, 80, "S"), 0)
    inn(e, tcp(PEER, EXT, 80, 40000, "SA"), 0)
    out(e, tcp(VM, PEER, 40000, 80, "A"), 0)
    if direction == "out":
        seg = IP(src=VM, dst=PEER, id=4243) / TCP(sport=40000, dport=80, flags="PA", seq=1001, ack=1)
        send, want = out, (EXT, PEER)
    else:
        seg = IP(src=PEER, dst=EXT, id=4243) / TCP(sport=80, dport=40000, flags="PA", seq=1001, ack=1001)
        send, want = inn, (PEER, VM)
    frags = fragment(seg / (b"z" * 3000), fragsize=1000)
    assert len(frags) == 4 and frags[0].flags.MF and frags[0].frag == 0
    got = [send(e, raw(f), 1) for f in frags]
    assert [a.reason for a in got] == [NatReason.TRANSLATED] * 4
    assert all((IP(a.data).src, IP(a.data).dst) == want for a in got)
    whole = defragment([IP(a.data) for a in got])[0]
    assert checksums_ok(raw(whole)) and len(whole[TCP].payload) == 3000


def test_zero_udp_checksum_stays_zero_on_later_packets():
    """Later packets of a flow, by the fast path and (with IP options) by the general one."""
    from conntrack.build import ipv4, udp_datagram
    from conntrack.packet import parse_ip
    e = engine()
    first = out(e, udp(VM, PEER, 5000, 53), 0)  # with a checksum
    assert first.action == Action.ACCEPT
    src, dst = bytes(map(int, VM.split("."))), bytes(map(int, PEER.split(".")))
    plain = ipv4(src, dst, 17, udp_datagram(src, dst, 5000, 53, b"later", checksum=False))
    opts = ipv4(src, dst, 17, udp_datagram(src, dst, 5000, 53, b"later", checksum=False), options=b"\x01\x01\x01\x00")
    for pkt in (plain, opts):
        a = out(e, pkt, 1)
        assert a.reason == NatReason.TRANSLATED and IP(a.data).src == EXT and checksums_ok(a.data)
        p = parse_ip(a.data)
        assert a.data[p.l4 + 6:p.l4 + 8] == b"\0\0"


def test_a_syn_on_a_time_wait_tuple_reopens_the_flow_with_its_mapping():
    """RFC 1122 reopening, as Linux: a client that reuses its port while the NAT still has the
    old connection in TIME_WAIT gets a new flow (it used to be dropped as invalid: a 1 s
    SYN retransmission per reused port)."""
    e = engine()
    for p, side in ((tcp(VM, PEER, 6000, 80, "S"), Side.INTERNAL), (tcp(PEER, EXT, 80, 6000, "SA"), Side.EXTERNAL),
                    (tcp(VM, PEER, 6000, 80, "A"), Side.INTERNAL), (tcp(PEER, EXT, 80, 6000, "FA"), Side.EXTERNAL),
                    (tcp(VM, PEER, 6000, 80, "FA"), Side.INTERNAL), (tcp(PEER, EXT, 80, 6000, "A"), Side.EXTERNAL)):
        assert e.process(p, side, 0.5).action == Action.ACCEPT
    assert e.status()["counters"].get("dropped_invalid", 0) == 0
    a = e.process(tcp(VM, PEER, 6000, 80, "S"), Side.INTERNAL, 3.0)
    assert a.action == Action.ACCEPT and a.reason == NatReason.TRANSLATED
    assert a.data[12:16] == bytes([203, 0, 113, 1]) and a.data[20:22] == (6000).to_bytes(2, "big")
    assert e.process(tcp(PEER, EXT, 80, 6000, "SA"), Side.EXTERNAL, 3.1).action == Action.ACCEPT
    assert len(e.table) == 1 and e.status()["mappings_live"] == 1
