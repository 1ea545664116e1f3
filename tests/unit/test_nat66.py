"""NAT66: the engine translating IPv6 beside IPv4 (``nat66 = true``), checked with scapy."""
from __future__ import annotations

import pytest
from scapy.all import TCP, UDP, raw
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6ND_NS,
                                ICMPv6PacketTooBig, IPerror6, IPv6, IPv6ExtHdrFragment, fragment6)

from conntrack.answer import Action
from nat import NatEngine, NatReason, parse_nat_conf, parse_toml
from nat.config import ConfigError

from .nat_support import (EXT, EXT6, PEER, PEER6, PEER6B, VM, VM6, VM6B, checksums_ok, checksums_ok6, engine,
                          engine6, inn, out, ping6, tcp6, udp, udp6)

INBOUND6 = '[[inbound]]\nproto = "tcp"\nport = 8080\nto = "[2001:db8:1::3]:80"\n'


def test_ipv6_stays_refused_while_nat66_is_off():
    e = engine()
    assert out(e, udp6(VM6, PEER6, 5000, 53)).reason == NatReason.NOT_IPV4
    assert e.status().get("external_ip6") is None


def test_outbound_tcp_gets_the_external_address_and_its_port_and_the_reply_comes_back():
    e = engine6()
    v = out(e, tcp6(VM6, PEER6, 40000, 443))
    assert v.action == Action.ACCEPT and v.reason == NatReason.TRANSLATED
    p = IPv6(v.data)
    assert (p.src, p.dst, p[TCP].sport, p[TCP].dport) == (EXT6, PEER6, 40000, 443)  # port preserved
    assert checksums_ok6(v.data)
    r = inn(e, tcp6(PEER6, EXT6, 443, 40000, "SA"), 0.1)
    q = IPv6(r.data)
    assert r.action == Action.ACCEPT and (q.src, q.dst, q[TCP].sport, q[TCP].dport) == (PEER6, VM6, 443, 40000)
    assert checksums_ok6(r.data)
    a = out(e, tcp6(VM6, PEER6, 40000, 443, "A", b"hello"), 0.2)
    assert a.action == Action.ACCEPT and IPv6(a.data).src == EXT6 and checksums_ok6(a.data)


def test_udp_mapping_and_filtering_are_endpoint_independent_per_family():
    e = engine6()
    a = IPv6(out(e, udp6(VM6, PEER6, 5000, 53)).data)
    b = IPv6(out(e, udp6(VM6, PEER6B, 5000, 53)).data)
    assert a[UDP].sport == b[UDP].sport == 5000  # one mapping for every destination
    v = inn(e, udp6(PEER6B, EXT6, 9999, 5000))  # a stranger, through the endpoint-independent filter
    assert v.action == Action.ACCEPT and IPv6(v.data).dst == VM6 and checksums_ok6(v.data)
    # a second VM asking for the same port gets another one; the IPv4 pool is apart: 5000 there too
    c = IPv6(out(e, udp6(VM6B, PEER6, 5000, 53)).data)
    assert c.src == EXT6 and c[UDP].sport != 5000
    from scapy.all import IP
    assert IP(out(e, udp(VM, PEER, 5000, 53)).data)[UDP].sport == 5000
    assert e.status()["pools6"]["udp"]["used"] == 2 and e.status()["pools"]["udp"]["used"] == 1


def test_address_dependent_filtering_refuses_strangers_in_ipv6_too():
    e = engine6('filtering = "address-dependent"\n')
    out(e, udp6(VM6, PEER6, 5000, 53))
    assert inn(e, udp6(PEER6B, EXT6, 53, 5000)).reason == NatReason.FILTERED
    assert inn(e, udp6(PEER6, EXT6, 54, 5000)).action == Action.ACCEPT


def test_inbound_mapping_to_an_ipv6_address_beside_the_same_port_in_ipv4():
    e = engine6(INBOUND6 + '[[inbound]]\nproto = "tcp"\nport = 8080\nto = "198.18.0.3:80"\n')
    v = inn(e, tcp6(PEER6, EXT6, 33000, 8080))
    p = IPv6(v.data)
    assert v.action == Action.ACCEPT and (p.src, p.dst, p[TCP].dport) == (PEER6, VM6B, 80) and checksums_ok6(v.data)
    r = out(e, tcp6(VM6B, PEER6, 80, 33000, "SA"), 0.1)
    q = IPv6(r.data)
    assert (q.src, q[TCP].sport) == (EXT6, 8080) and checksums_ok6(r.data)
    from scapy.all import IP
    w = inn(e, raw(IP(src=PEER, dst=EXT) / TCP(sport=33000, dport=8080, flags="S")))
    assert w.action == Action.ACCEPT and IP(w.data).dst == "198.18.0.3"
    assert {r["internal"] for r in e.mapping_rows() if r["static"]} == {"[2001:db8:1::3]:80", "198.18.0.3:80"}


