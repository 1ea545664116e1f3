"""The layer-2 tunnel home: a VM's Ethernet frames carried over UDP or TCP to a proxy on its home LAN.

Sans-I/O engines: bytes and ``now`` in, one :class:`~conntrack.answer.Answer` out per
input, timer or call (the input going on as ``data``, the end's own messages as
``sends``, frozen events; a DROP's reason is a :class:`Drop`, any other's a :class:`Cause`):

* :mod:`tunnel.wire`     versioned message format, ``parse_*``/``build_*``, :class:`WireError`
                         (a ``conntrack.errors.ParseError``; our own misuse: ``LocalProtocolError``)
* :mod:`tunnel.crypto`   ChaCha20-Poly1305 with a pre-shared key, nonces, the replay window
* :mod:`tunnel.session`  session states: one IntEnum, one transition table
* :mod:`tunnel.host`     the host end (attach, keepalives, roaming re-attach)
* :mod:`tunnel.proxy`    the proxy end (sessions, MAC learning, flooding, announcements)
* :mod:`tunnel.mactable`, :mod:`tunnel.announce`, :mod:`tunnel.stream` (TCP length framing)

Thin I/O drivers around them, in their own sub-package :mod:`tunnel.io` (TAP devices,
sockets, the selector loop).  Only the drivers touch the kernel or the clock.

Encapsulation overhead, per Ethernet frame: 16-byte header + 16-byte tag = 32
bytes, plus UDP/IPv4 (28) or UDP/IPv6 (48); over TCP, 2 bytes of length prefix
inside the stream.  So a full 1514-byte frame from a 1500-MTU TAP becomes a
1574-byte IPv4 datagram.  MTU choice (see :mod:`tunnel.io.transport`): the TAP keeps
MTU 1500 so the VM and the home LAN need no change, and the UDP socket lets the
kernel fragment outer datagrams above the path MTU (``IP_PMTUDISC_DONT``);
``--mtu 1426`` on the TAP, the VM and the LAN avoids fragmentation instead.
Frames above the TAP MTU are counted (OVERSIZED) and dropped, never truncated.
``--offload`` (both ends) carries TCP GSO super-frames with their virtio-net header.

Security model: one pre-shared key for the proxy and all its host ends;
ChaCha20-Poly1305 with the header as associated data; per-session replay
windows; sessions exist only after an authentic ATTACH that names the proxy's
current epoch (a random number drawn at start, learned from its EPOCH answer),
so ATTACHes captured before a proxy restart cannot be replayed after it, and
those of closed sessions not during its run; endpoints move only on authentic
fresh traffic.  Known limits: no forward secrecy and no per-host identity
(anyone with the key can attach and claim a MAC: the last ATTACH wins); nonce
uniqueness rests on random 32-bit session ids and random sequence starts.
"""
from .crypto import AeadCipher, Key, KeyFileError, PlainCipher, ReplayWindow, generate_key_text, load_key, parse_key_text
from .events import Cause, EventKind, TunnelEvent
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
    "load_key", "parse_key_text", "transition",
]
