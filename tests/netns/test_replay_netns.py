"""Cross-validation: the simulator and the real-kernel lab give the same verdicts.

A bounded sample of small scenarios (hand-written below, each a few seconds of
traffic with 4 s timeouts) is played twice: with ``sim.run.replay`` (simulated
time, roam's TCP model) and with ``tools.lab.netns.run_netns`` (namespaces,
Linux TCP/UDP, the VM's link really moved).  For every connection and every mode
both backends run, the verdicts (survived / broken) must agree.  Reasons are
compared and shown on failure, but only verdicts are asserted: the kernel's
reasons come from what real endpoints can observe (an ICMP error, their own
address gone, a timeout), which is not always what the simulator's omniscient
loss bookkeeping names (see the module docstring of tools.lab.netns).

Every mode is covered: bridged and host-only (the kernel alone), nat and nat+state
(``roam nat`` in each host namespace), tunnel (``roam tunnel proxy`` at home, ``roam
tunnel host`` on the VM's host).  A mode the lab cannot run must come back as an error,
never a verdict.
"""
from __future__ import annotations

import pytest

from sim import parse_scenario, replay
from sim.results import Outcome
from tools.lab.attach import HostOnly
from tools.lab.netns import run_netns

pytestmark = pytest.mark.netns


_BASE = """
[scenario]
name = "{name}"
duration = {duration}
modes = ["bridged", "host-only"]
tcp_timeout = 4.0
udp_timeout = 4.0

[[site]]
name = "home"
prefix = "192.0.2.0/24"
proxy = "192.0.2.2"

[[site]]
name = "s1"
prefix = "203.0.113.0/26"

[[site]]
name = "s2"
prefix = "203.0.113.64/26"

[[host]]
name = "h1a"
site = "s1"
address = "203.0.113.10"

[[host]]
name = "h1b"
site = "s1"
address = "203.0.113.11"

[[host]]
name = "h2a"
site = "s2"
address = "203.0.113.74"

[vm]
host = "h1a"
home_address = "192.0.2.50"
bridged = "{bridged}"

[[peer]]
name = "p1"
address = "198.51.100.10"

[[peer]]
name = "p2"
address = "198.51.100.11"
"""


def _conn(cid, proto, direction, peer, port, start, interval=0.5, session=False):
    extra = "session = true\n" if session else ""
    return (f'[[connection]]\nid = "{cid}"\nprotocol = "{proto}"\ndirection = "{direction}"\npeer = "{peer}"\n'
            f"port = {port}\nstart = {start}\ninterval = {interval}\n{extra}\n")


def _move(at, to, ms):
    return f'[[migration]]\nat = {at}\nto = "{to}"\ndowntime_ms = {ms}\n\n'


SCENARIOS = {
    # moves on one LAN: a bridged VM keeps its lease, everything should survive there
    "same-lan": (_BASE.format(name="same-lan", duration=7.0, bridged="re-lease")
                 + _conn("out-tcp", "tcp", "outbound", "p1", 443, 0.5)
                 + _conn("out-udp-session", "udp", "outbound", "p2", 4433, 0.5, session=True)
                 + _conn("in-tcp", "tcp", "inbound", "p1", 22, 0.7)
                 + _conn("in-udp", "udp", "inbound", "p2", 5000, 0.7)
                 + _move(2.0, "h1b", 300) + _move(4.0, "h1a", 200)),
    # to another site with a new lease: the old address is gone (the tunnel keeps the home address)
    "cross-site": (_BASE.format(name="cross-site", duration=6.0, bridged="re-lease").replace(
        'modes = ["bridged", "host-only"]', 'modes = ["bridged", "host-only", "tunnel"]')
                   + _conn("out-tcp", "tcp", "outbound", "p1", 80, 0.5)
                   + _conn("in-udp", "udp", "inbound", "p2", 53, 0.5)
                   + _conn("late-out-tcp", "tcp", "outbound", "p2", 443, 3.5)
                   + _move(2.0, "h2a", 400)),
    # keep the address, same LAN; one connection starts during the downtime
    "keep-same-lan": (_BASE.format(name="keep-same-lan", duration=6.0, bridged="keep")
                      + _conn("out-tcp", "tcp", "outbound", "p1", 443, 0.5, interval=1.0)
                      + _conn("in-tcp", "tcp", "inbound", "p2", 22, 0.5)
                      + _conn("during-move", "udp", "outbound", "p2", 53, 2.2)
                      + _move(2.0, "h1b", 600)),
    # nothing moves
    "no-move": (_BASE.format(name="no-move", duration=4.0, bridged="re-lease")
                + _conn("out-tcp", "tcp", "outbound", "p1", 443, 0.5)
                + _conn("out-udp", "udp", "outbound", "p1", 53, 0.5)
                + _conn("in-tcp", "tcp", "inbound", "p2", 22, 0.5)),
}

