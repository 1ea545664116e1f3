"""The one client schedule (``sim.schedule``) the simulator's connections and the lab's endpoints both follow."""
from __future__ import annotations

from sim.schedule import Schedule, Step, Transport

UP, CONNECTING, BROKEN = Transport.UP, Transport.CONNECTING, Transport.BROKEN


def test_tcp_waits_for_the_handshake_then_one_request_at_a_time():
    s = Schedule(False, 1.0, 5.0, end=10.0, settle=None)
    assert s.tick(0.0, CONNECTING) == Step.WAIT
    s.answered(0.05)  # the connection came up
    assert s.tick(1.0, UP) == Step.SEND and s.awaiting
    assert s.tick(2.0, UP) == Step.WAIT  # still waiting for the answer: no second request
    s.answered(2.1)
    assert not s.awaiting and s.tick(3.0, UP) == Step.SEND


def test_tcp_never_gives_up_itself_the_transport_does():
    s = Schedule(False, 1.0, 5.0, end=100.0, settle=None)
    s.answered(0.0)
    assert s.tick(1.0, UP) == Step.SEND
    assert s.tick(50.0, UP) == Step.WAIT
    assert s.tick(51.0, BROKEN) == Step.STOP


def test_udp_resends_while_unanswered_and_gives_up_after_the_timeout():
    s = Schedule(True, 1.0, 5.0, end=100.0, settle=None)
    assert [s.tick(t, UP) for t in (0.0, 1.0, 2.0, 3.0, 4.0)] == [Step.SEND] * 5
    assert s.waiting_since == 0.0
    assert s.tick(5.0, UP) == Step.GIVE_UP
    s2 = Schedule(True, 1.0, 5.0, end=100.0, settle=None)
    s2.tick(0.0, UP)
    s2.answered(4.9)  # answered in time: the clock starts again at the next request
    assert s2.tick(5.0, UP) == Step.SEND and s2.waiting_since == 5.0


def test_past_the_end_a_client_stops_only_once_answered_after_the_last_move():
    s = Schedule(False, 1.0, 30.0, end=10.0, settle=12.0)  # the last move's downtime ends at 12 s
    s.answered(9.5)
    assert s.tick(10.0, UP) == Step.SEND  # past the end, but not proven: keep asking
    s.answered(11.0)  # during the downtime: not after it
    assert not s.proven() and s.tick(11.5, UP) == Step.SEND
    s.answered(12.3)
    assert s.proven() and s.tick(13.0, UP) == Step.DONE


def test_past_the_end_a_client_with_a_request_out_waits_for_its_answer():
    s = Schedule(False, 1.0, 30.0, end=10.0, settle=None)
    s.answered(0.0)
    assert s.tick(9.5, UP) == Step.SEND
    assert s.tick(10.5, UP) == Step.WAIT
    s.answered(10.7)
    assert s.tick(11.5, UP) == Step.DONE


def test_a_tcp_client_still_connecting_past_the_end_keeps_trying():
    s = Schedule(False, 1.0, 30.0, end=10.0, settle=None)
    assert s.tick(10.5, CONNECTING) == Step.WAIT


def test_a_udp_client_past_the_end_stops_when_answered():
    s = Schedule(True, 1.0, 30.0, end=10.0, settle=None)
    s.tick(9.8, UP)
    s.answered(9.9)
    assert s.tick(10.8, UP) == Step.DONE
