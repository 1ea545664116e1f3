"""One proxy serving 100 host ends and 1,000 VM MACs (issue 11, "Scale"), the engines wired in memory.

100 real :class:`~tunnel.host.HostEnd` engines and one :class:`~tunnel.proxy.ProxyEnd`
(real handshakes and AEAD; :class:`tools.bench.tunnel_scale.Fabric` hands each answer's
``data``/``sends`` to the other side, time passed in).  Ten VMs per host end, learned from
their frames (no MAC given).  Every frame carries a tag, so where each one came out (which
host end's TAP, the LAN) is checked frame by frame.  The run time is bounded by the counts
(and :data:`~tools.bench.tunnel_scale.MAX_DELIVERIES` per pump); nothing is timed.
"""
from __future__ import annotations

import itertools

import pytest

from tools.bench.tunnel_scale import (
    BCAST, LAN_PEER, LAN_PEER_IP, Fabric, arp_from_lan, ip_frame, measure, rarp, report, tag_of, vm_ip, vm_mac,
)
from tunnel.announce import gratuitous_arp

HOSTS, PER_HOST = 100, 10
_tags = itertools.count(1)


@pytest.fixture(scope="module")
def fabric() -> Fabric:
    f = Fabric(HOSTS)
    f.attach_all()
    assert f.attached()
    f.from_lan(arp_from_lan())  # the LAN peer speaks: learned behind the LAN, flooded to every host end
    f.tick(0.01)
    f.vms_speak(PER_HOST)
    return f


def _lan_round(f: Fabric, where: dict, middle=None) -> int:
    """A frame from the LAN to every VM and one from every VM to the LAN peer (``middle`` runs halfway,
    while the rest flow).  Each LAN frame must come out of exactly the TAP of the host end the VM was
    on when it was sent, once; a frame sent toward a VM that then moved may come out once more at
    its new host (what the proxy re-sends on a move: as many as it counts).  Each VM's frame must
    come out on the LAN, once."""
    f.clear()
    resent = f.proxy.counters["resent_frames"]
    sent_down, sent_up = {}, {}
    vms = sorted(where)
    for k, vm in enumerate(vms):
        if middle is not None and k == len(vms) // 2:
            middle()
        t = next(_tags)
        f.from_lan(ip_frame(vm_mac(*vm), LAN_PEER, LAN_PEER_IP, t))
        sent_down[t] = (vm, where[vm])
        t = next(_tags)
        f.vm_sends(where[vm], ip_frame(LAN_PEER, vm_mac(*vm), vm_ip(*vm), t))
        sent_up[t] = vm
    f.pump()
    seen: dict[int, list[int]] = {}
    for i, frames in enumerate(f.tap):
        for fr in frames:
            if fr[:6] != BCAST and fr[6:12] == LAN_PEER:
                seen.setdefault(tag_of(fr), []).append(i)
    wrong, again = {}, 0
    for t, (vm, at) in sent_down.items():
        got = seen.get(t)
        if got == [at]:
            continue
        if where[vm] != at and got == sorted([at, where[vm]]):
            again += 1
            continue
        wrong[t] = (vm, at, where[vm], got)
    assert not wrong, f"{len(wrong)} LAN frames not delivered exactly at their VM's host, e.g. {list(wrong.items())[:3]}"
    assert again == f.proxy.counters["resent_frames"] - resent
    up = sorted(tag_of(fr) for fr in f.lan if fr[:6] == LAN_PEER)
    assert up == sorted(sent_up)
    return again


def test_one_proxy_serves_100_host_ends_and_1000_vms_learned_from_their_frames(fabric):
    f = fabric
    p = f.proxy
    assert len(p.sessions) == HOSTS and len(p.macs) == HOSTS * PER_HOST + 1  # and the LAN peer
    for i, h in enumerate(f.hosts):
        assert set(h.macs) == {vm_mac(i, v) for v in range(PER_HOST)}
        assert all(p.macs.lookup(vm_mac(i, v)) == h.session for v in range(PER_HOST))
    assert p.counters["claim_moves"] + p.counters["presence_moves"] == HOSTS * PER_HOST
    assert sum(p.drops.values()) == 0 and all(sum(h.drops.values()) == 0 for h in f.hosts)
    _lan_round(f, {(i, v): i for i in range(HOSTS) for v in range(PER_HOST)})


def test_broadcast_from_the_lan_reaches_every_host_end_once(fabric):
    f = fabric
    f.clear()
    t = next(_tags)
    f.from_lan(ip_frame(BCAST, LAN_PEER, LAN_PEER_IP, t))
    f.pump()
    assert [sum(1 for fr in tap if tag_of(fr) == t and fr[:6] == BCAST) for tap in f.tap] == [1] * HOSTS


def test_one_vm_then_all_ten_vms_of_a_host_move_while_the_rest_keep_flowing(fabric):
    f = fabric
    p = f.proxy
    where = {(i, v): i for i in range(HOSTS) for v in range(PER_HOST)}
    moves = p.counters["presence_moves"]

    def move(vm, to: int) -> None:
        """The VM resumes at host end ``to``: its first frame there (QEMU's RARP)."""
        f.vm_sends(to, rarp(vm_mac(*vm)))
        f.pump()
        where[vm] = to

    f.tick(1.0)
    # Sent toward it at host 7 earlier in the round, since it last spoke there: re-sent at 42.
    assert _lan_round(f, where, middle=lambda: move((7, 3), 42)) == 1
    assert p.macs.lookup(vm_mac(7, 3)) == f.hosts[42].session
    assert vm_mac(7, 3) not in f.hosts[7].macs and vm_mac(7, 3) in f.hosts[42].macs  # host 7 saw it elsewhere
    assert f.lan.count(gratuitous_arp(vm_mac(7, 3), vm_ip(7, 3))) == 1  # announced on the LAN

    f.tick(1.0)
    def move_host_20() -> None:
        for v in range(PER_HOST):
            move((20, v), 99)

    assert _lan_round(f, where, middle=move_host_20) == PER_HOST
    assert f.hosts[20].macs == ()  # every VM seen elsewhere: forgotten
    assert set(f.hosts[99].macs) == {vm_mac(99, v) for v in range(PER_HOST)} | {vm_mac(20, v) for v in range(PER_HOST)}
    assert all(p.macs.lookup(vm_mac(20, v)) == f.hosts[99].session for v in range(PER_HOST))
    assert p.counters["presence_moves"] - moves == 1 + PER_HOST
    assert p.counters["mac_flaps"] == 0

    # Every one of the 1,000 still where it is, the moved ones at their new hosts.
    f.tick(1.0)
    assert _lan_round(f, where) == 0
    assert sum(p.drops.values()) == 0 and all(sum(h.drops.values()) == 0 for h in f.hosts)


def test_bench_scale_runs_at_tiny_counts_and_prints_its_table():
    out = report(measure(hosts=4, macs=8, frames=50, repeats=3))
    for row in ("attach, sessions 4-4", "idle, 4 sessions", "CPU us/session/s", "bytes/session", "bytes/MAC", "LAN -> 8 MACs", "LAN broadcast, 4 host ends",
                "move, 4 hosts, 8 MACs"):
        assert row in out
