"""tools.metrics: the status of real engines as Prometheus metrics, served and fetched over loopback."""
from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit import nat_support as ns
from tests.unit.test_tunnel_ends import BCAST, VM1, attached_pair, frame
from tools.metrics import MetricsError, NatCollector, TunnelCollector, serve


def _fetch(server) -> dict:
    host, port = server.server_address[:2]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def served():
    servers = []

    def run(collector):
        with socket.socket() as probe:  # a port free now (port 0 is refused: a scraper must know it)
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        servers.append(serve(f"127.0.0.1:{port}", collector))
        return servers[-1]
    yield run
    for s in servers:
        s.shutdown()
        s.server_close()


def _plugin_status(engine) -> dict:
    """The shape Plugin._status_data gives (engine status inside, offload counters beside)."""
    return {"queue": 3, "external_iface": "ext0", "internal": ["198.18.0.0/24"], "engine": engine.status(),
            "offload": None, "queued_packets": 7, "internal_errors": 0}


def test_nat_metrics_follow_the_live_status(served):
    e = ns.engine()
    server = served(NatCollector(lambda: _plugin_status(e)))
    before = _fetch(server)
    assert before[("roam_nat_translated_packets_total", frozenset({("direction", "out")}))] == 0
    assert before[("roam_nat_mappings", frozenset())] == 0
    ns.out(e, ns.tcp(ns.VM, ns.PEER, 40000, 80))
    ns.inn(e, ns.udp(ns.PEER, ns.EXT, 53, 9))  # to no mapping: dropped, by reason
    after = _fetch(server)  # the same server: a scrape reads the status anew
    assert after[("roam_nat_translated_packets_total", frozenset({("direction", "out")}))] == 1
    assert after[("roam_nat_mappings", frozenset())] == 1
    assert after[("roam_nat_pool_ports_used", frozenset({("proto", "tcp")}))] == 1
    drops = {dict(k[1])["reason"]: v for k, v in after.items() if k[0] == "roam_nat_dropped_packets_total"}
    assert sum(drops.values()) == 1, drops
    assert ("roam_nat_offloaded_flows", frozenset()) not in after  # offload off: not reported as 0


def test_tunnel_metrics_of_an_attached_pair(served):
    net, host = attached_pair()
    net.from_vm("a", frame(BCAST, VM1))
    net.transfer()
    net.now = 2.5
    clock = [net.now]
    proxy_st = dict(net.proxy.status(net.now), driver={"tap_tx_dropped": 0}, uptime=2.5)
    host_st = dict(host.status(net.now), driver={}, uptime=2.5, transport="udp")
    proxy = _fetch(served(TunnelCollector(lambda: (2.5, proxy_st), lambda: clock[0])))
    assert proxy[("roam_tunnel_sessions", frozenset({("state", "ATTACHED")}))] == 1
    rx = [v for k, v in proxy.items() if k[0] == "roam_tunnel_session_frames_total" and ("direction", "rx") in k[1]]
    assert rx == [1]
    age = [v for k, v in proxy.items() if k[0] == "roam_tunnel_last_heard_age_seconds"]
    assert age == [2.5]
    clock[0] = 4.0  # scraped 1.5 s after the status was published: the age is as of the scrape
    h = _fetch(served(TunnelCollector(lambda: (2.5, host_st), lambda: clock[0])))
    assert h[("roam_tunnel_frames_total", frozenset({("direction", "tx")}))] == 1
    assert h[("roam_tunnel_last_heard_age_seconds", frozenset({("session", host_st["session"])}))] == 4.0
    assert h[("roam_tunnel_uptime_seconds", frozenset())] == 4.0


@pytest.mark.parametrize("address,message", [
    ("nonsense", "--metrics nonsense: not ADDR:PORT"),
    ("198.51.100.1:99999", "not ADDR:PORT"),
    ("192.0.2.254:9464", "cannot listen"),  # not an address of this host
])
def test_bad_metrics_address_is_one_clear_error(address, message):
    with pytest.raises(MetricsError, match=message):
        serve(address, NatCollector(dict))


@pytest.mark.parametrize("argv", [["nat", "--external", "ext0"], ["tunnel", "proxy", "--listen", "127.0.0.1:4789",
                                                                  "--bridge", "br0", "--plaintext"]])
def test_a_bad_metrics_address_is_refused_when_parsed(argv, capsys):
    """Before the daemon makes anything (its TAP, its rules): the option's own error, exit status 2."""
    from tools import cli

    with pytest.raises(SystemExit) as e:
        cli.parse_args([*argv, "--metrics", "nonsense"])
    assert e.value.code == 2
    assert "argument --metrics: not ADDR:PORT" in capsys.readouterr().err


def test_a_taken_port_is_one_clear_error(served):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(MetricsError, match=r"--metrics 127.0.0.1:\d+: cannot listen: Address already in use"):
            serve(f"127.0.0.1:{s.getsockname()[1]}", NatCollector(dict))
