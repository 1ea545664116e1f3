"""The one survival judge (``sim.judge``), fed observation scripts directly: each test reads top to bottom
as what the endpoints saw, then the verdict it must give."""
from __future__ import annotations

import random

import pytest

from sim.judge import LATE, Move, Observation, Seen, judge, settle, timeline_runs
from sim.results import Cause, Outcome

MOVE = (Move(10.0, 0.5),)  # the VM leaves at 10 s and is back at 10.5 s


def O(t, seen, by="vm", where=None):  # noqa: E743 - reads as a script line
    return Observation(t, seen, by, where)


def verdict(*obs, moves=MOVE, interval=1.0):
    return judge("c", obs, moves, interval)


UP = (O(1.0, Seen.ESTABLISHED), O(2.0, Seen.ANSWERED), O(9.0, Seen.ANSWERED))


def test_answered_after_the_move_survives_with_the_stall_measured():
    r = verdict(*UP, O(11.2, Seen.ANSWERED), O(12.0, Seen.ANSWERED))
    assert r.outcome == Outcome.SURVIVED and r.cause is None and r.established
    assert r.interruption_ms == pytest.approx(2200)  # last answer 9.0 -> first after the move 11.2
    assert r.broken_at is None and r.broken_side is None


def test_neither_answered_after_the_move_nor_broken_is_not_survival():
    # the rule "survived requires an answer after the last move": a connection nobody saw break, but that
    # nothing showed working once the VM was back, was cut short by the run -- broken, timed out
    r = verdict(*UP)
    assert r.outcome == Outcome.BROKEN and r.cause == Cause.TIMED_OUT
    assert r.interruption_ms is None and r.broken_at is None
    # an answer during the downtime is not after the move either
    assert verdict(*UP, O(10.4, Seen.ANSWERED)).outcome == Outcome.BROKEN
    # the last of several moves counts
    two = (Move(10.0, 0.5), Move(20.0, 0.5))
    assert verdict(*UP, O(11.0, Seen.ANSWERED), moves=two).outcome == Outcome.BROKEN
    assert verdict(*UP, O(11.0, Seen.ANSWERED), O(21.0, Seen.ANSWERED), moves=two).outcome == Outcome.SURVIVED


def test_without_moves_an_established_unbroken_connection_survives():
    r = verdict(O(1.0, Seen.ESTABLISHED), moves=())
    assert r.outcome == Outcome.SURVIVED and r.interruption_ms == 0
    assert settle(()) is None and settle(MOVE) == 10.5


def test_never_established_is_broken_even_unbroken():
    r = verdict(O(1.0, Seen.LOST), moves=())
    assert r.outcome == Outcome.BROKEN and not r.established and r.cause == Cause.TIMED_OUT


def test_a_break_after_answers_past_the_move_is_still_broken():
    r = verdict(*UP, O(11.0, Seen.ANSWERED), O(15.0, Seen.GAVE_UP, "peer"))
    assert r.outcome == Outcome.BROKEN and r.broken_at == 15.0 and r.broken_side == "peer"
    assert r.interruption_ms is None


def test_a_reset_as_the_first_break_is_reset_by_peer_whatever_else_was_seen():
    r = verdict(*UP, O(10.6, Seen.UNREACHABLE), O(11.0, Seen.RESET), O(12.0, Seen.GAVE_UP, "peer"))
    assert r.cause == Cause.RESET_BY_PEER and r.broken_at == 11.0 and r.broken_side == "vm"
    # a reset that is not the first break does not make it one
    r = verdict(*UP, O(11.0, Seen.GAVE_UP), O(12.0, Seen.RESET, "peer"))
    assert r.cause == Cause.TIMED_OUT and r.broken_side == "vm"


@pytest.mark.parametrize("losses,cause", [
    ((Seen.UNREACHABLE,), Cause.UNREACHABLE),
    ((Seen.NO_MAPPING,), Cause.NO_INBOUND_MAPPING),
    ((Seen.LOST,), Cause.TIMED_OUT),
    ((), Cause.TIMED_OUT),
    ((Seen.UNREACHABLE, Seen.LOST), Cause.TIMED_OUT),  # the last loss says where packets died
    ((Seen.LOST, Seen.UNREACHABLE), Cause.UNREACHABLE),
    ((Seen.NO_MAPPING, Seen.UNREACHABLE), Cause.UNREACHABLE),
])
def test_a_timeout_takes_its_cause_from_the_last_loss_or_error_seen(losses, cause):
    obs = [O(10.2 + i, s) for i, s in enumerate(losses)]
    r = verdict(*UP, *obs, O(30.0, Seen.GAVE_UP))
    assert r.outcome == Outcome.BROKEN and r.cause == cause


