"""Mutation testing of the engines and the judge, time-boxed: ``python -m tools.mutation``.

mutmut (a well-kept library: it mutates each function, runs only the tests that reach
it, and remembers results between runs) does the work; its configuration is
``[tool.mutmut]`` in pyproject.toml (what is mutated, which tests run).  This wrapper
bounds the run in time, keeps mutmut's spinner out of the terminal, and prints the
score per module, the way the README reports it.  A survivor judged equivalent (no
test can tell it from the original) is listed in ``tests/mutation-equivalent.txt``
with the reason, and counted apart.

Runs outside the work tree's packages: mutmut copies the tree into ``mutants/``.
"""
from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "tests" / "mutation-equivalent.txt"


def _equivalent() -> dict[str, str]:
    """Mutant name -> why it is equivalent (lines ``name  # reason``)."""
    out = {}
    if EQUIVALENT.exists():
        for raw in EQUIVALENT.read_text().splitlines():
            name, _, why = raw.partition("#")
            if name.strip():
                out[name.strip()] = why.strip()
    return out


def _results() -> list[tuple[str, str]]:
    """(mutant name, status) for every mutant mutmut knows."""
    p = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=ROOT,
                       capture_output=True, text=True, check=False)
    rows = []
    for line in p.stdout.splitlines():
        name, sep, status = line.strip().partition(": ")
        if sep:
            rows.append((name, status))
    return rows


def _module(mutant: str) -> str:
    """``nat.engine.xǁNatEngineǁprocess__mutmut_3`` -> ``nat.engine``."""
    return mutant.rsplit(".", 1)[0]


def report(rows: list[tuple[str, str]], equivalent: dict[str, str]) -> int:
    per: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors = []
    for name, status in rows:
        st = "equivalent" if status == "survived" and name in equivalent else status
        per[_module(name)][st] += 1
        if st == "survived":
            survivors.append(name)
    print(f"{'module':<28} {'killed':>7} {'survived':>9} {'equiv.':>7} {'timeout':>8} {'no tests':>9} {'not run':>8} "
          f"{'score':>7}")
    tk = ts = 0
    for mod in sorted(per):
        c = per[mod]
        k, s = c["killed"] + c["timeout"], c["survived"]
        tk, ts = tk + k, ts + s
        score = f"{100 * k / (k + s):.1f}%" if k + s else "-"
        print(f"{mod:<28} {c['killed']:>7} {s:>9} {c['equivalent']:>7} {c['timeout']:>8} {c['no tests']:>9} "
              f"{c['not checked']:>8} {score:>7}")
    total = f"{100 * tk / (tk + ts):.1f}%" if tk + ts else "-"
    print(f"{'all':<28} {'':>7} {ts:>9} {'':>7} {'':>8} {'':>9} {'':>8} {total:>7}")
    print("score = killed (timeouts count as killed) / (killed + survived); equivalent survivors are "
          "listed in tests/mutation-equivalent.txt; 'no tests': no unit or property test reaches the function; "
          "'not run': not tested yet (the time box ended first: run again to go on)")
    if survivors:
        print(f"\n{len(survivors)} survivors (`mutmut show NAME` prints the change):")
        for name in survivors:
            print("  " + name)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.mutation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="stop the run after this long (default %(default)s)")
    ap.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel (default %(default)s)")
    ap.add_argument("--report-only", action="store_true", help="print the last run's results, run nothing")
    args = ap.parse_args(argv)
    if not args.minutes > 0:
        ap.error("--minutes must be a positive number")
    if not args.report_only:
        log = ROOT / "mutants" / "run.log"
        log.parent.mkdir(exist_ok=True)
        start = time.monotonic()
        print(f"mutmut run, at most {args.minutes:g} min (log: {log}) ...", flush=True)
        with open(log, "w") as f:
            p = subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)],
                                 cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            try:
                p.wait(timeout=args.minutes * 60)
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                print("time box reached: the results below cover the mutants tested so far "
                      "(run again to go on where it stopped)")
        print(f"ran {time.monotonic() - start:.0f} s")
    return report(_results(), _equivalent())


if __name__ == "__main__":
    sys.exit(main())
