"""Deployment-shaped: the tunnel's ends stopped at random instants, and started again, while the VM's traffic flows.

The tunnel lab of :mod:`tests.netns.test_tunnel_lab`.  A TCP stream runs from the VM to the home peer the
whole time.  Round after round, one end (the proxy or the host end, drawn) is stopped by SIGTERM or SIGKILL
(drawn) at a random instant: mid-stream, or within its own start-up.  It is started again each time.  After
every round the host end attaches again, the stream goes on in order, and each namespace holds the TAP of its
running end only: nothing of a stopped end is left behind.  The draws are not seeded (every run meets other
instants) and are in every assertion's message.
"""
from __future__ import annotations

import random
import signal
import time

from .test_tunnel_lab import Stream, TunnelLab, wait_for

ROUNDS = 6
TAPS = {"proxy": "roamp", "host": "rt0"}


def _links(lab, ns: str) -> list[str]:
    return [link.get_attr("IFLA_IFNAME") for link in lab.ipr(ns).get_links()]


def _taps(lab, ns: str, prefix: str) -> list[str]:
    return [name for name in _links(lab, ns) if name.startswith(prefix)]


def test_ends_stopped_at_random_instants_come_back_and_the_stream_goes_on(lab, tmp_path):
    t = TunnelLab(lab, tmp_path, "udp")
    ns = t.ns
    where = {"proxy": ns["home"], "host": ns["hosta"]}
    start = {"proxy": t.start_proxy, "host": lambda: t.start_host("hosta")}
    rng = random.Random()
    tries: list[tuple] = []
    procs: dict = {}
    stream = None
    try:
        t0 = time.monotonic()
        procs["proxy"] = start["proxy"]()
        wait_for(lambda: t.status(procs["proxy"]), 20, "the proxy to start")
        startup = time.monotonic() - t0  # how long an end takes to publish its first status here
        procs["host"] = start["host"]()
        wait_for(lambda: t.attached(procs["host"]), 20, "the host end to attach")
        stream = Stream(lab, ns["vm"], ns["peer"])
        wait_for(lambda: stream.received > 20_000, 20, "the stream to flow")
        for _ in range(ROUNDS):
            which = rng.choice(("proxy", "host"))
            sig = rng.choice((signal.SIGTERM, signal.SIGKILL))
            during_startup = rng.random() < 0.5
            if during_startup:  # a fresh start of that end, stopped somewhere in its start-up
                lab.stop(procs[which])
                procs[which] = start[which]()
                delay = rng.uniform(0, startup * 1.2)
            else:
                delay = rng.uniform(0, 1.0)
            tries.append((which, sig.name, "start-up" if during_startup else "running", round(delay, 3)))
            time.sleep(delay)
            procs[which].send_signal(sig)
            procs[which].wait(timeout=30)
            procs[which] = start[which]()
            before = stream.received
            wait_for(lambda: t.status(procs["proxy"]), 20, f"the proxy to start again {tries}")
            wait_for(lambda: t.attached(procs["host"]), 30, f"the host end to attach again {tries}")
            wait_for(lambda: stream.received > before + 20_000, 40, f"the stream to go on {tries}")
            assert stream.errors == [], (tries, stream.errors)
            for end, prefix in TAPS.items():  # the running end's TAP, and no other
                assert len(_taps(lab, where[end], prefix)) == 1, (tries, end, _links(lab, where[end]))
        stream.finish()
        assert stream.errors == [], (tries, stream.errors)
        for end in ("host", "proxy"):
            assert lab.stop(procs[end]) == 0, (tries, end)
            assert _taps(lab, where[end], TAPS[end]) == [], (tries, end)
        print(f"draws: {tries}; {stream.received} bytes in order")
    except BaseException:
        print(f"draws: {tries}")
        print(t.dump_logs())
        raise
    finally:
        if stream is not None:
            stream.finish()
        for p in procs.values():
            if p.poll() is None:
                lab.stop(p)
