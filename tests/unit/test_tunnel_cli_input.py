"""`roam tunnel`'s bad input (issue 11's audit): each is the option's own error (argparse's `error:`,
exit status 2) or one clear line, never a traceback, and never a daemon that misbehaves later.

Everything here runs in-process through the real parser (``tools.cli.parse_args``) with the daemons'
entry functions replaced by a recorder, so that no input, good or bad, can make a TAP or a socket; the
two subprocesses (``genkey`` into a full file) make neither.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tools import cli, cmd_tunnel

ROOT = Path(__file__).resolve().parents[2]
PROXY = ["proxy", "--listen", "192.0.2.1:4789", "--bridge", "br0", "--key-file", "k"]
HOST = ["host", "--proxy", "192.0.2.1:4789", "--tap", "rt0", "--key-file", "k"]


@pytest.fixture
def ran(monkeypatch):
    """The daemons' entry functions, recorded instead of run (never a device or socket)."""
    calls: list[str] = []
    monkeypatch.setattr(cmd_tunnel, "cmd_proxy", lambda args: calls.append("proxy") or 0)
    monkeypatch.setattr(cmd_tunnel, "cmd_host", lambda args: calls.append("host") or 0)
    return calls


def run(*argv: str) -> int:
    """``roam tunnel ARGV`` in-process: the exit status, SystemExit's included."""
    try:
        _, args = cli.parse_args(["tunnel", *argv])
        return args.func(args)
    except SystemExit as exc:
        return int(exc.code or 0)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# -- 1. numbers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,option,value", [
    (HOST, "--keepalive", "nan"), (HOST, "--keepalive", "inf"), (HOST, "--keepalive", "0"),
    (HOST, "--keepalive", "-1"), (HOST, "--dead-after", "-15"), (HOST, "--dead-after", "nan"),
    (PROXY, "--session-timeout", "nan"), (PROXY, "--session-timeout", "0"), (PROXY, "--mac-age", "-inf"),
    (PROXY, "--mac-age", "x"), (PROXY, "--tcp-auth-timeout", "nan"), (PROXY, "--tcp-auth-timeout", "-3"),
    (HOST, "--keepalive", "1e-9"), (HOST, "--dead-after", "0.001"),  # a timer that would only spin the loop
])
def test_timings_must_be_finite_seconds_of_at_least_10_ms(ran, capsys, argv, option, value):
    assert run(*argv, f"{option}={value}") == 2 and ran == []  # `=`: argparse takes "-inf" for an option
    assert error_line(capsys) == f"roam tunnel {argv[0]}: error: argument {option}: seconds, at least 0.01, got {value!r}"


@pytest.mark.parametrize("argv,option,value,expected", [
    (PROXY, "--max-tcp-connections", "0", "a whole number of at least 1, got '0'"),
    (PROXY, "--max-tcp-connections", "-5", "a whole number of at least 1, got '-5'"),
    (PROXY, "--mtu", "67", "a whole number from 68 to 65443, got '67'"),
    (HOST, "--mtu", "65444", "a whole number from 68 to 65443, got '65444'"),
    (HOST, "--mtu", "1500.5", "a whole number from 68 to 65443, got '1500.5'"),
    (HOST, "--path-mtu", "575", "a whole number from 576 to 65535, got '575'"),
    (PROXY, "--path-mtu", "65536", "a whole number from 576 to 65535, got '65536'"),
    (HOST, "--tap", "a-name-too-long-0", "an interface name of 1 to 15 bytes without '/', ':' or blanks, "
     "got 'a-name-too-long-0'"),
])
def test_counts_and_sizes_out_of_range_name_the_option_and_bounds(ran, capsys, argv, option, value, expected):
    assert run(*argv, option, value) == 2 and ran == []
    assert error_line(capsys) == f"roam tunnel {argv[0]}: error: argument {option}: {expected}"


def test_mtu_bounds_are_what_the_engines_take():
    from tunnel.segment import MIN_SEGMENT_SIZE
    from tunnel.wire import OFFLOAD_MAX_FRAME
    from tools.tunnel_options import MTU_MAX, PATH_MTU_MIN
    assert MTU_MAX == OFFLOAD_MAX_FRAME - 14 - 8  # a full frame with two VLAN tags, with or without offload
    assert PATH_MTU_MIN == MIN_SEGMENT_SIZE + 28


def test_dead_after_must_exceed_keepalive(ran, capsys):
    assert run(*HOST, "--keepalive", "5", "--dead-after", "5") == 2 and ran == []
    line = error_line(capsys)
    assert line.startswith("roam tunnel host: error: argument --dead-after: must be more than --keepalive (5), got 5")
    assert "declared dead between two keepalives" in line
    assert run(*HOST, "--dead-after", "4") == 2 and ran == []  # against the default keepalive, 5


