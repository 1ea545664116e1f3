"""The proxy end of the tunnel: the home LAN's side, serving many host ends and VMs.

Sans-I/O: the driver feeds it messages from host ends with the endpoint they came
from (:meth:`ProxyEnd.receive`; an endpoint is any hashable the driver can send
to: a UDP ``(ip, port)``, a TCP connection id), frames read from its TAP on the
home-LAN bridge (:meth:`ProxyEnd.from_lan`) and the time.  Every call answers with
one :class:`~conntrack.answer.Answer`: ``data`` is the frame for the home LAN when
the input goes there, ``sends`` are ``(endpoint, message)`` for host ends and
``("lan", frame)`` for the proxy's own LAN frames (announcements), ``events`` what
happened.

* Sessions are keyed by session id, each with its own key (see :mod:`tunnel.crypto`),
  and created only by an authentic ATTACH carrying a cookie of this run, at most
  :data:`~tunnel.wire.COOKIE_LIFETIME` old, sealed under the session key.  Any other
  authentic ATTACH for an unknown session draws an EPOCH (a challenge: a fresh
  nonce and cookie), smaller than it, and changes nothing: the answer is CONSUME
  for :attr:`Cause.CHALLENGE`, which proves nothing about the sender (see
  :func:`tunnel.events.proves_peer`).  A message of a session we do not know draws
  a RESET (rate-limited, never larger than it), so a host end whose proxy
  restarted attaches again at once.
  A session's endpoint is updated only by authentic, fresh traffic (roaming).
* MAC learning (:class:`~tunnel.mactable.MacTable`, with ageing): sources of
  frames from a session are learned behind it, sources from the LAN behind the
  LAN; MACs named in an ATTACH move to that session (VNET's HANDLE) unless they
  speak behind another one: a claim never beats presence (:mod:`tunnel.presence`);
  LAN frames cannot take a named MAC back while the session lives.  When a MAC
  moves, what was sent toward its old place since it last spoke there is sent
  again to the new one (:mod:`tunnel.resend`).
* Broadcast, multicast and unknown unicast from a session go to the LAN and every
  other session; from the LAN, to every session.
* On an ATTACH that moves a MAC (new session, or the session's endpoint changed),
  it announces the VM's addresses on the LAN (gratuitous ARP, unsolicited NA) and
  to the other sessions, with addresses learned from the VM's own frames.
* The other way round, when a MAC moves to a session from elsewhere (the VM
  migrated), it tells that session the home LAN's neighbours (the latest
  :data:`NEIGHBOURS_TOLD` address/MAC bindings the LAN's hosts stated in their own
  ARP and neighbour-discovery frames), as gratuitous ARP / unsolicited NA.  A
  Linux VM whose link went down and up has forgotten its neighbours (and only
  asks again after ARP's one-second retransmission time, its TCP segments
  queued behind the question); an announcement it receives answers at once.
* Forged, tampered, replayed, truncated or oversized messages are DROP answers,
  counted in :attr:`drops` (one count per DROP answer); nothing unauthenticated
  changes any state (but the RESET rate budget): a session's replay window moves only
  after authentication.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

from conntrack.answer import Action, Answer

from .announce import announcement, neighbour_binding, source_address
from .attach import RESET_RATE, ProxyHandshake, ProxySession
from .crypto import Cipher, clear_part, open_body, seal_parts
from .end import End, new_answer as _new
from .events import Cause, EventKind, TunnelEvent
from .mactable import LAN, MacTable, port_name as _port_name
from .presence import FLAP_HOLD, PRESENCE, Presence
from .resend import WINDOW, Resend
from .segment import Budget, split
from .session import SessionEvent as E, SessionState
from .wire import (
    COOKIE_LIFETIME, MAX_SEQ, Attach, Drop, Flag, Header, MsgType, WireError,
    build_attach_ack, check_empty, check_frame, format_mac, is_multicast, parse_attach, parse_handshake, parse_header,
)
from .vnet import strip

__all__ = ["ProxyEnd", "ProxySession", "RESET_RATE", "TO_LAN"]

MAX_ADDRESSES_PER_MAC = 8
#: LAN neighbour bindings kept (latest first out), and told to a VM that moved.
MAX_LAN_NEIGHBOURS = 256
NEIGHBOURS_TOLD = 16
#: Closed session ids remembered at least this long (a replayed ATTACH with a cookie still good
#: must not reopen one), and at most this many.
CLOSED_KEEP = COOKIE_LIFETIME + 2.0
CLOSED_MAX = 65536
#: The destination of the proxy's own frames for the home LAN in an answer's ``sends``.
TO_LAN = "lan"
_ACCEPT, _CONSUME = Action.ACCEPT, Action.CONSUME
_DATA, _CONTROL = Cause.DATA, Cause.CONTROL
#: Bytes held in reassembly for all sessions together, beyond each session's reserve of one message
#: (:mod:`.segment`; a session holds at most MAX_PENDING messages).  At most: this plus max_sessions messages.
REASSEMBLY_BUDGET = 16 << 20


class ProxyEnd(Presence, ProxyHandshake, End):
    from_bits = int(Flag.FROM_PROXY)

    def __init__(
        self,
        cipher: Cipher,
        *,
        session_timeout: float = 60.0,
        mac_age: float = 300.0,
        mac_capacity: int = 4096,
        max_sessions: int = 256,
        announce: bool = True,
        presence: float = PRESENCE,
        flap_hold: float = FLAP_HOLD,
        resend_window: float = WINDOW,
        **end,
    ) -> None:
        """``end``: what every end takes (:class:`~tunnel.end.End`: max_frame, offload, segment_size,
        random_bytes).  Each session negotiates offload (:attr:`Session.offload`): on when its host end
        can too.  ``presence``, ``flap_hold``: see :mod:`tunnel.presence`; ``resend_window`` (0: off):
        see :mod:`tunnel.resend`."""
        super().__init__(cipher, **end)
        self.presence = presence
        self.flap_hold = flap_hold
        self.resend = Resend(resend_window)
        self.session_timeout = session_timeout
        self.max_sessions = max_sessions
        self._budget = Budget(REASSEMBLY_BUDGET)
        self._lost_closed = 0  # superframes lost by sessions that closed
        self.announce = announce
        #: This run's cookie secret: a restart invalidates every cookie issued before it.
        self._secret = self._random(32)
        self._reset_tokens = RESET_RATE
        self._reset_at = 0.0
        #: Drawn at start and told in every EPOCH: a host end that hears another one knows we restarted.
        self.epoch = 0
        while not self.epoch:
            self.epoch = int.from_bytes(self._random(8), "big")
        self.macs = MacTable(mac_age, mac_capacity)
        self.addresses: dict[bytes, OrderedDict[bytes, None]] = {}
        #: address -> MAC, as LAN hosts stated them about themselves (ARP, NS/NA); latest last.
        self.lan_neighbours: OrderedDict[bytes, bytes] = OrderedDict()
        self._closed: OrderedDict[int, float] = OrderedDict()  # recently closed ids -> when: refuse their ATTACHes

    # -- messages from host ends ------------------------------------------------------------

    #: One message from a host end: ACCEPT with the frame for the LAN in ``data`` (None when it goes
    #: only to other sessions, in ``sends``); CONSUME for a control message (replies in ``sends``);
    #: DROP unless authentic, fresh and well formed.
    receive = End.receive_from
    receive_whole = End.receive_whole_from

    def _receive_other(self, message: bytes, endpoint: Hashable, now: float) -> Answer:
        try:
            if len(message) > self.max_message:
                raise WireError(Drop.OVERSIZED, f"{len(message)} bytes")
            h = parse_header(message)
            if h.from_proxy:
                raise WireError(Drop.WRONG_DIRECTION, "a proxy's message")
            s = self.sessions.get(h.session)
            if s is None:
                if h.type == MsgType.ATTACH:
                    return self._handshake(h, message, endpoint, now)
                return self._unknown(h, message, endpoint, now)
            if not s.window.check(h.seq):
                raise WireError(Drop.REPLAYED, f"sequence {h.seq}")
            if h.type == MsgType.ATTACH and parse_handshake(clear_part(h, message)).hello:
                raise WireError(Drop.REPLAYED, f"hello for live session {h.session:08x}")
            if h.offload != s.offload or h.aes != s.aes:
                raise WireError(Drop.MODE_MISMATCH, "offload or suite differs from what the session negotiated")
            if h.type == MsgType.SEGMENT:
                if h.plaintext != self.cipher.plaintext:
                    raise WireError(Drop.MODE_MISMATCH, "plaintext and encryption mixed")
                return self._receive_segment(s, message, int(h.flags), h.seq, endpoint, now)
            assert s.cipher is not None  # a session in ``sessions`` is keyed
            payload = open_body(s.cipher, h, message)
            attach = parse_attach(payload) if h.type == MsgType.ATTACH else None
        except WireError as exc:
            return self._drop(exc.reason)
        return self._authentic(s, h, payload, attach, endpoint, False, now)

    def _authentic(self, s: ProxySession, h: Header, payload: bytes, attach: Attach | None, endpoint: Hashable,
                   new: bool, now: float) -> Answer:
        """An authentic, fresh message of session ``s``: record it, follow the endpoint, act on it."""
        s.window.update(h.seq)
        s.last_heard = now
        s.counters["rx_messages"] += 1
        moved_endpoint = False
        if endpoint != s.endpoint:
            old, s.endpoint = s.endpoint, endpoint
            moved_endpoint = True
            self.counters["endpoint_changes"] += 1
            self._events.append(TunnelEvent(EventKind.ENDPOINT_CHANGED, s.id, now, endpoint, f"from {old}"))
        try:
            return self._dispatch(s, h, payload, attach, new or moved_endpoint, now)
        except WireError as exc:  # authentic but malformed: a counted drop, state kept
            return self._drop(exc.reason)

    def _moved(self, s: ProxySession, message: bytes, endpoint: Hashable, now: float) -> Answer:
        """A DATA message made whole from segments, from another endpoint than ``s``'s: authentic and
        fresh, it moves the endpoint (the long way)."""
        try:
            h = parse_header(message)
            assert s.cipher is not None  # a session in ``sessions`` is keyed
            payload = open_body(s.cipher, h, message)
        except WireError as exc:
            return self._drop(exc.reason)
        return self._authentic(s, h, payload, None, endpoint, False, now)

    def _dispatch(self, s: ProxySession, h: Header, payload: bytes, attach: Attach | None,
                  moved: bool, now: float) -> Answer:
        if h.type == MsgType.DATA:
            return self._from_session(s, self._frame_in(s, payload), now)
        if h.type == MsgType.ATTACH:
            assert attach is not None
            self._step(s, E.ATTACH_RECEIVED)
            self._attach(s, attach, moved, now)
            self._send(s, MsgType.ATTACH_ACK, build_attach_ack(h.seq))
        elif h.type == MsgType.KEEPALIVE:
            check_empty(payload, h.type)
            self._step(s, E.PEER_HEARD)
            for mac in s.named:  # named MACs live as long as the session
                if self.macs.lookup(mac) == s.id:
                    self.macs.learn(mac, s.id, now)
            self._send(s, MsgType.KEEPALIVE_ACK, b"")
        elif h.type == MsgType.DETACH:
            check_empty(payload, h.type)
            self._close(s, E.DETACH, now, "detached")
        else:
            raise WireError(Drop.BAD_TYPE, f"{h.type.name} from a host end")
        return self._answer(_CONSUME, _CONTROL)

    def _attach(self, s: ProxySession, a: Attach, moved: bool, now: float) -> None:
        """Place what an ATTACH names and no longer names (see :mod:`tunnel.presence`)."""
        self.counters["attaches"] += 1
        gone = [m for m in s.named if m not in a.macs]
        s.named = a.macs
        if a.previous and a.previous != s.id and a.previous in self.sessions:
            self._close(self.sessions[a.previous], E.SUPERSEDED, now, f"superseded by {s.id:08x}")
        if gone:
            self._withdraw(s, gone, now)
        self._claim(s, a.macs, moved, now)

    def _announce(self, s: ProxySession, mac: bytes, now: float) -> None:
        if not self.announce:
            return
        for addr in self.addresses.get(mac, ()):
            frame = bytes(self.vnet) + announcement(mac, addr)
            self._sends.append((TO_LAN, frame))
            for other in self.sessions.values():
                if other is not s and other.state == SessionState.ATTACHED:
                    self._send(other, MsgType.DATA, frame)
            self.counters["announcements"] += 1
            self._events.append(TunnelEvent(EventKind.ANNOUNCED, s.id, now, s.endpoint,
                                            f"{format_mac(mac)} {_addr_text(addr)}"))

    def _tell_neighbours(self, s: ProxySession, now: float) -> None:
        """A VM just arrived behind ``s``: announce the LAN's latest neighbours to it (only to it)."""
        if not self.announce or not self.lan_neighbours:
            return
        told = 0
        for addr, mac in reversed(self.lan_neighbours.items()):
            if told >= NEIGHBOURS_TOLD:
                break
            if self.macs.lookup(mac) != LAN:
                continue  # not (or no longer) known on the LAN
            self._send(s, MsgType.DATA, bytes(self.vnet) + announcement(mac, addr))
            told += 1
        if told:
            self.counters["neighbours_told"] += told
            self._events.append(TunnelEvent(EventKind.ANNOUNCED, s.id, now, s.endpoint,
                                            f"{told} LAN neighbour(s) to the session"))

    # -- frames -----------------------------------------------------------------------------

    def _from_session(self, s: ProxySession, frame: bytes, now: float) -> Answer:
        """An authentic frame from a session: to the LAN (``data``), to other sessions (``sends``)."""
        v = self.vnet
        dst, src = frame[v:v + 6], frame[v + 6:v + 12]
        if not is_multicast(src):
            if not self.macs.hear(src, s.id, now):
                self._heard(s, src, now)  # new here: presence decides (tunnel.presence)
            addr = source_address(frame[v:v + 64] if v else frame)
            if addr is not None:
                known = self.addresses.get(src)
                if known is None:
                    known = self.addresses[src] = OrderedDict()
                if not known or next(reversed(known)) != addr:  # most frames: the latest address again
                    known.pop(addr, None)
                    known[addr] = None
                    while len(known) > MAX_ADDRESSES_PER_MAC:
                        known.popitem(last=False)
        if is_multicast(dst):
            self._flood(frame, exclude=s.id)
            return self._to_lan(frame)
        e = self.macs.entry(dst)
        if e is None:
            self.counters["unknown_unicast"] += 1
            self._flood(frame, exclude=s.id)
            return self._to_lan(frame)
        port = e.port
        if port == LAN:
            return self._to_lan(frame)
        if port == s.id:
            return self._drop(Drop.HAIRPIN)
        self.resend.keep(dst, frame, now, e.heard)
        return self._forward(self.sessions[port], frame)

    _deliver = _from_session  # the data path's authentic frames go where the long way's do

    def from_lan(self, frame: bytes, now: float) -> Answer:
        """A frame from the home LAN (read from the proxy's TAP): ACCEPT with the sealed messages
        for the sessions that take it in ``sends``; DROP when none does."""
        try:
            check_frame(frame, self.max_frame, self.vnet)
        except WireError as exc:
            return self._drop(exc.reason)
        self.counters["lan_rx_frames"] += 1
        v = self.vnet
        dst, src = frame[v:v + 6], frame[v + 6:v + 12]
        if not is_multicast(src):
            port = self.macs.lookup(src)
            if port not in (None, LAN) and src in self.sessions[port].named:
                self.counters["lan_conflicts"] += 1  # a VM's named MAC seen on the LAN: keep the VM's
            else:
                self.macs.learn(src, LAN, now)
                et = frame[v + 12]
                if et == 0x08 or et == 0x86:  # maybe ARP or neighbour discovery: a binding to remember
                    b = neighbour_binding(frame[v:v + 78] if v else frame)
                    if b is not None:
                        known = self.lan_neighbours
                        known.pop(b[0], None)
                        known[b[0]] = b[1]
                        while len(known) > MAX_LAN_NEIGHBOURS:
                            known.popitem(last=False)
        if is_multicast(dst):
            return self._flooded(frame)
        e = self.macs.entry(dst)
        if e is None:
            self.counters["unknown_unicast"] += 1
            return self._flooded(frame)
        if e.port == LAN:
            return self._drop(Drop.NO_ROUTE)
        self.resend.keep(dst, frame, now, e.heard)
        return self._forward(self.sessions[e.port], frame)

    def _flooded(self, frame: bytes) -> Answer:
        """A LAN frame for every session: ACCEPT if one took it."""
        if self._flood(frame, exclude=LAN):
            return self._answer(_ACCEPT, _DATA)
        return self._drop(Drop.NO_SESSION)

    def _flood(self, frame: bytes, exclude: int) -> int:
        """Seal ``frame`` for every attached session but ``exclude``; how many took it."""
        n = 0
        for s in self.sessions.values():
            if s.id != exclude and s.state == SessionState.ATTACHED and self._send(s, MsgType.DATA, frame):
                n += 1
        return n

    def _forward(self, s: ProxySession, frame: bytes) -> Answer:
        """A frame for one session (unicast): the data path, one message and nothing else in most answers."""
        try:
            message = self._seal(s, MsgType.DATA, frame)
        except WireError as exc:
            return self._drop(exc.reason)
        if message is None:
            return self._drop(Drop.SEQ_EXHAUSTED)
        if self._sends or self._events:
            self._sends.append((s.endpoint, message))
            return self._answer(_ACCEPT, _DATA)
        return _new(Answer, (_ACCEPT, _DATA, None, ((s.endpoint, message),), ()))

    def _to_lan(self, frame: bytes) -> Answer:
        self.counters["lan_tx_frames"] += 1
        if self._sends or self._events:
            return self._answer(_ACCEPT, _DATA, frame)
        return _new(Answer, (_ACCEPT, _DATA, frame, (), ()))

    # -- timers -----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        times = [_heard(s) + self.session_timeout for s in self.sessions.values()]
        d = self.macs.next_deadline()
        if d is not None:
            times.append(d)
        return min(times) if times else None

    def expire(self, now: float) -> Answer:
        """Timers due at ``now`` (silent sessions, aged MACs): CONSUME, with the events."""
        for s in [s for s in self.sessions.values() if _heard(s) + self.session_timeout <= now]:
            self._close(s, E.EXPIRED, now, "host end silent")
        closed = self._closed
        while closed and next(iter(closed.values())) + CLOSED_KEEP <= now:
            closed.popitem(last=False)
        self.macs.expire(now)
        self.resend.expire(now)
        live = set(m for m, _ in self.macs.items())
        for mac in [m for m in self.addresses if m not in live]:
            del self.addresses[mac]
        for addr in [a for a, m in self.lan_neighbours.items() if m not in live]:
            del self.lan_neighbours[addr]
        return self._answer(_CONSUME, Cause.TIMER)

    def close(self, now: float) -> Answer:
        """Shutting down: tell every host end (DETACH in ``sends``), so they re-attach as soon as we are back."""
        for s in list(self.sessions.values()):
            self._send(s, MsgType.DETACH, b"")
            self._close(s, E.DETACH, now, "proxy shutting down", release=False)
        return self._answer(_CONSUME, Cause.CLOSE)

    # -- status -----------------------------------------------------------------------------

    def status(self, now: float) -> dict:
        return {
            "role": "proxy",
            # the suite it takes for sessions whose host end asks for it (each session's: below)
            "cipher": "plaintext" if self.cipher.plaintext else "aes-256-gcm" if self.aes else "chacha20-poly1305",
            "offload": self.offload,
            "segment_size": self.segment_size,
            "superframes_lost": self._lost_closed + sum(s.reassembly.lost for s in self.sessions.values()
                                                        if s.reassembly is not None),
            "epoch": f"{self.epoch:016x}",
            "key": self.cipher.fingerprint,
            "sessions": [
                {
                    "session": f"{s.id:08x}",
                    "state": s.state.name,
                    "endpoint": _endpoint_text(s.endpoint),
                    "last_heard_ago": round(now - _heard(s), 3),
                    "age": round(now - s.created, 3),
                    "named_macs": [format_mac(m) for m in s.named],
                    "offload": s.offload,
                    "cipher": "plaintext" if self.cipher.plaintext else "aes-256-gcm" if s.aes else "chacha20-poly1305",
                    "counters": dict(s.counters),
                }
                for s in self.sessions.values()
            ],
            "macs": {format_mac(m): _port_name(e.port) for m, e in self.macs.items()},
            "counters": dict(self.counters) | dict(self.resend.counters),
            "resend": {"frames_kept": len(self.resend), "bytes_kept": self.resend.size,
                       "window": self.resend.window},
            "drops": {d.name.lower(): n for d, n in self.drops.items()},
        }

    # -- internals --------------------------------------------------------------------------

    def _close(self, s: ProxySession, event: E, now: float, why: str, release: bool = True) -> None:
        self._step(s, event)
        del self.sessions[s.id]
        if s.reassembly is not None:
            s.reassembly.clear()  # give its bytes back to the budget
            self._lost_closed += s.reassembly.lost
        self._closed.pop(s.id, None)
        self._closed[s.id] = now
        while len(self._closed) > CLOSED_MAX:
            self._closed.popitem(last=False)
        self.counters["sessions_closed"] += 1
        self._events.append(TunnelEvent(EventKind.SESSION_CLOSED, s.id, now, s.endpoint, why))
        if release:  # its MACs go to a session that names them, or nowhere (tunnel.presence)
            self._release_port(s.id, now, why)
        else:
            self.macs.forget_port(s.id)

    def _send(self, s: ProxySession, mtype: MsgType, payload: bytes) -> bool:
        """Seal a message for session ``s`` into ``sends``; False when its counter ran out (or a frame
        needs an offload the session lacks: counted)."""
        try:
            message = self._seal(s, mtype, payload)
        except WireError as exc:
            self.counters[exc.reason.name.lower()] += 1
            return False
        if message is None:
            return False
        self._sends.append((s.endpoint, message))
        return True

    def _seal(self, s: ProxySession, mtype: MsgType, payload: bytes) -> bytes | None:
        """The next message of session ``s``; None when its counter ran out.  A DATA payload is a frame
        as the TAP has it: without offload in the session its virtio-net header comes off first (a GSO
        super-frame cannot: WireError NEEDS_OFFLOAD); a message too large for one datagram is cut."""
        if s.send_seq > MAX_SEQ:
            self.counters["seq_exhausted"] += 1  # not a drop by itself: the caller decides
            return None
        n = len(payload) - self.vnet
        if mtype == MsgType.DATA and self.vnet and not s.offload:
            payload = strip(payload)
        assert s.cipher is not None  # a session in ``sessions`` is keyed
        message = seal_parts(s.cipher, mtype, s.tx_flags, s.id, s.send_seq, payload)
        s.send_seq += 1
        if mtype == MsgType.DATA:
            s.counters["tx_frames"] += 1
            s.counters["tx_bytes"] += n
            if self.segment_size and len(message) > self.segment_size:
                message = split(message, self.segment_size)
                s.counters["tx_segmented"] += 1
        return message

    @property
    def tap_offload(self) -> bool:
        """Whether the TAP should hand us GSO super-frames and partial checksums: when we can carry them
        and every session negotiated offload (else the kernel segments and checksums before the TAP)."""
        return self.offload and all(s.offload for s in self.sessions.values())


def _heard(s: ProxySession) -> float:
    """When a session was last heard: a proxy session is heard from its first message on."""
    assert s.last_heard is not None
    return s.last_heard


def _endpoint_text(ep: Hashable) -> str:
    if isinstance(ep, tuple) and len(ep) >= 2:
        return f"{ep[0]}:{ep[1]}"
    return str(ep)


def _addr_text(addr: bytes) -> str:
    import ipaddress
    return str(ipaddress.ip_address(addr))
