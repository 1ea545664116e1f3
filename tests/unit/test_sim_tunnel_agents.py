"""The simulator's tunnel mode runs the agents as deployed: one per host from the start, told no MAC."""
from __future__ import annotations

from sim import Outcome, parse_scenario
from sim.run import World
from tunnel import SessionState
from tunnel.wire import parse_mac

from .test_sim_replay import BASE, _move


def test_every_host_has_an_attached_agent_at_time_zero_that_learns_the_vm_where_it_runs():
    sc = parse_scenario(BASE + _move("b1", at=5.0, down_ms=500), "t.toml")
    world = World(sc, "tunnel")
    mode = world.mode
    mode.attach(world.hosts[sc.vm.host])  # what the run does first, at time zero
    assert world.clock.now == 0.0
    assert sorted(mode.agents) == ["a1", "a2", "b1"]
    assert all(a.state == SessionState.ATTACHED and a.macs == () for a in mode.agents.values())
    assert len(mode.proxy.sessions) == 3 and len(mode.proxy.macs) == 0
    world = World(sc, "tunnel")
    run = world.run()
    mode, vm = world.mode, parse_mac(sc.vm.mac)
    assert run.results["t"].outcome == Outcome.SURVIVED
    assert mode.agents["b1"].macs == (vm,) and mode.agents["a1"].macs == ()  # a1 forgot it when it left
    assert mode.agents["a1"].counters["macs_forgotten"] == 1
    assert mode.proxy.macs.lookup(vm) == mode.agents["b1"].session
    c = mode.proxy.counters
    assert c["claim_moves"] + c["presence_moves"] == 2  # nowhere -> a1 (its first frame), nowhere -> b1
