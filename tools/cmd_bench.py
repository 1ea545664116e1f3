"""`roam bench TARGET`: benchmarks that print tables with ratios to a reference run.

Each target lives in ``tools/bench/<target>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``.  Nothing here is ever asserted by the test suite.
"""
from __future__ import annotations

import argparse
import importlib

from .cli import above_zero, add_command, at_least_one

TARGETS = {
    "conntrack": "packets/s tracked from memory and from a capture; memory per entry at 1,000,000 entries",
    "nat": "kernel MASQUERADE vs bare NFQUEUE vs roam nat in the lab; the engine alone in-process",
    "tunnel": "roam tunnel vs OpenVPN vs kernel VXLAN vs direct in the lab; migration interruption; "
              "the proxy at 100 host ends and 1,000 MACs",
    "sim": "simulated connections and packets/s across migrations",
}


def register(sub, help_text: str) -> None:
    p = add_command(sub, "bench", help_text, "Benchmarks. Each prints a table with ratios to a reference measured "
                    "in the same run; none is a pass/fail test.")
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name, text in TARGETS.items():
        try:
            module = importlib.import_module(f"tools.bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tools.bench.{name}":
                raise
            t = targets.add_parser(name, help=f"{text} [not built yet]")
            t.set_defaults(func=_not_built(name))
            continue
        t = targets.add_parser(name, help=text, description=(module.__doc__ or text).strip(),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(t)
        _counts_positive(t)
        t.set_defaults(func=module.run)


def _counts_positive(parser: argparse.ArgumentParser) -> None:
    """Every number a benchmark takes but its seed is a count or a duration: 0 or less is the option's
    error (``--entries -5`` named, not a ValueError from deep in the run)."""
    for action in parser._actions:
        if action.dest != "seed" and action.type in (int, float):
            action.type = at_least_one if action.type is int else above_zero


def _not_built(name: str):
    def run(args) -> int:
        import sys

        print(f"roam bench {name}: not built yet (see the project's open issues)", file=sys.stderr)
        return 2

    return run
