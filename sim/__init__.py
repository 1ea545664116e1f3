"""The migration simulator: which of a VM's connections survive its moves, under each mode.

A discrete-event world (``sim.world``) with simulated time, sites, hosts, a VM and
remote peers; packets are real IPv4 bytes (built by ``conntrack.build``, read by
``conntrack.parse_ip``) that move through the real ``conntrack``, ``nat`` and
``tunnel`` engines (``sim.modes``); small TCP/UDP endpoints (``sim.stack``) report
what actually arrives, each connection (``sim.connection``) follows the one client
schedule (``sim.schedule``), and the one judge (``sim.judge``, shared with the
namespace lab) turns what was observed into survived or broken.  Scenarios are
frozen values (``sim.scenario``) read from TOML (``sim.scenario_toml``).

    from sim import load_scenario, replay
    report = replay(load_scenario("examples/scenarios/basic.toml"))
"""
from .modes import EngineUnavailable
from .judge import Move, Observation, Seen, judge
from .results import MODES, Cause, ConnInfo, ConnResult, ModeRun, Outcome, Report
from .run import World, replay, run_mode
from .scenario import (
    ConnSpec, ForwardSpec, HostSpec, MigrationSpec, PeerSpec, Scenario, ScenarioError, SiteSpec, VmSpec,
)
from .scenario_toml import load_scenario, parse_scenario, to_toml
from .world import Loss

__all__ = [
    "Cause", "ConnInfo", "ConnResult", "ConnSpec", "EngineUnavailable", "ForwardSpec", "HostSpec", "Loss", "MODES",
    "MigrationSpec", "ModeRun", "Move", "Observation", "Outcome", "PeerSpec", "Report", "Scenario",
    "ScenarioError", "Seen", "SiteSpec", "VmSpec", "World", "judge", "load_scenario", "parse_scenario", "replay",
    "run_mode", "to_toml",
]
