"""Clear one-line messages, never a traceback: commands run without the privileges they need, and
numbers out of range.

"Without privileges" two ways, both real processes made with setpriv(1): the unprivileged user
nobody (given only CAP_DAC_READ_SEARCH, so it can reach the interpreter and the tree, which may
sit under a mode-700 home), and root with every capability dropped (a container, or a unit with a
narrow CapabilityBoundingSet=), where uid 0 alone would pass a uid check and then fail deep inside
iptables ("you must be root") or pyroute2 ("mount rundir failed").
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CAPTURE = ROOT / "tests" / "captures" / "test_reads_scapy_capture_le_usec.pcap"

UNPRIVILEGED = {
    "nobody": ["--reuid=65534", "--regid=65534", "--clear-groups",
               "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"],
    "root-without-capabilities": ["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"],
}

needs_setpriv = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                   reason="making an unprivileged process needs root and setpriv")


def _roam(argv, prefix=(), cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "tools.cli", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))


@pytest.fixture
def conf(tmp_path):
    path = tmp_path / "nat.conf"
    path.write_text("[host]\nip = 198.18.0.1\nnetmask = 255.255.255.0\n")
    return str(path)


@needs_setpriv
@pytest.mark.parametrize("who", sorted(UNPRIVILEGED))
@pytest.mark.parametrize("argv,expected", [
    (["nat", "--config", "{conf}", "--external", "lo"], "roam nat: needs root (iptables rules"),
    (["lab", "up"], "roam lab: needs root (network namespaces"),
    (["replay", "--backend", "netns", "examples/scenarios/basic.toml"], "roam replay: --backend netns needs root"),
    (["tunnel", "proxy", "--listen", "192.0.2.1:4789", "--bridge", "br0", "--key-file", "{conf}"],
     "roam tunnel proxy: needs root (a TAP device"),
], ids=["nat", "lab-up", "replay-netns", "tunnel-proxy"])
def test_without_privileges_one_line_and_no_traceback(who, argv, expected, conf):
    out = _roam([a.format(conf=conf) for a in argv], ["setpriv", *UNPRIVILEGED[who]])
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(expected), out.stderr
    assert "run it with sudo" in out.stderr


@pytest.mark.parametrize("argv,expected", [
    (["conntrack", "--capacity", "0", str(CAPTURE)],
     "roam conntrack: error: argument --capacity: a whole number of at least 1, got '0'"),
    (["bench", "conntrack", "--entries", "-5"],
     "roam bench conntrack: error: argument --entries: a whole number of at least 1, got '-5'"),
    (["bench", "sim", "--duration", "nan"], "roam bench sim: error: argument --duration: a number above 0, got 'nan'"),
    (["bench", "nat", "--seconds", "0"], "roam bench nat: error: argument --seconds: a number above 0, got '0'"),
])
def test_numbers_out_of_range_are_the_options_error(argv, expected):
    out = _roam(argv)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == expected, out.stderr
