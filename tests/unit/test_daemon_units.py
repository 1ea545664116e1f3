"""`roam install-units`: the shipped systemd units, installed into a directory of the test's."""
from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import cli
from tools.cmd_install_units import UNITS

ROOT = Path(__file__).resolve().parents[2]


def _fake_roam(tmp_path) -> str:
    path = tmp_path / "bin" / "roam"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


def _unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.optionxform = str  # systemd's keys are case-sensitive
    cp.read_string(path.read_text(), source=str(path))
    return cp


def test_install_units_into_a_directory(tmp_path, capsys):
    roam = _fake_roam(tmp_path)
    dest = tmp_path / "units"
    assert cli.main(["install-units", "--prefix", str(dest), "--roam", roam]) == 0
    out = capsys.readouterr().out
    assert "systemctl daemon-reload" in out and "systemctl enable --now roam-nat" in out
    assert sorted(p.name for p in dest.iterdir()) == sorted(UNITS)
    commands = {"roam-nat.service": ["nat"], "roam-tunnel-proxy.service": ["tunnel", "proxy"],
                "roam-tunnel-host.service": ["tunnel", "host"]}
    for name in UNITS:
        unit = _unit(dest / name)
        svc = unit["Service"]
        assert svc["Type"] == "notify"
        argv = shlex.split(svc["ExecStart"])
        assert argv[0] == roam and argv[1:] == commands[name] + ["$ROAM_ARGS"]
        assert "CAP_NET_ADMIN" in svc["CapabilityBoundingSet"].split()
        assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
        assert unit["Install"]["WantedBy"] == "multi-user.target"
        # the example ROAM_ARGS= in the unit's own comment is a command roam accepts
        example = next(l for l in (dest / name).read_text().splitlines() if "ROAM_ARGS=" in l and l.startswith("#"))
        args = cli.parse_args(commands[name] + shlex.split(example.split("ROAM_ARGS=", 1)[1]))[1]
        assert args.func.__module__.startswith("tools.cmd_") and args.metrics


def test_dry_run_writes_nothing(tmp_path, capsys):
    dest = tmp_path / "units"
    assert cli.main(["install-units", "--prefix", str(dest), "--roam", _fake_roam(tmp_path), "--dry-run"]) == 0
    assert not dest.exists()
    assert capsys.readouterr().out.count("would write") == len(UNITS)


def test_unwritable_prefix_and_missing_roam_are_one_line_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for argv in (["--prefix", str(blocker / "units"), "--roam", _fake_roam(tmp_path)],
                 ["--prefix", str(tmp_path / "u"), "--roam", str(tmp_path / "no-such-roam")]):
        out = subprocess.run([sys.executable, "-m", "tools.cli", "install-units", *argv], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("roam install-units: "), out.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or shutil.which("roam") is None,
                    reason="systemd-analyze or an installed roam missing")
def test_installed_units_pass_systemd_analyze_verify(tmp_path):
    dest = tmp_path / "units"
    assert cli.main(["install-units", "--prefix", str(dest)]) == 0
    for name in UNITS:
        out = subprocess.run(["systemd-analyze", "verify", str(dest / name)], capture_output=True, text=True,
                             timeout=60, env=dict(os.environ, SYSTEMD_LOG_LEVEL="warning"))
        assert out.returncode == 0, out.stderr
