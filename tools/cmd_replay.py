"""`roam replay SCENARIO [--backend sim|netns|qemu] [--json] [--plot FILE]`."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

from conntrack.pcap import write_pcap
from sim import MODES, Report, ScenarioError, load_scenario, replay

from . import report
from .cli import add_command
from .compare import add_compare_argument, run_compare
from .privileges import lab_refusal as _lab_refusal


DESCRIPTION = """\
Play a migration scenario (TOML: sites, hosts, the VM, its connections, its moves) under each attachment
mode -- bridged, host-only, nat, nat+state, tunnel -- and print one row per connection and one column
per mode: survived (answered after the last move; with the longest stall across the moves, in ms) or
broken, with the reason its endpoints saw (reset by peer, unreachable, no inbound mapping, timed out).
The simulator moves real packets through roam's own conntrack, NAT and tunnel engines; TCP endpoints
decide survival. examples/scenarios/example.toml documents every field of a scenario.
"""
EXAMPLES = ("roam replay examples/scenarios/basic.toml --plot timeline.html",)


def register(sub, help_text: str) -> None:
    p = add_command(sub, "replay", help_text, DESCRIPTION, EXAMPLES)
    p.add_argument("scenario", metavar="SCENARIO", help="a scenario file (TOML)")
    p.add_argument("--backend", choices=("sim", "netns", "qemu"), default="sim",
                   help="sim: the discrete-event simulator (default); netns: the namespace lab, with real "
                   "kernel TCP/UDP, `roam nat` and `roam tunnel` (root; same report); qemu: the same lab with a "
                   "real Linux guest live-migrated by QEMU (root; QEMU's own downtime and migration time per move)")
    p.add_argument("--parallel", action="store_true",
                   help="netns, qemu: run the modes at once, each in its own lab (qemu: at most one guest per core)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--plot", metavar="FILE", help="also write a timeline of every connection per mode (HTML)")
    p.add_argument("--pcap", metavar="PREFIX", help="also write every simulated packet of each mode to "
                   "PREFIX-MODE.pcap (raw IPv4, simulated time; open it in Wireshark or `roam conntrack`)")
    p.add_argument("--modes", metavar="LIST", help=f"comma-separated modes to run instead of the scenario's "
                   f"(from {', '.join(MODES)})")
    p.add_argument("--seed", type=int, help="override the scenario's random seed (link loss)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar on stderr")
    add_compare_argument(p)
    p.set_defaults(func=run)


class _Bar:
    """Progress on stderr once a run takes a while: a bar on a terminal, else a line per mode."""

    def __init__(self, modes: tuple[str, ...], enabled: bool, tty: bool | None = None) -> None:
        self.modes = modes
        self.enabled = enabled
        self.tty = tty  # False: not a terminal, so a line per finished mode on long runs instead
        self.started = time.monotonic()
        self.shown = False

    def __call__(self, mode: str, frac: float) -> None:
        slow = time.monotonic() - self.started >= 0.5
        if not self.enabled:
            if self.tty is False and frac >= 1.0 and time.monotonic() - self.started >= 2.0:
                sys.stderr.write(f"replay: {mode} done ({time.monotonic() - self.started:.0f} s)\n")
            return
        if not self.shown and not slow:
            return
        self.shown = True
        i = self.modes.index(mode) if mode in self.modes else 0
        total = (i + min(frac, 1.0)) / len(self.modes)
        n = int(total * 30)
        sys.stderr.write(f"\rreplay [{'#' * n}{'.' * (30 - n)}] {total * 100:3.0f}%  {mode:<10}")
        sys.stderr.flush()

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    try:
        sc = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(f"roam replay: {exc}", file=sys.stderr)
        return 1
    modes = sc.modes
    if args.modes:
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            print(f"roam replay: unknown mode(s) {', '.join(bad) or '(none given)'}; modes: {', '.join(MODES)}",
                  file=sys.stderr)
            return 2
    if args.seed is not None:
        from dataclasses import replace
        sc = replace(sc, seed=args.seed)
    if getattr(args, "compare", None):  # several backends side by side; 1 when verdicts disagree
        if any(b in args.compare for b in ("netns", "qemu")) and (why := _lab_refusal()):
            print(f"roam replay: --compare with netns or qemu {why}", file=sys.stderr)
            return 2
        return run_compare(args, sc)
    run_netns: Callable[..., Report] | None = None
    if args.backend in ("netns", "qemu"):
        if args.pcap:
            print("roam replay: --pcap works with --backend sim only (capture in the lab with tcpdump)",
                  file=sys.stderr)
            return 2
        if why := _lab_refusal():
            print(f"roam replay: --backend {args.backend} {why}", file=sys.stderr)
            return 2
        if args.backend == "netns":
            from .lab.netns import run_netns
        else:
            from .lab.qemu_play import run_qemu as run_netns
    tty = sys.stderr.isatty()
    bar = _Bar(modes, not args.quiet and tty, None if args.quiet else tty)
    captures: dict[str, list] = {}

    def tap_for(mode: str):
        records = captures.setdefault(mode, [])
        return lambda now, data: records.append((now, bytes(data)))

    taps = tap_for if args.pcap else None
    try:
        if run_netns is not None:
            rep = run_netns(sc, modes, bar, parallel=args.parallel)
        else:
            rep = replay(sc, modes, bar, taps)
    finally:
        bar.done()
    for mode, records in captures.items():
        path = f"{args.pcap}-{mode.replace('+', '-')}.pcap"
        try:
            with open(path, "wb") as f:
                write_pcap(f, records)
        except OSError as exc:
            print(f"roam replay: cannot write {path}: {exc.strerror}", file=sys.stderr)
            return 1
        if not args.json:
            print(f"{len(records)} packets of mode {mode} written to {path}", file=sys.stderr)
    if args.plot:
        try:
            with open(args.plot, "w", encoding="utf-8") as page:
                page.write(report.html_timeline(rep))
        except OSError as exc:
            print(f"roam replay: cannot write {args.plot}: {exc.strerror}", file=sys.stderr)
            return 1
        if not args.json:
            print(f"timeline written to {os.path.abspath(args.plot)}", file=sys.stderr)
    sys.stdout.write(report.as_json(rep) if args.json else report.table(rep))  # with QEMU's figures per move
    return 1 if any(r.error for r in rep.runs) else 0