def test_stalls_span_moves_too_close_for_progress_in_between_and_not_a_break_before_the_move():
    two = (Move(10.0, 0.5), Move(10.8, 0.5))
    r = verdict(*UP, O(12.0, Seen.ANSWERED), moves=two)
    assert r.interruption_ms == pytest.approx(3000)  # 9.0 -> 12.0: one stall across both moves
    # the longest of separate stalls
    apart = (Move(10.0, 0.5), Move(20.0, 0.5))
    r = verdict(*UP, O(11.0, Seen.ANSWERED), O(19.5, Seen.ANSWERED), O(23.5, Seen.ANSWERED), moves=apart)
    assert r.interruption_ms == pytest.approx(4000)


def test_runs_of_steady_progress_split_where_answers_stop():
    r = verdict(O(1.0, Seen.ESTABLISHED), O(2.0, Seen.ANSWERED), O(3.0, Seen.ANSWERED), O(11.0, Seen.ANSWERED),
                O(12.0, Seen.ANSWERED))
    assert r.runs == ((1.0, 3.0), (11.0, 12.0))  # slack 1.5 * interval + 0.25


def test_the_peer_saw_each_new_source_once_in_order():
    r = verdict(*UP, O(1.0, Seen.PEER_SAW, "peer", ("203.0.113.100", 40000)),
                O(2.0, Seen.PEER_SAW, "peer", ("203.0.113.100", 40000)),
                O(11.0, Seen.PEER_SAW, "peer", ("203.0.113.200", 40000)), O(11.0, Seen.ANSWERED))
    assert r.peer_saw == ((1.0, "203.0.113.100", 40000), (11.0, "203.0.113.200", 40000))


def test_the_order_observations_come_in_does_not_matter():
    script = [*UP, O(10.3, Seen.LOST), O(11.0, Seen.ANSWERED), O(11.0, Seen.PEER_SAW, "peer", ("198.51.100.1", 5)),
              O(14.0, Seen.ANSWERED)]
    want = judge("c", script, MOVE, 1.0)
    for seed in range(5):
        shuffled = script[:]
        random.Random(seed).shuffle(shuffled)
        assert judge("c", shuffled, MOVE, 1.0) == want


def test_an_answer_at_the_instant_the_downtime_ends_is_not_after_it():
    assert verdict(*UP, O(10.5, Seen.ANSWERED)).outcome == Outcome.BROKEN
    assert verdict(*UP, O(10.5, Seen.ANSWERED), O(10.51, Seen.ANSWERED)).outcome == Outcome.SURVIVED


def test_the_verdict_names_the_connection_and_when_it_came_up():
    r = judge("tcp-1", (O(1.5, Seen.ESTABLISHED), O(2.0, Seen.ANSWERED)), (), 1.0)
    assert (r.id, r.established, r.established_at) == ("tcp-1", True, 1.5)
    r = judge("udp-2", (O(3.0, Seen.LOST),), (), 1.0)
    assert (r.id, r.established, r.established_at) == ("udp-2", False, None)


def test_an_answer_at_the_instant_of_the_move_is_after_it():
    """The VM leaves at ``at``: progress seen at that instant ends the stall (as the timeline draws it)."""
    r = verdict(*UP, O(10.0, Seen.ANSWERED), O(12.0, Seen.ANSWERED))
    assert r.interruption_ms == pytest.approx(1000)  # 9.0 -> 10.0, not 10.0 -> 12.0
    assert r.runs == ((1.0, 2.0), (9.0, 9.0), (10.0, 10.0), (12.0, 12.0))


def test_timeline_runs_split_at_late_answers_and_at_every_move():
    assert timeline_runs([1.0, 2.0, 2.0 + LATE, 3.0 + 2 * LATE], (), 1.0) == ((1.0, 2.0 + LATE), (3.0 + 2 * LATE,) * 2)
    assert timeline_runs([0.0, 0.5, 1.0], (), 0.4) == ((0.0, 1.0),)  # late is counted in intervals
    assert timeline_runs([0.0, 0.5, 1.0], (), 0.36) == ((0.0, 0.0), (0.5, 0.5), (1.0, 1.0))
    # a move splits a run even where answers kept coming on time; a move at the very answer splits before it
    assert timeline_runs([1.0, 2.0, 3.0, 4.0], (Move(2.5, 0.1), Move(4.0, 0.1)), 1.0) == (
        (1.0, 2.0), (3.0, 3.0), (4.0, 4.0))
    assert timeline_runs([3.0, 1.0, 2.0], (Move(1.0, 0.1),), 1.0) == ((1.0, 3.0),)  # a move at the first answer
