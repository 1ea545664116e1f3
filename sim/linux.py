"""What Linux does, as numbers and small pure functions the simulator's stacks and routers share.

The simulator's verdicts are checked against the kernel (the netns and qemu backends), so
its endpoints and routers follow the kernel's rules, each named after the kernel function
or RFC it follows.  Nothing here reads a clock: time is passed in.

* the retransmission timeout: ``tcp_rtt_estimator`` / ``__tcp_set_rto`` (RFC 6298 with a
  200 ms floor on the variance term), initial 1 s, back-off doubling up to 120 s
  (``tcp_retransmit_timer``), linear SYN timeouts (``tcp_syn_linear_timeouts``), the
  last timer cut to TCP_USER_TIMEOUT (``tcp_clamp_rto_to_user_timeout``), the tail loss
  probe before the first RTO (``tcp_schedule_loss_probe``);
* ICMP errors: ``icmp_err_convert`` (errno, fatal) per destination-unreachable code,
  RFC 1122 4.2.3.9 soft errors, RFC 6069 back-off revert (``tcp_ld_RTO_revert``);
* neighbour resolution (``neigh_timer_handler``): how long a router keeps sending to a
  machine that left, and when it gives up with ICMP host unreachable;
* ICMP rate limiting (``icmpv4_xrlim_allow``: a token bucket per destination).
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, replace
from typing import NamedTuple

# ------------------------------------------------------------------ TCP timers (include/net/tcp.h)
TCP_TIMEOUT_INIT = 1.0  # RFC 6298 2.1
TCP_RTO_MIN = 0.2
TCP_RTO_MAX = 120.0
TCP_SYN_LINEAR_TIMEOUTS = 4  # net.ipv4.tcp_syn_linear_timeouts (6.x): the first SYN retransmissions do not back off


@dataclass(slots=True)
class Rto:
    """One socket's RTT estimate and retransmission timeout, as ``tcp_rtt_estimator`` and
    ``__tcp_set_rto`` keep them: rto = srtt + max(4 * rttvar, TCP_RTO_MIN), the first sample
    giving rttvar = sample / 2 (RFC 6298 2.2), later ones 2.3.  ``backoff`` counts the
    doublings since the last new acknowledgement (``icsk_backoff``)."""

    srtt: float = 0.0
    rttvar: float = 0.0
    backoff: int = 0

    def base(self) -> float:
        """The un-backed-off timeout (``__tcp_set_rto``, or TCP_TIMEOUT_INIT before any sample)."""
        if not self.srtt:
            return TCP_TIMEOUT_INIT
        return min(self.srtt + max(4 * self.rttvar, TCP_RTO_MIN), TCP_RTO_MAX)

    def current(self) -> float:
        """The timeout with its back-off (``inet_csk_rto_backoff``)."""
        return min(self.base() * (1 << min(self.backoff, 31)), TCP_RTO_MAX)

    def sample(self, rtt: float) -> None:
        """A round-trip sample of a segment sent once (Karn): RFC 6298 2.2/2.3."""
        if not self.srtt:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def acked(self) -> None:
        """New data acknowledged: the back-off ends (``tcp_ack`` -> ``icsk_backoff = 0``)."""
        self.backoff = 0

    def back_off(self, syn_sent: bool, retransmits: int) -> None:
        """After the ``retransmits``-th retransmission (``tcp_retransmit_timer``): double, except
        for the first SYN retransmissions (``sysctl_tcp_syn_linear_timeouts``)."""
        if not syn_sent or retransmits > TCP_SYN_LINEAR_TIMEOUTS:
            self.backoff += 1  # unbounded, as icsk_backoff: a revert past the cap changes nothing

    def revert(self) -> bool:
        """RFC 6069 (``tcp_ld_RTO_revert``): undo one back-off step; False when there is none."""
        if not self.backoff:
            return False
        self.backoff -= 1
        return True


def loss_probe_timeout(srtt: float, rto: float) -> float:
    """``tcp_schedule_loss_probe`` (RFC 8985 7.2, net.ipv4.tcp_early_retrans = 3): a tail loss probe
    2 srtt + TCP_RTO_MIN after the last segment when it is the only one in flight, never later than
    the RTO would fire.  The probe neither backs off nor counts as a retransmission: the RTO is
    re-armed from it, and TCP_USER_TIMEOUT counts from the first RTO retransmission (measured on
    Linux 6.18: data sent at T, probe T+0.21, RTO retransmissions T+0.42, 0.85, 1.68, 3.35)."""
    if not srtt:
        return TCP_TIMEOUT_INIT
    return min(2 * srtt + TCP_RTO_MIN, rto)


def clamp_to_user_timeout(rto: float, first_sent: float, user_timeout: float, now: float) -> float:
    """``tcp_clamp_rto_to_user_timeout``: the next timer never waits past the user timeout
    (counted from retrans_stamp: a SYN's first transmission, data's first RTO retransmission)."""
    remaining = first_sent + user_timeout - now
    if remaining <= 0:
        return 0.001  # "fire ASAP": one jiffy
    return min(rto, remaining)


# ------------------------------------------------------------------ ICMP (net/ipv4/icmp.c)
ICMP_DEST_UNREACH = 3
ICMP_TIME_EXCEEDED = 11
ICMP_NET_UNREACH, ICMP_HOST_UNREACH, ICMP_PROT_UNREACH, ICMP_PORT_UNREACH = 0, 1, 2, 3


class IcmpErr(NamedTuple):
    errno: int
    fatal: bool  # a hard error (RFC 1122 4.2.3.9): ends even an established connection's attempts


#: ``icmp_err_convert``: destination unreachable code -> (errno, fatal)
ICMP_ERR_CONVERT: tuple[IcmpErr, ...] = (
    IcmpErr(errno.ENETUNREACH, False), IcmpErr(errno.EHOSTUNREACH, False), IcmpErr(errno.ENOPROTOOPT, True),
    IcmpErr(errno.ECONNREFUSED, True), IcmpErr(errno.EMSGSIZE, False), IcmpErr(errno.EOPNOTSUPP, False),
    IcmpErr(errno.ENETUNREACH, True), IcmpErr(errno.EHOSTDOWN, True), IcmpErr(errno.ENONET, True),
    IcmpErr(errno.ENETUNREACH, True), IcmpErr(errno.EHOSTUNREACH, True), IcmpErr(errno.ENETUNREACH, False),
    IcmpErr(errno.EHOSTUNREACH, False), IcmpErr(errno.EHOSTUNREACH, True), IcmpErr(errno.EHOSTUNREACH, True),
    IcmpErr(errno.EHOSTUNREACH, True),
)


def icmp_error(icmp_type: int, code: int) -> IcmpErr | None:
    """The error an ICMP message means to a socket (``tcp_v4_err``/``__udp4_lib_err``); None: ignored."""
    if icmp_type == ICMP_DEST_UNREACH and 0 <= code < len(ICMP_ERR_CONVERT):
        return ICMP_ERR_CONVERT[code]
    if icmp_type == ICMP_TIME_EXCEEDED:
        return IcmpErr(errno.EHOSTUNREACH, False)
    return None


def reverts_backoff(icmp_type: int, code: int) -> bool:
    """RFC 6069 4: only net and host unreachable undo a back-off step (``tcp_v4_err``)."""
    return icmp_type == ICMP_DEST_UNREACH and code in (ICMP_NET_UNREACH, ICMP_HOST_UNREACH)


#: The errors an application that wants to go on treats as passing reports (the lab's endpoint
#: program, ``tools.lab.endpoint.SOFT_ERRORS``): anything else read from a socket ends it.
SOFT_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN})
#: The errors that say the destination (or the route to it) is unreachable.
UNREACHABLE_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENONET})

ICMP_RATELIMIT = 1.0  # net.ipv4.icmp_ratelimit (ms -> s)
XRLIM_BURST_FACTOR = 6


@dataclass(slots=True)
class IcmpLimiter:
    """``icmpv4_xrlim_allow`` / ``inet_peer_xrlim_allow``: per destination, a token bucket of
    ``XRLIM_BURST_FACTOR`` messages refilled at one per ``interval`` (0: no limit, as the lab's
    routers are set)."""

    interval: float = ICMP_RATELIMIT
    tokens: dict | None = None

    def allow(self, dst: bytes, now: float) -> bool:
        if self.interval <= 0:
            return True
        if self.tokens is None:
            self.tokens = {}
        cap = XRLIM_BURST_FACTOR * self.interval
        have, last = self.tokens.get(dst, (cap, now))
        have = min(cap, have + (now - last))
        if have < self.interval:
            self.tokens[dst] = (have, now)
            return False
        self.tokens[dst] = (have - self.interval, now)
        return True


# ------------------------------------------------------------------ timers (kernel/time/timer.c)
#: CONFIG_HZ of Debian's kernels (and of the lab's): the tick that timer_list timers fire on.
HZ = 250
#: The timer wheel's levels: a timer ``delta`` ticks away goes to the first level whose start exceeds
#: it (``LVL_START``), and fires at that level's next bucket boundary (granularity 8**level ticks).
_WHEEL_STARTS = (63, 504, 4032, 32256)


def timer_fires(now: float, expires: float, phase: float = 0.0) -> float:
    """When a ``timer_list`` armed at ``now`` to expire at ``expires`` really runs (seconds).

    ``calc_wheel_index``/``calc_index``: the expiry is taken in ticks and rounded *up* to its
    level's granularity, never early: a 250 ms timer (63 ticks) runs after 256-284 ms, a 1 s one
    1.004-1.032 s later.  Whether a sender hears ICMP before it gives up can hang on those few ms.
    ``phase``: where time zero falls in the wheel's buckets (a lab run's is not known: the
    campaign tries several, ``WHEEL_PHASES``).
    """
    j_now = int((now + phase) * HZ + 1e-9)
    j_exp = max(j_now, -int(-((expires + phase) * HZ - 1e-9) // 1))
    delta = j_exp - j_now
    level = next((i for i, start in enumerate(_WHEEL_STARTS) if delta < start), len(_WHEEL_STARTS))
    shift = 3 * level
    return (((j_exp >> shift) + 1) << shift) / HZ - phase


#: Phases of time zero against the wheel to try, one tick apart across a level-1 bucket (8 ticks):
#: where the most timers of a scenario (0.25-2 s) are rounded.
WHEEL_PHASES = tuple(k / HZ for k in range(8))


# ------------------------------------------------------------------ neighbours (net/core/neighbour.c)
class ConfirmingSegment(bytes):
    """A TCP segment sent while its socket had a neighbour confirmation pending (an ACK made forward
    progress: ``sk_dst_confirm``): ``skb->dst_pending_confirm``.

    Each hop's ``ip_finish_output2`` confirms its next hop's neighbour entry with it
    (``sock_confirm_neigh``).  On a real network only the sender's own hop sees the skb; between
    namespaces joined by veths the skb itself travels on (``skb_scrub_packet`` keeps the bit), so
    the lab's routers keep a TCP peer's neighbour REACHABLE with no ARP probe, and UDP's not
    (measured with ``ip -s neigh``).  The simulator plays that only on the lab's network
    (``sim.world.Network.skb_crosses``).
    """

    __slots__ = ()


#: ``neigh_rand_reach_time``: the reachable time in force is drawn in [base/2, 3*base/2).
DRAW_MIN, DRAW_MAX = 0.5, 1.5


@dataclass(frozen=True, slots=True)
class NeighParams:
    """``neigh_parms`` of an interface, in seconds.  ``reachable`` is the reachable time in force.

    The kernel keeps one per interface, drawn in [base/2, 3*base/2] from base_reachable_time
    (``neigh_rand_reach_time``: at each write of the sysctl, and again every 300 s for every
    interface).  Whether a vanished machine's sender hears ICMP host unreachable before its
    give-up time can hang on that draw, so the simulator plays the mean unless told the draw
    (:meth:`drawn`; the lab backends read theirs from the kernel).
    """

    reachable: float = 30.0  # base_reachable_time_ms
    delay_first_probe: float = 5.0  # delay_first_probe_time
    retrans: float = 1.0  # retrans_time_ms
    ucast_probes: int = 3  # ucast_solicit
    mcast_probes: int = 3  # mcast_solicit
    queue: int = 101  # unres_qlen: packets held while resolving

    def drawn(self, factor: float) -> "NeighParams":
        """These parameters with the kernel's draw of the reachable time, ``factor`` x base."""
        if not DRAW_MIN <= factor <= DRAW_MAX:
            raise ValueError(f"a reachable-time draw is in [{DRAW_MIN}, {DRAW_MAX}] x base, not {factor}")
        return replace(self, reachable=self.reachable * factor)

    def incomplete_probes(self) -> int:
        """Probes sent for a new entry before it fails: ``neigh_max_probes`` minus the ucast start."""
        return self.mcast_probes

    def probe_probes(self) -> int:
        """Unicast probes of a stale entry (NUD_PROBE) before it fails (mcast_reprobes = 0)."""
        return self.ucast_probes


#: Linux's defaults (a fresh machine; the VM's and the peers' own stacks).
LINUX_NEIGH = NeighParams()
#: The lab's routers (``tools.lab.topology.INET_NEIGH``): a vanished neighbour is given up within
#: about two seconds.  The simulator's site gateways use the same, so both backends' routers
#: answer a machine that left with ICMP host unreachable at the same pace.
ROUTER_NEIGH = NeighParams(reachable=1.0, delay_first_probe=1.0, retrans=0.25)
