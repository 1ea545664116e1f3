"""Shell completion through argcomplete: the hook run the way the shell runs it (as argcomplete's own
tests do: COMP_LINE, COMP_POINT, _ARGCOMPLETE set; the answer read from the stream it writes)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IFS = "\013"


def complete(line: str, tmp_path, command=(sys.executable, "-m", "tools.cli")) -> set[str]:
    out = tmp_path / "completions"
    env = dict(os.environ, _ARGCOMPLETE="1", _ARGCOMPLETE_IFS=IFS, COMP_LINE=line, COMP_POINT=str(len(line)),
               _ARGCOMPLETE_STDOUT_FILENAME=str(out), _ARGCOMPLETE_SUPPRESS_SPACE="1")
    env.pop("_ARC_DEBUG", None)
    run = subprocess.run(list(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return {w.strip() for w in out.read_text().split(IFS) if w.strip()}


def test_subcommands_are_offered(tmp_path):
    words = complete("roam ", tmp_path)
    assert {"replay", "conntrack", "nat", "tunnel", "lab", "bench", "install-units"} <= words


def test_a_started_word_and_a_subcommands_own_options(tmp_path):
    assert complete("roam tu", tmp_path) == {"tunnel"}
    assert {"proxy", "host", "genkey", "status"} <= complete("roam tunnel ", tmp_path)
    nat = complete("roam nat --", tmp_path)
    assert {"--metrics", "--log-format", "--external", "--config"} <= nat
    assert complete("roam nat --log-format ", tmp_path) == {"text", "json"}


@pytest.mark.skipif(shutil.which("roam") is None, reason="roam is not installed as a command")
def test_installed_command_carries_the_marker_register_python_argcomplete_looks_for(tmp_path):
    roam = shutil.which("roam")
    check = subprocess.run([sys.executable, "-m", "argcomplete._check_console_script", roam],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "nat" in complete("roam n", tmp_path, command=(roam,))
