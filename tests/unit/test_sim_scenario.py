"""Scenario files: good ones load, bad ones name the line and the problem; captures seed connections."""
from __future__ import annotations

import dataclasses
import os

import pytest

from conntrack import Proto, TcpFlag, build
from conntrack.pcap import write_pcap
from sim import ScenarioError, load_scenario, parse_scenario, wire
from sim.scenario_toml import to_toml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples", "scenarios")

GOOD = """\
[scenario]
duration = 20.0
modes = ["bridged", "nat"]

[[site]]
name = "a"
prefix = "203.0.113.0/25"

[[host]]
name = "h1"
site = "a"
address = "203.0.113.10"

[vm]
host = "h1"

[[peer]]
name = "web"
address = "198.51.100.10"

[[connection]]
id = "x"
peer = "web"
port = 443
start = 1.0
"""


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".toml")))
def test_bundled_scenarios_load(name):
    sc = load_scenario(os.path.join(EXAMPLES, name))
    assert sc.connections and sc.hosts


def test_defaults_and_round_trip_through_toml():
    sc = parse_scenario(GOOD, "good.toml")
    c = sc.connections[0]
    assert (c.direction, c.protocol, c.interval, c.request, c.response) == ("outbound", Proto.TCP, 1.0, 100, 200)
    assert sc.modes == ("bridged", "nat") and sc.vm.bridged == "re-lease" and sc.name == "good"
    assert dataclasses.replace(parse_scenario(to_toml(sc), "x.toml"), source="") == dataclasses.replace(sc, source="")


def _error(text: str) -> ScenarioError:
    with pytest.raises(ScenarioError) as e:
        parse_scenario(text, "bad.toml")
    return e.value


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("old,new,needle,words", [
    ('peer = "web"', 'peer = "nope"', 'peer = "nope"', "peer 'nope' is not a [[peer]]"),
    ('port = 443', 'port = 70000', "port = 70000", "'port' must be a port 1..65535"),
    ('modes = ["bridged", "nat"]', 'modes = ["bridged", "natt"]', "modes =", "unknown mode 'natt'"),
    ('address = "203.0.113.10"', 'address = "203.0.113.200"', 'address = "203.0.113.200"',
     "outside site 'a'"),
    ('start = 1.0', 'start = 25.0', "start = 25.0", "not before the scenario's duration"),
    ('prefix = "203.0.113.0/25"', 'prefix = "203.0.113.0/33"', "prefix =", "not an IPv4 network"),
    ('host = "h1"', 'host = "h9"', 'host = "h9"', "host 'h9' is not a [[host]]"),
    ('id = "x"', 'id = "x"\nflavour = "mint"', "flavour", "unknown key 'flavour' in [[connection]]"),
    ('start = 1.0', 'start = "soon"', 'start = "soon"', "'start' must be a number"),
])
def test_semantic_errors_name_the_line_and_the_problem(old, new, needle, words):
    text = GOOD.replace(old, new, 1)
    err = _error(text)
    assert words in err.message
    assert err.line == _line_of(text, needle)
    assert str(err).startswith(f"bad.toml:{err.line}: ")


def test_missing_key_points_at_its_table():
    text = GOOD.replace('peer = "web"\n', "", 1)
    err = _error(text)
    assert "needs 'peer'" in err.message and err.line == _line_of(text, "[[connection]]")


def test_second_table_of_an_array_gets_its_own_line():
    text = GOOD + '\n[[connection]]\nid = "y"\npeer = "web"\nport = 0\n'
    err = _error(text)
    assert err.line == len(text.splitlines())


def test_syntax_error_gives_tomllib_line():
    err = _error(GOOD.replace('port = 443', 'port = = 443'))
    assert err.message.startswith("TOML syntax") and err.line == _line_of(GOOD, "port = 443")


def test_tunnel_needs_a_home_site_with_a_proxy():
    err = _error(GOOD.replace('["bridged", "nat"]', '["tunnel"]'))
    assert "needs exactly one [[site]] with 'proxy'" in err.message


def test_duplicate_ids_and_overlapping_prefixes():
    assert "used twice" in _error(GOOD + '\n[[connection]]\nid = "x"\npeer = "web"\nport = 1\n').message
    overlap = GOOD.replace('[[host]]', '[[site]]\nname = "b"\nprefix = "203.0.113.64/26"\n\n[[host]]', 1)
    err = _error(overlap)
    assert "overlaps site 'a'" in err.message and err.line == _line_of(overlap, "203.0.113.64/26")


