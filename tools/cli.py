"""`roam` — one command, one subcommand per job; each lives in its own module.

A subcommand module ``tools/cmd_<name>.py`` defines ``register(subparsers)``, which
adds its parser and sets ``func`` (args -> exit code).  A subcommand whose module is
not there yet is listed, and says so plainly when run.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: name -> one-line help, in the order `roam --help` lists them.
SUBCOMMANDS = {
    "replay": "replay a migration scenario and report which connections survive in each mode",
    "conntrack": "track the connections in a pcap capture and print the table like `conntrack -L`",
    "nat": "run the user-space NAT as a netfilter plugin (NFQUEUE), or offline over a capture",
    "tunnel": "the layer-2 tunnel home: genkey, proxy, host, status",
    "lab": "build or tear down the namespace lab (home site, remote sites, internet)",
    "bench": "benchmarks: conntrack, nat, tunnel, sim (printed tables, never asserted)",
}


def _not_built(name: str):
    def run(args: argparse.Namespace) -> int:
        print(f"roam {name}: not built yet (see the project's open issues)", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roam",
        description="Which of a VM's connections survive a migration — behind a NAT, or "
        "through a layer-2 tunnel home? Real engines (conntrack, NAT, tunnel), a simulator "
        "and a namespace lab to find out.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f"tools.cmd_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tools.cmd_{name}":
                raise
            p = sub.add_parser(name, help=f"{help_text} [not built yet]", description=f"{help_text}. Not built yet.")
            p.set_defaults(func=_not_built(name))
            continue
        module.register(sub, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
