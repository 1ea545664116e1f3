# PYTHON_ARGCOMPLETE_OK  (argcomplete's marker: `eval "$(register-python-argcomplete roam)"` completes roam)
"""`roam` — one command, one subcommand per job; each lives in its own module.

A subcommand module ``tools/cmd_<name>.py`` defines ``register(subparsers)``, which
adds its parser and sets ``func`` (args -> exit code).  A subcommand whose module is
not there yet is listed, and says so plainly when run.

``-v``/``-q`` work before or after the subcommand (operators add them at the end of a
unit's ExecStart line); an option's value is shown under the option's own name in
``--help``, never the internal ``dest`` a module stores it under.

Shell completion (argcomplete): when the shell's hook runs us (``_ARGCOMPLETE`` set), the
subcommand named so far on the line is the chosen one, so its options are offered too.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import math
import os
import sys

#: name -> one-line help, in the order `roam --help` lists them.
SUBCOMMANDS = {
    "replay": "replay a migration scenario and report which connections survive in each mode",
    "conntrack": "track the connections in a capture (pcap or pcapng, gzip or not) and print them like `conntrack -L` / `-E`",
    "nat": "run the user-space NAT as a netfilter plugin (NFQUEUE), or offline over a capture",
    "tunnel": "the layer-2 tunnel home: genkey, proxy, host, status",
    "lab": "build or tear down the namespace lab (home site, remote sites, internet)",
    "bench": "benchmarks: conntrack, nat, tunnel, sim (printed tables, never asserted)",
    "install-units": "install the systemd units of roam nat and roam tunnel proxy|host (Type=notify)",
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
    parser.add_argument("--version", action="version", version=f"roam {_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug); also after the subcommand")
    parser.add_argument("-q", "--quiet", dest="log_quiet", action="count", default=0,
                        help="less log output (errors only); also after the subcommand")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module_name = f"tools.cmd_{name.replace('-', '_')}"
        if importlib.util.find_spec(module_name) is None:
            p = sub.add_parser(name, help=f"{help_text} [not built yet]", description=f"{help_text}. Not built yet.")
            p.set_defaults(func=_not_built(name))
        elif name == chosen:
            importlib.import_module(module_name).register(sub, help_text)
            for p in _tree(sub.choices[name]):
                _add_log_options(p)
                _readable_metavars(p)
        else:
            sub.add_parser(name, help=help_text)  # listed only; never parsed, as it is not the chosen one
    return parser


class _LinesFormatter(argparse.HelpFormatter):
    """Paragraphs (runs of unindented lines) wrapped, blank lines kept, an indented line (an example) as is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        para: list[str] = []
        for line in text.strip("\n").splitlines() + [""]:
            if line and not line.startswith(" "):
                para.append(line)
                continue
            if para:
                out.append(super()._fill_text(" ".join(para), width, indent))
                para = []
            out.append(indent + line if line else "")
        return "\n".join(out).rstrip("\n")


def add_command(sub, name: str, help_text: str, description: str,
                examples: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A subcommand's parser, every one alike: its one-line help (from ``SUBCOMMANDS``), its description
    (a triple-quoted text: paragraphs wrapped to the terminal), its example command lines under
    "example(s):", one a line."""
    epilog = None
    if examples:
        epilog = ("examples:" if len(examples) > 1 else "example:") + "".join(f"\n  {e}" for e in examples)
    return sub.add_parser(name, help=help_text, description=description, epilog=epilog,
                          formatter_class=_LinesFormatter)


def at_least_one(text: str) -> int:
    """argparse type: a count (1 or more); anything else is the option's error, not a traceback later."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, got {text!r}")
    return value


def above_zero(text: str) -> float:
    """argparse type: a duration or size above 0 (finite)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"a number above 0, got {text!r}")
    return value


def within(low: int, high: int):
    """argparse type: a whole number from ``low`` to ``high`` (the bounds in the option's error)."""
    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"a whole number from {low} to {high}, got {text!r}")
        return value
    return whole


def seconds_from(low: float):
    """argparse type: a finite duration of at least ``low`` seconds (a timer shorter than that would only
    keep a loop busy)."""
    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low <= value < math.inf:
            raise argparse.ArgumentTypeError(f"seconds, at least {low:g}, got {text!r}")
        return value
    return seconds


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("roam")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _tree(parser: argparse.ArgumentParser):
    """The parser and every parser under it (``roam nat translate``...)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in dict.fromkeys(action.choices.values()):  # aliases share a parser
                yield from _tree(p)


def _add_log_options(parser: argparse.ArgumentParser) -> None:
    """``-v``/``-q`` after the subcommand too, wherever the subcommand leaves them free (``roam conntrack``
    keeps ``-q`` for conntrack's --reply-dst; ``--quiet`` works there)."""
    for strings, dest, what in ((("-v", "--verbose"), "sub_verbose", "more log output (-vv for debug)"),
                                (("-q", "--quiet"), "sub_quiet", "less log output (errors only)")):
        free = [s for s in strings if s not in parser._option_string_actions]
        if free and free[-1].startswith("--"):
            parser.add_argument(*free, dest=dest, action="count", default=argparse.SUPPRESS, help=what)


def _readable_metavars(parser: argparse.ArgumentParser) -> None:
    """An option whose ``dest`` is not its own name would show it (``--config T_CONFIG``): show the name."""
    for action in parser._actions:
        if not action.option_strings or action.metavar is not None or action.nargs == 0:
            continue
        names = [s.lstrip("-").replace("-", "_") for s in action.option_strings if s.startswith("--")]
        if names and action.dest not in names:
            action.metavar = names[0].upper()


def log_level(args: argparse.Namespace) -> int:
    """-v and -q from before and after the subcommand; a subcommand's own ``--quiet`` switch counts too.
    From WARNING, or from INFO for a daemon (``log_base``: its start line belongs in the journal)."""
    own = getattr(args, "quiet", None) is True and not args.log_quiet  # `roam -q replay` set it: counted once
    quiet = args.log_quiet + getattr(args, "sub_quiet", 0) + own
    verbose = args.verbose + getattr(args, "sub_verbose", 0)
    base = getattr(args, "log_base", logging.WARNING)
    return max(logging.DEBUG, min(logging.CRITICAL, base + 10 * (min(quiet, 2) - min(verbose, 2))))


def parse_args(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = build_parser(_chosen(argv))
    args = parser.parse_args(argv)
    if args.log_quiet and getattr(args, "quiet", None) is False:
        args.quiet = True  # `roam -q replay` is `roam replay -q`
    return parser, args


def _chosen(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def _complete() -> None:
    """argcomplete's hook (the shell set ``_ARGCOMPLETE``): answer with the words that fit, and exit."""
    import shlex

    import argcomplete

    line = os.environ.get("COMP_LINE", "")[:int(os.environ.get("COMP_POINT", "0") or 0) or None]
    try:
        words = shlex.split(line)[1:]
    except ValueError:  # an open quote: the words before it
        words = line.split()[1:]
    argcomplete.autocomplete(build_parser(_chosen(words)))


def main(argv: list[str] | None = None) -> int:
    if argv is None and "_ARGCOMPLETE" in os.environ:
        _complete()
    argv = sys.argv[1:] if argv is None else argv
    parser, args = parse_args(argv)
    from tools.daemon import setup_logging

    setup_logging(log_level(args), getattr(args, "log_format", "text"))
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
