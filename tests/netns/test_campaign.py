"""The differential campaign: the simulator against the kernel on generated scenarios.

A fixed-seed sample of ``ROAM_CAMPAIGN_N`` (default 30) scenarios from
``tests.property.sim_strategies.campaign_scenarios`` (long outages near the give-up
time, moves away and back and within one LAN, bridged keep and re-lease, inbound in
every mode, UDP sessions and request/response, idle connections) is played by the
simulator and by the netns backend (its modes in parallel), and every verdict AND every
reason must be equal: the simulator plays each lab run's routers' reachable-time draws,
and where the two raced within the kernel's timer granularity, the wheel's other phases
(``tools.compare``); a cell that still disagrees is played once more with its mode alone
(the lab's latency under load, below).  The interruption agreement (median and worst absolute
difference over the cells both saw survive) is printed, not asserted.  A disagreement
found here becomes a named regression scenario under tests/scenarios/ with its own test.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from tests.property.sim_strategies import campaign_scenarios
from tools.compare import compare, interruption_summary, render

pytestmark = pytest.mark.netns

N = int(os.environ.get("ROAM_CAMPAIGN_N", "30"))
#: derandomized: the same sample every run (hypothesis draws from a fixed seed, and without the literals
#: of the modules loaded: ``_no_local_constants``), never shrunk (each example is a lab run of seconds)
SAMPLE = settings(max_examples=N, derandomize=True, database=None, phases=[Phase.generate], deadline=None,
                  suppress_health_check=list(HealthCheck))


@contextlib.contextmanager
def _no_local_constants():
    """Hypothesis (6.1xx) also draws literals it finds in the modules loaded so far, so a derandomized
    sample would change with every edit to any of them and differ between a lone run and the suite's:
    draw without them (its own global constants stay).  Internals: where they are missing, nothing is
    patched, and the test below says whether the sample still holds."""
    from hypothesis.internal.conjecture import providers

    get, cache = getattr(providers, "_get_local_constants", None), getattr(providers, "CONSTANTS_CACHE", None)
    if get is None or cache is None or not hasattr(providers, "Constants"):
        yield
        return
    empty = providers.Constants()
    providers._get_local_constants = lambda: empty
    cache.cache.clear()
    try:
        yield
    finally:
        providers._get_local_constants = get
        cache.cache.clear()


def _sample() -> list:
    out = []

    @SAMPLE
    @given(campaign_scenarios())
    def take(sc):
        out.append(sc)

    with _no_local_constants():
        take()
    return out[:N]


def test_sample_is_fixed_and_reaches_the_cases_users_meet(tmp_path, monkeypatch):
    a = _sample()
    # a module with literals of its own loaded in between, as an edit to a loaded module would add: 1,000 of
    # them (hypothesis skips a module with more than 1,024, and integers in -99..99).  Without
    # ``_no_local_constants`` they change the sample (seen with hypothesis 6.155).
    (tmp_path / "roam_campaign_literals.py").write_text(f"INTS = {tuple(range(100, 3100, 3))!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "roam_campaign_literals", raising=False)
    importlib.import_module("roam_campaign_literals")
    b = _sample()
    assert a == b and len(a) >= min(N, 30)
    kinds = set()
    for sc in a:
        hosts = {h.name: h.site for h in sc.hosts}
        where = sc.vm.host
        for m in sc.migrations:
            kinds.add("same-lan" if hosts[m.to] == hosts[where] and m.to != where else
                      "stay" if m.to == where else "away")
            if m.downtime > 0.6 * sc.tcp_timeout:
                kinds.add("long")
            where = m.to
        kinds |= {c.direction for c in sc.connections} | {("udp-session" if c.session else c.protocol_name)
                                                          for c in sc.connections}
        kinds.add(sc.vm.bridged)
        if any(c.interval >= 0.6 * sc.timeout_of(c) for c in sc.connections):
            kinds.add("idle")
    assert {"same-lan", "away", "long", "inbound", "outbound", "tcp", "udp", "udp-session", "keep", "re-lease",
            "idle"} <= kinds, kinds


#: Reason disagreements seen and not yet explained, by (mode, the simulator's reason, the lab's reason):
#: the verdicts must still agree there, they are printed, and any other disagreement fails.  Open work.
KNOWN_REASON_GAPS: dict[tuple[str, str, str], str] = {
    # (none open: the last, nat+state "reset by peer" vs "timed out", was a carried snapshot that held an
    # offloaded TCP flow as SYN_SENT; see test_nat_offload.py's SIGUSR1 test)
}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} ms"


def _alone(sc, rows: list) -> dict:
    """The disagreeing ``rows`` of ``sc`` played again, their modes one at a time: (conn, mode) -> row."""
    again = compare(sc, ("sim", "netns"), parallel=False, modes=tuple(dict.fromkeys(r.mode for r in rows)))
    return {(r.conn, r.mode): r for r in again}


def test_simulator_and_kernel_agree_on_every_verdict_and_reason():
    """A cell that disagrees is played once more with its mode alone on the machine: the lab's modes run
    in parallel on 2 cores, and where the kernel's answer sits within tens of milliseconds of a give-up
    time, the Python tunnel's or NAT's latency under that load can decide it (seen: scenario 17, c2,
    tunnel, "timed out" once in CI, "survived" in every run alone).  Agreeing alone, it is counted and
    printed as raced under load, not hidden; disagreeing again, it fails."""
    if os.geteuid() != 0:
        pytest.skip("the netns backend needs root")
    rows_all, bad, where, under_load = [], [], [], []
    for i, sc in enumerate(_sample()):
        rows = compare(sc, ("sim", "netns"), parallel=True)
        rows_all += rows
        where += [i] * len(rows)
        errors = [r for r in rows if r.cells["netns"].error is not None]
        assert not errors, (i, errors[0].cells["netns"].error)
        differ = []
        for r in rows:
            if not r.reasons_agree:
                sim, lab = r.cells["sim"], r.cells["netns"]
                known = r.verdicts_agree and (r.mode, sim.reason, lab.reason) in KNOWN_REASON_GAPS
                print(f"scenario {i}{' (a known reason gap)' if known else ''}:\n{render(rows)}")
                if not known:
                    differ.append(r)
        if differ:
            again = _alone(sc, differ)
            for r in differ:
                a = again[(r.conn, r.mode)]
                lab = (r.cells["netns"].verdict, r.cells["netns"].reason)
                print(f"scenario {i}, {r.conn} under {r.mode}, alone: {render([a]).splitlines()[2]}")
                if a.reasons_agree:
                    under_load.append((i, r.conn, r.mode, lab))
                else:
                    bad.append((i, sc, a))
    k, med, worst = interruption_summary(rows_all)
    print(f"\ncampaign: {len(rows_all)} cells over {N} scenarios; interruption |sim - netns| over {k} surviving "
          f"cells: median {_ms(med)}, worst {_ms(worst)}")
    for mode in dict.fromkeys(r.mode for r in rows_all):
        k, med, worst = interruption_summary([r for r in rows_all if r.mode == mode])
        print(f"campaign: {mode}: interruption |sim - netns| over {k} surviving cells: median {_ms(med)}, "
              f"worst {_ms(worst)}")
    agree = sum(r.verdicts_agree for r in rows_all), sum(r.reasons_agree for r in rows_all)
    print(f"campaign: verdicts agree in {agree[0]}/{len(rows_all)} cells, reasons in {agree[1]}/{len(rows_all)}")
    # cells whose answer raced within the kernel's timer granularity: the simulator gave the lab's at another
    # phase of the timer wheel (counted and shown, so that a campaign leaning on them is seen)
    raced = [(where[j], r.conn, r.mode, r.phases) for j, r in enumerate(rows_all) if r.phases]
    print(f"campaign: {len(raced)} cells agree only at another phase of the timer wheel: {raced}")
    print(f"campaign: {len(under_load)} cells disagreed with the modes in parallel and agreed alone (the lab's "
          f"answer under load first): {under_load}")
    if worst is not None:  # where the interruptions differ most: a place to look, not a failure
        j, r = max(((j, r) for j, r in enumerate(rows_all) if r.interruption_diff_ms() is not None),
                   key=lambda jr: jr[1].interruption_diff_ms())
        print(f"campaign: worst interruption difference in scenario {where[j]}, {r.conn} under {r.mode}: "
              + ", ".join(f"{b} {c.interruption_ms:.0f} ms" for b, c in r.cells.items()))
    assert not bad, [(i, r.conn, r.mode, {b: (c.verdict, c.reason) for b, c in r.cells.items()}) for i, _, r in bad]
