"""The host end of the tunnel: a VM's frames from the TAP to the proxy and back.

Sans-I/O: the driver feeds it frames read from the TAP (:meth:`HostEnd.send_frame`),
messages from the proxy (:meth:`HostEnd.receive`) and the time
(:meth:`HostEnd.expire` at :meth:`HostEnd.next_deadline`).  Every call answers
with one :class:`~conntrack.answer.Answer`: ``data`` is the input going on (the
sealed message for the proxy, or the opened frame for the TAP), ``sends`` the
messages the end originates, each ``("proxy", message)``, ``events`` what happened.

* On start it draws a random session id and nonce and sends a *hello* ATTACH
  naming the VM MACs it serves (given, and learned from the source of frames the
  VM sends; learned ones age out), resending with backoff; the proxy answers
  with EPOCH (its nonce and a cookie), from which both ends derive the session
  key; the ATTACH under that key, with the cookie, opens the session
  (ATTACH_ACK).  Frames go out only under a session key (NOT_ATTACHED before).
* Keepalives every ``keepalive`` seconds; if the proxy stays silent for
  ``dead_after`` seconds the session is presumed lost (say the proxy restarted):
  it re-attaches under a fresh session id naming the old one as ``previous``.
  A proxy that lost the session (restarted) says so at the first message it gets
  (RESET, or an EPOCH of another epoch): the host end re-attaches at once.
  Only the RESETs and EPOCHs that match where it stands count: late duplicates
  and replays are STALE drops.
* Roaming: :meth:`roamed` (the driver saw our address change, or reconnected the
  TCP transport) re-sends ATTACH at once from wherever we now are; the proxy moves
  the session's endpoint on the first authentic message.  A host end started on
  another host simply attaches: its ATTACH names the VM's MACs; the proxy moves
  them when the VM speaks there, or at once if it speaks nowhere else
  (:mod:`tunnel.presence`).
* An agent serving every VM of a bridge: VMs come (a frame from a new MAC, or
  :meth:`serve`, say from an orchestration hook) and go (:meth:`forget`: the
  driver saw their TAP leave the bridge, or was told); and a frame from the proxy
  whose source is a learned VM MAC says that VM now runs elsewhere: it is forgotten
  here.  Each change names the MACs served in a new ATTACH at once, so the proxy
  moves or drops them without waiting.
* Only authentic, fresh messages of our current session change anything; the
  rest are DROP answers, also counted in :attr:`drops` by :class:`~tunnel.wire.Drop`
  reason (exactly one count per DROP answer).
"""
from __future__ import annotations

from operator import attrgetter
from typing import Iterable

from conntrack.answer import Action, Answer

from .crypto import Cipher, ReplayWindow, clear_part, hello_cipher, open_body, reset_tag, seal_parts, session_cipher
from .end import End, Session, new_answer as _new
from .events import Cause, EventKind, TunnelEvent
from .segment import MAX_PENDING, Budget, Reassembly, split
from .session import SessionEvent as E, SessionState
from .wire import (
    HEADER_LEN, MAX_MACS, MAX_SEQ, NONCE_LEN, RESET_LEN, ZERO_NONCE, Attach, Drop,
    Flag, Handshake, Header, MsgType, WireError, build_attach, build_handshake, check_empty, check_frame, format_mac,
    is_multicast, parse_attach_ack, parse_challenge, parse_header,
)
from .vnet import strip


_LIVE = (SessionState.ATTACHING, SessionState.ATTACHED)
_ACCEPT, _CONSUME = Action.ACCEPT, Action.CONSUME
_DATA, _CONTROL = Cause.DATA, Cause.CONTROL
_OFFLOAD, _AES = int(Flag.OFFLOAD), int(Flag.AES)
#: Where the host end's own messages go: its one peer.
PROXY = "proxy"


