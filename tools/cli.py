"""`roam` — one command, one subcommand per job; each lives in its own module.

A subcommand module ``tools/cmd_<name>.py`` defines ``register(subparsers)``, which
adds its parser and sets ``func`` (args -> exit code).  A subcommand whose module is
not there yet is listed, and says so plainly when run.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

#: name -> one-line help, in the order `roam --help` lists them.
SUBCOMMANDS = {
    "replay": "replay a migration scenario and report which connections survive in each mode",
    "conntrack": "track the connections in a capture (pcap or pcapng, gzip or not) and print them like `conntrack -L` / `-E`",
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


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (start-up time matters:
    `roam tunnel host` is started on the migration's critical path)."""
    parser = argparse.ArgumentParser(
        prog="roam",
        description="Which of a VM's connections survive a migration — behind a NAT, or "
        "through a layer-2 tunnel home? Real engines (conntrack, NAT, tunnel), a simulator "
        "and a namespace lab to find out.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module_name = f"tools.cmd_{name}"
        if importlib.util.find_spec(module_name) is None:
            p = sub.add_parser(name, help=f"{help_text} [not built yet]", description=f"{help_text}. Not built yet.")
            p.set_defaults(func=_not_built(name))
        elif name == chosen:
            importlib.import_module(module_name).register(sub, help_text)
        else:
            sub.add_parser(name, help=help_text)  # listed only; never parsed, as it is not the chosen one
    return parser


def _chosen(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_chosen(argv))
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
