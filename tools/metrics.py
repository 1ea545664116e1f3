"""``--metrics ADDR:PORT``: the counters `roam nat status` / `roam tunnel status` show, for Prometheus.

Nothing is counted twice: each scrape asks the running daemon for its status (the NAT plugin's
``live_status()``, taken under its lock; the tunnel driver's last published status, which its
loop refreshes every second and on every session event) and turns it into metric families
(a custom prometheus_client Collector).  The server is prometheus_client's own, in a thread
of its own, on the address given and nowhere else.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.process_collector import ProcessCollector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger("roam")


class MetricsError(Exception):
    """--metrics cannot be served (the message names the option and why)."""


def serve(address: str, collector) -> WSGIServer:
    """Serve ``collector`` (and the process's own metrics) on ``address`` ("IP:PORT", "[IPv6]:PORT");
    the server (``shutdown()`` stops it)."""
    from tunnel.io.transport import parse_endpoint

    try:
        host, port = parse_endpoint(address)
    except (ValueError, OSError):
        raise MetricsError(f"--metrics {address}: not ADDR:PORT (an IP address and a port, [ADDR]:PORT for IPv6)") \
            from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(namespace="roam", registry=registry)
    try:
        server, _thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise MetricsError(f"--metrics {address}: cannot listen: {exc.strerror or exc}") from None
    log.info("metrics on http://%s/metrics", address)
    return server


def _counter(name: str, doc: str, labels: tuple[str, ...], rows) -> CounterMetricFamily:
    m = CounterMetricFamily(name, doc, labels=labels)
    for label_values, value in rows:
        m.add_metric(label_values, value)
    return m


def _gauge(name: str, doc: str, labels: tuple[str, ...], rows) -> GaugeMetricFamily:
    m = GaugeMetricFamily(name, doc, labels=labels)
    for label_values, value in rows:
        m.add_metric(label_values, value)
    return m


class NatCollector:
    """`roam nat status`'s numbers: translated, dropped by reason, mappings, pool use, offloaded flows."""

    def __init__(self, read_status: Callable[[], dict]) -> None:
        self.read_status = read_status

    def collect(self) -> Iterator:
        st = self.read_status()
        e, off = st["engine"], st.get("offload")
        c = e["counters"]
        yield InfoMetricFamily("roam_nat", "what this roam nat serves", value={
            "external_iface": str(st.get("external_iface")), "external_ip": str(e.get("external_ip")),
            "queue": str(st.get("queue")), "internal": ",".join(st.get("internal", [])),
            "offload": "on" if off is not None else "off"})
        yield _counter("roam_nat_translated_packets", "packets translated (by roam, or by the kernel for it)",
                       ("direction",), ((("out",), c.get("translated_out", 0)), (("in",), c.get("translated_in", 0))))
        yield _counter("roam_nat_dropped_packets", "packets dropped, by reason", ("reason",),
                       (((k[len("dropped_"):],), v) for k, v in c.items() if k.startswith("dropped_")))
        yield _counter("roam_nat_malformed_packets", "malformed packets (dropped), by parse error", ("reason",),
                       (((k,), v) for k, v in e.get("parse_errors", {}).items()))
        yield _counter("roam_nat_events", "the engine's other counters (flows opened, address changes...)",
                       ("event",), (((k,), v) for k, v in c.items() if not k.startswith(("dropped_", "translated_"))))
        yield _gauge("roam_nat_mappings", "mappings live (inbound mappings not included)", (), (((), e["mappings_live"]),))
        yield _gauge("roam_nat_inbound_mappings", "inbound mappings configured", (), (((), e["inbound_mappings"]),))
        yield _gauge("roam_nat_flows", "flows tracked", (), (((), e["flows"]),))
        yield _gauge("roam_nat_pool_ports_used", "external ports in use, by protocol", ("proto",),
                     (((p,), u["used"]) for p, u in e["pools"].items()))
        yield _gauge("roam_nat_pool_ports", "external ports in the pool, by protocol", ("proto",),
                     (((p,), u["size"]) for p, u in e["pools"].items()))
        yield _counter("roam_nat_queued_packets", "packets that came through NFQUEUE", (),
                       (((), st.get("queued_packets", 0)),))
        yield _counter("roam_nat_internal_errors", "packets that hit a bug of ours (dropped)", (),
                       (((), st.get("internal_errors", 0)),))
        if off is not None:
            yield _gauge("roam_nat_offloaded_flows", "flows translated by the kernel (conntrack entries of roam's)",
                         (), (((), off["flows"]),))
            yield _counter("roam_nat_offload", "offload events: entries installed, ended, adopted at start, failed; "
                           "flows the kernel path NATed, and its clashes",
                           ("event",), (((k,), off[k]) for k in ("offloaded", "offload_ended", "adopted",
                                                                  "offload_failed", "kernel_flows", "kernel_clashes")
                                        if k in off))


class TunnelCollector:
    """`roam tunnel status`'s numbers: sessions, frames, bytes, drops by reason, last-heard ages.

    ``published()`` gives ``(when, status)`` as the driver last computed it and ``clock()`` the
    driver's clock, so an age is as of the scrape, not of the status."""

    def __init__(self, published: Callable[[], tuple[float, dict] | None], clock: Callable[[], float]) -> None:
        self.published = published
        self.clock = clock

    def collect(self) -> Iterator:
        got = self.published()
        if got is None:  # not begun yet
            return
        when, st = got
        since = max(0.0, self.clock() - when)
        role = st.get("role", "?")
        yield InfoMetricFamily("roam_tunnel", "what this tunnel end serves", value={
            "role": role, "transport": str(st.get("transport")), "tap": str(st.get("tap")),
            "listen": str(st.get("listen") or ""), "proxy": str(st.get("proxy") or ""), "cipher": str(st.get("cipher"))})
        yield _gauge("roam_tunnel_uptime_seconds", "seconds since this end started", (),
                     (((), (st.get("uptime") or 0) + since),))
        yield _counter("roam_tunnel_drops", "messages and frames dropped, by reason", ("reason",),
                       (((k,), v) for k, v in st.get("drops", {}).items()))
        yield _counter("roam_tunnel_driver", "the driver's own counters (TAP and socket errors, reloads...)",
                       ("event",), (((k,), v) for k, v in st.get("driver", {}).items()))
        if role == "host":
            yield from self._host(st, since)
        else:
            yield from self._proxy(st, since)

    @staticmethod
    def _host(st: dict, since: float) -> Iterator:
        c = st.get("counters", {})
        yield _gauge("roam_tunnel_sessions", "sessions, by state", ("state",), (((str(st.get("state")),), 1),))
        yield _counter("roam_tunnel_frames", "frames carried", ("direction",),
                       (((d,), c.get(f"{d}_frames", 0)) for d in ("tx", "rx")))
        yield _counter("roam_tunnel_bytes", "frame bytes carried", ("direction",),
                       (((d,), c.get(f"{d}_bytes", 0)) for d in ("tx", "rx")))
        yield _counter("roam_tunnel_events", "the host end's other counters", ("event",),
                       (((k,), v) for k, v in c.items() if not k.endswith(("_frames", "_bytes"))))
        if st.get("last_heard_ago") is not None:
            yield _gauge("roam_tunnel_last_heard_age_seconds", "seconds since the proxy was last heard",
                         ("session",), (((str(st.get("session")),), st["last_heard_ago"] + since),))

    @staticmethod
    def _proxy(st: dict, since: float) -> Iterator:
        sessions = st.get("sessions", [])
        states: dict[str, int] = {}
        for s in sessions:
            states[s["state"]] = states.get(s["state"], 0) + 1
        yield _gauge("roam_tunnel_sessions", "sessions, by state", ("state",), (((k,), v) for k, v in states.items()))
        c = st.get("counters", {})
        yield _counter("roam_tunnel_lan_frames", "frames to and from the home LAN", ("direction",),
                       ((("rx",), c.get("lan_rx_frames", 0)), (("tx",), c.get("lan_tx_frames", 0))))
        yield _counter("roam_tunnel_events", "the proxy end's other counters", ("event",),
                       (((k,), v) for k, v in c.items() if not k.startswith("lan_")))
        per = ("session", "endpoint", "direction")
        yield _counter("roam_tunnel_session_frames", "frames carried by a live session", per,
                       [((s["session"], s["endpoint"], d), s["counters"].get(f"{d}_frames", 0))
                        for s in sessions for d in ("tx", "rx")])
        yield _counter("roam_tunnel_session_bytes", "frame bytes carried by a live session", per,
                       [((s["session"], s["endpoint"], d), s["counters"].get(f"{d}_bytes", 0))
                        for s in sessions for d in ("tx", "rx")])
        yield _gauge("roam_tunnel_last_heard_age_seconds", "seconds since a session's host end was last heard",
                     ("session", "endpoint"), [((s["session"], s["endpoint"]), s["last_heard_ago"] + since)
                                               for s in sessions])
