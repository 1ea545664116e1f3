"""The migration simulator: which of a VM's connections survive its moves, under each mode.

A discrete-event world (``sim.world``) with simulated time, sites, hosts, a VM and
remote peers; packets are real IPv4 bytes (``sim.wire``) that move through the real
``conntrack``, ``nat`` and ``tunnel`` engines (``sim.modes``); small TCP/UDP
endpoints (``sim.stack``) decide survival from what actually arrives.  Scenarios
come from TOML files (``sim.scenario``); ``sim.strategies`` has hypothesis
strategies that generate them.

    from sim import load_scenario, replay
    report = replay(load_scenario("examples/scenarios/basic.toml"))
"""
from .modes import EngineUnavailable
from .results import MODES, ConnInfo, ConnResult, ModeRun, Reason, Report, Verdict
from .run import World, replay, run_mode
from .scenario import (
    ConnSpec, ForwardSpec, HostSpec, MigrationSpec, PeerSpec, Scenario, ScenarioError, SiteSpec, VmSpec,
    load_scenario, parse_scenario,
)
from .world import Loss

__all__ = [
    "ConnInfo", "ConnResult", "ConnSpec", "EngineUnavailable", "ForwardSpec", "HostSpec", "Loss", "MODES",
    "MigrationSpec", "ModeRun", "PeerSpec", "Reason", "Report", "Scenario", "ScenarioError", "SiteSpec",
    "Verdict", "VmSpec", "World", "load_scenario", "parse_scenario", "replay", "run_mode",
]
