"""`roam nat --workers N` without the kernel: the pools' partition, who owns a port, the
merged status, and the clear refusals (issue 10, section 4)."""
from __future__ import annotations

import re

import pytest

from nat import parse_toml
from nat.netfilter import PluginError
from nat.ports import PortPool
from nat.netfilter.workers import Slices, merge_status, partition, worker_path


def test_partition_is_contiguous_disjoint_and_covers_the_range():
    for first, last, n in ((1024, 65535, 2), (1024, 65535, 3), (600, 1023, 7), (5, 5, 1), (10, 13, 4)):
        s = partition(first, last, n)
        assert len(s) == n
        assert s[0][0] == first and s[-1][1] == last
        for (a, b), (c, _) in zip(s, s[1:]):
            assert a <= b and c == b + 1
        size = (last - first + 1) // n
        assert [a for a, _ in s] == [first + k * size for k in range(n)]  # worker k from lo + k*size


def test_the_default_pools_for_two_workers():
    sl = Slices(parse_toml('internal = ["198.18.0.0/24"]'), 2)
    assert (sl.modulus, sl.lanes) == (8, [(0, 3), (4, 7)])
    assert sl.ports(1) == [(1024, 65535, (8, 4, 7)), (600, 1023, (8, 4, 7))]
    # the even ports connect() hands out in sequence change worker every four
    assert [sl.owner(6, p) for p in range(20000, 20032, 2)] == [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4
    assert [sl.owner(17, p) for p in (1024, 1031, 1032, 65535, 600, 607, 608, 22, 80)] == [0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert [sl.owner(1, i) for i in (1, 32767, 32768)] == [0, 0, 1]


def test_each_worker_config_holds_only_its_lane():
    cfg = parse_toml('internal = ["198.18.0.0/24"]\n[timeouts]\nudp = 77\n')
    sl = Slices(cfg, 2)
    w1 = sl.config(cfg, 1)
    assert (w1.port_range, w1.low_port_range, w1.port_lane, w1.icmp_id_range) == \
        ((1024, 65535), (600, 1023), (8, 4, 7), (32768, 65535))
    assert w1.udp_timeout == 77 and w1.internal == cfg.internal  # all else as configured


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64])
def test_the_workers_pools_deal_every_port_once_and_the_owner_allocates_it(n):
    """Each port of both ranges is in exactly one worker's pool -- the one ``owner`` (so the
    rules) sends it to -- and that worker preserves it; the pools are near equal in size."""
    cfg = parse_toml('internal = ["198.18.0.0/24"]\n[ports]\nrange = "1024-9999"\n')
    sl = Slices(cfg, n)
    pools = [PortPool(w.port_range, w.low_port_range, lane=w.port_lane)
             for w in (sl.config(cfg, k) for k in range(n))]
    for p in list(range(600, 1024)) + list(range(1024, 10000)):
        holders = [k for k, pool in enumerate(pools) if p in pool.class_of(p)]
        assert holders == [sl.owner(6, p)], (p, holders)
        assert pools[holders[0]].allocate(p) == p
    sizes = [pool.use().size for pool in pools]
    assert sum(sizes) == 424 + 8976 and max(sizes) - min(sizes) <= sum(sizes) // sl.modulus + 16  # a lane, give or take the ends
    assert all(pool.use().used == pool.use().size for pool in pools)  # every port handed out once
    assert all(pool.allocate(5000) is None for pool in pools)


@pytest.mark.parametrize("first,last,n,what", [(1024, 1026, 4, "port range 1024-1026 has 3 port(s)"),
                                               (1000, 1000, 2, "port range 1000-1000 has 1 port(s)")])
def test_a_pool_too_small_for_the_workers_is_a_clear_error(first, last, n, what):
    with pytest.raises(PluginError, match=re.escape(f"--workers {n}: the {what}, fewer than one per worker")):
        partition(first, last, n)


def test_the_low_range_too_must_fit():
    cfg = parse_toml('internal = ["198.18.0.0/24"]\n[ports]\nrange = "2000-60000"\nlow_range = "1000-1001"\n')
    with pytest.raises(PluginError, match="low port range 1000-1001"):
        Slices(cfg, 3)


@pytest.mark.parametrize("n", [0, -1, 65])
def test_a_worker_count_out_of_bounds_is_refused(n):
    with pytest.raises(PluginError, match=f"--workers {n}: give 1 to 64"):
        partition(1024, 65535, n)


def test_worker_files_sit_beside_the_parents():
    assert worker_path("/run/roam/nat-q3.status.json", 1) == "/run/roam/nat-q3.w1.status.json"
    assert worker_path("/tmp/x/nat-ns5-q0.snapshot.json", 0) == "/tmp/x/nat-ns5-q0.w0.snapshot.json"


def _part(pid, out, inn, queued, tcp_used, off_flows):
    return {"pid": pid, "queued_packets": queued, "internal_errors": 0, "ports": [[1, 2], [3, 4], [5, 6]],
            "engine": {"external_ip": "203.0.113.1", "flows": off_flows, "mappings_live": tcp_used,
                       "inbound_mappings": 1, "pools": {"tcp": {"used": tcp_used, "size": 100}},
                       "counters": {"translated_out": out, "translated_in": inn, "dropped_no_mapping": 1},
                       "parse_errors": {}},
            "offload": {"flows": off_flows, "offloaded": off_flows, "kernel_translated_out": 0,
                        "kernel_translated_in": 0}, "mappings": [{"proto": "tcp"}] * tcp_used}


def test_the_merged_status_sums_the_workers_and_lists_each():
    base = {"pid": 1, "queue": 3, "external_iface": "ext0", "internal": [], "written_at": 0.0}
    st = merge_status([_part(11, 5, 4, 7, 2, 3), _part(12, 1, 0, 2, 5, 1), None], [11, 12, 13], base)
    assert st["pid"] == 1 and st["queued_packets"] == 9
    e = st["engine"]
    assert e["counters"] == {"translated_out": 6, "translated_in": 4, "dropped_no_mapping": 2}
    assert e["pools"] == {"tcp": {"used": 7, "size": 200}} and e["inbound_mappings"] == 1
    assert st["offload"]["flows"] == 4 and len(st["mappings"]) == 7
    assert [(w["queue"], w["running"], w.get("queued_packets")) for w in st["workers"]] == \
        [(3, True, 7), (4, True, 2), (5, False, None)]


def test_workers_refuse_nat66_with_a_clear_error(tmp_path, capsys):
    from tools.cli import main
    conf = tmp_path / "nat.conf"
    conf.write_text("[host]\nip = 198.18.0.1\nnetmask = 255.255.255.0\nnatIp6Enable = 1\n"
                    "natIp6Prefix = 2001:db8:1::/64\n")
    rc = main(["nat", "--config", str(conf), "--external", "ext0", "--workers", "2", "--state-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc != 0 and "NAT66" in err and "one process" in err, err
