"""The words of the NAT's answers: where a packet came from, which part of the
translation a call does, and why a packet got its answer.

The answer itself is the engines' one shape, :class:`conntrack.answer.Answer`; its
``reason`` is a :class:`NatReason`, which a driver counts by name.
"""
from __future__ import annotations

from enum import IntEnum


class Side(IntEnum):
    """Where a packet came from."""

    INTERNAL = 0  # from the internal network: outbound (or hairpinned)
    EXTERNAL = 1  # from the external interface: inbound


class Stage(IntEnum):
    """Which part of the translation this call does.

    FULL does it all (NFQUEUE on the external interface, offline captures).  A hairpinned
    packet in the kernel is done in two halves so that the kernel's tracker sees one
    consistent tuple between them: HAIRPIN_DST before routing (to the external address:
    the destination becomes the internal target), HAIRPIN_SRC as it leaves toward the
    inside (the source becomes the external address and port).
    """

    FULL = 0
    HAIRPIN_DST = 1
    HAIRPIN_SRC = 2


class NatReason(IntEnum):
    """Why a packet got its answer (drops are counted per reason, as ``dropped_<name>``)."""

    TRANSLATED = 0
    HAIRPINNED = 1
    ICMP_ERROR_TRANSLATED = 2
    HOST_FLOW = 3  # the NAT host's own traffic on the external address (from it, or to it with
    #               no mapping when a host stack stands behind it): tracked, not rewritten
    NOT_OURS = 4  # a hairpin-stage packet that is no hairpin (e.g. to the host itself): passed as it is
    MALFORMED = 10  # did not parse: ParseError
    NOT_IPV4 = 11
    NO_EXTERNAL_ADDRESS = 12  # the external interface has no address (yet / any more)
    NOT_INTERNAL_SOURCE = 13  # outbound packet whose source is not in the internal network
    NOT_EXTERNAL_ADDRESS = 14  # inbound packet not addressed to the external address
    UNSUPPORTED_PROTOCOL = 15  # no ports or query id to map (GRE, ICMP other than echo/errors...)
    NO_MAPPING = 16  # inbound with no mapping and no state
    FILTERED = 17  # a mapping exists but its filtering refuses this remote endpoint
    POOL_FULL = 18
    TABLE_FULL = 19
    INVALID = 20  # the tracker calls it invalid (TCP segment that fits no state, stray reply)
    ICMP_NO_FLOW = 21  # ICMP error quoting a flow we do not know
    FRAGMENT_WITHOUT_HEAD = 22
    WRONG_SIDE = 23  # a known tuple arriving from the side it cannot come from
    HAIRPIN_DISABLED = 24
    HOST_PORT_CLASH = 25  # the host's own flow uses a port a mapping holds
