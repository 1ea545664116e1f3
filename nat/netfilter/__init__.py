"""The NAT as a netfilter plugin: the I/O around :class:`nat.NatEngine`.

* :mod:`.interfaces` -- the external interface's address and index, the internal
  networks, and netlink address events;
* :mod:`.rules` -- the plugin's iptables rules (fail-closed NFQUEUE, hairpin halves);
* :mod:`.queue` -- roam's own NFQUEUE netlink client (GSO super-packets);
* :mod:`.plugin` -- the driver: queue in, engine, verdicts and logged events out.

Nothing here is imported by the engine; the modules import pyroute2, python-iptables
and netfilterqueue only when they are used.
"""


class PluginError(RuntimeError):
    """The plugin cannot start (message says why and what to do)."""
