"""`roam replay` end to end, and verdicts that come from packets, not from mode names."""
from __future__ import annotations

import json
import os

import pytest

from sim import Outcome, parse_scenario, replay, run_mode
from sim.results import MODES
from tools.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASIC = os.path.join(ROOT, "examples", "scenarios", "basic.toml")

BASE = """\
[scenario]
duration = 20.0
tcp_timeout = 10.0
udp_timeout = 10.0

[[site]]
name = "home"
prefix = "192.0.2.0/24"
proxy = "192.0.2.2"

[[site]]
name = "a"
prefix = "203.0.113.0/25"

[[site]]
name = "b"
prefix = "203.0.113.128/25"

[[host]]
name = "a1"
site = "a"
address = "203.0.113.10"

[[host]]
name = "a2"
site = "a"
address = "203.0.113.11"

[[host]]
name = "b1"
site = "b"
address = "203.0.113.140"

[vm]
host = "a1"
home_address = "192.0.2.50"

[[peer]]
name = "web"
address = "198.51.100.10"

[[connection]]
id = "t"
peer = "web"
port = 443
start = 1.0
"""


def _move(to: str, at: float = 5.0, down_ms: float = 500) -> str:
    return f'\n[[migration]]\nat = {at}\nto = "{to}"\ndowntime_ms = {down_ms}\n'


def _verdict(text: str, mode: str):
    run = run_mode(parse_scenario(text, "t.toml"), mode)
    assert run.error is None, run.error
    return run.results["t"]


