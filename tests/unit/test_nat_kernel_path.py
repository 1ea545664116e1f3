"""The kernel path without a kernel: the mapping table's journal, what it becomes in the sets
(nat.netfilter.kernelpath), and how the driver learns the kernel's flows, clashes included
(nat.netfilter.offload.Offloader.learn), against a fake conntrack table and a set writer that
records.  The real sets and rules: tests/netns/test_nat_kernel_path.py."""
from __future__ import annotations

import ipaddress

from nat import Action, Side
from nat.netfilter.ctnetlink import KEntry, Tuple
from nat.netfilter.ipset import member
from nat.netfilter.kernelpath import CLASH_QUEUED, KERNEL, KernelPath
from nat.netfilter.offload import MARK

from .nat_support import EXT, PEER, VM, engine, udp
from .test_nat_offload import _offloader

ip = lambda s: ipaddress.IPv4Address(s).packed  # noqa: E731
VM_B = "198.18.0.3"


class Writer:
    """The set writer, recording (add, set, member)."""

    def __init__(self):
        self.changes = []

    def change(self, add, name, data):
        self.changes.append((add, name, data))

    def send(self):
        pass

    def errors(self):
        return 0


def _setup():
    e = engine()
    kp = KernelPath(3, (1024, 65535))
    kp.writer = Writer()
    kp.fill(e.mapping_table, 0.0)
    off = _offloader(e)
    off.kernel = kp
    return e, kp, off


def _kernel_entry(src, sport, dport_ext, dst=PEER, dport=53, proto=17):
    """A NEW event of the kernel path: ``src:sport`` NATed to EXT:``dport_ext``."""
    return KEntry(Tuple(proto, ip(src), ip(dst), sport, dport), Tuple(proto, ip(dst), ip(EXT), dport, dport_ext),
                  MARK | KERNEL, 1, 0, born=True)


def test_the_journal_becomes_set_changes_kept_port_or_moved():
    e, kp, _ = _setup()
    kp.writer.changes.clear()
    assert e.process(udp(VM, PEER, 5000, 53), Side.INTERNAL, 0.0).action == Action.ACCEPT  # its own port
    assert e.process(udp(VM_B, PEER, 5000, 53), Side.INTERNAL, 0.0).action == Action.ACCEPT  # another
    kp.sync()
    moved_to = e.mapping_table.by_internal[(17, ip(VM_B), 5000)].mapping.external_port
    assert moved_to != 5000
    assert kp.writer.changes == [
        (True, kp.held[17], member(port=5000)), (True, kp.keep, member(ip(VM), 5000, 17)),
        (True, kp.held[17], member(port=moved_to)), (True, kp.moved, member(ip(VM_B), 5000, 17) + member(timeout=0))]
    kp.writer.changes.clear()
    e.expire(10_000.0)  # both flows time out: their mappings go, and with them the members
    kp.sync()
    assert sorted(kp.writer.changes) == sorted([
        (False, kp.held[17], member(port=5000)), (False, kp.keep, member(ip(VM), 5000, 17)),
        (False, kp.held[17], member(port=moved_to)), (False, kp.moved, member(ip(VM_B), 5000, 17))])


def test_a_learned_flow_holds_its_mapping_like_any_other():
    e, kp, off = _setup()
    c = off.learn(_kernel_entry(VM, 40000, 40000), 1.0)
    assert c is not None and kp.counters == {"kernel_flows": 1, "kernel_clashes": 0, "kernel_table_full": 0, "kernel_foreign": 0}
    m = e.mapping_table.by_external[(17, 40000)].mapping
    assert (m.internal_ip, m.internal_port) == (ip(VM), 40000)
    # endpoint-independent: the same endpoint to another destination keeps the mapping (roam decides
    # it now: as if it came to the queue), and a third party may send in
    assert e.process(udp(VM, "203.0.113.9", 40000, 53), Side.INTERNAL, 1.1).data[12:16] == ip(EXT)
    assert e.process(udp("203.0.113.7", EXT, 99, 40000), Side.EXTERNAL, 1.2).action == Action.ACCEPT
    # its DESTROY frees it as any offloaded flow's does
    off.engine.end_flow(c.original, 2.0)
    assert (17, 40000) in e.mapping_table.by_external  # the second flow still holds it


def test_a_port_another_endpoint_holds_is_a_clash_removed_and_queued_from_then_on():
    e, kp, off = _setup()
    assert e.process(udp(VM, PEER, 41000, 53), Side.INTERNAL, 0.0).action == Action.ACCEPT  # VM holds 41000
    kp.sync()
    kp.writer.changes.clear()
    ev = _kernel_entry(VM_B, 41000, 41000, dport=54)  # the kernel NATed VM_B onto it (a set update missed)
    off.ct.entries[ev.original] = ev
    assert off.learn(ev, 1.0) is None
    assert kp.counters["kernel_clashes"] == 1 and ev.original not in off.ct.entries  # removed from the kernel
    assert kp.writer.changes == [(False, kp.keep, member(ip(VM_B), 41000, 17)),  # not VM_B's port
                                 (True, kp.moved, member(ip(VM_B), 41000, 17) + member(timeout=CLASH_QUEUED))]
    assert e.mapping_table.by_external[(17, 41000)].mapping.internal_ip == ip(VM)  # VM's mapping untouched


def test_a_port_the_kernel_chose_itself_is_taken_and_the_own_port_let_go():
    e, kp, off = _setup()
    kp.writer.changes.clear()
    c = off.learn(_kernel_entry(VM, 42000, 42001), 1.0)  # a tuple of the host's own took 42000
    assert c is not None
    assert e.mapping_table.by_internal[(17, ip(VM), 42000)].mapping.external_port == 42001
    assert (False, kp.keep, member(ip(VM), 42000, 17)) in kp.writer.changes
    assert (False, kp.held[17], member(port=42000)) in kp.writer.changes  # no mapping holds 42000
    kp.sync()
    assert (True, kp.moved, member(ip(VM), 42000, 17) + member(timeout=0)) in kp.writer.changes


