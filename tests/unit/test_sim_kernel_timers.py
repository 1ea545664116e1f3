"""The kernel's timer wheel and neighbour draws as the simulator plays them (``sim.linux``)."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from sim import linux


@given(st.floats(0, 100), st.floats(0, 40), st.sampled_from(linux.WHEEL_PHASES))
def test_a_timer_never_runs_early_nor_later_than_its_levels_granularity(now, delay, phase):
    fires = linux.timer_fires(now, now + delay, phase)
    assert fires >= now + delay - 1e-9
    ticks = delay * linux.HZ
    granularity = next((8 ** i for i, start in enumerate((63, 504, 4032, 32256)) if ticks < start - 1), 8 ** 4)
    assert fires <= now + delay + (granularity + 1) / linux.HZ + 1e-9


def test_the_wheel_rounds_as_measured_on_the_lab_kernel():
    """The peer's RTO gaps measured in the lab (HZ=250): 204, 208, 412, 836, 1660 ms for 200 ms doubling;
    a router's 250 ms ARP probes 256 ms apart; a 1 s delay_first_probe 1.024 s."""
    assert linux.timer_fires(0.0, 0.2) == pytest.approx(0.204)
    assert 0.404 <= linux.timer_fires(0.0, 0.4) <= 0.432
    assert 0.804 <= linux.timer_fires(0.0, 0.8) <= 0.832
    assert 1.604 <= linux.timer_fires(0.0, 1.6) <= 1.632
    assert linux.timer_fires(0.0, 0.25) == pytest.approx(0.256)
    assert linux.timer_fires(0.0, 1.0) == pytest.approx(1.024)


def test_phases_shift_where_time_zero_falls_in_the_buckets():
    seen = {round(linux.timer_fires(0.0, 1.0, phase), 6) for phase in linux.WHEEL_PHASES}
    assert len(seen) > 1 and all(1.0 < t <= 1.036 for t in seen)


def test_a_reachable_time_is_drawn_within_the_kernels_range():
    p = linux.ROUTER_NEIGH
    assert p.drawn(0.5).reachable == pytest.approx(p.reachable / 2)
    assert p.drawn(1.5).reachable == pytest.approx(1.5 * p.reachable)
    for bad in (0.49, 1.51, float("nan")):
        with pytest.raises(ValueError):
            p.drawn(bad)