def test_table_has_a_row_per_connection_and_a_column_per_mode(capsys):
    assert main(["replay", BASIC, "-q"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("connection"))
    assert header.split()[4:] == list(MODES)
    for cid in ("https", "dns", "quic-session", "ssh-in"):
        assert any(line.startswith(cid + " ") for line in out.splitlines())


def test_json_has_the_documented_shape(capsys):
    assert main(["replay", BASIC, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["connections"]) == 4
    for c in data["connections"]:
        assert {"id", "protocol", "direction", "modes"} <= set(c)
        assert set(c["modes"]) == set(MODES)
        for m in c["modes"].values():
            assert m["verdict"] in ("survived", "broken")
            assert m["reason"] in (None, "reset by peer", "unreachable", "no inbound mapping", "timed out")
            assert (m["reason"] is None) == (m["verdict"] == "survived")
            assert (m["interruption_ms"] is None) == (m["verdict"] == "broken")


def test_basic_scenario_outcomes(capsys):
    rep = replay(parse_scenario(open(BASIC).read(), BASIC))
    by = {r.mode: r.results for r in rep.runs}
    assert all(r.outcome == Outcome.SURVIVED for r in by["tunnel"].values())
    assert not any(r.established for r in by["host-only"].values())
    assert all(r.outcome == Outcome.BROKEN for r in by["bridged"].values())  # the move leaves the LAN
    assert by["nat"]["https"].cause.text == "reset by peer"  # the peer sees a new source and resets
    assert by["nat"]["dns"].outcome == Outcome.SURVIVED  # a stateless UDP server answers any source


def test_plot_writes_a_self_contained_html_timeline(tmp_path, capsys):
    out = tmp_path / "t.html"
    assert main(["replay", BASIC, "--plot", str(out), "-q"]) == 0
    text = out.read_text()
    assert text.startswith("<!doctype html>") and text.count("<svg") == 4  # one view per connection of basic.toml
    assert "<script src" not in text and "src=" not in text and "<link" not in text  # nothing fetched; zoom is inline JS
    assert "move to dc-1" in text
    import re
    import xml.etree.ElementTree as ET

    for svg in re.findall(r"<svg.*?</svg>", text, re.S):
        root = ET.fromstring(svg)  # well-formed, and draws something per connection
        assert len(root.findall(".//{http://www.w3.org/2000/svg}rect")) >= 1


def test_bad_scenario_exits_1_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE.replace('peer = "web"', 'peer = "nobody"'))
    assert main(["replay", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:{BASE.splitlines().index('peer = ' + chr(34) + 'web' + chr(34)) + 1}:" in err
    assert "peer 'nobody' is not a [[peer]]" in err


def test_netns_backend_has_no_pcap_option(capsys):
    assert main(["replay", BASIC, "--backend", "netns", "--pcap", "/nonexistent/x"]) == 2
    assert "--pcap works with --backend sim only" in capsys.readouterr().err


# -------------------------------------------------------------- verdicts come from packets
def test_nat_survives_a_move_that_keeps_the_external_address():
    assert _verdict(BASE + _move("a1"), "nat").outcome == Outcome.SURVIVED  # restart in place
    assert _verdict(BASE + _move("a2"), "nat").cause.text == "reset by peer"  # same LAN, new address


def test_bridged_survives_a_move_on_the_same_lan_only():
    assert _verdict(BASE + _move("a2"), "bridged").outcome == Outcome.SURVIVED
    assert _verdict(BASE + _move("b1"), "bridged").cause.text == "unreachable"
    keep = BASE.replace('home_address = "192.0.2.50"', 'home_address = "192.0.2.50"\nbridged = "keep"')
    assert _verdict(keep + _move("b1"), "bridged").outcome == Outcome.BROKEN


def test_a_move_at_the_very_end_is_exercised_not_assumed():
    # the move ends at 20.0 s, the scenario's duration: the clients keep going until they are
    # answered after it (or give up), so the verdict comes from packets sent after the move
    late_away = _verdict(BASE + _move("b1", at=19.5), "bridged")
    assert late_away.established and late_away.outcome == Outcome.BROKEN
    assert late_away.cause.text == "unreachable"
    late_near = _verdict(BASE + _move("a2", at=19.5), "bridged")
    assert late_near.outcome == Outcome.SURVIVED
    assert late_near.runs[-1][1] > 20.0  # answered after the VM was back


@pytest.mark.parametrize("mode", MODES)
def test_every_survivor_was_answered_after_the_last_move(mode):
    sc = parse_scenario(open(BASIC).read(), BASIC)
    settle = max(m.at + m.downtime for m in sc.migrations)
    run = run_mode(sc, mode)
    for r in run.results.values():
        if r.outcome == Outcome.SURVIVED:
            assert r.runs and r.runs[-1][1] > settle, r


def test_host_only_losses_are_the_vms_own_missing_route():
    from sim.world import Loss

    assert "HOST_ONLY" not in Loss.__members__  # no loss reason belongs to one mode
    run = run_mode(parse_scenario(BASE, "t.toml"), "host-only")
    r = run.results["t"]
    assert not r.established and r.cause.text == "unreachable"
    assert run.drops.get("no_route", 0) > 0 and set(run.drops) == {"no_route"}


def test_sample_covers_both_verdicts():
    """The netns cross-validation sample is not degenerate: the simulator finds survivors and breakages in it."""
    from tests.netns.test_replay_netns import SCENARIOS

    verdicts = set()
    for name, text in SCENARIOS.items():
        sc = parse_scenario(text, f"<{name}>")
        for run in replay(sc, sc.modes).runs:
            verdicts |= {r.outcome for r in run.results.values()}
    assert verdicts == {Outcome.SURVIVED, Outcome.BROKEN}


def test_tunnel_breaks_when_its_packets_cannot_get_home():
    cut = BASE.replace('proxy = "192.0.2.2"', 'proxy = "192.0.2.2"\nloss = 1.0')
    r = _verdict(cut, "tunnel")
    assert not r.established and r.cause.text == "timed out"


def test_tcp_back_off_can_outlast_a_downtime_shorter_than_the_timeout():
    # 9 s down, 10 s timeout: the retransmissions fall at +0.2, 0.6, 1.4, 3, 6.2 s (all in the
    # downtime), the next would be +12.6 s, after the give-up at +10 s -- as in real TCP.
    assert _verdict(BASE + _move("b1", down_ms=9000), "tunnel").cause.text == "timed out"
    assert _verdict(BASE + _move("b1", down_ms=2000), "tunnel").outcome == Outcome.SURVIVED


def test_inbound_needs_a_mapping_on_the_host_it_reaches():
    inbound = BASE.replace('id = "t"', 'id = "t"\ndirection = "inbound"').replace("port = 443", "port = 22")
    assert _verdict(inbound, "nat").cause.text == "no inbound mapping"
    fwd = inbound + '\n[[forward]]\nport = 22\nexternal_port = 2222\n'
    r = _verdict(fwd, "nat")
    assert r.outcome == Outcome.SURVIVED and r.peer_saw[0][1:] == ("203.0.113.10", 2222)


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_report(mode):
    lossy = BASE.replace('name = "web"', 'name = "web"\nloss = 0.05') + _move("b1")
    a = run_mode(parse_scenario(lossy, "t.toml"), mode)
    b = run_mode(parse_scenario(lossy, "t.toml"), mode)
    assert a.results == b.results and a.packets == b.packets


def test_pcap_option_writes_the_simulated_packets(tmp_path, capsys):
    from conntrack.pcap import read_pcap, record_packet

    prefix = str(tmp_path / "sim")
    assert main(["replay", BASIC, "-q", "--modes", "nat,tunnel", "--pcap", prefix]) == 0
    for mode in ("nat", "tunnel"):
        with open(f"{prefix}-{mode}.pcap", "rb") as f:
            pkts = [record_packet(r) for r in read_pcap(f)]
        assert len(pkts) > 100
        assert all(p.family == 4 for p in pkts)
    assert "packets of mode nat written" in capsys.readouterr().err


def test_against_a_lab_the_simulator_plays_the_labs_network():
    """``--compare`` with a lab backend: the simulator's links take the lab's 0.1 ms and lose nothing (the
    lab reproduces neither latency nor loss, and Linux's RTO follows the RTT); nothing else changes."""
    from tools.compare import LAB_LATENCY, as_the_lab_plays

    with open(os.path.join(os.path.dirname(__file__), "..", "scenarios", "outage_near_give_up_link_down.toml")) as f:
        sc = parse_scenario(f.read(), "x.toml")
    lab = as_the_lab_plays(sc)
    assert {s.latency for s in lab.sites} | {p.latency for p in lab.peers} == {LAB_LATENCY}
    assert not any(s.loss for s in lab.sites) and not any(p.loss for p in lab.peers)
    assert [s.name for s in lab.sites] == [s.name for s in sc.sites] and lab.connections == sc.connections
    assert lab.migrations == sc.migrations and lab.vm == sc.vm
    assert {s.latency for s in sc.sites} != {LAB_LATENCY}  # the scenario itself is untouched