class HostEnd(End):
    def __init__(
        self,
        cipher: Cipher,
        macs: Iterable[bytes] = (),
        *,
        learn_macs: bool = True,
        keepalive: float = 5.0,
        dead_after: float = 15.0,
        retry: float = 0.1,
        retry_max: float = 2.0,
        learned_mac_age: float = 300.0,
        **end,
    ) -> None:
        """``end``: what every end takes (:class:`~tunnel.end.End`: max_frame, offload, segment_size,
        random_bytes)."""
        super().__init__(cipher, **end)
        self.fixed_macs: tuple[bytes, ...] = tuple(dict.fromkeys(bytes(m) for m in macs))
        for m in self.fixed_macs:
            if len(m) != 6 or is_multicast(m):
                raise ValueError(f"not a unicast MAC: {m.hex()}")
        self.learn_macs = learn_macs
        self.keepalive = keepalive
        self.dead_after = dead_after
        self.retry = retry
        self.retry_max = retry_max
        self.learned_mac_age = learned_mac_age
        # Over UDP, DATA messages larger than ``segment_size`` go as segments laid end to end in ``data``.
        self._reassembly = Reassembly(Budget(MAX_PENDING * self.max_message), self.max_message)
        #: The session we attach under (id 0: none yet).  Its record also holds the end's state and
        #: when the proxy was last heard, both carried on to the next session (:meth:`_new_session`).
        self._s = self._record(0, SessionState.IDLE, None, 0.0)
        self.previous = 0
        self.proxy_epoch = 0  # the proxy's current epoch, learned from its EPOCH answer
        # The handshake of the current session: our nonce, the key of our hellos, then (after the
        # proxy's EPOCH) its nonce and cookie and the session key; acked once the proxy knew it.
        self._nonce = ZERO_NONCE
        self._hello: Cipher | None = None
        self._handshake: Handshake | None = None
        self._hellos = 0  # hellos sent in this session (unanswered so far: no key yet)
        self._key_first = 0  # our first sequence number under the session key
        self._acked = False
        self.learned: dict[bytes, float] = {}  # MAC -> last seen (oldest first)
        #: The host's own MACs (its bridge's, its TAP's: the driver says): their frames are not a VM's.
        self.local_macs: set[bytes] = {bytes(6)}
        self._round_first = 0  # sequence number of the first ATTACH of this round
        self._attach_seq = -1  # ... and of the latest
        self._retry_delay = retry
        self._retry_at: float | None = None
        self._keepalive_at: float | None = None
        self._round_at: float | None = None  # when this round of ATTACHes began: the dead timer runs from it
        self.last_sent: float | None = None
        self.attached_at: float | None = None

    # -- the session's fields, under the names the API (and the tests) have always used -------

    session = property(attrgetter("_s.id"))
    state = property(attrgetter("_s.state"))
    session_offload = property(attrgetter("_s.offload"), doc="Whether the session negotiated offload "
                               "(:attr:`offload`: whether this end can).")
    last_heard = property(attrgetter("_s.last_heard"))
    _key = property(attrgetter("_s.cipher"))
    _window = property(attrgetter("_s.window"))
    _seq = property(attrgetter("_s.send_seq"), lambda self, seq: setattr(self._s, "send_seq", seq))

    @property
    def _dead_at(self) -> float | None:
        """When the proxy counts as lost: ``dead_after`` past the start of the round or the last
        authentic message, whichever is later (None while no round runs)."""
        if self._round_at is None:
            return None
        heard = self.last_heard
        return (self._round_at if heard is None or heard < self._round_at else heard) + self.dead_after

    # -- what the VM has ------------------------------------------------------------------

    @property
    def macs(self) -> tuple[bytes, ...]:
        """The MACs an ATTACH names: given ones, then the most recently heard learned ones (newest last): past
        MAX_MACS, those that spoke least recently go unnamed (the proxy still places them by their frames)."""
        room = max(0, MAX_MACS - len(self.fixed_macs))
        learned = [m for m in self.learned if m not in self.fixed_macs]
        return self.fixed_macs[:MAX_MACS] + tuple(learned[len(learned) - room:] if room else ())

    # -- API calls --------------------------------------------------------------------------

    def start(self, now: float) -> Answer:
        """Begin attaching: CONSUME, the first ATTACH in ``sends``."""
        self._step(self._s, E.START)
        self._new_session(now)
        self._begin_round(now)
        return self._answer(_CONSUME, Cause.START)

    def roamed(self, now: float) -> Answer:
        """Our address (or transport connection) changed: re-attach from where we are now."""
        if self.state in (SessionState.ATTACHING, SessionState.ATTACHED):
            self._step(self._s, E.ROAMED)
            self.counters["roams"] += 1
            self._begin_round(now)
        return self._answer(_CONSUME, Cause.ROAMED)

    def close(self, now: float) -> Answer:
        """Stop: DETACH in ``sends`` when a session is live."""
        if self.state in _LIVE and self._key is not None:  # before the EPOCH the proxy knows nothing to detach
            self._send(MsgType.DETACH, b"", now)
        if self.state != SessionState.CLOSED:
            self._step(self._s, E.DETACH)
            self.sessions = {}
            self._events.append(TunnelEvent(EventKind.SESSION_CLOSED, self.session, now, detail="closed"))
        self._retry_at = self._keepalive_at = self._round_at = None
        return self._answer(_CONSUME, Cause.CLOSE)

    def serve(self, mac: bytes, now: float) -> Answer:
        """Serve ``mac`` as if given (an orchestration hook says the VM is here): CONSUME, with an
        ATTACH naming it in ``sends`` when live and it is new (a claim: see :mod:`tunnel.presence`)."""
        mac = bytes(mac)
        if len(mac) != 6 or is_multicast(mac):
            raise ValueError(f"not a unicast MAC: {mac.hex()}")
        if mac not in self.fixed_macs:
            self.fixed_macs += (mac,)
            self.learned.pop(mac, None)
            self.counters["macs_served"] += 1
            self._events.append(TunnelEvent(EventKind.MAC_LEARNED, self.session, now, detail=format_mac(mac)))
            self._name_again(now)
        return self._answer(_CONSUME, Cause.MACS)

    def forget(self, macs: Iterable[bytes], now: float, why: str = "told") -> Answer:
        """Serve ``macs`` no more (their VM left: its TAP left the bridge, or a hook says so), given or
        learned: CONSUME, with an ATTACH without them in ``sends`` when live, so the proxy drops them
        at once.  A VM still here is learned again from its next frame."""
        gone = [m for m in dict.fromkeys(bytes(m) for m in macs) if m in self.fixed_macs or m in self.learned]
        if gone:
            self.fixed_macs = tuple(m for m in self.fixed_macs if m not in gone)
            for m in gone:
                self.learned.pop(m, None)
                self._events.append(TunnelEvent(EventKind.MAC_FORGOTTEN, self.session, now,
                                                detail=f"{format_mac(m)} ({why})"))
            self.counters["macs_forgotten"] += len(gone)
            self._name_again(now)
        return self._answer(_CONSUME, Cause.MACS)

    def _name_again(self, now: float) -> None:
        """The MACs served changed: a new ATTACH says so (once keyed; the hello's round names them anyway)."""
        if self.state in _LIVE and self._key is not None:
            self._send_attach(now)

    def send_frame(self, frame: bytes, now: float) -> Answer:
        """A frame the VM sent (read from the TAP): ACCEPT with the sealed message for the proxy
        in ``data`` (and a new ATTACH in ``sends`` when the frame names a new MAC), or DROP."""
        try:
            check_frame(frame, self.max_frame, self.vnet)
        except WireError as exc:
            return self._drop(exc.reason)
        v = self.vnet
        src = bytes(frame[v + 6:v + 12])
        if self.learn_macs and not is_multicast(src) and src not in self.fixed_macs and src not in self.local_macs:
            known = src in self.learned
            self.learned.pop(src, None)
            self.learned[src] = now
            if not known and self.state in (SessionState.ATTACHING, SessionState.ATTACHED):
                self.counters["macs_learned"] += 1
                self._events.append(TunnelEvent(EventKind.MAC_LEARNED, self.session, now, detail=format_mac(src)))
                self._send_attach(now)  # name it at once
        s = self._s
        if s.cipher is None or s.state not in _LIVE:
            return self._drop(Drop.NOT_ATTACHED)  # no session key yet: nothing can carry it
        if s.send_seq > MAX_SEQ:
            return self._drop(Drop.SEQ_EXHAUSTED)
        n = len(frame) - self.vnet
        payload = frame
        if v and not s.offload:  # a session without offload carries the plain frame
            try:
                payload = strip(frame)
            except WireError as exc:
                return self._drop(exc.reason)
        message = seal_parts(s.cipher, MsgType.DATA, s.tx_flags, s.id, s.send_seq, payload)
        if self.segment_size and len(message) > self.segment_size:
            message = split(message, self.segment_size)
            self.counters["tx_segmented"] += 1
        s.send_seq += 1
        self.last_sent = now
        c = self.counters
        c["tx_frames"] += 1
        c["tx_bytes"] += n
        if n > c["tx_largest_frame"]:  # with --offload: shows whether GSO super-frames arrive whole
            c["tx_largest_frame"] = n
        if self._sends or self._events:
            return self._answer(_ACCEPT, _DATA, message)
        return _new(Answer, (_ACCEPT, _DATA, message, (), ()))

    # -- received messages ------------------------------------------------------------------

    def receive(self, message: bytes, now: float) -> Answer:
        """A message from the proxy: ACCEPT with the frame for the TAP in ``data``; CONSUME for a
        control message (any reply in ``sends``); DROP unless authentic, fresh and well formed."""
        return self.receive_from(message, PROXY, now)

    def receive_whole(self, buf: bytes, size: int, now: float) -> Answer | None:
        """A UDP GRO read (see :meth:`~tunnel.end.End.receive_whole_from`): one answer for the consecutive
        segments of one message of ours, or None, and the driver hands the datagrams to :meth:`receive`."""
        return self.receive_whole_from(buf, size, PROXY, now)

    def _receive_other(self, message: bytes, endpoint, now: float) -> Answer:
        s = self._s
        try:
            if len(message) > self.max_message:
                raise WireError(Drop.OVERSIZED, f"{len(message)} bytes")
            h = parse_header(message)
            if not h.from_proxy:
                raise WireError(Drop.WRONG_DIRECTION, "a host end's message")
            if self.state not in (SessionState.ATTACHING, SessionState.ATTACHED) or h.session != self.session:
                raise WireError(Drop.UNKNOWN_SESSION, f"session {h.session:08x}")
            if h.type == MsgType.EPOCH:  # under a key of its own: no window, no liveness; it negotiates offload
                return self._on_epoch(h, message, now)
            if h.type == MsgType.RESET:
                return self._on_reset(h, message, now)
            if self._key is None:
                raise WireError(Drop.UNKNOWN_SESSION, "no session key yet")
            if h.offload != self.session_offload or h.aes != self._s.aes:
                raise WireError(Drop.MODE_MISMATCH, "offload or suite differs from what the session negotiated")
            if not self._window.check(h.seq):
                raise WireError(Drop.REPLAYED, f"sequence {h.seq}")
            if h.type == MsgType.SEGMENT:
                if h.plaintext != self.cipher.plaintext:
                    raise WireError(Drop.MODE_MISMATCH, "plaintext and encryption mixed")
                return self._receive_segment(s, message, int(h.flags), h.seq, PROXY, now)
            assert s.cipher is not None  # checked above: the session key is agreed
            payload = open_body(s.cipher, h, message)
        except WireError as exc:
            return self._drop(exc.reason)
        # Authentic from here on.
        s.window.update(h.seq)
        self.counters["rx_messages"] += 1
        s.last_heard = now  # which also puts off the dead timer (:attr:`_dead_at`)
        try:
            frame = self._dispatch(h, payload, now)
        except WireError as exc:  # authentic but malformed: the peer's bug, still a counted drop
            return self._drop(exc.reason)
        if frame is None:
            return self._answer(_CONSUME, _CONTROL)
        return self._answer(_ACCEPT, _DATA, frame)

    def _deliver(self, s: Session, frame: bytes, now: float) -> Answer:
        if self.learned:
            v = self.vnet
            src = frame[v + 6:v + 12]
            if src in self.learned:
                self._elsewhere(src, now)
                return self._answer(_ACCEPT, _DATA, frame)
        return _new(Answer, (_ACCEPT, _DATA, frame, (), ()))  # the data path: nothing else to carry

    def _elsewhere(self, mac: bytes, now: float) -> None:
        """A frame from the proxy comes from ``mac``, a VM we learned: it runs elsewhere now (the proxy
        announced it, or it spoke there): forget it here, so no claim of ours stands in its way."""
        del self.learned[mac]
        self.counters["macs_seen_elsewhere"] += 1
        self._events.append(TunnelEvent(EventKind.MAC_FORGOTTEN, self.session, now,
                                        detail=f"{format_mac(mac)} (seen elsewhere)"))
        self._name_again(now)

    def _dispatch(self, h: Header, payload: bytes, now: float) -> bytes | None:
        """Act on an authentic message; the frame for the TAP, or None for a control message."""
        if h.type == MsgType.DATA:
            frame = self._frame_in(self._s, payload)
            v = self.vnet
            if self.learned and frame[v + 6:v + 12] in self.learned:
                self._elsewhere(frame[v + 6:v + 12], now)
            return frame
        if h.type == MsgType.ATTACH_ACK:
            acked = parse_attach_ack(payload)
            if self.state == SessionState.ATTACHING and self._round_first <= acked <= self._attach_seq:
                self._step(self._s, E.ATTACH_ACKED)
                self._acked = True
                self.attached_at = now
                self._retry_at = None
                self._retry_delay = self.retry
                self._keepalive_at = now + self.keepalive
                self._events.append(TunnelEvent(EventKind.ATTACHED, self.session, now))
            else:
                self._step(self._s, E.PEER_HEARD)
        elif h.type == MsgType.KEEPALIVE_ACK:
            check_empty(payload, h.type)
            self._step(self._s, E.PEER_HEARD)
        elif h.type == MsgType.DETACH:
            # The proxy dropped our session: attach again under a new one.
            check_empty(payload, h.type)
            self._lose_session(now, "proxy detached")
        else:
            raise WireError(Drop.BAD_TYPE, f"{h.type.name} from the proxy")
        return None

    def _on_epoch(self, h: Header, message: bytes, now: float) -> Answer:
        """The proxy's challenge to one of our ATTACHes: its nonce, epoch and cookie, sealed under the
        session key they make.  Taken once per session (in the hello); later, one of another epoch
        says the proxy restarted and forgot us (a new session); any other is STALE."""
        if self._hello is None:
            raise WireError(Drop.UNKNOWN_SESSION, "no hello sent")
        proxy_nonce = clear_part(h, message)
        if len(proxy_nonce) != NONCE_LEN or proxy_nonce == ZERO_NONCE:
            raise WireError(Drop.TRUNCATED, "epoch without its nonce")
        if h.aes and not self.aes:  # (our hello did not ask: a broken or forged EPOCH)
            raise WireError(Drop.MODE_MISMATCH, "AES-256-GCM offered to a host end that did not ask")
        key = session_cipher(self.cipher, self.session, self._nonce, proxy_nonce, h.aes)
        c = parse_challenge(open_body(key, h, message))
        self.counters["epochs_received"] += 1
        if self._key is None:  # the answer to our hello: the session key, and the ATTACH that opens it
            s = self._s
            s.cipher, self._key_first = key, s.send_seq
            self.sessions = {s.id: s}  # keyed: DATA may come
            # Offload: we asked for it in the hello if we can; the proxy's EPOCH (authenticated,
            # header included) says whether it can too.  Both: on for the whole session.
            self._negotiate(s, bool(self.offload and h.offload), h.aes)
            if self.offload:  # an end that cannot carry offload has nothing to negotiate (nor tell)
                self._events.append(TunnelEvent(EventKind.OFFLOAD, self.session, now,
                                                detail="on" if self.session_offload else "off"))
            self._handshake = Handshake(self._nonce, proxy_nonce, c.issued, c.cookie)
            self.proxy_epoch = c.epoch
            s.window = ReplayWindow()
            s.window.update(h.seq)
            self._send_attach(now)
        elif c.epoch != self.proxy_epoch:
            # A proxy run that never saw this session answered it: the proxy restarted under us.
            self.proxy_epoch = c.epoch
            self._lose_session(now, "proxy restarted")
        else:
            return self._drop(Drop.STALE)  # a late second answer to a hello, or a replay
        return self._answer(_CONSUME, _CONTROL)

    def _on_reset(self, h: Header, message: bytes, now: float) -> Answer:
        """The proxy knows no session of the message it echoes: if that is a message of ours under our
        acknowledged session key, the proxy lost the session (say, it restarted): attach anew, now."""
        if len(message) != RESET_LEN:
            raise WireError(Drop.BAD_PAYLOAD, f"reset is {RESET_LEN} bytes, have {len(message)}")
        header, tag = bytes(message[:HEADER_LEN]), bytes(message[HEADER_LEN:])
        if not any(reset_tag(c, header) == tag for c in (self.cipher, *self.old_ciphers)):
            raise WireError(Drop.AUTH_FAILED, "reset tag does not verify")
        self.counters["resets_received"] += 1
        if not self._acked or not self._key_first <= h.seq < self._seq:
            return self._drop(Drop.STALE)  # not (yet) a session the proxy knew, or not our message
        self._lose_session(now, "proxy knows no such session")
        return self._answer(_CONSUME, _CONTROL)

    # -- timers -----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        times = [t for t in (self._retry_at, self._keepalive_at, self._dead_at) if t is not None]
        if self.learned and self.learned_mac_age > 0:
            times.append(next(iter(self.learned.values())) + self.learned_mac_age)
        return min(times) if times else None

    def expire(self, now: float) -> Answer:
        """Timers due at ``now``: CONSUME, with any ATTACH or KEEPALIVE in ``sends``."""
        while self.learned:
            mac, seen = next(iter(self.learned.items()))
            if seen + self.learned_mac_age > now:
                break
            del self.learned[mac]
        if self.state == SessionState.CLOSED or self.state == SessionState.IDLE:
            return self._answer(_CONSUME, Cause.TIMER)
        if self._dead_at is not None and now >= self._dead_at:
            self._lose_session(now, "proxy silent")
            return self._answer(_CONSUME, Cause.TIMER)
        if self.state == SessionState.ATTACHING and self._retry_at is not None and now >= self._retry_at:
            self._step(self._s, E.RETRY_TIMER)
            self.counters["attach_retries"] += 1
            self._send_attach(now)
        if self.state == SessionState.ATTACHED and self._keepalive_at is not None and now >= self._keepalive_at:
            self._step(self._s, E.KEEPALIVE_TIMER)
            self._send(MsgType.KEEPALIVE, b"", now)
            self.counters["keepalives"] += 1
            self._keepalive_at = now + self.keepalive
        return self._answer(_CONSUME, Cause.TIMER)

    # -- status -----------------------------------------------------------------------------

    def status(self, now: float) -> dict:
        return {
            "role": "host",
            "state": self.state.name,
            "session": f"{self.session:08x}",
            "previous": f"{self.previous:08x}" if self.previous else None,
            "proxy_epoch": f"{self.proxy_epoch:016x}" if self.proxy_epoch else None,
            "key": self.cipher.fingerprint,
            "macs": [format_mac(m) for m in self.macs],
            "last_heard_ago": None if self.last_heard is None else round(now - self.last_heard, 3),
            "counters": dict(self.counters),
            "drops": {d.name.lower(): n for d, n in self.drops.items()},
            # the session's suite (negotiated; before it is: the one this end asks for)
            "cipher": "plaintext" if self.cipher.plaintext else "aes-256-gcm"
            if (self._s.aes if self._key is not None else self.aes) else "chacha20-poly1305",
            "offload": self.session_offload,
            "offload_capable": self.offload,
            "segment_size": self.segment_size,
            "superframes_lost": self._reassembly.lost,
        }

    @property
    def tap_offload(self) -> bool:
        """Whether the TAP should hand us GSO super-frames and partial checksums now: only while a
        session negotiated offload (else the kernel segments and checksums before the TAP)."""
        return self.session_offload and self._key is not None and self.state in _LIVE

    # -- internals --------------------------------------------------------------------------

    def _record(self, sid: int, state: SessionState, last_heard: float | None, now: float) -> Session:
        """A new session's record: no key yet (so no offload agreed), sequence numbers from 0."""
        s = Session(sid, PROXY, now, last_heard, ReplayWindow(), 0, state, counters=self.counters,
                    reassembly=self._reassembly)
        self._negotiate(s, False)
        return s

    def _new_session(self, now: float) -> None:
        old = self._s
        while True:
            sid = int.from_bytes(self._random(4), "big")
            if sid and sid != old.id:
                break
        if old.id:
            self.previous = old.id
        self._reassembly.clear()
        self._s = self._record(sid, old.state, old.last_heard, now)
        self.sessions = {}  # no key yet
        # A fresh nonce, hence fresh keys: sequence numbers can start at 0 (see tunnel.crypto).
        self._nonce = self._fresh_nonce()
        self._hello = hello_cipher(self.cipher, sid, self._nonce)
        self._handshake, self._acked, self._hellos = None, False, 0
        self.counters["sessions"] += 1

    def _lose_session(self, now: float, why: str) -> None:
        old = self.session
        self._step(self._s, E.DEAD_TIMER)
        self._events.append(TunnelEvent(EventKind.SESSION_CLOSED, old, now, detail=why))
        self._new_session(now)
        self._events.append(TunnelEvent(EventKind.NEW_SESSION_ID, self.session, now, detail=f"after {old:08x}: {why}"))
        self._begin_round(now)

    def _begin_round(self, now: float) -> None:
        self._retry_delay = self.retry
        self._keepalive_at = None
        self._round_at = now
        self._round_first = self._seq
        self._send_attach(now)
        self._events.append(TunnelEvent(EventKind.ATTACHING, self.session, now))

    def _send_attach(self, now: float) -> None:
        """An ATTACH: a hello under the hello key until the proxy's EPOCH came, then under the session key
        with the proxy's nonce and cookie."""
        seq = self._seq
        hs = self._handshake or Handshake(self._nonce)
        payload = build_attach(Attach(self.macs, self.previous, self.proxy_epoch))
        if not self._send(MsgType.ATTACH, payload, now, build_handshake(hs)):
            return
        self._attach_seq = seq
        self.counters["attaches"] += 1
        if self.state == SessionState.ATTACHING:
            self._retry_at = now + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, self.retry_max)

    def _send(self, mtype: MsgType, payload: bytes, now: float, clear: bytes = b"") -> bool:
        """Seal a control message of ours into ``sends``; False when the session's counter ran out."""
        if self._seq > MAX_SEQ:
            self.counters["seq_exhausted"] += 1  # not a drop of any input: the session needs replacing
            return False
        key = self._key or self._hello
        assert key is not None  # start() made the hello key; every send comes after it
        # A hello asks for offload when we can carry it, and for AES-256-GCM when we would take it --
        # but not every third unanswered one: a proxy from before the AES flag drops hellos that carry
        # it (bad flags), and a host end upgraded first must still attach (to ChaCha20-Poly1305).  The
        # session's messages say what was agreed.
        if self._key is not None:
            flags = self._s.tx_flags
        else:
            self._hellos += mtype == MsgType.ATTACH
            aes = self.aes and self._hellos % 3 != 0
            if self.aes and not aes:
                self.counters["hellos_without_aes"] += 1
            flags = (_OFFLOAD if self.offload else 0) | (_AES if aes else 0)
        self._sends.append((PROXY, seal_parts(key, mtype, flags, self.session, self._seq, payload, clear)))
        self._seq += 1
        self.last_sent = now
        return True