def test_good_values_still_reach_the_daemons(ran):
    assert run(*HOST, "--keepalive", "0.3", "--dead-after", "1", "--mtu", "9000", "--path-mtu", "576",
               "--mac", "02:00:00:00:00:01", "--bridge", "brvm") == 0
    assert run(*PROXY, "--session-timeout", "30", "--mac-age", "0.5", "--max-tcp-connections", "1",
               "--tcp-auth-timeout", "120", "--mtu", "68", "--path-mtu", "65535", "--tap", "roamp4789") == 0
    assert run(*HOST[:-2], "--plaintext") == 0
    assert ran == ["host", "proxy", "host"]


def test_key_file_is_required_unless_plaintext_before_anything_runs(ran, capsys):
    assert run(*PROXY[:-2]) == 2 and ran == []
    assert error_line(capsys).startswith("roam tunnel proxy: error: the following arguments are required: "
                                         "--key-file (unless --plaintext; make one with `roam tunnel genkey")


# -- 2. the VM's MAC -----------------------------------------------------------------------------

@pytest.mark.parametrize("mac,why", [("ff:ff:ff:ff:ff:ff", "multicast or broadcast"),
                                     ("01:00:5e:00:00:01", "multicast or broadcast"),
                                     ("00:00:00:00:00:00", "all zero")])
def test_a_host_mac_that_is_no_vms_is_refused_before_any_device(ran, capsys, mac, why):
    assert run(*HOST, "--mac", "02:00:00:00:00:01", "--mac", mac) == 2 and ran == []
    assert error_line(capsys) == f"roam tunnel host: error: argument --mac: not a VM's unicast MAC ({why}): {mac!r}"
    assert run(*HOST, "--mac", "zz:00:00:00:00:01") == 2  # int()'s words never reach the user
    assert error_line(capsys).endswith("argument --mac: not a MAC address: 'zz:00:00:00:00:01'")


# -- 3. `roam tunnel status` ----------------------------------------------------------------------

def _live(**kw) -> dict:
    from tunnel.io.loop import process_start
    return dict({"role": "host", "pid": os.getpid(), "pid_start": process_start(os.getpid()), "state": "ATTACHED",
                 "session": "00000001", "macs": [], "last_heard_ago": 1.0, "transport": "udp", "proxy": "x"}, **kw)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def status(path, as_json=False) -> int:
    return cmd_tunnel.cmd_status(argparse.Namespace(status_dir=str(path), json=as_json))


def test_status_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "regular"
    f.write_text("")
    assert status(f) == 1
    err = capsys.readouterr().err
    assert err == f"roam tunnel status: --status-dir {f}: Not a directory\n"


def test_odd_status_files_are_named_and_skipped_the_rest_printed(tmp_path, capsys):
    (tmp_path / "host-1.json").write_text(json.dumps(_live()))
    (tmp_path / "host-2.json").write_text("[1, 2]")  # JSON, but no object
    (tmp_path / "host-3.json").write_text("{not json")
    (tmp_path / "proxy-4.json").write_text(json.dumps(  # a session entry of another shape
        {"role": "proxy", "pid": os.getpid(), "sessions": [["00000002", "ATTACHED"]]}))
    (tmp_path / "proxy-5.json").write_text(json.dumps(  # a session entry missing keys: shown as far as it goes
        {"role": "proxy", "pid": os.getpid(), "listen": "192.0.2.1:4789", "sessions": [{"session": "00000003"}]}))
    assert status(tmp_path) == 0
    out, err = capsys.readouterr()
    assert "session 00000001 ATTACHED" in out and "session 00000003 ?" in out and "endpoint ?" in out
    lines = err.splitlines()
    assert len(lines) == 3 and "Traceback" not in err
    assert lines[0] == f"roam tunnel status: {tmp_path / 'host-2.json'}: skipped: not a status file " \
        "(a JSON list, not an object)"
    assert lines[1].startswith(f"roam tunnel status: {tmp_path / 'host-3.json'}: skipped: not JSON")
    assert lines[2].startswith(f"roam tunnel status: {tmp_path / 'proxy-4.json'}: skipped: not a status file this "
                               "roam can show")
    assert status(tmp_path, as_json=True) == 0
    out, err = capsys.readouterr()
    assert [st["file"] for st in json.loads(out)] == ["host-1.json", "proxy-4.json", "proxy-5.json"]
    assert len(err.splitlines()) == 2


