"""Where a VM's MAC lives at the proxy: a claim never beats presence.

Two things can say a VM is behind a session: its host end *names* the MAC in an
ATTACH (a claim: given with ``--mac``, or learned from the VM's frames), or the VM's
own frames arrive through the session (presence).  A claim is a belief, presence a
fact; so:

===========================================  =============================================
what happens                                 where the MAC goes
===========================================  =============================================
a frame from the MAC through session S       to S (a move), unless it moved less than
                                             ``flap_hold`` ago (a flap: kept, counted)
an ATTACH of S names the MAC                 to S, unless it *speaks* behind another
                                             session (kept there: ``claims_deferred``)
S's ATTACH stops naming it (withdrawn),      to the newest other session naming it, else
S detaches, expires or is superseded         nowhere (frames for it are flooded)
===========================================  =============================================

A MAC *speaks* behind session O when a frame from it came through O within
``presence`` seconds, or came through O ever and O still names it (its host end still
sees the VM: it forgets a VM whose TAP left its bridge, or which it sees elsewhere).
So a host end that (re-)attaches naming a VM running elsewhere pulls nothing away,
while a VM that moves takes its MAC along with its first frame; two claims with no
frame heard yet: the newest wins, until the VM speaks.  The flap hold bounds how
often one MAC can move (at most once per ``flap_hold``): frames of the old host still
on their way after the VM spoke at the new one do not take it back.  Only authentic,
fresh messages reach any of this: a forged or replayed frame moves nothing.

Every move announces the VM's addresses (gratuitous ARP / unsolicited NA: on the LAN,
and to the other sessions, whose host ends then forget the VM), tells the new session
the LAN's neighbours, and sends it again what was sent toward the old one since the
VM was last heard there (:mod:`tunnel.resend`).

A mixin of :class:`~tunnel.proxy.ProxyEnd`, working on its state (one idea per module).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .events import EventKind, TunnelEvent
from .mactable import LAN, NEVER, MacEntry, port_name
from .resend import SLACK
from .session import SessionState
from .wire import MsgType, format_mac

#: Seconds a frame from a MAC keeps it behind its session against any claim.
PRESENCE = 10.0
#: Seconds after a move during which frames through another session do not move the MAC again.
FLAP_HOLD = 0.5


if TYPE_CHECKING:  # what this mixin uses of ProxyEnd's state, declared for the type checker only
    from .end import End, Session
    from .mactable import MacTable
    from .resend import Resend

    class _ProxyState(End):
        presence: float
        flap_hold: float
        macs: MacTable
        resend: Resend

        def _announce(self, s: Session, mac: bytes, now: float) -> None: ...

        def _tell_neighbours(self, s: Session, now: float) -> None: ...

        def _send(self, s: Session, mtype: MsgType, payload: bytes) -> bool: ...
else:
    _ProxyState = object


class Presence(_ProxyState):
    """The MAC-placing half of :class:`~tunnel.proxy.ProxyEnd` (a mixin)."""

    def _speaks(self, mac: bytes, e: MacEntry, now: float) -> bool:
        """Whether ``mac`` speaks behind the session of its entry ``e`` (see the module's rules)."""
        if e.port == LAN or e.heard == NEVER:
            return False
        if e.heard + self.presence > now:
            return True
        o = self.sessions.get(e.port)
        return o is not None and mac in o.named

    def _heard(self, s, mac: bytes, now: float) -> None:
        """A frame from ``mac`` came, authentic, through ``s``, and ``mac`` did not live there."""
        e = self.macs.entry(mac)
        if e is None:  # new, or released by the session it left: what was kept for it goes along
            self.macs.learn(mac, s.id, now)
            learned = self.macs.entry(mac)
            assert learned is not None  # just learned
            learned.heard = now
            self._resend(mac, s, NEVER, now)
            return
        if e.port != LAN and now - e.moved < self.flap_hold:
            self.counters["mac_flaps"] += 1  # forwarded all the same; the MAC stays
            return
        self._move(mac, s, e, now, heard=True)

    def _claim(self, s, macs: tuple[bytes, ...], moved_endpoint: bool, now: float) -> None:
        """An ATTACH of ``s`` names ``macs``."""
        arrived = False
        for mac in macs:
            e = self.macs.entry(mac)
            if e is not None and e.port == s.id:
                self.macs.learn(mac, s.id, now)  # refreshed, heard kept
                if moved_endpoint:
                    self._announce(s, mac, now)
            elif e is not None and self._speaks(mac, e, now):
                self.counters["claims_deferred"] += 1
                self._events.append(TunnelEvent(EventKind.MAC_KEPT, s.id, now, s.endpoint,
                                                f"{format_mac(mac)} speaks behind session {e.port:08x}"))
            else:
                self._move(mac, s, e, now, heard=False, tell=False)
                arrived = True
        if arrived:
            self._tell_neighbours(s, now)

    def _withdraw(self, s, macs, now: float) -> None:
        """``s`` stopped naming ``macs``: those that live behind it leave it."""
        for mac in macs:
            e = self.macs.entry(mac)
            if e is not None and e.port == s.id:
                self._release(mac, e, now, f"withdrawn by session {s.id:08x}")

    def _release_port(self, port: int, now: float, why: str) -> None:
        """Session ``port`` is gone (already out of :attr:`sessions`): its MACs leave it."""
        for mac, e in [(m, e) for m, e in self.macs.items() if e.port == port]:
            self._release(mac, e, now, why, quiet=True)

    def _release(self, mac: bytes, e: MacEntry, now: float, why: str, quiet: bool = False) -> None:
        """``mac`` leaves its session: to the newest other session that names it, else nowhere (an event
        unless ``quiet``: the session's close says it already)."""
        claimants = [o for o in self.sessions.values()
                     if o.id != e.port and o.state == SessionState.ATTACHED and mac in o.named]
        if claimants:
            self._move(mac, max(claimants, key=lambda o: o.created), e, now, heard=False)
            return
        self.macs.forget(mac)  # its kept frames wait (within the window) for where it turns up
        self.counters["macs_released"] += 1
        if not quiet:
            self._events.append(TunnelEvent(EventKind.MAC_MOVED, e.port, now, None,
                                            f"{format_mac(mac)} to nowhere ({why})"))

    def _move(self, mac: bytes, s, e: MacEntry | None, now: float, heard: bool, tell: bool = True) -> None:
        """Put ``mac`` behind ``s`` (from entry ``e``'s port, or nowhere), and do what a move does."""
        old = None if e is None else e.port
        since = NEVER if e is None or e.heard == NEVER else e.heard - SLACK
        self.macs.learn(mac, s.id, now)
        n = self.macs.entry(mac)
        assert n is not None  # just learned
        n.heard = now if heard else NEVER
        if old is not None and old != LAN:
            n.moved = now
        self.counters["presence_moves" if heard else "claim_moves"] += 1
        self._events.append(TunnelEvent(EventKind.MAC_MOVED, s.id, now, s.endpoint,
                                        f"{format_mac(mac)} from {port_name(old)}{' (heard)' if heard else ''}"))
        if old != LAN:
            self._resend(mac, s, since, now)
        self._announce(s, mac, now)
        if tell:
            self._tell_neighbours(s, now)

    def _resend(self, mac: bytes, s, since: float, now: float) -> None:
        """Send ``s`` what was sent toward ``mac``'s old place since ``since`` (:mod:`tunnel.resend`)."""
        frames = self.resend.take(mac, since, now)
        for f in frames:
            if self._send(s, MsgType.DATA, f):
                self.counters["resent_frames"] += 1
                self.counters["resent_bytes"] += len(f) - self.vnet
        if frames:
            self.counters["resends"] += 1