# behind each host's `roam nat`, with an inbound mapping for ssh; the VM moves to another site
SCENARIOS["nat-move"] = (
    _BASE.format(name="nat-move", duration=7.0, bridged="re-lease").replace(
        'modes = ["bridged", "host-only"]', 'modes = ["nat", "nat+state"]')
    + '[[forward]]\nprotocol = "tcp"\nport = 22\nexternal_port = 2222\n\n'
    + _conn("out-tcp", "tcp", "outbound", "p1", 443, 0.5)
    + _conn("out-udp", "udp", "outbound", "p2", 53, 0.5)
    + _conn("in-tcp-mapped", "tcp", "inbound", "p1", 22, 0.5)
    + _conn("in-tcp-unmapped", "tcp", "inbound", "p2", 80, 0.5)
    + _conn("late-out-tcp", "tcp", "outbound", "p1", 443, 4.0)
    + _move(2.0, "h2a", 1500))


def _basic_compressed():
    """The README's bundled scenario, every mode, squeezed in time (10 s of traffic, 5 s timeouts)."""
    import dataclasses
    import os

    from sim import load_scenario

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "scenarios", "basic.toml")
    sc = load_scenario(path)
    moves = tuple(dataclasses.replace(m, at=4.0 + 3 * i) for i, m in enumerate(sc.migrations))
    return dataclasses.replace(sc, duration=10.0, tcp_timeout=5.0, udp_timeout=5.0, migrations=moves)


def _scenario(name):
    if name == "basic-compressed":
        return _basic_compressed()
    return parse_scenario(SCENARIOS[name], f"<{name}>")


@pytest.mark.parametrize("name", sorted(SCENARIOS) + ["basic-compressed"])
def test_same_verdicts_as_the_simulator(lab, name):
    sc = _scenario(name)
    modes = sc.modes
    sim = replay(sc, modes)
    net = run_netns(sc, modes, parallel=True)
    assert net.backend == "netns"
    assert [r.mode for r in net.runs] == list(modes)
    for run in net.runs:
        assert run.error is None, f"{run.mode}: {run.error}"
    diffs = []
    for s_run, n_run in zip(sim.runs, net.runs):
        assert s_run.error is None, f"sim {s_run.mode}: {s_run.error}"
        for c in sc.connections:
            s, n = s_run.results[c.id], n_run.results[c.id]
            line = (f"{s_run.mode:9} {c.id:16} sim={s.outcome.text}/{s.cause.text if s.cause else '-'} "
                    f"netns={n.outcome.text}/{n.cause.text if n.cause else '-'}")
            if s.outcome != n.outcome:
                diffs.append(line)
            # what the netns backend says about a survivor must hold up: it was established and answered
            if n.outcome == Outcome.SURVIVED:
                assert n.established and n.broken_at is None and n.runs, line
            else:
                assert n.cause is not None, line
    assert not diffs, "verdicts differ between --backend sim and --backend netns:\n" + "\n".join(diffs)


