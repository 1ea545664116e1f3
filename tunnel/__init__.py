"""The layer-2 tunnel home: a VM's Ethernet frames carried over UDP or TCP to a proxy on its home LAN.

Sans-I/O engines: bytes and ``now`` in, one :class:`~conntrack.answer.Answer` out per
input, timer or call (the input going on as ``data``, the end's own messages as
``sends``, frozen events; a DROP's reason is a :class:`Drop`, any other's a :class:`Cause`):

* :mod:`tunnel.wire`     versioned message format, ``parse_*``/``build_*``, :class:`WireError`
                         (a ``conntrack.errors.ParseError``; our own misuse: ``LocalProtocolError``)
* :mod:`tunnel.crypto`   ChaCha20-Poly1305 (AES-256-GCM session keys where both ends ask) with a
                         pre-shared key, nonces, the replay window
* :mod:`tunnel.session`  session states: one IntEnum, one transition table
* :mod:`tunnel.end`      what both ends share: the session record, the answer, the DATA receive path
* :mod:`tunnel.host`     the host end (attach, keepalives, roaming re-attach)
* :mod:`tunnel.proxy`    the proxy end (sessions, MAC learning, flooding, announcements)
* :mod:`tunnel.attach`    the proxy's side of attaching (the challenge, RESETs, offload negotiated)
* :mod:`tunnel.presence` where a VM's MAC lives at the proxy: a claim never beats presence
* :mod:`tunnel.resend`   frames sent toward a VM's old host, sent again where it went
* :mod:`tunnel.segment`  a sealed message cut into UDP segments that fit the path, and put back
* :mod:`tunnel.vnet`     the virtio-net header of an offloading TAP, taken off for a plain session
* :mod:`tunnel.mactable`, :mod:`tunnel.announce`, :mod:`tunnel.stream` (TCP length framing)

Thin I/O drivers around them, in their own sub-package :mod:`tunnel.io` (TAP devices,
sockets, the selector loop).  Only the drivers touch the kernel or the clock.

Encapsulation overhead, per Ethernet frame: 16-byte header + 16-byte tag = 32
bytes, plus UDP/IPv4 (28) or UDP/IPv6 (48); over TCP, 2 bytes of length prefix
inside the stream.  The TAP keeps MTU 1500 so the VM and the home LAN need no
change.  Fast by default: each session negotiates offload in ATTACH/EPOCH (on when
both ends' TAPs carry virtio-net headers; ``--no-offload`` turns it off), and then
carries the VM's own TCP GSO super-frames (~64 KiB) with one AEAD call each.  Over
UDP a message larger than the path takes (``--path-mtu``) leaves as segments that
each fit (:mod:`tunnel.segment`; UDP GSO out, UDP GRO in), never as IP fragments.
Frames above the maximum are counted (OVERSIZED) and dropped, never truncated.

Security model: one pre-shared key for the proxy and all its host ends, from
which every session derives its own key (HKDF over both ends' random nonces,
exchanged in ATTACH and EPOCH: no (key, nonce) pair repeats across sessions,
restarts or proxies); ChaCha20-Poly1305 (or AES-256-GCM, negotiated) with the
header as associated data;
per-session replay windows; a session exists only after an authentic ATTACH
carrying a fresh cookie of the proxy's current run, so nothing replayed opens a
session, counts as authentic (:func:`proves_peer`) or draws an answer larger
than itself; endpoints move only on authentic fresh traffic.  A proxy that lost
a session says so (RESET, rate-limited) and the host end re-attaches at once.
Key rotation: :meth:`ProxyEnd.rekey` / :meth:`HostEnd.rekey` keep live sessions.
Known limits: no forward secrecy and no per-host identity (anyone with the key
can attach and claim a MAC that speaks nowhere else: the newest claim wins until the VM speaks); someone who can capture and
inject can make a host end re-attach (a RESET it provokes from another proxy
sharing the key).
"""
from .crypto import AeadCipher, Key, KeyFileError, PlainCipher, ReplayWindow, generate_key_text, load_key, parse_key_text
from .events import Cause, EventKind, TunnelEvent, proves_peer
from .host import HostEnd
from .mactable import LAN, MacTable
from .proxy import ProxyEnd, ProxySession
from .session import SessionEvent, SessionState, SessionStateError, TRANSITIONS, transition
from .stream import StreamDecoder, encode as frame_stream_message
from .wire import OVERHEAD, Drop, MsgType, WireError

__all__ = [
    "AeadCipher", "Cause", "Drop", "EventKind", "HostEnd", "Key", "KeyFileError", "LAN", "MacTable", "MsgType", "OVERHEAD",
    "PlainCipher", "ProxyEnd", "ProxySession", "ReplayWindow", "SessionEvent", "SessionState", "SessionStateError",
    "StreamDecoder", "TRANSITIONS", "TunnelEvent", "WireError", "frame_stream_message", "generate_key_text",
    "load_key", "parse_key_text", "proves_peer", "transition",
]
