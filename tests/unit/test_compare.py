"""The comparison table (``tools.compare``): which cells are compared with which, and what it says."""
from __future__ import annotations

from tools.compare import Cell, Row, disagreements, render

SURVIVED = Cell("survived", None, 1200.0)
TIMED_OUT = Cell("broken", "timed out", None)
UNREACHABLE = Cell("broken", "unreachable", None)


def test_a_lab_cell_is_compared_with_the_simulator_at_that_labs_draws():
    # the sim column (the first lab's draws) says timed out; at qemu's draws the simulator says unreachable
    row = Row("c1", "bridged", {"sim": TIMED_OUT, "netns": TIMED_OUT, "qemu": UNREACHABLE},
              sim_at={"netns": TIMED_OUT, "qemu": UNREACHABLE})
    assert row.verdicts_agree and row.reasons_agree
    assert not Row("c1", "bridged", {"sim": TIMED_OUT, "netns": UNREACHABLE}, sim_at={"netns": TIMED_OUT}).reasons_agree
    assert disagreements([Row("c1", "nat", {"sim": SURVIVED, "netns": TIMED_OUT}, sim_at={"netns": SURVIVED})])


def test_the_table_marks_reasons_phases_and_shows_the_labs_warnings():
    rows = [
        Row("c1", "bridged", {"sim": TIMED_OUT, "netns": UNREACHABLE}, sim_at={"netns": TIMED_OUT}),
        Row("c2", "bridged", {"sim": TIMED_OUT, "netns": UNREACHABLE}, sim_at={"netns": UNREACHABLE},
            phases={"netns": 0.004}, warnings=("netns bridged: the move at 3 s resumed the VM 250 ms late",)),
        Row("c3", "tunnel", {"sim": SURVIVED, "netns": Cell("survived", None, 1210.0)}, sim_at={"netns": SURVIVED}),
    ]
    text = render(rows).splitlines()
    assert text[2].startswith("~  c1") and text[3].startswith("≈  c2") and text[4].startswith("   c3")
    assert text[4].endswith("10 ms")  # the interruption difference
    assert "c2 under bridged: the simulator at netns's draws and the timer wheel's phase 4 ms: broken: unreachable" \
        in text
    assert text.count("warning: netns bridged: the move at 3 s resumed the VM 250 ms late") == 1
    assert "verdicts agree in 3/3 cells, reasons in 2/3 (0 not compared: a backend could not run the mode)" in text
