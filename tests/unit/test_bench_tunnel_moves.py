"""`roam bench tunnel`'s moves: the gap measured around a move, and the table (no lab needed)."""
from __future__ import annotations

from tools.bench.tunnel_moves import longest_gap, report_moves


def test_the_longest_gap_overlapping_a_window_counts_the_arrivals_around_it():
    arrivals = [0.0, 0.001, 0.002, 0.010, 0.011, 0.050, 0.051]
    assert round(longest_gap(arrivals, 0.003, 0.009), 3) == 8.0  # 2 ms -> 10 ms spans the window
    assert round(longest_gap(arrivals, 0.0, 0.0105), 3) == 8.0
    assert round(longest_gap(arrivals, 0.0, 0.011), 3) == 39.0  # the gap that begins inside ends after it
    assert round(longest_gap(arrivals, 0.012, 0.02), 3) == 39.0  # nothing inside: before and after
    assert longest_gap(arrivals, 0.06, 0.07) is None  # nothing after it
    assert longest_gap([], 0.0, 1.0) is None


def test_the_moves_table_gives_median_and_worst_and_says_whether_the_target_is_met():
    m = {"moves": 3, "vm_to_peer": [3.0, 5.0, 4.0], "peer_to_vm": [2.0, None, 30.0], "quiet": [1.5, 2.5],
         "errors": 0, "proxy": {"presence_moves": 3, "resent_frames": 7}}
    text = report_moves(m)
    lines = text.splitlines()
    assert lines[2].split()[-2:] == ["4.0", "5.0"]
    assert lines[3].split()[-2:] == ["30.0", "30.0"]  # median of the two measured moves: the upper one
    assert lines[4].split()[-2:] == ["2.5", "2.5"]
    assert "gaps over 20 ms: 1 of 6; proxy: presence_moves=3 resent_frames=7; stream errors 0" in text
    assert text.endswith("worst 30.0 ms (NOT MET)")
