"""The differential campaign: one scenario on several backends, verdicts and reasons side by side.

    from tools.compare import compare, render
    rows = compare(scenario, ("sim", "netns"), parallel=True)
    print(render(rows)); sys.exit(1 if disagreements(rows) else 0)

Every backend judges with the one judge (``sim.judge``); a row is one connection under one
mode, with each backend's verdict, reason and interruption.  A row *disagrees* when the
verdicts differ (what the exit status reports); reasons that differ are marked too.
``roam replay --compare sim,netns[,qemu]`` is ``add_compare_argument`` + ``run_compare``.
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field, replace
from typing import Callable

BACKENDS = ("sim", "netns", "qemu")


@dataclass(frozen=True, slots=True)
class Cell:
    """One backend's answer for one connection under one mode (verdict None: the mode did not run)."""

    verdict: str | None
    reason: str | None
    interruption_ms: float | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Row:
    """One connection under one mode.  ``sim_at``: the simulator's cell replayed at each lab backend's own
    draws of the routers' reachable times (what that backend's cell is compared with)."""

    conn: str
    mode: str
    cells: dict  # backend -> Cell
    sim_at: dict = field(default_factory=dict)  # lab backend -> the simulator's Cell at its draws
    #: lab backend -> the timer-wheel phase (s) at which the simulator gave that backend's answer, where
    #: the phase it plays first (0) gave another: the two raced within the kernel's timer granularity
    phases: dict = field(default_factory=dict)
    #: what the lab backends warned of in this mode's run (a late resume, a redrawn reachable time...):
    #: where a row disagrees, the first place to look
    warnings: tuple = ()

    def ran(self) -> dict:
        return {b: c for b, c in self.cells.items() if c.error is None and c.verdict is not None}

    def _pairs(self) -> list[tuple[Cell, Cell]]:
        """The cells compared: each lab backend with the simulator at its draws (or, without the
        simulator, the backends with one another)."""
        ran = self.ran()
        if "sim" in ran and len(ran) > 1:
            return [(self.sim_at.get(b, ran["sim"]), c) for b, c in ran.items() if b != "sim"]
        cells = list(ran.values())
        return [(cells[0], c) for c in cells[1:]]

    @property
    def verdicts_agree(self) -> bool:
        return all(a.verdict == b.verdict for a, b in self._pairs())

    @property
    def reasons_agree(self) -> bool:
        return all((a.verdict, a.reason) == (b.verdict, b.reason) for a, b in self._pairs())

    def interruption_diff_ms(self) -> float | None:
        """Largest absolute difference of the survivors' interruptions (None unless all ran and survived)."""
        got = [c.interruption_ms for pair in self._pairs() for c in pair]
        vals = [v for v in got if v is not None]
        if len(vals) < 2 or len(vals) < len(got):
            return None
        return max(vals) - min(vals)


def _runner(backend: str) -> Callable:
    if backend == "sim":
        from sim.run import replay
        return lambda sc, modes, parallel: replay(sc, modes)
    if backend == "netns":
        from tools.lab.netns import run_netns
        return lambda sc, modes, parallel: run_netns(sc, modes, parallel=parallel)
    if backend == "qemu":
        from tools.lab.qemu_play import run_qemu
        return lambda sc, modes, parallel: run_qemu(sc, modes, parallel=parallel)
    raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


#: One-way delay of the lab's links (plain veths, ~0.1 ms): what the simulator plays against a lab backend.
LAB_LATENCY = 0.0001
#: Why, printed with the table.
LAB_NETWORK_NOTE = ("sim plays the lab's network: links of 0.1 ms and no loss (the lab's links are plain veths; "
                    "no netem on this kernel), as Linux's RTO and tail loss probe follow the RTT; and, mode by "
                    "mode, the reachable times the lab's kernel drew for its routers")


def as_the_lab_plays(sc):
    """``sc`` on the lab's network: the simulator's sites and peers with the lab's link delay and no loss.

    The lab reproduces neither latency nor loss, and a verdict near the give-up time depends
    on the RTT (the RTO is srtt + 200 ms, the tail loss probe 2 srtt + 200 ms): compared on
    the scenario's latencies, the two would differ by the network, not by what Linux does."""
    from dataclasses import replace

    return replace(sc, sites=tuple(replace(s, latency=LAB_LATENCY, loss=0.0) for s in sc.sites),
                   peers=tuple(replace(p, latency=LAB_LATENCY, loss=0.0) for p in sc.peers))


