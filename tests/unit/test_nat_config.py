import pytest

from conntrack.packet import Proto
from nat.config import ConfigError, Filtering, load, parse_nat_conf, parse_toml

NAT_CONF = """\
# VMware-style
[host]
ip = 198.18.0.1
netmask = 255.255.255.0
device = /dev/vmnet8
[udp]
timeout = 60
[tcp]
timeWaitTimeout = 30
[incomingtcp]
8080 = 198.18.0.2:80   ; web
[incomingudp]
5353 = 198.18.0.2:53
[netbios]
nbnsTimeout = 2
"""


def test_nat_conf_parses():
    cfg = parse_nat_conf(NAT_CONF)
    assert cfg.internal == ("198.18.0.0/24",)
    assert cfg.udp_timeout == 60 and cfg.tcp_time_wait == 30
    fw = {(f.proto, f.external_port): (f.internal_ip, f.internal_port) for f in cfg.forwards}
    assert fw == {(Proto.TCP, 8080): ("198.18.0.2", 80), (Proto.UDP, 5353): ("198.18.0.2", 53)}
    text = "\n".join(cfg.warnings)
    assert "unknown section [netbios]" in text and "nat.conf:14" in text
    assert "UDP mapping timeout 60 s is below the RFC 4787 REQ-5 minimum of 120 s" in text
    assert "[host] device ignored" in text
    assert cfg.other_sections == (("netbios", (("nbnsTimeout", "2"),)),)


def test_defaults_are_rfc_minimums_without_warnings():
    cfg = parse_toml('internal = ["198.18.0.0/24"]')
    assert (cfg.udp_timeout, cfg.tcp_established, cfg.tcp_transitory, cfg.icmp_timeout) == (300, 7440, 240, 60)
    assert cfg.warnings == ()
    assert cfg.filtering == Filtering.ENDPOINT_INDEPENDENT


@pytest.mark.parametrize("text,where,msg", [
    ("[incomingtcp]\n8080 = 198.18.0.2\n", "nat.conf:2", "should be ADDRESS:PORT"),
    ("[incomingtcp]\n\n70000 = 198.18.0.2:80\n", "nat.conf:3", "outside 1-65535"),
    ("[udp]\ntimeout = soon\n", "nat.conf:2", "not a number of seconds"),
    ("timeout = 3\n", "nat.conf:1", "before any [section]"),
    ("[udp\n", "nat.conf:1", "section header"),
    ("[incomingudp]\nnonsense\n", "nat.conf:2", "expected KEY = VALUE"),
    ("[host]\nip = 198.18.0.1\n", "nat.conf:2", "needs a netmask"),
    ("[incomingtcp]\n80 = 1.2.3.4:80\n80 = 1.2.3.5:80\n", "nat.conf:3", "mapped twice (first at nat.conf:2)"),
    ("[udp]\ntimeout = inf\n", "nat.conf:2", "not a finite number"),
    ("[tcp]\n\ntimeout = 1e400\n", "nat.conf:3", "not a finite number"),
    ("[tcp]\ntimeWaitTimeout = nan\n", "nat.conf:2", "not a finite number"),
])
def test_nat_conf_errors_name_the_line(text, where, msg):
    with pytest.raises(ConfigError) as ei:
        parse_nat_conf(text)
    assert ei.value.where == where
    assert msg in ei.value.message


def test_toml_full():
    cfg = parse_toml("""
external_ip = "203.0.113.1"
internal = ["198.18.0.0/24", "198.19.0.0/16"]
filtering = "address-and-port-dependent"
hairpinning = false
[ports]
range = "20000-20100"
low_range = "900-1000"
[timeouts]
udp = 30
[[inbound]]
proto = "udp"
port = 5000
to = "198.18.0.5:5001"
""")
    assert cfg.external_ip == "203.0.113.1" and len(cfg.internal) == 2
    assert cfg.filtering == Filtering.ADDRESS_AND_PORT_DEPENDENT and cfg.hairpinning is False
    assert cfg.port_range == (20000, 20100) and cfg.low_port_range == (900, 1000)
    assert cfg.forwards[0].proto == Proto.UDP and cfg.forwards[0].internal_port == 5001
    assert any("below the RFC 4787 REQ-5" in w for w in cfg.warnings)


@pytest.mark.parametrize("text,msg", [
    ("internal = [", "not valid TOML"),
    ('filtering = "strict"', "use one of"),
    ('[timeouts]\nudp_x = 3', "unknown timeout"),
    ('[[inbound]]\nproto = "sctp"\nport = 1\nto = "1.2.3.4:5"', "should be \"tcp\" or \"udp\""),
    ('[ports]\nrange = "5000-4000"', "ascending"),
])
def test_toml_errors(text, msg):
    with pytest.raises(ConfigError) as ei:
        parse_toml(text)
    assert msg in str(ei.value)


