"""The netns backend's verdicts from endpoint logs (``tools.lab.logs.verdicts``, through the one judge): a pure
function of the events the endpoints wrote, so it is tested here on event lists like the ones they write."""
from __future__ import annotations

import pytest

from sim import parse_scenario
from sim.results import Cause, Outcome
from tools.lab.logs import verdicts

SC = """\
[scenario]
duration = 10.0
modes = ["bridged"]
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
name = "b1"
site = "b"
address = "203.0.113.140"
[vm]
host = "a1"
[[peer]]
name = "web"
address = "198.51.100.10"
[[connection]]
id = "t"
peer = "web"
port = 443
start = 1.0
[[migration]]
at = 9.5
to = "b1"
downtime_ms = 500
"""


def _ev(t, ev, who="vm", **kw):
    return {"t": t, "ev": ev, "who": who, "idx": 0, "side": "client" if who == "vm" else "server", **kw}


def _one(events):
    sc = parse_scenario(SC, "t.toml")
    return verdicts(sc, events)["t"]


UP = [_ev(1.0, "established", local=["203.0.113.100", 40000], remote=["198.51.100.10", 443]),
      _ev(1.5, "answer"), _ev(9.0, "answer")]


def test_no_answer_after_the_last_move_is_not_survival():
    # established and never broken, but nothing answered once the VM was back (10.0 s): not shown to survive
    r = _one(UP)
    assert r.outcome == Outcome.BROKEN and r.cause == Cause.TIMED_OUT
    r = _one(UP + [_ev(10.4, "answer")])
    assert r.outcome == Outcome.SURVIVED and r.interruption_ms == pytest.approx(1400)


@pytest.mark.parametrize("err,gone,reason", [
    ("ECONNRESET", False, Cause.RESET_BY_PEER),
    ("ECONNREFUSED", False, Cause.RESET_BY_PEER),
    ("EOF", False, Cause.TIMED_OUT),  # an orderly close is not a reset
    ("EPIPE", False, Cause.TIMED_OUT),  # a write after the end: not by itself the peer's RST
    ("EINVAL", False, Cause.TIMED_OUT),  # generic: unreachable only with the address gone
    ("EINVAL", True, Cause.UNREACHABLE),
    ("EHOSTUNREACH", False, Cause.UNREACHABLE),
])
def test_reasons_from_the_error_an_endpoint_saw(err, gone, reason):
    r = _one(UP + [_ev(10.5, "broken", err=err, address_gone=gone)])
    assert r.outcome == Outcome.BROKEN and r.cause == reason and r.broken_side == "vm"