def test_a_flow_the_kernel_reopened_replaces_the_one_the_engine_had():
    e, kp, off = _setup()
    p = udp(VM, PEER, 43000, 53)
    assert e.process(p, Side.INTERNAL, 0.0).action == Action.ACCEPT  # the engine's, not offloaded
    c = off.learn(_kernel_entry(VM, 43000, 43000), 1.0)
    assert c is not None and kp.counters["kernel_clashes"] == 0 and e.table.lookup(c.original) is c


def test_an_address_change_empties_the_sets():
    e, kp, _ = _setup()
    flushed = []
    import nat.netfilter.kernelpath as kpm

    real = kpm.ipset.flush
    kpm.ipset.flush = flushed.append
    try:
        e.set_external_address("203.0.113.5", 1.0)
        kp.sync()
    finally:
        kpm.ipset.flush = real
    assert sorted(flushed) == sorted([*kp.held.values(), kp.keep, kp.moved])


def test_a_full_table_refuses_the_kernels_flow_counted_not_queued():
    e, kp, off = _setup()
    e.table.capacity = len(e.table)
    ev = _kernel_entry(VM, 44000, 44000)
    off.ct.entries[ev.original] = ev
    kp.writer.changes.clear()
    assert off.learn(ev, 1.0) is None
    assert kp.counters["kernel_table_full"] == 1 and kp.counters["kernel_clashes"] == 0
    assert ev.original not in off.ct.entries and kp.writer.changes == []


def test_an_entry_not_the_kernel_paths_is_removed_and_counted_never_raised():
    e, kp, off = _setup()
    gre = KEntry(Tuple(47, ip(VM), ip(PEER), 0, 0), Tuple(47, ip(PEER), ip(EXT), 0, 0), MARK | KERNEL, 1, 0, born=True)
    other = _kernel_entry(VM, 46000, 46000)._replace(reply=Tuple(17, ip(PEER), ip("203.0.113.5"), 53, 46000))
    for ev in (gre, other):
        off.ct.entries[ev.original] = ev
        assert off.learn(ev, 1.0) is None and ev.original not in off.ct.entries
    assert kp.counters["kernel_foreign"] == 2 and not e.table


def test_a_static_mapping_removed_by_a_reload_keeps_its_port_held():
    from nat.mapping import Mapping

    _, kp, _ = _setup()
    kp.writer.changes.clear()
    kp._apply(-1, Mapping(6, ip(VM), 80, ip(EXT), 8080, static=True))
    assert kp.writer.changes == [(False, kp.moved, member(ip(VM), 80, 6))]  # the endpoint goes, the port stays held


def _worker(k: int):
    """Worker ``k`` of two: its engine holds only its lane of the pools, its offloader learns
    only the kernel path's flows from its lane's source ports."""
    from nat import NatEngine
    from nat.netfilter.workers import Slices, WorkerOffloader

    base = engine()
    slices = Slices(base.config, 2)
    e = NatEngine(slices.config(base.config, k), EXT, seed=7)
    kp = KernelPath(3 + k, (1024, 65535), owner=1)
    kp.writer = Writer()
    kp.fill(e.mapping_table, 0.0)
    off = _offloader(e)
    off.__class__ = WorkerOffloader
    off.kernel, off.index, off.slices = kp, k, slices
    return e, kp, off, slices


def test_a_worker_learns_its_own_lanes_kernel_flows_only():
    e0, kp0, off0, slices = _worker(0)
    e1, kp1, off1, _ = _worker(1)
    ports = [p for p in range(40000, 40040, 2)]
    assert {slices.owner(17, p) for p in ports} == {0, 1}
    for p in ports:
        ev = _kernel_entry(VM, p, p)
        mine, theirs = (off0, off1) if slices.owner(17, p) == 0 else (off1, off0)
        assert mine.learn(ev, 1.0) is not None and mine.mine(ev)
        assert theirs.learn(ev, 1.0) is None and not theirs.mine(ev)
    for e, k in ((e0, 0), (e1, 1)):
        held = {port for (proto, port) in e.mapping_table.by_external if proto == 17}
        assert held == {p for p in ports if slices.owner(17, p) == k}
    assert kp0.counters["kernel_flows"] + kp1.counters["kernel_flows"] == len(ports)
    assert kp0.counters["kernel_foreign"] == kp1.counters["kernel_foreign"] == 0


def test_a_port_the_kernel_chose_in_another_workers_lane_is_a_clash():
    """The kernel path's MASQUERADE may pick any port of the range when the flow's own tuple is
    taken: one of another lane is not the worker's to hold (that worker knows nothing of the
    endpoint), so the entry goes, counted, and the endpoint is queued from then on."""
    e0, kp0, off0, slices = _worker(0)
    own = next(p for p in range(40000, 40100) if slices.owner(17, p) == 0)
    other = next(p for p in range(40000, 40100) if slices.owner(17, p) == 1)
    ev = _kernel_entry(VM, own, other)
    off0.ct.entries[ev.original] = ev
    assert off0.mine(ev)  # by its source port: the worker its packets reach
    assert off0.learn(ev, 1.0) is None
    assert kp0.counters["kernel_clashes"] == 1 and ev.original not in off0.ct.entries
    assert (True, kp0.moved, member(ip(VM), own, 17) + member(timeout=CLASH_QUEUED)) in kp0.writer.changes
    assert not e0.mapping_table.by_external
