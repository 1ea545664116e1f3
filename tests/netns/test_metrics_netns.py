"""``--metrics ADDR:PORT``: the daemons' Prometheus endpoint, scraped inside the namespace.

The daemons run in namespaces this test makes, bound to an address there; the HTTP client
(Python's urllib, in a process of its own) runs in the same namespace (`ip netns exec`).  The metric names are checked, and that a counter moves once
traffic went through (a TCP connection through the NAT; ARP through the tunnel).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.netns.test_daemon_netns import Notify, notify_factory  # noqa: F401 (a fixture)
from tests.netns.test_nat_plugin import PEER, Site

ROOT = Path(__file__).resolve().parents[2]


#: the HTTP client run inside the namespace (urllib: curl is not among the set-up's packages)
_FETCH = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"


def scrape(lab, ns: str, address: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of http://ADDRESS/metrics fetched by an HTTP client in ``ns``: {(name, labels): value}."""
    out = lab.run(ns, [sys.executable, "-c", _FETCH, f"http://{address}/metrics"]).stdout
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(out) for s in fam.samples}


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape_until(lab, ns: str, address: str, pred, what: str, seconds: float = 20.0) -> dict:
    """Scrape until ``pred(samples)`` holds (bounded in time; not a timing assertion)."""
    end = time.monotonic() + seconds
    while True:
        samples = scrape(lab, ns, address)
        if pred(samples):
            return samples
        if time.monotonic() > end:
            raise AssertionError(f"gave up after {seconds} s waiting for {what}")
        time.sleep(0.1)


def _daemon(lab, ns, argv, tmp_path, n: Notify, name: str) -> subprocess.Popen:
    with open(tmp_path / f"{name}.log", "wb") as log:
        proc = lab.popen(ns, [sys.executable, "-m", "tools.cli", *argv], stdout=log, stderr=log, cwd=ROOT,
                         env=dict(os.environ, NOTIFY_SOCKET=n.path))
    try:
        n.wait_for("READY", proc)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{(tmp_path / f'{name}.log').read_text()[-3000:]}") from None
    return proc


def test_nat_metrics_scraped_inside_the_namespace(lab, tmp_path, notify_factory):
    site = Site(lab, tmp_path)
    addr = "198.18.0.1:9464"
    _daemon(lab, site.host, ["nat", "--config", site.conf, "--external", "ext0", "--internal", "hv0", "--queue", "3",
                             "--state-dir", str(tmp_path), "--metrics", addr], tmp_path, notify_factory("nat"), "nat")
    before = scrape(lab, site.host, addr)
    for name in ("roam_nat_info", "roam_nat_mappings", "roam_nat_flows", "roam_nat_inbound_mappings",
                 "roam_nat_offloaded_flows", "roam_nat_queued_packets_total", "roam_nat_internal_errors_total",
                 "roam_process_resident_memory_bytes"):
        assert any(k[0] == name for k in before), name
    pools = site.status()["engine"]["pools"]  # what `roam nat status` shows
    assert value(before, "roam_nat_pool_ports", proto="tcp") == pools["tcp"]["size"]
    assert value(before, "roam_nat_inbound_mappings") == 1
    assert value(before, "roam_nat_info", external_iface="ext0", external_ip="203.0.113.1", queue="3",
                 internal="198.18.0.0/24", offload="on") == 1
    out0 = value(before, "roam_nat_translated_packets_total", direction="out")
    assert out0 is not None

    srv = site.sock(site.inet)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((PEER, 8000))
    srv.listen(1)
    cli = site.sock(site.vm)
    try:
        cli.connect((PEER, 8000))
        conn, peer = srv.accept()
        conn.close()
        assert peer[0] == "203.0.113.1"  # it went through the NAT
        after = scrape_until(lab, site.host, addr, lambda s: value(s, "roam_nat_translated_packets_total",
                                                                   direction="out") > out0
                             and value(s, "roam_nat_mappings") >= 1, "the counters to move")
    finally:
        cli.close()
        srv.close()
    assert value(after, "roam_nat_pool_ports_used", proto="tcp") >= 1
    assert (value(after, "roam_nat_offload_total", event="offloaded") or 0) \
        + (value(after, "roam_nat_offload_total", event="kernel_flows") or 0) >= 1  # roam's, or the kernel path's


def test_tunnel_metrics_scraped_inside_the_namespace(lab, tmp_path, notify_factory):
    ns = lab.ns("tun")
    lab.bridge(ns, "br0")
    lab.bridge(ns, "brvm")
    key = tmp_path / "tunnel.key"
    subprocess.run([sys.executable, "-m", "tools.cli", "tunnel", "genkey", "--out", str(key)], cwd=ROOT, check=True,
                   timeout=60)
    common = ["--key-file", str(key), "--status-dir", str(tmp_path / "status")]
    paddr, haddr = "127.0.0.1:9465", "127.0.0.1:9466"
    _daemon(lab, ns, ["tunnel", "proxy", "--listen", "127.0.0.1:4789", "--bridge", "br0", "--metrics", paddr, *common],
            tmp_path, notify_factory("proxy"), "proxy")
    _daemon(lab, ns, ["tunnel", "host", "--proxy", "127.0.0.1:4789", "--tap", "rt0", "--bridge", "brvm",
                      "--keepalive", "1", "--metrics", haddr, *common], tmp_path, notify_factory("host"), "host")
    host = scrape_until(lab, ns, haddr, lambda s: value(s, "roam_tunnel_sessions", state="ATTACHED"),
                        "the host end to attach")
    for name in ("roam_tunnel_info", "roam_tunnel_uptime_seconds", "roam_tunnel_frames_total",
                 "roam_tunnel_bytes_total", "roam_tunnel_last_heard_age_seconds"):
        assert any(k[0] == name for k in host), name
    from tunnel.crypto import aes_is_fast  # (--cipher auto on both ends: AES-256-GCM where the CPU has AES)
    assert value(host, "roam_tunnel_info", role="host", transport="udp", tap="rt0", listen="",
                 proxy="127.0.0.1:4789", cipher="aes-256-gcm" if aes_is_fast() else "chacha20-poly1305") == 1
    tx0 = value(host, "roam_tunnel_frames_total", direction="tx")

    # traffic: ARP for an address nobody has, from the VM side's bridge, goes through the tunnel
    lab.addr(ns, "brvm", "198.18.0.50/24")
    lab.run(ns, ["ping", "-c", "2", "-W", "1", "198.18.0.77"], check=False)
    host = scrape_until(lab, ns, haddr, lambda s: value(s, "roam_tunnel_frames_total", direction="tx") > tx0,
                        "frames to count")
    assert value(host, "roam_tunnel_bytes_total", direction="tx") > 0
    proxy = scrape_until(lab, ns, paddr, lambda s: any(k[0] == "roam_tunnel_session_frames_total"
                                                       and ("direction", "rx") in k[1] and v > 0 for k, v in s.items()),
                         "the proxy to count the frames")
    assert value(proxy, "roam_tunnel_sessions", state="ATTACHED") == 1
    assert value(proxy, "roam_tunnel_lan_frames_total", direction="tx") > 0
    ages = [v for k, v in proxy.items() if k[0] == "roam_tunnel_last_heard_age_seconds"]
    assert len(ages) == 1 and ages[0] >= 0
