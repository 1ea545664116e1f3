"""One scenario connection while a mode plays it: the application on top of the simulated sockets.

The client follows the one client schedule (``sim.schedule``, shared with the
namespace lab's endpoints); the server side answers each request.  A connection only
*records* what its sockets report (established, answered, reset, gave up), what the
peer saw, and where the network last lost its packets; the one judge
(``sim.judge``) turns that record into the verdict, as it does for the lab's logs.
(Not conntrack's flow: that is a tracked 5-tuple.)
"""
from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Iterable

from conntrack import Proto

from .judge import Move, Observation, Seen, judge, settle
from .results import ConnResult
from .schedule import Schedule, Step, Transport
from .stack import SockState, TcpSock, UdpSock
from .world import Clock, Loss, UNREACHABLE_LOSSES

if TYPE_CHECKING:
    from .scenario import ConnSpec
    from .world import Network


def seen_of_loss(loss: Loss) -> Seen:
    """What a loss tells the judge: unreachable (a router or the sender's stack would say so), no
    mapping at a NAT, or just lost."""
    if loss in UNREACHABLE_LOSSES:
        return Seen.UNREACHABLE
    return Seen.NO_MAPPING if loss == Loss.NO_MAPPING else Seen.LOST


class Connection:
    __slots__ = ("tag", "spec", "clock", "moves", "schedule", "udp", "sock", "established_at", "broken_at",
                 "broken_state", "broken_client", "seen", "_saw")

    def __init__(self, tag: int, spec: "ConnSpec", clock: Clock, end: float, timeout: float,
                 moves: Iterable[Move] = ()) -> None:
        self.tag = tag
        self.spec = spec
        self.clock = clock
        self.moves = tuple(moves)
        self.udp = spec.protocol == Proto.UDP
        self.schedule = Schedule(self.udp, spec.interval, timeout, end, settle(self.moves))
        self.sock: TcpSock | UdpSock | None = None  # the client socket (opened by the run)
        self.established_at: float | None = None
        self.broken_at: float | None = None
        self.broken_state: SockState | None = None
        self.broken_client = True
        self.seen: list[Observation] = []  # for the judge
        self._saw: tuple[bytes, int] | None = None

    @property
    def timeout(self) -> float:
        return self.schedule.timeout

    def _by(self, client: bool) -> str:
        """Whose endpoint: the VM's or the peer's."""
        return "vm" if client == (self.spec.direction == "outbound") else "peer"

    # ------------------------------------------------------------ socket callbacks
    def on_established(self, now: float, sock) -> None:
        if sock.client and self.established_at is None:
            self.established_at = now
            self.schedule.answered(now)
            self.seen.append(Observation(now, Seen.ESTABLISHED))

    def on_data(self, now: float, sock, n: int) -> None:
        if sock.client:
            if self.udp and self.established_at is None:
                self.established_at = now
                self.seen.append(Observation(now, Seen.ESTABLISHED))
            self.schedule.answered(now)
            self.seen.append(Observation(now, Seen.ANSWERED))
        elif not self.udp:
            sock.send(self.spec.response)

    def on_broken(self, now: float, state: SockState, client: bool) -> None:
        if self.broken_at is None:
            self.broken_at = now
            self.broken_state = state
            self.broken_client = client
            self.seen.append(Observation(now, Seen.RESET if state == SockState.RESET else Seen.GAVE_UP,
                                         self._by(client)))

    def on_peer_saw(self, now: float, src: bytes, sport: int) -> None:
        if self._saw != (src, sport):
            self._saw = (src, sport)
            self.seen.append(Observation(now, Seen.PEER_SAW, "peer", (str(ipaddress.IPv4Address(src)), sport)))

    # ------------------------------------------------------------ the client application
    @staticmethod
    def tick(conn: "Connection", _=None) -> None:
        now = conn.clock.now
        sock = conn.sock
        assert sock is not None  # the run opens it before the first tick
        if sock.stack.holds(now):  # the client's machine is paused: its timer runs when it runs again
            sock.stack.defer(Connection.tick, conn)
            return
        if conn.broken_at is not None:
            transport = Transport.BROKEN
        elif isinstance(sock, UdpSock) or sock.state == SockState.ESTABLISHED:  # UDP: conn.udp
            transport = Transport.UP
        else:
            transport = Transport.CONNECTING if sock.alive else Transport.BROKEN
        step = conn.schedule.tick(now, transport)
        if step == Step.SEND:
            sock.send(conn.spec.request)
        elif step == Step.GIVE_UP:
            conn.on_broken(now, SockState.TIMED_OUT, True)
            return
        elif step != Step.WAIT:
            return
        conn.clock.after(conn.spec.interval, Connection.tick, conn)

    # ------------------------------------------------------------ the verdict
    def result(self, net: "Network") -> ConnResult:
        """The judge's verdict on what was recorded, with where the network last lost this connection's packets."""
        seen = self.seen
        loss = net.losses.get(self.tag)
        if loss is not None:
            seen = [*seen, Observation(net.lost_at[self.tag], seen_of_loss(loss))]
        return judge(self.spec.id, seen, self.moves, self.spec.interval)
