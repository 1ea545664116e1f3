"""`roam bench tunnel`'s first tables (no lab needed): every figure beside its reference, the targets judged."""
from __future__ import annotations

import argparse

from tools.bench.tunnel import add_arguments, report

# (iperf3 Mbit/s, RTT median s, RTT p99 s, tunnel CPU s/GB)
ROWS = {"direct": (10_000.0, 0.000100, 0.000200, None), "vxlan": (12_000.0, 0.000110, 0.000210, None),
        "roam-udp": (7_000.0, 0.000250, 0.000400, 3.0), "openvpn-aes": (1_000.0, 0.000300, 0.000500, 10.0)}


def _targets(text: str) -> list[str]:
    lines = text.splitlines()
    return lines[lines.index(next(x for x in lines if x.startswith("target"))) + 2:]


def test_the_targets_are_judged_against_references_of_the_same_run():
    got = _targets(report(ROWS, 3))
    assert got[0].split()[-3:] == ["0.58", "x", "MET"]  # 7,000 / 12,000 against 0.5
    assert got[1].split()[-3:] == ["7.00", "x", "MET"]  # 7,000 / 1,000 against 5
    assert "added RTT roam-udp <= openvpn-aes's (0.200 ms; median vs direct)" in got[2]
    assert got[2].split()[-3:] == ["0.150", "ms", "MET"]
    assert got[3].split()[-2:] == ["s/GB", "printed"] and len(got) == 4  # no migration verdict any more
    slow = dict(ROWS, **{"roam-udp": (4_000.0, 0.000350, 0.000400, 3.0)})  # 0.33 x, 4 x, +0.250 ms
    got = _targets(report(slow, 1))
    assert [g.endswith("NOT MET") for g in got] == [True, True, True, False]


def test_the_moves_default_to_the_issues_minimum_of_20():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.moves, args.qemu_moves) == (20, 20)
