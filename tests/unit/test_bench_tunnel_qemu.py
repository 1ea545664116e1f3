"""The QEMU moves of `roam bench tunnel`: the generated scenario and the per-move stall (no QEMU here:
the qemu backend itself is tested in tests/vm)."""
from sim.scenario_toml import parse_scenario
from tools.bench.tunnel_qemu import _gap_across, report_qemu_moves, scenario_toml


def test_the_scenario_moves_back_and_forth_with_requests_both_ways():
    sc = parse_scenario(scenario_toml(5), "<bench>")
    assert [m.to for m in sc.migrations] == ["b", "a", "b", "a", "b"]
    assert sc.modes == ("tunnel",) and {c.direction for c in sc.connections} == {"outbound", "inbound"}
    assert sc.duration > max(m.at for m in sc.migrations) + 1


def test_the_stall_is_the_longest_gap_overlapping_the_pause():
    answers = [0.0, 0.005, 0.010, 0.300, 0.305, 0.900, 0.905]
    assert round(_gap_across(answers, 0.1, 0.2)) == 290
    assert round(_gap_across(answers, 0.31, 0.32)) == 595
    assert _gap_across([0.0], 0.1, 0.2) is None


def test_the_report_says_how_many_moves_met_the_target():
    rows = [{"downtime_ms": 10.0, "pause_ms": 100.0, "out_ms": 140.0, "in_ms": 170.0},
            {"downtime_ms": 12.0, "pause_ms": 120.0, "out_ms": 200.0, "in_ms": None}]
    text = report_qemu_moves({"rows": rows, "warnings": [], "drops": {}})
    assert "VM -> peer: stall - pause median 60 ms, worst 80 ms; within pause + 50 ms in 1 of 2 moves" in text
    assert "peer -> VM: stall - pause median 70 ms, worst 70 ms; within pause + 50 ms in 0 of 1 moves" in text
    assert report_qemu_moves({"error": "no QEMU"}) == "QEMU moves: not measured: no QEMU"
