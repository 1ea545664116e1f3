"""`roam` itself: --version, -v/-q before or after the subcommand, help that names options by their own names."""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys

import pytest

from tools import cli


def _parse(*argv: str) -> argparse.Namespace:
    return cli.parse_args(list(argv))[1]


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"roam {version('roam')}\n"


def test_version_from_the_installed_command():
    out = subprocess.run([sys.executable, "-m", "tools.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("roam ")


@pytest.mark.parametrize("argv,level", [
    (["replay", "x.toml"], logging.WARNING),
    (["-v", "replay", "x.toml"], logging.INFO),
    (["replay", "x.toml", "-v"], logging.INFO),
    (["replay", "x.toml", "-vv"], logging.DEBUG),
    (["-v", "replay", "x.toml", "-v"], logging.DEBUG),
    (["-vvv", "replay", "x.toml"], logging.DEBUG),
    (["-q", "replay", "x.toml"], logging.ERROR),
    (["replay", "x.toml", "-q"], logging.ERROR),
    (["replay", "x.toml", "--quiet"], logging.ERROR),
    (["-qq", "conntrack", "x.pcap"], logging.CRITICAL),
    (["conntrack", "x.pcap", "--quiet"], logging.ERROR),
    (["conntrack", "x.pcap", "-v"], logging.INFO),
    (["nat", "translate", "--config", "c", "--in", "a", "--out", "b", "-v"], logging.INFO),
    (["nat", "-v", "translate", "--config", "c", "--in", "a", "--out", "b"], logging.INFO),
    (["nat", "status", "-q"], logging.ERROR),
    (["tunnel", "status", "-v"], logging.INFO),
    (["lab", "status", "-vv"], logging.DEBUG),
])
def test_v_and_q_work_before_or_after_the_subcommand(argv, level):
    assert cli.log_level(_parse(*argv)) == level


def test_q_before_replay_also_stops_its_progress_bar():
    assert _parse("-q", "replay", "x.toml").quiet is True
    assert _parse("replay", "x.toml").quiet is False


def test_conntrack_keeps_q_for_the_reply_destination():
    args = _parse("conntrack", "x.pcap", "-q", "192.0.2.1")
    assert args.reply_dst is not None and cli.log_level(args) == logging.WARNING


def _parsers():
    for name in cli.SUBCOMMANDS:
        parser = cli.build_parser(name)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        yield from cli._tree(sub)


def test_help_names_each_value_after_its_option_not_an_internal_dest():
    shown = 0
    for p in _parsers():
        text = p.format_help()
        assert "T_CONFIG" not in text and "S_STATE_DIR" not in text and "T_INTERNAL" not in text
        for a in p._actions:
            if a.option_strings and a.nargs != 0:
                names = [s.lstrip("-").replace("-", "_") for s in a.option_strings if s.startswith("--")]
                assert a.metavar is not None or a.dest in names, (p.prog, a.option_strings, a.dest)
                shown += 1
    assert shown > 20
    nat = next(p for p in _parsers() if p.prog == "roam nat translate")
    assert "--config CONFIG" in nat.format_help()
    status = next(p for p in _parsers() if p.prog == "roam nat status")
    assert "--state-dir STATE_DIR" in status.format_help()


def test_top_level_help_lists_version_verbose_and_quiet(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "--version" in out and "-v, --verbose" in out and "-q, --quiet" in out
