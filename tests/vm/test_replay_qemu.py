"""Cross-validation with real guests: `roam replay --backend qemu` gives the simulator's verdicts.

The same scenarios are played by the simulator (``sim.run.replay``) and by the qemu
backend (``tools.lab.qemu_play.run_qemu``: a Linux guest booted by QEMU, live-migrated
by QEMU between host namespaces, its sockets driven over its control port on the one
client schedule).  Every verdict must agree; the interruption differences (qemu minus
sim, survivors in both) are printed, not asserted: TCG on shared cores is noisy.

Bounded to a few minutes on TCG: the README's bundled scenario squeezed in time
(every mode), and three small generated scenarios (``tests.property.sim_strategies``,
drawn with a fixed seed) in one mode each.
"""
from __future__ import annotations

import dataclasses
import os
import statistics

from sim import load_scenario, replay
from sim.results import Outcome

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _basic_compressed():
    """examples/scenarios/basic.toml, every mode, in 12 s of traffic with 6 s timeouts."""
    sc = load_scenario(os.path.join(ROOT, "examples", "scenarios", "basic.toml"))
    moves = tuple(dataclasses.replace(m, at=4.0 + 3 * i) for i, m in enumerate(sc.migrations))
    return dataclasses.replace(sc, duration=12.0, tcp_timeout=6.0, udp_timeout=6.0, migrations=moves)


def _generated(n: int = 3, seed: int = 20261202):
    """``n`` small generated scenarios (fixed seed) with moves, one mode each, modes in turn."""
    from sim.results import MODES
    from tests.property.sim_strategies import scenarios

    out = []
    for i in range(n):
        mode = MODES[(i * 2 + 1) % len(MODES)]
        pool = _draw(scenarios(modes=(mode,), max_connections=3, max_migrations=2), seed + i, 40)
        # a short one that moves and has a few connections (hypothesis starts with the simplest)
        fit = [sc for sc in pool if sc.migrations and len(sc.connections) >= 2 and sc.duration <= 25]
        out.append(fit[0] if fit else pool[-1])
    return out


def _draw(strategy, seed: int, count: int) -> list:
    """``count`` examples of ``strategy``, the same for the same seed (``.example()`` is not reproducible)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    got = []

    @hseed(seed)
    @settings(max_examples=count, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def pick(sc):
        got.append(sc)

    pick()
    return got


def _compare(sc, sim, qemu) -> tuple[list[str], list[float], list[str]]:
    """(verdict disagreements, interruption differences in ms, one line per cell)."""
    diffs, deltas, lines = [], [], []
    for s_run, q_run in zip(sim.runs, qemu.runs):
        assert s_run.error is None, f"sim {s_run.mode}: {s_run.error}"
        assert q_run.error is None, f"qemu {q_run.mode}: {q_run.error}"
        for c in sc.connections:
            s, q = s_run.results[c.id], q_run.results[c.id]
            line = (f"{s_run.mode:9} {c.id:14} sim={s.outcome.text}/{s.cause.text if s.cause else '-'}"
                    f"/{s.interruption_ms or 0:.0f}ms qemu={q.outcome.text}/{q.cause.text if q.cause else '-'}"
                    f"/{q.interruption_ms or 0:.0f}ms")
            lines.append(line)
            if s.outcome != q.outcome:
                diffs.append(line)
            if s.outcome == q.outcome == Outcome.SURVIVED:
                deltas.append(q.interruption_ms - s.interruption_ms)
            # what the qemu backend says about a survivor must hold up: established and answered
            if q.outcome == Outcome.SURVIVED:
                assert q.established and q.broken_at is None and q.runs, line
            else:
                assert q.cause is not None, line
    return diffs, deltas, lines


def _play_and_compare(vmlab, sc):
    from tools.lab.qemu_play import moves_text, run_qemu

    sim = replay(sc, sc.modes)
    qemu = run_qemu(sc, sc.modes)
    assert qemu.backend == "qemu" and [r.mode for r in qemu.runs] == list(sc.modes)
    diffs, deltas, lines = _compare(sc, sim, qemu)
    for run in qemu.runs:  # QEMU really migrated, once per move, and the guest was paused for each
        assert len(run.moves) == len(sc.migrations), run.mode
        for m, spec in zip(run.moves, sc.migrations):
            assert m.total_ms > 0 and m.ram_bytes > 0, m
            assert m.paused <= m.resumed and m.resumed - m.paused >= spec.downtime - 0.01, (m, spec)
    print(f"\n{sc.name}: " + "\n".join(lines))
    print(moves_text(qemu), end="")
    if deltas:
        print(f"interruption qemu - sim: median {statistics.median(deltas):+.0f} ms, "
              f"worst |{max(deltas, key=abs):+.0f}| ms over {len(deltas)} survivor(s)")
    assert not diffs, "verdicts differ between --backend sim and --backend qemu:\n" + "\n".join(diffs)


def test_basic_every_mode_same_verdicts_as_the_simulator(vmlab):
    _play_and_compare(vmlab, _basic_compressed())


def test_generated_scenarios_same_verdicts_as_the_simulator(vmlab):
    for sc in _generated():
        _play_and_compare(vmlab, sc)