def test_status_fails_when_every_end_is_gone(tmp_path, capsys):
    (tmp_path / "host-1.json").write_text(json.dumps(_live(pid=_dead_pid())))
    (tmp_path / "proxy-2.json").write_text(json.dumps({"role": "proxy", "pid": _dead_pid(), "sessions": []}))
    assert status(tmp_path) == 1
    out, err = capsys.readouterr()
    assert "GONE (was ATTACHED)" in out  # still shown
    assert err == f"roam tunnel status: every tunnel end in {tmp_path} is GONE (its process no longer runs): " \
        "2 stale status file(s)\n"
    assert status(tmp_path, as_json=True) == 1
    (tmp_path / "host-3.json").write_text(json.dumps(_live()))
    assert status(tmp_path) == 0 and status(tmp_path, as_json=True) == 0


# -- 4. addresses ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,option", [(["host", "--tap", "rt0", "--key-file", "k", "--proxy"], "--proxy"),
                                         (["proxy", "--bridge", "br0", "--key-file", "k", "--listen"], "--listen")])
@pytest.mark.parametrize("text", ["foo:99", "192.0.2.300:1", "[2001:db8::1:1", "2001:db8::zz]:1"])
def test_a_bad_address_names_its_option(ran, capsys, argv, option, text):
    assert run(*argv, text) == 2 and ran == []
    line = error_line(capsys)
    assert line.startswith(f"roam tunnel {argv[0]}: error: argument {option}: not IP:PORT: {text!r}"), line
    assert "inet_pton" not in line


def test_parse_endpoint_says_which_text():
    from tunnel.io.transport import parse_endpoint
    with pytest.raises(ValueError, match=r"^not IP:PORT: 'foo:99'$"):
        parse_endpoint("foo:99")
    assert parse_endpoint("[2001:db8::1]:4789") == ("2001:db8::1", 4789)


# -- 5. `roam tunnel macs` speaks as itself --------------------------------------------------------

def test_macs_messages_name_the_command(monkeypatch, capsys, tmp_path):
    import tunnel.io.control as control

    def absent(path, verb, mac):
        raise FileNotFoundError(2, "No such file or directory")  # no socket made: the agent is "not there"

    monkeypatch.setattr(control, "request", absent)
    assert run("macs", "--control", str(tmp_path / "host.sock")) == 1
    assert error_line(capsys).startswith("roam tunnel macs: no host agent answers on")
    monkeypatch.setattr(control, "request", lambda path, verb, mac: {"ok": False, "error": "busy"})
    assert run("macs", "--control", str(tmp_path / "host.sock")) == 1
    assert error_line(capsys) == "roam tunnel macs: the agent refused: busy"
    assert run("attach", "--mac", "ff:ff:ff:ff:ff:ff", "--control", str(tmp_path / "host.sock")) == 2
    assert error_line(capsys) == "roam tunnel attach: --mac: not a VM's unicast MAC (multicast or broadcast): " \
        "'ff:ff:ff:ff:ff:ff'"


# -- 6. help text, and genkey into a full file -----------------------------------------------------

def _help(*argv: str) -> str:
    parser = cli.build_parser("tunnel")
    sub = parser._subparsers._group_actions[0].choices["tunnel"]  # type: ignore[union-attr]
    for name in argv:
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return " ".join(sub.format_help().split())


def test_help_says_what_the_options_take():
    host, proxy, st = _help("host"), _help("proxy"), _help("status")
    assert "--keepalive SECONDS" in host and "--dead-after SECONDS" in host and "--key-file FILE" in host
    assert "required unless --plaintext" in host and "more than --keepalive" in host
    assert "--session-timeout SECONDS" in proxy and "--mac-age SECONDS" in proxy and "--mtu BYTES" in proxy
    assert "68..65443" in proxy and "576..65535" in proxy
    assert "when it re-attaches" not in proxy and "every time its MAC moves to another host end" in proxy
    assert "--status-dir DIR the --status-dir the ends were started with (default /run/roam/tunnel)" in st
    assert "Exit status: 0 when at least one end runs; 1 when none does" in st


def _genkey(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", "tunnel", "genkey", *argv], cwd=ROOT, text=True,
                          stderr=subprocess.PIPE, timeout=60, **kw)


def test_genkey_into_a_full_file_is_one_line_and_exit_1(tmp_path):
    with open("/dev/full", "w") as full:
        r = _genkey(stdout=full)
    assert r.returncode == 1
    assert r.stderr == "roam tunnel genkey: cannot write the key to standard output: No space left on device\n"
    out = tmp_path / "k.key"  # --out on a file system that takes no byte more: no empty key left behind
    r = _genkey("--out", str(out), stdout=subprocess.DEVNULL,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)))
    assert r.returncode == 1 and r.stderr == f"roam tunnel genkey: cannot write {out}: File too large\n"
    assert not out.exists()
