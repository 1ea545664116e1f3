"""The user-space NAT: mapping table, port allocation, inbound mappings, packet rewrite.

Sans-I/O engine (:class:`NatEngine`) plus, in :mod:`nat.plugin`, the netfilter
driver that feeds it real packets through NFQUEUE.
"""
from .config import ConfigError, Filtering, NatConfig, PortForward, load, parse_nat_conf, parse_toml
from .engine import Action, NatEngine, Reason, Side, Stage, Verdict
from .mapping import Mapping

__all__ = ["Action", "ConfigError", "Filtering", "Mapping", "NatConfig", "NatEngine", "PortForward", "Reason",
           "Side", "Stage", "Verdict", "load", "parse_nat_conf", "parse_toml"]
