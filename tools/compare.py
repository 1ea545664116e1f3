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
from dataclasses import dataclass
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
    conn: str
    mode: str
    cells: dict  # backend -> Cell

    def ran(self) -> dict:
        return {b: c for b, c in self.cells.items() if c.error is None and c.verdict is not None}

    @property
    def verdicts_agree(self) -> bool:
        return len({c.verdict for c in self.ran().values()}) <= 1

    @property
    def reasons_agree(self) -> bool:
        return len({(c.verdict, c.reason) for c in self.ran().values()}) <= 1

    def interruption_diff_ms(self) -> float | None:
        """Largest absolute difference of the survivors' interruptions (None unless all ran and survived)."""
        vals = [c.interruption_ms for c in self.ran().values()]
        if len(vals) < 2 or any(v is None for v in vals):
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
                    "no netem on this kernel), as Linux's RTO and tail loss probe follow the RTT")


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
    """Play ``sc`` on every backend (one after the other; ``parallel``: a backend's modes at once).  With a
    lab backend among them the simulator plays the lab's network (:func:`as_the_lab_plays`)."""
    modes = tuple(modes or sc.modes)
    lab = any(b != "sim" for b in backends)
    reports = {b: _runner(b)(as_the_lab_plays(sc) if b == "sim" and lab else sc, modes, parallel)
               for b in backends}
    rows = []
    for c in sc.connections:
        for mode in modes:
            cells = {}
            for b, rep in reports.items():
                run = next((r for r in rep.runs if r.mode == mode), None)
                if run is None or run.error is not None:
                    cells[b] = Cell(None, None, None, run.error if run is not None else "not run")
                    continue
                res = run.results[c.id]
                cells[b] = Cell(res.outcome.text, res.cause.text if res.cause is not None else None,
                                res.interruption_ms)
            rows.append(Row(c.id, mode, cells))
    return rows


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
        mark = "!! " if not r.verdicts_agree else ("~  " if not r.reasons_agree else "   ")
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
    out.append("!! = verdicts differ (exit status 1), ~ = same verdict, different reason")
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