def test_no_mapping_unknown_source_and_wrong_address_are_counted_drops():
    e = engine6()
    assert inn(e, tcp6(PEER6, EXT6, 1, 8080)).reason == NatReason.NO_MAPPING
    assert out(e, udp6("2001:db8:9::1", PEER6, 1, 2)).reason == NatReason.NOT_INTERNAL_SOURCE
    assert inn(e, udp6(PEER6, "2001:db8:ff::2", 1, 2)).reason == NatReason.NOT_EXTERNAL_ADDRESS
    assert e.counters["dropped_no_mapping"] == 1 and e.counters["dropped_not_internal_source"] == 1


def test_echo_maps_its_identifier_and_the_reply_comes_back():
    e = engine6()
    a = out(e, ping6(VM6, PEER6, 77))
    b = out(e, ping6(VM6B, PEER6, 77))  # the same id from another VM: another external id
    pa, pb = IPv6(a.data), IPv6(b.data)
    assert pa.src == pb.src == EXT6 and pa[ICMPv6EchoRequest].id == 77 != pb[ICMPv6EchoRequest].id
    assert checksums_ok6(a.data) and checksums_ok6(b.data)
    r = inn(e, ping6(PEER6, EXT6, pb[ICMPv6EchoRequest].id, reply=True), 0.1)
    q = IPv6(r.data)
    assert r.action == Action.ACCEPT and q.dst == VM6B and q[ICMPv6EchoReply].id == 77 and checksums_ok6(r.data)
    assert inn(e, ping6(PEER6, EXT6, 4242, reply=True)).action == Action.DROP  # no request: no reply


def test_an_error_from_the_peer_reaches_the_vm_with_its_own_packet_quoted():
    e = engine6()
    sent = out(e, udp6(VM6, PEER6, 5000, 53, b"query")).data
    err = raw(IPv6(src=PEER6, dst=EXT6) / ICMPv6DestUnreach(code=4) / sent)
    v = inn(e, err, 0.1)
    assert v.action == Action.ACCEPT and v.reason == NatReason.ICMP_ERROR_TRANSLATED
    p = IPv6(v.data)
    assert p.dst == VM6 and p[IPerror6].src == VM6 and p[IPerror6].dst == PEER6
    assert raw(p[IPerror6]) == udp6(VM6, PEER6, 5000, 53, b"query")  # exactly what the VM sent
    assert checksums_ok6(v.data)


def test_packet_too_big_from_a_router_and_errors_leaving_from_inside():
    e = engine6(INBOUND6)
    sent = out(e, tcp6(VM6, PEER6, 40000, 443, "S", b"x" * 100)).data
    ptb = raw(IPv6(src="2001:db8:5::1", dst=EXT6) / ICMPv6PacketTooBig(mtu=1280) / sent)
    v = inn(e, ptb, 0.1)
    p = IPv6(v.data)
    assert v.action == Action.ACCEPT and (p.src, p.dst) == ("2001:db8:5::1", VM6) and p[IPerror6].src == VM6
    assert p[ICMPv6PacketTooBig].mtu == 1280 and checksums_ok6(v.data)
    # the inside answers an inbound mapping's packet with an error: it leaves from the external address
    came = inn(e, udp6(PEER6, EXT6, 1, 2))
    assert came.action == Action.DROP  # (no UDP mapping: nothing to answer; now a TCP one)
    syn = inn(e, tcp6(PEER6, EXT6, 33000, 8080), 0.2).data
    err = raw(IPv6(src="2001:db8:1::fe", dst=PEER6) / ICMPv6DestUnreach(code=1) / syn)
    w = out(e, err, 0.3)
    q = IPv6(w.data)
    assert w.action == Action.ACCEPT and (q.src, q.dst) == (EXT6, PEER6)  # the internal router's address stays in
    from scapy.layers.inet import TCPerror
    assert (q[IPerror6].dst, q[TCPerror].dport) == (EXT6, 8080) and checksums_ok6(w.data)


def test_an_error_about_no_flow_is_dropped():
    e = engine6()
    err = raw(IPv6(src=PEER6, dst=EXT6) / ICMPv6DestUnreach(code=4) / udp6(EXT6, PEER6, 7, 8))
    assert inn(e, err).reason == NatReason.ICMP_NO_FLOW


