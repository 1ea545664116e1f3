"""The user-space NAT: mapping table, port allocation, inbound mappings, packet rewrite.

Sans-I/O engine (:class:`NatEngine`), answering every packet in the engines' one shape
(:class:`~conntrack.answer.Answer`, reasons :class:`NatReason`, events :mod:`nat.events`);
in :mod:`nat.netfilter`, the driver that feeds it real packets through NFQUEUE.
"""
from conntrack.answer import Action, Answer

from .answers import NatReason, Side, Stage
from .config import ConfigError, Filtering, NatConfig, PortForward, load, parse_nat_conf, parse_toml
from .engine import NatEngine
from .mapping import Mapping

__all__ = ["Action", "Answer", "ConfigError", "Filtering", "Mapping", "NatConfig", "NatEngine", "NatReason",
           "PortForward", "Side", "Stage", "load", "parse_nat_conf", "parse_toml"]
