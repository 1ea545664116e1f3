"""The proxy's side of attaching: the challenge that opens a session, and the RESET.

Split from :mod:`tunnel.proxy` (one idea per module): everything here runs for a
message of a session the proxy does not (yet) know.  An ATTACH opens a session only
with a cookie of this run, still good, sealed under the session key that cookie's
nonces make; any other authentic ATTACH draws an EPOCH (a challenge) and changes
nothing; anything else of an unknown session draws a rate-limited RESET.  Offload and
the suite are negotiated here: the hello's OFFLOAD (AES) flag asks, the EPOCH's agrees
when the proxy can carry it (would take AES-256-GCM) too, and the session keeps the
flags of the ATTACH that opened it (all of them associated data: nobody on the way can
flip the choice; and the EPOCH and that ATTACH are sealed under the agreed suite's key).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Hashable

from conntrack.answer import Action, Answer

from .crypto import (
    Cipher, ReplayWindow, clear_part, cookie, hello_cipher, open_body, reset_tag, seal_parts, session_cipher,
)
from .end import Session
from .events import Cause, EventKind, TunnelEvent
from .segment import Reassembly
from .wire import (
    COOKIE_LIFETIME, HEADER, RESET_LEN, VERSION, Challenge, Drop, Flag, Header, MsgType,
    WireError, build_challenge, parse_attach, parse_handshake,
)

#: RESETs sent at most this many per second (and in a burst): they answer messages nobody can
#: authenticate, so they must not make the proxy a reflector at any rate a sender likes.
RESET_RATE = 100.0
_RESET_TYPES = (MsgType.DATA, MsgType.KEEPALIVE, MsgType.SEGMENT)  # what a host end sends under a key we may have lost
_OFFLOAD, _FROM_PROXY, _PLAINTEXT = int(Flag.OFFLOAD), int(Flag.FROM_PROXY), int(Flag.PLAINTEXT)
_AES = int(Flag.AES)
_CONSUME = Action.CONSUME


#: The proxy's record of a host end's session: the one record both ends keep (see :mod:`tunnel.end`).
ProxySession = Session


if TYPE_CHECKING:  # what this mixin uses of ProxyEnd's state, declared for the type checker only
    from collections import OrderedDict

    from .end import End
    from .segment import Budget
    from .wire import Attach

    class _ProxyState(End):
        max_sessions: int
        epoch: int
        _secret: bytes
        _budget: Budget
        _closed: OrderedDict[int, float]
        _reset_tokens: float
        _reset_at: float

        def _authentic(self, s: Session, h: Header, payload: bytes, attach: Attach | None, endpoint: Hashable,
                       new: bool, now: float) -> Answer: ...
else:
    _ProxyState = object


class ProxyHandshake(_ProxyState):
    """The attaching half of :class:`~tunnel.proxy.ProxyEnd` (a mixin: it works on the proxy's own state)."""

    # -- the handshake ----------------------------------------------------------------------

    def _handshake(self, h: Header, message: bytes, endpoint: Hashable, now: float) -> Answer:
        """An ATTACH for a session we do not know.  It opens one only if it carries a cookie of this run
        that is still good and is sealed under the session key that cookie's nonces make; any other
        authentic ATTACH (a hello, an old cookie, a replay) draws a challenge and changes nothing."""
        if h.session in self._closed or h.session == 0:
            raise WireError(Drop.REPLAYED, f"attach for closed session {h.session:08x}")
        if len(self.sessions) >= self.max_sessions:
            raise WireError(Drop.UNKNOWN_SESSION, "session table full")
        hs = parse_handshake(clear_part(h, message))
        sid = h.session
        if hs.hello:
            keys = [(psk, hello_cipher(psk, sid, hs.host_nonce)) for psk in (self.cipher, *self.old_ciphers)]
        else:
            if h.aes and not self.aes:  # our EPOCH said no: only a broken host end asks again
                raise WireError(Drop.MODE_MISMATCH, "AES-256-GCM asked of a proxy that would not take it")
            keys = [(psk, session_cipher(psk, sid, hs.host_nonce, hs.proxy_nonce, h.aes))
                    for psk in (self.cipher, *self.old_ciphers)]
        for psk, key in keys:
            try:
                attach = parse_attach(open_body(key, h, message))
            except WireError as exc:
                if exc.reason == Drop.AUTH_FAILED:
                    continue  # maybe under the key before the last reload
                raise
            age = (int(now) - hs.issued) & 0xFFFFFFFF
            if (not hs.hello and age <= COOKIE_LIFETIME and attach.epoch == self.epoch
                    and cookie(self._secret, sid, hs.host_nonce, hs.proxy_nonce, hs.issued) == hs.cookie):
                if h.offload and not self.offload:  # our EPOCH said no: only a broken host end asks again
                    raise WireError(Drop.MODE_MISMATCH, "offload asked of a proxy that cannot carry it")
                s = ProxySession(sid, endpoint, now, now, ReplayWindow(), 1, cipher=key)  # 0 was the EPOCH's
                self._negotiate(s, h.offload, h.aes)
                s.reassembly = Reassembly(self._budget, self.max_message, reserve=self.max_message)
                self.sessions[sid] = s
                self.counters["sessions_opened"] += 1
                self._events.append(TunnelEvent(EventKind.SESSION_OPENED, s.id, now, endpoint))
                if self.offload:  # a proxy that cannot carry offload has nothing to negotiate (nor tell)
                    self._events.append(TunnelEvent(EventKind.OFFLOAD, s.id, now, endpoint,
                                                    "on" if s.offload else "off"))
                return self._authentic(s, h, b"", attach, endpoint, True, now)
            # A hello asks for offload if its host end can carry it (and for AES-256-GCM if it would
            # take it); the EPOCH agrees if we can (would) too.
            return self._challenge(psk, sid, hs.host_nonce, endpoint, now, h.offload and self.offload,
                                   h.aes and self.aes)
        raise WireError(Drop.AUTH_FAILED, "attach does not verify")

    def _challenge(self, psk: Cipher, sid: int, host_nonce: bytes, endpoint: Hashable, now: float,
                   offload: bool = False, aes: bool = False) -> Answer:
        """EPOCH: a fresh nonce (so a fresh session key, whose sequence 0 it takes) and a cookie."""
        proxy_nonce = self._fresh_nonce()
        issued = int(now) & 0xFFFFFFFF
        c = Challenge(self.epoch, issued, cookie(self._secret, sid, host_nonce, proxy_nonce, issued))
        key = session_cipher(psk, sid, host_nonce, proxy_nonce, aes)
        flags = _FROM_PROXY | (_OFFLOAD if offload else 0) | (_AES if aes else 0)
        self._sends.append((endpoint, seal_parts(key, MsgType.EPOCH, flags, sid, 0, build_challenge(c), proxy_nonce)))
        self.counters["epochs_sent"] += 1
        return self._answer(_CONSUME, Cause.CHALLENGE)

    def _unknown(self, h: Header, message: bytes, endpoint: Hashable, now: float) -> Answer:
        """A message of a session we do not know (we restarted, or it expired): a counted drop, with a
        RESET naming it when the message is no smaller and the rate allows."""
        self._reset_tokens = min(RESET_RATE, self._reset_tokens + max(0.0, now - self._reset_at) * RESET_RATE)
        self._reset_at = now
        if h.type in _RESET_TYPES and len(message) >= RESET_LEN and self._reset_tokens >= 1.0:
            self._reset_tokens -= 1.0
            flags = _FROM_PROXY | (int(h.flags) & (_OFFLOAD | _AES)) | (_PLAINTEXT if self.cipher.plaintext else 0)
            header = HEADER.pack(VERSION, MsgType.RESET, flags, 0, h.session, h.seq)
            self._sends.append((endpoint, header + reset_tag(self.cipher, header)))
            self.counters["resets_sent"] += 1
        return self._drop(Drop.UNKNOWN_SESSION)