def compare(sc, backends: tuple[str, ...] = ("sim", "netns"), parallel: bool = False,
            modes: tuple[str, ...] | None = None) -> list[Row]:
    """Play ``sc`` on every backend (one after the other; ``parallel``: a backend's modes at once).

    With a lab backend among them the simulator plays the lab's network (:func:`as_the_lab_plays`)
    and, mode by mode, the draws the lab's kernel made of its routers' reachable times (read from
    the kernel: whether a sender hears ICMP host unreachable before it gives up can hang on them).
    """
    from sim.run import run_mode

    modes = tuple(modes or sc.modes)
    labs = [b for b in backends if b != "sim"]
    reports = {b: _runner(b)(sc, modes, parallel) for b in labs}
    played = as_the_lab_plays(sc) if labs else sc
    sim_runs: dict = {}  # (mode, lab backend) -> the simulator's ModeRun at that backend's draws
    if "sim" in backends:
        cache: dict = {}
        for mode in modes:
            for b in labs or [None]:  # type: ignore[list-item]  # None: the simulator alone, no lab's draws
                run = _run_of(reports[b], mode) if b is not None else None
                draws = dict(run.draws) if run is not None else {}
                key = (mode, tuple(sorted(draws.items())))
                if key not in cache:
                    cache[key] = run_mode(played, mode, draws=draws, lab=bool(labs))
                sim_runs[(mode, b)] = cache[key]
    rows = []
    for c in sc.connections:
        for mode in modes:
            cells = {}
            for b in backends:
                run = sim_runs[(mode, labs[0] if labs else None)] if b == "sim" else _run_of(reports[b], mode)
                cells[b] = _cell(run, c.id)
            sim_at = {b: _cell(sim_runs[(mode, b)], c.id) for b in labs} if "sim" in backends else {}
            warned = tuple(f"{b} {mode}: {w}" for b in labs for w in getattr(_run_of(reports[b], mode), "warnings", ()))
            rows.append(Row(c.id, mode, cells, sim_at, warnings=warned))
    if "sim" in backends and labs:
        replays: dict = {}  # (mode, draws, phase) -> the simulator's run: several rows of a mode share it
        rows = [_other_phases(r, played, {b: _run_of(reports[b], r.mode) for b in labs}, replays) for r in rows]
    return rows


def _other_phases(row: Row, sc, lab_runs: dict, replays: dict) -> Row:
    """Where a lab backend's answer differs from the simulator's, replay the mode at the timer wheel's other
    phases (``sim.linux.WHEEL_PHASES``: where the lab's time zero fell in the kernel's ticks is not
    measured); the first phase that gives the lab's verdict and reason stands for it in the comparison.
    ``replays`` keeps each (mode, draws, phase) run for the other rows that need it."""
    from sim.linux import WHEEL_PHASES
    from sim.run import run_mode

    sim_at, phases = dict(row.sim_at), {}
    for b, lab_cell in row.cells.items():
        if b == "sim" or lab_cell.verdict is None or sim_at.get(b) is None or sim_at[b].verdict is None:
            continue
        if (sim_at[b].verdict, sim_at[b].reason) == (lab_cell.verdict, lab_cell.reason):
            continue
        draws = dict(lab_runs[b].draws) if lab_runs.get(b) is not None else {}
        for phase in WHEEL_PHASES[1:]:
            key = (row.mode, tuple(sorted(draws.items())), phase)
            if key not in replays:
                replays[key] = run_mode(sc, row.mode, draws=draws, lab=True, phase=phase)
            cell = _cell(replays[key], row.conn)
            if (cell.verdict, cell.reason) == (lab_cell.verdict, lab_cell.reason):
                sim_at[b], phases[b] = cell, phase
                break
    return replace(row, sim_at=sim_at, phases=phases) if phases else row


def _run_of(report, mode: str):
    return next((r for r in report.runs if r.mode == mode), None)


def _cell(run, conn_id: str) -> Cell:
    if run is None or run.error is not None:
        return Cell(None, None, None, run.error if run is not None else "not run")
    res = run.results[conn_id]
    return Cell(res.outcome.text, res.cause.text if res.cause is not None else None, res.interruption_ms)


def disagreements(rows: list[Row]) -> list[Row]:
    """Rows whose verdicts differ (the campaign's failures)."""
    return [r for r in rows if not r.verdicts_agree]