def test_hairpinning_through_an_ipv6_inbound_mapping():
    e = engine6(INBOUND6)
    v = out(e, tcp6(VM6, EXT6, 41000, 8080))
    p = IPv6(v.data)
    assert v.reason == NatReason.HAIRPINNED and (p.src, p.dst, p[TCP].sport, p[TCP].dport) == (EXT6, VM6B, 41000, 80)
    r = out(e, tcp6(VM6B, EXT6, 80, 41000, "SA"), 0.1)
    q = IPv6(r.data)
    assert (q.src, q.dst, q[TCP].sport, q[TCP].dport) == (EXT6, VM6, 8080, 41000)
    assert checksums_ok6(v.data) and checksums_ok6(r.data)


def test_link_scoped_traffic_passes_untouched():
    e = engine6()
    ns = raw(IPv6(src="fe80::1", dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS(tgt=EXT6))
    v = inn(e, ns)
    assert v.action == Action.ACCEPT and v.reason == NatReason.NOT_OURS and v.data == ns
    assert out(e, udp6("fe80::2", "fe80::1", 546, 547)).data == udp6("fe80::2", "fe80::1", 546, 547)
    from scapy.layers.inet6 import ICMPv6ND_NA
    na = raw(IPv6(src=PEER6, dst=EXT6, hlim=255) / ICMPv6ND_NA(tgt=PEER6))  # the answer to the host's own NS
    assert inn(e, na).data == na
    routed = raw(IPv6(src=PEER6, dst=EXT6, hlim=64) / ICMPv6ND_NA(tgt=PEER6))  # came through a router: not ND
    assert inn(e, routed).reason == NatReason.UNSUPPORTED_PROTOCOL
    inward = raw(IPv6(src=PEER6, dst=VM6, hlim=255) / ICMPv6ND_NA(tgt=PEER6))  # from outside to a VM's address
    assert inn(e, inward).reason == NatReason.NOT_EXTERNAL_ADDRESS  # dropped, as a UDP packet to it would be
    assert e.status()["flows"] == 0


def test_fragments_follow_their_head_in_ipv6():
    e = engine6()
    pkt = IPv6(src=VM6, dst=PEER6) / IPv6ExtHdrFragment(id=4242) / UDP(sport=5000, dport=53) / (b"z" * 3000)
    frags = fragment6(pkt, 1000)
    outs = [out(e, raw(f), 0) for f in frags]
    assert len(frags) > 2 and all(v.action == Action.ACCEPT for v in outs)
    assert all(IPv6(v.data).src == EXT6 for v in outs)
    whole = b"".join(bytes(IPv6(v.data)[IPv6ExtHdrFragment].payload) for v in outs)  # UDP header + data
    from scapy.layers.inet6 import in6_chksum
    seg = bytearray(whole)
    stored = int.from_bytes(seg[6:8], "big")
    seg[6:8] = b"\0\0"
    assert in6_chksum(17, IPv6(src=EXT6, dst=PEER6), bytes(seg)) == stored


def test_no_external_v6_address_then_one_then_another():
    e = engine6(ext6=None)
    assert out(e, udp6(VM6, PEER6, 5000, 53)).reason == NatReason.NO_EXTERNAL_ADDRESS
    assert e.set_external_address(EXT6, 1, family=6) == 0
    out(e, udp6(VM6, PEER6, 5000, 53), 2)
    out(e, udp(VM, PEER, 5000, 53), 2)
    assert e.set_external_address("2001:db8:ff::7", 3, family=6) == 1  # only the IPv6 flow dies
    assert e.status()["flows"] == 1 and e.status()["external_ip"] == EXT
    assert IPv6(out(e, udp6(VM6, PEER6, 5000, 53), 4).data).src == "2001:db8:ff::7"
    with pytest.raises(ValueError):
        e.set_external_address("203.0.113.9", 5, family=6)


def test_snapshot_round_trip_and_rebind_with_v6_flows():
    e = engine6(INBOUND6)
    sent = IPv6(out(e, udp6(VM6B, PEER6, 5000, 53)).data)  # 5000 kept
    IPv6(out(e, udp6(VM6, PEER6, 5000, 53)).data)  # another port
    out(e, udp(VM, PEER, 6000, 53))
    inn(e, tcp6(PEER6, EXT6, 33000, 8080))
    snap = e.snapshot(1.0)
    f = engine6(INBOUND6, seed=99)
    assert f.restore(snap, 10.0) == 4
    r = inn(f, udp6(PEER6, EXT6, 53, sent[UDP].sport), 10.5)
    assert r.action == Action.ACCEPT and IPv6(r.data).dst == VM6B
    assert IPv6(inn(f, tcp6(PEER6, EXT6, 33000, 8080), 10.6).data).dst == VM6B  # its SYN again
    g = engine6(INBOUND6, ext6="2001:db8:ff::5")
    assert g.restore(snap, 10.0) == 1  # the IPv4 flow only: the IPv6 ones were on another address
    h = engine6(INBOUND6, ext6="2001:db8:ff::5")
    assert h.restore(snap, 10.0, rebind=True) == 4
    q = inn(h, udp6(PEER6, "2001:db8:ff::5", 53, 5000), 10.5)
    assert q.action == Action.ACCEPT and IPv6(q.data).dst == VM6B and checksums_ok6(q.data)


def test_reload_keeps_both_families_inbound_mappings():
    e = engine6(INBOUND6)
    e.reload(parse_toml('internal = ["198.18.0.0/24"]\nnat66 = true\ninternal6 = ["2001:db8:1::/64"]\n' + INBOUND6
                        + '[[inbound]]\nproto = "udp"\nport = 53\nto = "198.18.0.3:53"\n'), 1)
    assert len(e.config.forwards) == 2
    assert inn(e, tcp6(PEER6, EXT6, 33000, 8080), 2).action == Action.ACCEPT
    assert inn(e, udp("192.0.2.9", EXT, 1, 53), 2).action == Action.ACCEPT
    from nat.events import Reloaded
    assert Reloaded(2) in e.pop_events()


def test_nat_conf_nat66_keys_and_bracketed_forwards():
    cfg = parse_nat_conf("[host]\nip = 198.18.0.1\nnetmask = 255.255.255.0\nnatIp6Enable = 1\n"
                         "natIp6Prefix = 2001:db8:1::/64\n[incomingtcp]\n8080 = [2001:db8:1::3]:80\n"
                         "8080 = 198.18.0.3:80\n")
    assert cfg.nat66 and cfg.internal6 == ("2001:db8:1::/64",) and len(cfg.forwards) == 2 and not cfg.warnings
    off = parse_nat_conf("[host]\nnatIp6Enable = 0\nnatIp6Prefix = fd15:4ba5:5a2b:1008::/64\n")  # VMware's default
    assert not off.nat66 and not off.warnings
    silent = parse_nat_conf("[host]\nnatIp6Prefix = 2001:db8:1::/64\n")  # meant NAT66, forgot to enable it
    assert not silent.nat66 and silent.warnings == ("nat.conf:2: natIp6Prefix without natIp6Enable: IPv6 is not "
                                                    "translated (natIp6Enable = 1)",)
    with pytest.raises(ConfigError, match=r"nat.conf:2: natIp6Enable = 1 needs natIp6Prefix"):
        parse_nat_conf("[host]\nnatIp6Enable = 1\n")
    with pytest.raises(ConfigError, match=r"nat.conf:2: .*brackets"):
        parse_nat_conf("[incomingtcp]\n8080 = 2001:db8:1::3:80\n")
    with pytest.raises(ConfigError, match=r"nat.conf:3: TCP port 8080 is mapped twice"):
        parse_nat_conf("[incomingtcp]\n8080 = [2001:db8:1::3]:80\n8080 = [2001:db8:1::4]:80\n")
    with pytest.raises(ConfigError, match=r"nat.toml: nat66.*needs internal6"):
        parse_toml("nat66 = true\n")
    w = parse_toml('internal6 = ["2001:db8:1::/64"]\n' + INBOUND6).warnings
    assert any("nat66 is off" in x for x in w) and any("ignored while NAT66 is off" in x for x in w)
    assert any("outside the internal network" in x
               for x in parse_toml(BASE_NAT66 + INBOUND6.replace("2001:db8:1::3", "2001:db8:7::3")).warnings)


BASE_NAT66 = 'nat66 = true\ninternal6 = ["2001:db8:1::/64"]\n'


def test_ipv4_engine_unchanged_by_nat66_on():
    """The IPv4 path answers exactly the same with NAT66 on."""
    a, b = engine(), engine6()
    for data in (udp(VM, PEER, 5000, 53), udp("192.0.2.9", EXT, 53, 5000)):
        side_out = data[12:16] != bytes([192, 0, 2, 9])
        va = out(a, data) if side_out else inn(a, data)
        vb = out(b, data) if side_out else inn(b, data)
        assert va == vb and (va.data is None or checksums_ok(va.data))
