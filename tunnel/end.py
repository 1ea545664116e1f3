"""What both tunnel ends share: the session record, the answer, and the receive side of DATA.

The host end serves one proxy and the proxy many host ends and a LAN, but a session's
DATA reaches either the same way: recognised by one look-up (:attr:`End.sessions`, the
sessions that take DATA), a message or the segments of one put back together
(:mod:`tunnel.segment`) is opened under the session key; the replay window moves only
once it is authentic; the frame goes to the TAP.  That path, the answer every call
returns, the drop count, the key rotation and the offload negotiation live here once;
an end says only where a frame it received goes (:meth:`End._deliver`) and what the
long way does (:meth:`End._receive_other`).  Both ends keep one :class:`Session` per
session (see :mod:`tunnel.session`): the proxy one per host end, the host end the one
it attaches under.  One copy of the per-frame path keeps a fix in one end from leaving
the bug alive in the other; it costs the host end one call per frame (measured: within
the noise).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Hashable

from conntrack.answer import Action, Answer

from .crypto import Cipher, ReplayWindow, nonce
from .events import Cause, TunnelEvent
from .segment import SEGMENT_HEAD, SEGMENT_TYPE, Reassembly, run
from .session import SessionEvent, SessionState, transition
from .wire import (
    DEFAULT_MAX_FRAME, HEADER, HEADER_LEN, MAX_CONTROL, MAX_SEQ, NONCE_LEN, VERSION, VNET_HDR_LEN, ZERO_NONCE, Drop,
    Flag, WireError, check_frame,
)
from .vnet import NO_OFFLOAD

_OFFLOAD, _FROM_PROXY, _PLAINTEXT = int(Flag.OFFLOAD), int(Flag.FROM_PROXY), int(Flag.PLAINTEXT)
_AES = int(Flag.AES)
_DROP, _CONSUME = Action.DROP, Action.CONSUME
_PEER_HEARD = SessionEvent.PEER_HEARD
#: The data path makes its answers with ``tuple.__new__`` (all five fields given): NamedTuple's own
#: ``__new__`` is a Python function, and skipping it saves 40% of an answer's cost (measured).
new_answer = tuple.__new__
#: A segment held until its message is whole (frozen, so one answer serves every time).
HELD = new_answer(Answer, (_CONSUME, Cause.SEGMENT, None, (), ()))


@dataclass(slots=True)
class Session:
    """One session as an end keeps it: a slotted record, read on every frame."""

    id: int
    endpoint: Hashable
    created: float
    last_heard: float | None
    window: ReplayWindow
    send_seq: int
    state: SessionState = SessionState.IDLE
    named: tuple[bytes, ...] = ()
    counters: Counter = field(default_factory=Counter)
    cipher: Cipher | None = None  # the session key (None: not agreed yet)
    offload: bool = False  # negotiated: DATA payloads carry the virtio-net header (GSO super-frames)
    aes: bool = False  # negotiated: the session key is AES-256-GCM's (else ChaCha20-Poly1305's)
    tx_flags: int = _FROM_PROXY  # the flags of our messages in this session
    rx_flags: int = 0  # the exact flags of the peer's DATA messages (the fast path's key)
    reassembly: Reassembly | None = None


class End:
    """The part of :class:`~tunnel.host.HostEnd` and :class:`~tunnel.proxy.ProxyEnd` that is the same."""

    #: The direction bit of this end's messages: set on the proxy's, clear on a host end's.
    from_bits = 0

    def __init__(self, cipher: Cipher, *, max_frame: int = DEFAULT_MAX_FRAME, offload: bool = False,
                 segment_size: int = 0, random_bytes: Callable[[int], bytes] = os.urandom, aes: bool = False) -> None:
        """What every end is given (each end's own options come on top): the pre-shared key, the largest
        frame, whether its TAP can carry offload, the largest UDP datagram (0: never cut), randomness,
        whether it would take AES-256-GCM session keys (negotiated: both ends must)."""
        self.cipher = cipher
        self.aes = aes and not cipher.plaintext
        self.max_frame = max_frame
        #: Whether this end *can* carry offload: its TAP's frames start with a virtio-net header.
        #: Whether a session does is negotiated (:attr:`Session.offload`): both ends must be able to.
        self.offload = offload
        self.vnet = VNET_HDR_LEN if offload else 0  # frames from and to the TAP start with a virtio-net header
        self.max_message = HEADER_LEN + cipher.overhead + max(max_frame + self.vnet, MAX_CONTROL)
        #: Over UDP, the largest datagram the path takes: larger DATA messages go as segments
        #: (:mod:`tunnel.segment`) laid end to end; 0 (TCP, the simulator): never cut.
        self.segment_size = segment_size
        self._random = random_bytes
        #: Pre-shared keys of earlier loads (:meth:`rekey`): what was sealed under one still counts.
        self.old_ciphers: tuple[Cipher, ...] = ()
        #: The sessions DATA may arrive in (keyed and live), by id: the data path's one look-up.
        self.sessions: dict[int, Session] = {}
        self.counters: Counter[str] = Counter()
        self.drops: Counter[Drop] = Counter()
        # What the call under way sends and causes; drained into its answer.
        self._sends: list[tuple[Hashable, bytes]] = []
        self._events: list[TunnelEvent] = []

    def rekey(self, cipher: Cipher) -> None:
        """A new pre-shared key (key rotation): new sessions derive from it, live ones keep their keys,
        and what the previous key sealed (a host end's hello, a proxy's RESET) still counts until the
        next reload."""
        if cipher.plaintext != self.cipher.plaintext:
            raise ValueError("cannot switch between plaintext and encryption by reloading the key")
        self.old_ciphers = (self.cipher, *self.old_ciphers)[:1]
        self.cipher = cipher
        self.counters["key_reloads"] += 1

    # -- answers ----------------------------------------------------------------------------

    def _answer(self, action: Action, reason, data: bytes | None = None) -> Answer:
        """The call's answer, with what it sent and caused (drained: the next call starts empty)."""
        sends, events = self._sends, self._events
        if not sends and not events:
            return Answer(action, reason, data)
        self._sends, self._events = [], []
        return Answer(action, reason, data, tuple(sends), tuple(events))

    def _drop(self, reason: Drop) -> Answer:
        self.drops[reason] += 1
        return self._answer(_DROP, reason)

    # -- the receive side of DATA -------------------------------------------------------------

    def receive_from(self, message: bytes, endpoint: Hashable, now: float) -> Answer:
        """A message from the peer at ``endpoint``.  The data path: a DATA message (or segment) of one
        of :attr:`sessions`, from its endpoint, with exactly the flags expected and fresh, passes the
        long way's checks in fewer steps; anything else (roaming included) takes the end's long way
        (:meth:`_receive_other`)."""
        if HEADER_LEN <= len(message) <= self.max_message:
            version, mtype, flags, reserved, sid, seq = HEADER.unpack_from(message, 0)
            if (mtype == 1 or mtype == SEGMENT_TYPE) and version == VERSION and not reserved and seq <= MAX_SEQ:
                s = self.sessions.get(sid)
                if s is not None and flags == s.rx_flags and s.endpoint == endpoint and s.window.check(seq):
                    if mtype == 1:
                        return self._receive_data(s, message, flags, seq, now)
                    return self._receive_segment(s, message, flags, seq, endpoint, now)
        return self._receive_other(message, endpoint, now)

    def _receive_other(self, message: bytes, endpoint: Hashable, now: float) -> Answer:
        """The long way: every message the data path does not take."""
        raise NotImplementedError

    def receive_whole_from(self, buf: bytes, size: int, endpoint: Hashable, now: float) -> Answer | None:
        """A UDP GRO read from ``endpoint``: datagrams of ``size`` bytes laid end to end.  When they are
        consecutive segments of one DATA message of one of :attr:`sessions`, from its endpoint (all of
        it, or what one GSO send carried), one answer for them: held (CONSUME), or the message's as
        :meth:`receive_from` gives it; else None, and the driver hands the datagrams over one by one."""
        if len(buf) <= size or len(buf) > self.max_message + 255 * SEGMENT_HEAD:
            return None
        version, mtype, flags, reserved, sid, seq = HEADER.unpack_from(buf, 0)
        if mtype != SEGMENT_TYPE or version != VERSION or reserved or seq > MAX_SEQ:
            return None
        s = self.sessions.get(sid)
        if s is None or flags != s.rx_flags or s.endpoint != endpoint or not s.window.check(seq):
            return None
        r = run(buf, size)
        if r is None:
            return None
        assert s.reassembly is not None  # every session in ``sessions`` has one
        try:
            body = s.reassembly.add_run(seq, *r)
        except WireError as exc:
            return self._drop(exc.reason)
        if body is None:
            return HELD
        return self._receive_data(s, HEADER.pack(VERSION, 1, flags, 0, sid, seq) + body, flags, seq, now)

    def _receive_segment(self, s: Session, segment, flags: int, seq: int, endpoint: Hashable,
                         now: float) -> Answer:
        """A piece of a DATA message: held (CONSUME, proving nothing yet) until the last one makes it
        whole, then opened as the DATA message it was (see :mod:`tunnel.segment`)."""
        assert s.reassembly is not None  # every session in ``sessions`` has one
        try:
            body = s.reassembly.add(segment, seq)
        except WireError as exc:
            return self._drop(exc.reason)
        if body is None:
            return HELD
        message = HEADER.pack(VERSION, 1, flags, 0, s.id, seq) + body
        if endpoint == s.endpoint:
            return self._receive_data(s, message, flags, seq, now)
        return self._moved(s, message, endpoint, now)

    def _receive_data(self, s: Session, message: bytes, flags: int, seq: int, now: float) -> Answer:
        """A DATA message of ``s`` that passed the fast path's checks: opened, then delivered."""
        mv = memoryview(message)
        assert s.cipher is not None  # a session in ``sessions`` is keyed
        try:
            payload = s.cipher.open(mv[:HEADER_LEN], nonce(flags, s.id, seq), mv[HEADER_LEN:])
        except WireError as exc:
            return self._drop(exc.reason)
        s.window.update(seq)  # only now, authenticated: a forgery cannot move the window
        s.last_heard = now
        s.counters["rx_messages"] += 1
        try:
            frame = self._frame_in(s, payload)
        except WireError as exc:  # authentic but malformed: the peer's bug, a counted drop, state kept
            return self._drop(exc.reason)
        return self._deliver(s, frame, now)

    def _frame_in(self, s: Session, payload) -> bytes:
        """An authentic DATA payload of ``s`` as the TAP takes it (WireError if it is no frame)."""
        if self.vnet and not s.offload:
            payload = NO_OFFLOAD + payload  # the TAP wants a header; a plain frame wants nothing done
        check_frame(payload, self.max_frame, self.vnet)
        s.state = transition(s.state, _PEER_HEARD)
        c = s.counters
        c["rx_frames"] += 1
        c["rx_bytes"] += len(payload) - self.vnet
        return payload

    def _deliver(self, s: Session, frame: bytes, now: float) -> Answer:
        """An authentic frame from ``s``, ready for the TAP: where it goes is the end's to say."""
        raise NotImplementedError

    def _moved(self, s: Session, message: bytes, endpoint: Hashable, now: float) -> Answer:
        """A whole DATA message of ``s`` from another endpoint than its own (only the proxy has several)."""
        raise NotImplementedError

    # -- internals --------------------------------------------------------------------------

    def _negotiate(self, s: Session, offload: bool, aes: bool = False) -> None:
        """Settle ``s``'s offload (both ends can carry it, or not) and suite (both ends asked for AES,
        or not), and so the exact flags each way."""
        o = (_OFFLOAD if offload else 0) | (_AES if aes else 0)
        s.offload, s.aes = offload, aes
        s.tx_flags = self.from_bits | o
        s.rx_flags = (self.from_bits ^ _FROM_PROXY) | o | (_PLAINTEXT if self.cipher.plaintext else 0)

    def _step(self, s: Session, event: SessionEvent) -> None:
        s.state = transition(s.state, event)

    def _fresh_nonce(self) -> bytes:
        """A handshake nonce (never the all-zero one, which means "none yet")."""
        while True:
            n = self._random(NONCE_LEN)
            if n != ZERO_NONCE:
                return n