def _cell_text(c: Cell) -> str:
    if c.error is not None:
        return "error"
    if c.verdict == "survived":
        return f"survived {c.interruption_ms:.0f} ms" if c.interruption_ms is not None else "survived"
    return f"{c.verdict}: {c.reason}"


def interruption_summary(rows: list[Row]) -> tuple[int, float | None, float | None]:
    """(cells compared, median, worst) absolute interruption difference in ms over the survivors."""
    diffs = [d for d in (r.interruption_diff_ms() for r in rows) if d is not None]
    if not diffs:
        return 0, None, None
    return len(diffs), statistics.median(diffs), max(diffs)


def render(rows: list[Row]) -> str:
    """A table: per cell each backend's verdict and reason, ``!!`` on a verdict disagreement, ``~`` on a
    reason one, the interruption difference; then the totals."""
    if not rows:
        return "no connections"
    backends = list(rows[0].cells)
    texts = [[_cell_text(r.cells[b]) for b in backends] for r in rows]
    w_id = max(len("connection"), *(len(r.conn) for r in rows))
    w_mode = max(len("mode"), *(len(r.mode) for r in rows))
    widths = [max(len(b), *(len(t[i]) for t in texts)) for i, b in enumerate(backends)]
    head = f"   {'connection':<{w_id}}  {'mode':<{w_mode}}  " + "  ".join(
        f"{b:<{w}}" for b, w in zip(backends, widths)) + "  Δ interruption"
    out = [head, "-" * len(head)]
    for r, t in zip(rows, texts):
        mark = "!! " if not r.verdicts_agree else ("~  " if not r.reasons_agree else ("≈  " if r.phases else "   "))
        d = r.interruption_diff_ms()
        out.append(f"{mark}{r.conn:<{w_id}}  {r.mode:<{w_mode}}  " + "  ".join(
            f"{x:<{w}}" for x, w in zip(t, widths)) + (f"  {d:.0f} ms" if d is not None else ""))
    n = len(rows)
    compared = [r for r in rows if len(r.ran()) >= 2]
    v = sum(r.verdicts_agree for r in compared)
    why = sum(r.reasons_agree for r in compared)
    k, med, worst = interruption_summary(rows)
    out.append("")
    out.append(f"verdicts agree in {v}/{len(compared)} cells, reasons in {why}/{len(compared)} "
               f"({n - len(compared)} not compared: a backend could not run the mode)")
    if k:
        out.append(f"interruption |difference| over {k} surviving cells: median {med:.0f} ms, worst {worst:.0f} ms")
    for r in rows:  # the simulator's column is at the first lab backend's draws and phase 0; where it differs, say so
        for b, c in r.sim_at.items():
            if c != r.cells.get("sim"):
                at = f" and the timer wheel's phase {r.phases[b] * 1000:.0f} ms" if b in r.phases else ""
                out.append(f"{r.conn} under {r.mode}: the simulator at {b}'s draws{at}: {_cell_text(c)}")
    for w in dict.fromkeys(w for r in rows for w in r.warnings):
        out.append(f"warning: {w}")
    out.append("!! = verdicts differ (exit status 1), ~ = same verdict, different reason, ≈ = the same at another "
               "phase of the kernel's timer wheel (the answers raced within its granularity)")
    return "\n".join(out)


# ------------------------------------------------------------------ for tools/cmd_replay.py
def add_compare_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compare", metavar="BACKENDS", default=None,
                   help="play the scenario on several backends (e.g. sim,netns or sim,netns,qemu) and print "
                        "the verdicts side by side; exit status 1 when verdicts disagree")


def parse_backends(text: str) -> tuple[str, ...]:
    names = tuple(b.strip() for b in text.split(",") if b.strip())
    bad = [b for b in names if b not in BACKENDS]
    if bad or len(names) < 2:
        raise ValueError(f"--compare wants two or more of {', '.join(BACKENDS)}, got {text!r}")
    return names


def run_compare(args, sc) -> int:
    """``roam replay SCENARIO --compare ...``: print the table; 0 when verdicts agree, 1 when not, 2 on a bad list."""
    try:
        backends = parse_backends(args.compare)
    except ValueError as exc:
        print(f"roam replay: {exc}")
        return 2
    modes = tuple(args.modes.split(",")) if getattr(args, "modes", None) else None
    rows = compare(sc, backends, parallel=bool(getattr(args, "parallel", False)), modes=modes)
    print(render(rows))
    if "sim" in backends:
        print(LAB_NETWORK_NOTE)
    return 1 if disagreements(rows) else 0