def test_toml_error_names_line():
    with pytest.raises(ConfigError) as ei:
        parse_toml('internal = ["198.18.0.0/24"]\nfiltering = = 3\n')
    assert "line 2" in str(ei.value)


def test_load_by_extension(tmp_path):
    p = tmp_path / "nat.conf"
    p.write_text(NAT_CONF)
    assert load(str(p)).internal == ("198.18.0.0/24",)
    t = tmp_path / "nat.toml"
    t.write_text('internal = ["198.18.1.0/24"]\n')
    assert load(str(t)).internal == ("198.18.1.0/24",)
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.conf"))


def test_examples_parse():
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[2] / "examples" / "nat"
    files = sorted(root.glob("*.conf")) + sorted(root.glob("*.toml"))
    assert files, "examples/nat holds sample configs"
    for f in files:
        load(str(f))


@pytest.mark.parametrize("text,where", [
    ('internal = ["198.18.0.0/24"]\n[timeouts]\nudp = inf\n', "nat.toml:3: timeouts.udp"),
    ('[timeouts]\ntcp_established = 60.0\nudp = 1e400\n', "nat.toml:3: timeouts.udp"),
    ('timeouts.icmp = -inf\n', "nat.toml:1: timeouts.icmp"),
    ('[timeouts]\nicmp = nan\n', "nat.toml:2: timeouts.icmp"),
])
def test_toml_non_finite_timeouts_rejected_with_the_line(text, where):
    """inf/1e400 used to be taken, then crashed every new flow (math.floor(inf) in the tracker)."""
    with pytest.raises(ConfigError) as ei:
        parse_toml(text)
    assert ei.value.where == where and "not a finite number" in ei.value.message


def test_nat_conf_udp_timeout_zero_means_none_with_a_warning():
    from nat.config import NO_TIMEOUT
    cfg = parse_nat_conf("[host]\nip = 198.18.0.1\nnetmask = 255.255.255.0\n[udp]\ntimeout = 0\n")
    assert cfg.udp_timeout == NO_TIMEOUT and NO_TIMEOUT >= 2 ** 32
    assert any(w.startswith("nat.conf:5: [udp] timeout = 0: UDP mappings never time out") for w in cfg.warnings)
    assert not any("below the RFC" in w for w in cfg.warnings)
    with pytest.raises(ConfigError, match="must be positive"):  # roam's TOML says what it means
        parse_toml("[timeouts]\nudp = 0\n")


def test_nat_conf_udp_timeout_zero_keeps_a_flow_forever():
    from nat import NatEngine, Side
    from .nat_support import PEER, VM, udp
    cfg = parse_nat_conf("[host]\nip = 198.18.0.1\nnetmask = 255.255.255.0\n[udp]\ntimeout = 0\n")
    e = NatEngine(cfg, "203.0.113.1", seed=1)
    assert e.process(udp(VM, PEER, 5000, 53), Side.INTERNAL, 0).action.name == "ACCEPT"
    e.expire(10 * 365 * 86400.0)
    assert e.status()["flows"] == 1 and e.status()["mappings_live"] == 1


def test_duplicate_inbound_port_in_toml_names_its_table():
    with pytest.raises(ConfigError) as ei:
        parse_toml('[[inbound]]\nproto = "tcp"\nport = 80\nto = "198.18.0.2:80"\n'
                   '[[inbound]]\nproto = "tcp"\nport = 80\nto = "198.18.0.3:80"\n')
    assert ei.value.where == "nat.toml: inbound #2" and "first at nat.toml: inbound #1" in ei.value.message


def test_forward_outside_the_internal_network_warns():
    cfg = parse_nat_conf("[host]\nip = 198.18.0.1\nnetmask = 255.255.255.0\n[incomingtcp]\n"
                         "8080 = 198.18.0.2:80\n8081 = 10.9.9.9:80\n")
    outside = [w for w in cfg.warnings if "outside the internal network" in w]
    assert outside == ["TCP port 8081 forwards to 10.9.9.9, outside the internal network (198.18.0.0/24)"]
    t = parse_toml('internal = ["198.18.0.0/24"]\n[[inbound]]\nproto = "udp"\nport = 53\nto = "192.0.2.1:53"\n')
    assert any("UDP port 53 forwards to 192.0.2.1, outside" in w for w in t.warnings)
