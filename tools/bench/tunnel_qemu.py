"""`roam bench tunnel`'s real moves: a guest live-migrated by QEMU, agents running on both hosts.

Issue 11's second move target: with a real QEMU live migration, the peer's longest stall
in each direction at most QEMU's reported downtime + 50 ms, medians and worst over at
least 20 moves.  The qemu backend of ``roam replay`` already plays exactly that
deployment (one ``roam tunnel host`` per host from time zero, told no MAC; the guest's
TAP on the destination before it resumes), so this plays a generated scenario on it: N
moves between two hosts at different sites, a TCP request every 5 ms each way (VM -> peer
and peer -> VM).  Per move, from the endpoints' own logs: each direction's longest gap
between answers across the move, less two baselines:

* QEMU's downtime (``downtime_ms`` from ``query-migrate``): the issue's own measure, judged
  against 50 ms.  QEMU counts only its final stop-and-copy in it;
* the guest's pause (QEMU's STOP to RESUME): how long the guest was really stopped.  The
  backend holds it to the scenario's downtime (100 ms here: the destination is readied
  while the guest is paused), so it is usually longer than QEMU's figure, and it is the
  physical floor of any stall: the stall less it is what the tunnel and the guest's wake-up
  added.

Both are printed, so a miss of the issue's target can be read against the pause.  Printed
only; never asserted.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile

from tools.bench.table import render

EVERY = 0.005  # seconds between requests, each way
SPACING = 2.0  # seconds between moves (a TCG migration takes ~1 s)
TARGET_MS = 50.0  # the issue's: stall - QEMU's downtime (also printed against the pause)


def scenario_toml(moves: int) -> str:
    """The moves as a scenario (a home LAN with the proxy; hosts a and b at two sites; peer p)."""
    head = f"""[scenario]
name = "bench-qemu-moves"
duration = {3.0 + moves * SPACING + 2.0}
modes = ["tunnel"]
tcp_timeout = 20.0
udp_timeout = 20.0
[[site]]
name = "home"
prefix = "192.0.2.0/24"
proxy = "192.0.2.2"
[[site]]
name = "s1"
prefix = "203.0.113.0/25"
[[site]]
name = "s2"
prefix = "203.0.113.128/25"
[[host]]
name = "a"
site = "s1"
address = "203.0.113.10"
[[host]]
name = "b"
site = "s2"
address = "203.0.113.140"
[vm]
name = "vm"
mac = "02:00:00:00:00:01"
host = "a"
home_address = "192.0.2.50"
[[peer]]
name = "p"
address = "198.51.100.10"
"""
    conns = "".join(f'[[connection]]\nid = "{i}"\nprotocol = "tcp"\ndirection = "{d}"\npeer = "p"\nport = {port}\n'
                    f"start = 1.0\ninterval = {EVERY}\n"
                    for i, d, port in (("out", "outbound", 7000), ("in", "inbound", 7001)))
    moves_toml = "".join(f'[[migration]]\nat = {3.0 + k * SPACING:.1f}\nto = "{"ba"[k % 2]}"\ndowntime_ms = 100\n'
                         for k in range(moves))
    return head + conns + moves_toml


def measure_qemu_moves(moves: int) -> dict:
    """Play the moves on the qemu backend; per move: QEMU's downtime, the pause, each direction's stall."""
    from sim.scenario_toml import parse_scenario
    from tools.lab.qemu_play import run_qemu

    sc = parse_scenario(scenario_toml(moves), "<bench>")
    logdir = tempfile.mkdtemp(prefix="roam-bench-qemu-")
    try:
        run = run_qemu(sc, ("tunnel",), logdir=logdir).runs[0]
        if run.error is not None:
            return {"error": run.error}
        with open(os.path.join(logdir, "tunnel", "events.jsonl")) as f:
            events = [json.loads(line) for line in f if line.strip()]
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    answers = {idx: sorted(e["t"] for e in events if e.get("ev") == "answer" and e.get("idx") == idx)
               for idx in (0, 1)}
    rows = []
    for m, q in zip(sc.migrations, run.moves):
        pause = q.resumed - q.paused
        stalls = [_gap_across(answers[idx], m.at, m.at + pause) for idx in (0, 1)]
        rows.append({"downtime_ms": q.downtime_ms, "pause_ms": pause * 1e3,
                     "out_ms": stalls[0], "in_ms": stalls[1]})
    return {"rows": rows, "warnings": list(run.warnings), "drops": dict(run.drops)}


def _gap_across(times: list[float], start: float, end: float) -> float | None:
    """The longest gap between consecutive answers that overlaps [start, end] (ms); None if none does."""
    gaps = [(b - a) * 1e3 for a, b in zip(times, times[1:]) if b >= start and a <= end]
    return max(gaps) if gaps else None


def report_qemu_moves(res: dict) -> str:
    if "error" in res:
        return f"QEMU moves: not measured: {res['error']}"
    rows = res["rows"]
    table = [[k + 1, r["downtime_ms"], r["pause_ms"],
              *(v for key in ("out_ms", "in_ms")
                for v in ("-" if r[key] is None else r[key], _less(r[key], r["downtime_ms"]),
                          _less(r[key], r["pause_ms"])))]
             for k, r in enumerate(rows)]
    out = [f"Moves by QEMU live migration (TCG), agents running on both hosts, no MAC given; a TCP request every "
           f"{EVERY * 1e3:.0f} ms each way; the peer's longest stall across each move:",
           render(["move", "QEMU downtime ms", "pause ms", "VM->peer stall ms", "- downtime", "- pause",
                   "peer->VM stall ms", "- downtime", "- pause"], table),
           "('- downtime': less QEMU's reported downtime, the issue's measure, which counts only QEMU's final "
           "stop-and-copy; '- pause': less the guest's STOP -> RESUME, held to the scenario's downtime, the "
           "physical floor of any stall)"]
    worst = []
    for name, key in (("VM -> peer", "out_ms"), ("peer -> VM", "in_ms")):
        for base, what in (("downtime_ms", "downtime"), ("pause_ms", "pause")):
            over = [r[key] - r[base] for r in rows if r[key] is not None]
            if not over:
                continue
            out.append(f"{name}: stall - {what} median {statistics.median(over):.0f} ms, worst {max(over):.0f} ms; "
                       f"within {what} + {TARGET_MS:.0f} ms in {sum(o <= TARGET_MS for o in over)} of "
                       f"{len(over)} moves")
            if base == "downtime_ms":
                worst.append(max(over))
        missing = sum(r[key] is None for r in rows)
        if missing:
            out.append(f"{name}: no stall measured in {missing} of {len(rows)} moves")
    if len(worst) == 2:
        met = max(worst) <= TARGET_MS and all(r[k] is not None for r in rows for k in ("out_ms", "in_ms"))
        out.append(f"target (issue 11): longest stall each way <= QEMU downtime + {TARGET_MS:.0f} ms over "
                   f"{len(rows)} moves: worst {max(worst):.1f} ms beyond it ({'MET' if met else 'NOT MET'})")
    if res["warnings"]:
        out += ["warning: " + w for w in res["warnings"]]
    return "\n".join(out)


def _less(a: float | None, b: float) -> float | str:
    return "-" if a is None else a - b
