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


def test_the_report_judges_the_stall_against_qemus_downtime_and_prints_it_against_the_pause():
    rows = [{"downtime_ms": 10.0, "pause_ms": 100.0, "out_ms": 140.0, "in_ms": 170.0},
            {"downtime_ms": 12.0, "pause_ms": 120.0, "out_ms": 200.0, "in_ms": None}]
    text = report_qemu_moves({"rows": rows, "warnings": [], "drops": {}})
    lines = text.splitlines()
    # per move: downtime, pause, then each direction's stall, less the downtime, less the pause
    assert lines[3].split() == ["1", "10.00", "100", "140", "130", "40.00", "170", "160", "70.00"]
    assert lines[4].split() == ["2", "12.00", "120", "200", "188", "80.00", "-", "-", "-"]
    # the measure: the first move is within pause + 50 ms, not within QEMU's downtime + 50 ms
    assert "VM -> peer: stall - downtime median 159 ms, worst 188 ms; within downtime + 50 ms in 0 of 2 moves" in text
    assert "VM -> peer: stall - pause median 60 ms, worst 80 ms; within pause + 50 ms in 1 of 2 moves" in text
    assert "peer -> VM: stall - downtime median 160 ms, worst 160 ms; within downtime + 50 ms in 0 of 1 moves" in text
    assert "peer -> VM: stall - pause median 70 ms, worst 70 ms; within pause + 50 ms in 0 of 1 moves" in text
    assert "peer -> VM: no stall measured in 1 of 2 moves" in text
    assert text.endswith("QEMU downtime + 50 ms over 2 moves: worst 188.0 ms beyond it (NOT MET)")
    assert report_qemu_moves({"error": "no QEMU"}) == "QEMU moves: not measured: no QEMU"


def test_the_target_is_met_only_when_every_stall_each_way_is_within_qemus_downtime_plus_50_ms():
    rows = [{"downtime_ms": 80.0, "pause_ms": 100.0, "out_ms": 120.0, "in_ms": 125.0},
            {"downtime_ms": 60.0, "pause_ms": 100.0, "out_ms": 110.0, "in_ms": 105.0}]
    text = report_qemu_moves({"rows": rows, "warnings": ["late"], "drops": {}})
    assert "VM -> peer: stall - downtime median 45 ms, worst 50 ms; within downtime + 50 ms in 2 of 2 moves" in text
    assert "peer -> VM: stall - downtime median 45 ms, worst 45 ms; within downtime + 50 ms in 2 of 2 moves" in text
    assert "over 2 moves: worst 50.0 ms beyond it (MET)" in text
    assert text.endswith("warning: late")
    rows[1]["in_ms"] = 110.1  # 50.1 ms beyond QEMU's downtime: one direction's worst decides
    assert "over 2 moves: worst 50.1 ms beyond it (NOT MET)" in report_qemu_moves(
        {"rows": rows, "warnings": [], "drops": {}})
    rows[1]["in_ms"] = None  # a direction with no stall measured in a move is not a met target
    assert "(NOT MET)" in report_qemu_moves({"rows": rows, "warnings": [], "drops": {}})