def test_unreadable_file_is_a_scenario_error(tmp_path):
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(str(tmp_path / "missing.toml"))


def test_capture_flows_become_connections(tmp_path):
    vm, web, dns, admin = (wire.addr(a) for a in ("203.0.113.50", "198.51.100.10", "198.51.100.53",
                                                  "198.51.100.77"))
    pkts = [
        (100.0, build.tcp(vm, web, 40001, 443, 1, 0, TcpFlag.SYN)),
        (100.02, build.tcp(web, vm, 443, 40001, 9, 2, TcpFlag.SYN | TcpFlag.ACK)),
        (100.5, build.tcp(vm, web, 40001, 443, 2, 10, TcpFlag.ACK | TcpFlag.PSH, bytes(300))),
        (100.6, build.tcp(web, vm, 443, 40001, 10, 302, TcpFlag.ACK | TcpFlag.PSH, bytes(1000))),
        (101.0, build.udp(vm, dns, 5353, 53, bytes(40))),
        (101.01, build.udp(dns, vm, 53, 5353, bytes(120))),
        (102.0, build.tcp(admin, vm, 50000, 22, 7, 0, TcpFlag.SYN)),
        (102.1, build.tcp(wire.addr("198.51.100.1"), wire.addr("198.51.100.2"), 1, 2, 0, 0,
                          TcpFlag.SYN)),  # not the VM's
    ]
    with open(tmp_path / "vm.pcap", "wb") as f:
        write_pcap(f, pkts)
    text = GOOD.replace('[[connection]]\nid = "x"\npeer = "web"\nport = 443\nstart = 1.0\n',
                        '[[capture]]\nfile = "vm.pcap"\nvm_address = "203.0.113.50"\nstart = 2.0\n')
    (tmp_path / "s.toml").write_text(text)
    sc = load_scenario(str(tmp_path / "s.toml"))
    got = {(c.protocol_name, c.direction, c.peer, c.port, c.start) for c in sc.connections}
    assert got == {("tcp", "outbound", "web", 443, 2.0), ("udp", "outbound", "peer-198-51-100-53", 53, 3.0),
                   ("tcp", "inbound", "peer-198-51-100-77", 22, 4.0)}
    https = next(c for c in sc.connections if c.port == 443)
    assert (https.request, https.response) == (300, 1000)
    assert {p.name for p in sc.peers} >= {"peer-198-51-100-53", "peer-198-51-100-77"}


def test_damaged_capture_names_the_capture_line(tmp_path):
    (tmp_path / "bad.pcap").write_bytes(b"not a capture at all, but long enough")
    text = GOOD + '\n[[capture]]\nfile = "bad.pcap"\n'
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(ScenarioError) as e:
        load_scenario(str(tmp_path / "s.toml"))
    assert "not a pcap file" in e.value.message and e.value.line == _line_of(text, 'file = "bad.pcap"')


@pytest.mark.parametrize("key,value,words", [
    ("nat_address", "10.0.0.10", "'nat_address' 10.0.0.10 is outside the ranges a lab may use"),
    ("nat_gateway", "192.168.0.1", "'nat_gateway' 192.168.0.1 is outside the ranges"),
    ("host_only_address", "172.16.5.10", "'host_only_address' 172.16.5.10 is outside the ranges"),
    ("host_only_address", "198.18.1.255", "broadcast address of its /24"),
    ("nat_gateway", "198.18.7.1", "not on the VM's NAT network 198.18.0.0/24"),
    ("nat_gateway", "198.18.0.10", "is the VM's nat_address"),
])
def test_vm_addresses_must_be_in_the_lab_ranges(key, value, words):
    text = GOOD.replace('host = "h1"\n', f'host = "h1"\n{key} = "{value}"\n', 1)
    err = _error(text)
    assert words in err.message
    assert err.line == _line_of(text, f"{key} = ")


@pytest.mark.parametrize("table,item", [("forward", "hosts = [{a = 1}]"), ("forward", "hosts = [1]"),
                                        ("scenario", "modes = [{a = 1}]")])
def test_array_items_of_the_wrong_type_are_scenario_errors(table, item):
    if table == "forward":
        text = GOOD + f"\n[[forward]]\nport = 22\n{item}\n"
    else:
        text = GOOD.replace('modes = ["bridged", "nat"]', item)
    err = _error(text)  # a ScenarioError, not a TypeError from deep inside
    assert "must be an array of strings" in err.message
    assert err.line == _line_of(text, item)