def test_a_mode_the_lab_cannot_run_is_an_error_not_a_verdict(lab):
    import dataclasses

    sc = parse_scenario(SCENARIOS["no-move"], "<no-move>")
    no_home = dataclasses.replace(sc, sites=tuple(dataclasses.replace(s, proxy=None) for s in sc.sites))
    (run,) = run_netns(no_home, ("tunnel",)).runs
    assert run.error is not None and "not available in the netns backend" in run.error
    assert run.results == {}
    (run,) = run_netns(sc, ("no-such-mode",)).runs
    assert run.error is not None and run.results == {}


def _endpoint_events(lab, ns: str, cmd: dict, until, limit: float = 8.0) -> list[dict]:
    """Run one endpoint program in ``ns`` with ``cmd``; its events until ``until(events)`` or ``limit`` s."""
    import time

    from tools.lab.netns import EndpointProc

    p = EndpointProc(lab, ns, "probe", time.monotonic(), limit + 5, None)
    try:
        deadline = time.monotonic() + limit
        while not any(e["ev"] == "ready" for e in p.events) and time.monotonic() < deadline:
            p.pump()
            time.sleep(0.02)
        p.send(op="clock", t0=time.monotonic())
        p.send(**cmd)
        while not until(p.events) and time.monotonic() < deadline:
            p.pump()
            time.sleep(0.02)
        return list(p.events)
    finally:
        p.send(op="quit")
        lab.stop(p.p, wait=3.0)
        p.errfile.close()


def test_udp_client_reports_an_icmp_host_unreachable(lab):
    """A router answers the VM's datagrams with ICMP host unreachable: the UDP client says so.

    (Draining the socket's error queue before recv() would clear the pending error unseen.)"""
    vm, rt = lab.ns("udpvm"), lab.ns("udprt")
    lab.veth(vm, "eth0", rt, "eth0")
    lab.addr(vm, "eth0", "198.18.5.2/24")
    lab.addr(rt, "eth0", "198.18.5.1/24")
    lab.route(vm, "default", "198.18.5.1")
    lab.sysctl(rt, "net.ipv4.ip_forward", "1")
    lab.run(rt, ["ip", "route", "add", "unreachable", "198.51.100.0/24"])
    events = _endpoint_events(
        lab, vm, dict(op="udp_connect", idx=0, dst="198.51.100.99", port=53, src="", sport=40000, interval=0.2,
                      request=20, response=20, timeout=3.0, end=1.0, settle=None),
        until=lambda evs: any(e["ev"] in ("error", "broken") for e in evs))
    errors = [e for e in events if e["ev"] == "error"]
    assert errors and errors[0]["err"] == "EHOSTUNREACH", events


class _FailingAttach(HostOnly):
    """Fault injection (a driver whose attach raises an unexpected error): no real input makes one fail
    this way on purpose, and the point is what the backend does when one does."""

    def attach(self, host, first):
        raise ZeroDivisionError("injected")


def test_an_unexpected_failure_is_that_modes_error_and_the_others_still_run(lab, monkeypatch):
    from tools.lab import attach

    monkeypatch.setitem(attach.DRIVERS, "host-only", _FailingAttach)
    sc = parse_scenario(SCENARIOS["no-move"], "<no-move>")
    rep = run_netns(sc, ("bridged", "host-only"), parallel=True)
    by = {r.mode: r for r in rep.runs}
    assert by["host-only"].error is not None and "ZeroDivisionError: injected" in by["host-only"].error
    assert by["host-only"].results == {}
    assert by["bridged"].error is None and set(by["bridged"].results) == {c.id for c in sc.connections}


def test_a_driver_that_fails_to_start_leaves_no_temporary_directory(lab, monkeypatch, tmp_path):
    import tempfile

    from tools.lab import attach

    class Impatient(attach.Nat):
        READY = 0.0  # give `roam nat` no time to come up: the constructor fails after making its dir

    monkeypatch.setitem(attach.DRIVERS, "nat", Impatient)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    sc = parse_scenario(SCENARIOS["nat-move"], "<nat-move>")
    (run,) = run_netns(sc, ("nat",)).runs
    assert run.error is not None and "did not come up" in run.error
    assert list(tmp_path.iterdir()) == []
