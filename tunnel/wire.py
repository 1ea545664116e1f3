"""The tunnel's wire format: one header, one message, and the one error.

Every tunnel message, over UDP (one per datagram) or TCP (length-framed, see
:mod:`tunnel.stream`), is a 16-byte header followed by a body::

    0      1      2      3      4            8                    16
    +------+------+------+------+------------+--------------------+
    | ver  | type | flags| rsvd | session id | sequence number    |
    +------+------+------+------+------------+--------------------+
    | body: sealed payload (payload + 16-byte Poly1305 tag)       |
    +-------------------------------------------------------------+

* ``ver`` is :data:`VERSION` (2: per-session keys; 1 had one key for every
  session); anything else is rejected, so a later format can change everything
  after the first byte.
* ``flags``: :attr:`Flag.FROM_PROXY` says which end sent it (each end accepts only
  the other's messages, and the direction is part of the nonce);
  :attr:`Flag.PLAINTEXT` marks the benchmark-only unencrypted mode;
  :attr:`Flag.OFFLOAD` is negotiated: on a hello ATTACH it says the host end can
  carry offload (its TAP has virtio-net headers), on the EPOCH that the proxy can
  too and agrees; every later message of the session carries it iff both could,
  and then DATA payloads start with a 10-byte virtio-net header (little-endian
  ``struct virtio_net_hdr``) and may be GSO super-frames.  A session message whose
  flag differs from what its session negotiated is a counted MODE_MISMATCH drop.
  :attr:`Flag.AES` is negotiated the same way: a hello asks for AES-256-GCM, the
  EPOCH agrees, and the session key is then one of AES-256-GCM, not of
  ChaCha20-Poly1305 (see :mod:`tunnel.crypto`); every later message says which.
  The flags are associated data: nobody can flip the choice on the way.
* ``session id`` names one attachment of a host end to the proxy; ``sequence`` is
  the sender's per-session counter, from 0 (below 2**56, see :mod:`tunnel.crypto`).
* The whole header is the AEAD's associated data: changing any bit of it fails
  authentication.

Payloads by type (after decryption):

* ``DATA``: one Ethernet frame (14 bytes or more, at most the configured maximum),
  after the virtio-net header in offload mode.
* ``ATTACH``: a 52-byte *handshake block* in clear after the header (part of the
  associated data): ``host nonce`` (16 random bytes, fresh for every session),
  ``proxy nonce`` (16; zeros in a *hello*), ``u32 issued``, ``cookie`` (16; the
  proxy's, copied from its EPOCH).  Then, sealed: ``u32 previous session`` (0 =
  none), ``u64 proxy epoch`` (0 = not known yet), ``u8 n``, ``n`` MAC addresses:
  the VMs the host end serves (VNET's HANDLE command named its MAC the same way).
  A hello is sealed under a key derived from the pre-shared key and the host
  nonce; every later message of the session under the session key, derived from
  the pre-shared key and *both* nonces (see :mod:`tunnel.crypto`).
* ``EPOCH`` (the proxy's challenge): the proxy's nonce (16 bytes, fresh for every
  EPOCH) in clear, then sealed under the session key that nonce makes, at
  sequence 0: ``u64`` the proxy's epoch (drawn at start), ``u32 issued``, a
  16-byte cookie (a MAC under a secret the proxy draws at start, over the
  nonces and ``issued``).  The proxy creates a session only from an ATTACH
  carrying a cookie of its own run, at most :data:`COOKIE_LIFETIME` seconds old,
  sealed under the session key; it answers any other authentic ATTACH for a
  session it does not know with an EPOCH, and nothing else: so an ATTACH
  captured before a restart, or replayed after its session closed, opens
  nothing, and the EPOCH it draws is smaller than it.
* ``RESET``: no payload; the header echoes the session id and sequence number of
  a message the proxy could not place (no such session), and a 16-byte MAC under
  a key derived from the pre-shared key follows.  A host end whose acknowledged
  session it names attaches anew at once (a proxy restarted by ``kill -9`` is
  found on the first message, not after the dead timer).  Never larger than the
  message it answers.
* ``ATTACH_ACK``: ``u64`` sequence number of the ATTACH it answers.
* ``KEEPALIVE``, ``KEEPALIVE_ACK``, ``DETACH``: empty.
* ``SEGMENT``: a piece of a sealed DATA message, over UDP when the message is larger
  than the path takes (see :mod:`tunnel.segment`).

Codecs come in ``parse_*`` / ``build_*`` pairs.  Parsing fails only with
:class:`WireError` (a :class:`~conntrack.errors.ParseError`: the peer's fault, a
counted drop) with a :class:`Drop` reason; building something the format cannot
express is our own misuse: :class:`~conntrack.errors.LocalProtocolError`.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from conntrack.errors import LocalProtocolError, ParseError

VERSION = 2
HEADER = struct.Struct("!BBBBIQ")
HEADER_LEN = HEADER.size  # 16
TAG_LEN = 16
#: Bytes the tunnel adds around an Ethernet frame, before UDP/IP (or TCP/IP + 2).
OVERHEAD = HEADER_LEN + TAG_LEN  # 32
MAX_SEQ = (1 << 56) - 1
MAX_MACS = 64
ETH_MIN = 14
#: Largest control payload with its clear block: an ATTACH naming MAX_MACS MACs.
MAX_CONTROL = 52 + 13 + 6 * MAX_MACS
#: Default largest Ethernet frame: 1500-byte MTU + 14 header + two VLAN tags.
DEFAULT_MAX_FRAME = 1500 + 14 + 8

_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


class MsgType(IntEnum):
    DATA = 1
    ATTACH = 2
    ATTACH_ACK = 3
    KEEPALIVE = 4
    KEEPALIVE_ACK = 5
    DETACH = 6
    EPOCH = 7  # proxy -> host: the challenge ("attach again with this nonce and cookie")
    RESET = 8  # proxy -> host: "I know no such session" (echoes the message's session and sequence)
    SEGMENT = 9  # a piece of a DATA message too large for one datagram (see tunnel.segment)


class Flag(IntFlag):
    NONE = 0
    FROM_PROXY = 0x01
    PLAINTEXT = 0x02
    OFFLOAD = 0x04  # on ATTACH/EPOCH: "I can carry offload"; on a session's messages: it was negotiated
    AES = 0x08  # on ATTACH/EPOCH: "I would take AES-256-GCM"; on a session's messages: its key is one


_KNOWN_FLAGS = int(Flag.FROM_PROXY | Flag.PLAINTEXT | Flag.OFFLOAD | Flag.AES)
#: Length of the virtio-net header (struct virtio_net_hdr, little-endian) in offload mode.
VNET_HDR_LEN = 10
#: Largest frame in offload mode: a GSO super-frame whose sealed message (with its virtio-net header)
#: is at most 65507 bytes, what one UDP send carries; the TAP's ``gso_max_size`` keeps them below it
#: (see :mod:`tunnel.io.tap`).  So a TCP length prefix of 65508 or more is never a message (BAD_LENGTH).
OFFLOAD_MAX_FRAME = 65507 - 16 - 16 - VNET_HDR_LEN


class Drop(IntEnum):
    """Why a message or frame was dropped; the drivers count them by name."""

    TRUNCATED = 1  # shorter than a header (+ tag)
    BAD_VERSION = 2
    BAD_TYPE = 3
    BAD_FLAGS = 4  # unknown flag bits or non-zero reserved byte
    OVERSIZED = 5  # larger than the configured maximum (never truncated)
    BAD_PAYLOAD = 6  # authenticated, but the payload does not parse
    AUTH_FAILED = 7  # forged or tampered (or another key)
    REPLAYED = 8  # sequence number already seen or too old
    UNKNOWN_SESSION = 9  # authentic, but no such session here
    WRONG_DIRECTION = 10  # our own direction reflected back at us
    MODE_MISMATCH = 11  # plaintext message to an encrypting end or the reverse
    BAD_LENGTH = 12  # TCP framing: zero or too large length prefix
    SEQ_EXHAUSTED = 13  # sender's counter ran out (our own limit, not the peer's)
    NOT_ATTACHED = 14  # frame to send while no session can carry it
    HAIRPIN = 15  # proxy: destination lives behind the session it came from
    NO_ROUTE = 16  # proxy: destination is on the LAN, frame came from the LAN
    NO_SESSION = 17  # proxy: a LAN frame to flood, and no session to take it
    STALE = 18  # host: an authentic EPOCH or RESET that no longer applies (a late duplicate or a replay)
    NEEDS_OFFLOAD = 19  # a GSO super-frame from the TAP for a session that negotiated no offload


class WireError(ParseError):
    """Bytes that are not a valid tunnel message (the peer's fault); ``reason``, a :class:`Drop`, says why."""

    reason: Drop


@dataclass(frozen=True, slots=True)
class Header:
    type: MsgType
    flags: Flag
    session: int
    seq: int
    version: int = VERSION

    @property
    def from_proxy(self) -> bool:
        return bool(int(self.flags) & 0x01)

    @property
    def plaintext(self) -> bool:
        return bool(int(self.flags) & 0x02)

    @property
    def offload(self) -> bool:
        return bool(int(self.flags) & 0x04)

    @property
    def aes(self) -> bool:
        return bool(int(self.flags) & 0x08)


def build_header(h: Header) -> bytes:
    if not 0 <= h.seq <= MAX_SEQ:
        raise LocalProtocolError(Drop.SEQ_EXHAUSTED, f"sequence {h.seq} out of range")
    return HEADER.pack(h.version, int(h.type), int(h.flags), 0, h.session, h.seq)


_TYPES = {int(t): t for t in MsgType}
_FLAGS = {i: Flag(i) for i in range(_KNOWN_FLAGS + 1)}  # enum look-ups, not enum calls, per message


def parse_header(buf: bytes | bytearray | memoryview) -> Header:
    """Read and check the fixed header (not the body: that needs the key)."""
    if len(buf) < HEADER_LEN:
        raise WireError(Drop.TRUNCATED, f"header needs {HEADER_LEN} bytes, have {len(buf)}")
    version, mtype, flags, reserved, session, seq = HEADER.unpack_from(buf, 0)
    if version != VERSION:
        raise WireError(Drop.BAD_VERSION, f"version {version}")
    t = _TYPES.get(mtype)
    if t is None:
        raise WireError(Drop.BAD_TYPE, f"type {mtype}")
    f = _FLAGS.get(flags)
    if f is None or reserved:
        raise WireError(Drop.BAD_FLAGS, f"flags {flags:#x} reserved {reserved:#x}")
    if seq > MAX_SEQ:
        raise WireError(Drop.BAD_FLAGS, f"sequence {seq} above 2**56")
    return Header(t, f, session, seq, version)


# -- payloads ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attach:
    """An ATTACH payload: the MACs this host end serves, and the session it replaces."""

    macs: tuple[bytes, ...]
    previous: int = 0
    epoch: int = 0


_ATTACH_HEAD = struct.Struct("!IQB")


def build_attach(a: Attach) -> bytes:
    if len(a.macs) > MAX_MACS:
        raise LocalProtocolError(Drop.OVERSIZED, f"{len(a.macs)} MACs, at most {MAX_MACS}")
    for mac in a.macs:
        if len(mac) != 6:
            raise LocalProtocolError(Drop.BAD_PAYLOAD, "a MAC address is 6 bytes")
    return _ATTACH_HEAD.pack(a.previous, a.epoch, len(a.macs)) + b"".join(a.macs)


def parse_attach(buf: bytes | bytearray | memoryview) -> Attach:
    h = _ATTACH_HEAD.size
    if len(buf) < h:
        raise WireError(Drop.BAD_PAYLOAD, f"attach needs {h} bytes, have {len(buf)}")
    previous, epoch, n = _ATTACH_HEAD.unpack_from(buf, 0)
    if n > MAX_MACS:
        raise WireError(Drop.BAD_PAYLOAD, f"{n} MACs, at most {MAX_MACS}")
    if len(buf) != h + 6 * n:
        raise WireError(Drop.BAD_PAYLOAD, f"attach with {n} MACs is {h + 6 * n} bytes, have {len(buf)}")
    macs = tuple(bytes(buf[h + 6 * i: h + 6 + 6 * i]) for i in range(n))
    for mac in macs:
        if mac[0] & 1:
            raise WireError(Drop.BAD_PAYLOAD, f"multicast MAC {format_mac(mac)} in attach")
    return Attach(macs, previous, epoch)


def build_epoch(epoch: int) -> bytes:
    return _U64.pack(epoch)


def parse_epoch(buf: bytes | bytearray | memoryview) -> int:
    if len(buf) != 8:
        raise WireError(Drop.BAD_PAYLOAD, f"epoch is 8 bytes, have {len(buf)}")
    (epoch,) = _U64.unpack_from(buf, 0)
    if epoch == 0:
        raise WireError(Drop.BAD_PAYLOAD, "epoch 0 is reserved")
    return epoch


# -- the handshake ----------------------------------------------------------------------------

NONCE_LEN = 16
COOKIE_LEN = 16
ZERO_NONCE = bytes(NONCE_LEN)
#: Seconds a cookie stays good after the proxy issued it.
COOKIE_LIFETIME = 60.0


@dataclass(frozen=True, slots=True)
class Handshake:
    """An ATTACH's clear block: the nonces the session key is derived from, and the proxy's cookie."""

    host_nonce: bytes
    proxy_nonce: bytes = ZERO_NONCE
    issued: int = 0
    cookie: bytes = bytes(COOKIE_LEN)

    @property
    def hello(self) -> bool:
        """No proxy nonce yet: the first ATTACH of a session, answered with an EPOCH."""
        return self.proxy_nonce == ZERO_NONCE


_HANDSHAKE = struct.Struct(f"!{NONCE_LEN}s{NONCE_LEN}sI{COOKIE_LEN}s")
HANDSHAKE_LEN = _HANDSHAKE.size  # 52


def build_handshake(h: Handshake) -> bytes:
    if len(h.host_nonce) != NONCE_LEN or len(h.proxy_nonce) != NONCE_LEN or len(h.cookie) != COOKIE_LEN:
        raise LocalProtocolError(Drop.BAD_PAYLOAD, "nonces and cookie are 16 bytes")
    if h.host_nonce == ZERO_NONCE:
        raise LocalProtocolError(Drop.BAD_PAYLOAD, "a host nonce of zeros")
    return _HANDSHAKE.pack(h.host_nonce, h.proxy_nonce, h.issued & 0xFFFFFFFF, h.cookie)


def parse_handshake(buf: bytes | bytearray | memoryview) -> Handshake:
    if len(buf) != HANDSHAKE_LEN:
        raise WireError(Drop.TRUNCATED, f"handshake block is {HANDSHAKE_LEN} bytes, have {len(buf)}")
    host_nonce, proxy_nonce, issued, cookie = _HANDSHAKE.unpack_from(buf, 0)
    if host_nonce == ZERO_NONCE:
        raise WireError(Drop.BAD_PAYLOAD, "a host nonce of zeros")
    return Handshake(host_nonce, proxy_nonce, issued, cookie)


@dataclass(frozen=True, slots=True)
class Challenge:
    """An EPOCH's sealed payload: the proxy's epoch and the cookie the host end copies into its ATTACH."""

    epoch: int
    issued: int
    cookie: bytes


_CHALLENGE_TAIL = struct.Struct(f"!I{COOKIE_LEN}s")
CHALLENGE_LEN = 8 + _CHALLENGE_TAIL.size  # 28


def build_challenge(c: Challenge) -> bytes:
    if len(c.cookie) != COOKIE_LEN:
        raise LocalProtocolError(Drop.BAD_PAYLOAD, "a cookie is 16 bytes")
    return build_epoch(c.epoch) + _CHALLENGE_TAIL.pack(c.issued & 0xFFFFFFFF, c.cookie)


def parse_challenge(buf: bytes | bytearray | memoryview) -> Challenge:
    if len(buf) != CHALLENGE_LEN:
        raise WireError(Drop.BAD_PAYLOAD, f"epoch challenge is {CHALLENGE_LEN} bytes, have {len(buf)}")
    epoch = parse_epoch(bytes(buf[:8]))
    issued, cookie = _CHALLENGE_TAIL.unpack_from(buf, 8)
    return Challenge(epoch, issued, cookie)


#: Bytes in clear between the header and the sealed body, by message type (all associated data).
CLEAR_LEN = {MsgType.ATTACH: HANDSHAKE_LEN, MsgType.EPOCH: NONCE_LEN}
#: A RESET: the header and a 16-byte MAC, nothing else.
RESET_LEN = HEADER_LEN + TAG_LEN


def build_attach_ack(attach_seq: int) -> bytes:
    return _U64.pack(attach_seq)


def parse_attach_ack(buf: bytes | bytearray | memoryview) -> int:
    if len(buf) != 8:
        raise WireError(Drop.BAD_PAYLOAD, f"attach ack is 8 bytes, have {len(buf)}")
    return _U64.unpack_from(buf, 0)[0]


def check_empty(buf: bytes | bytearray | memoryview, what: MsgType) -> None:
    if len(buf):
        raise WireError(Drop.BAD_PAYLOAD, f"{what.name.lower()} carries no payload, have {len(buf)} bytes")


def check_frame(buf: bytes | bytearray | memoryview, max_frame: int, vnet: int = 0) -> None:
    """An Ethernet frame we will carry (after a ``vnet``-byte virtio-net header in offload
    mode): 14 bytes or more, ``max_frame`` at most."""
    n = len(buf) - vnet
    if n < ETH_MIN:
        raise WireError(Drop.TRUNCATED, f"ethernet frame needs {ETH_MIN} bytes, have {max(n, 0)}")
    if n > max_frame:
        raise WireError(Drop.OVERSIZED, f"frame of {n} bytes, at most {max_frame}")


# -- MAC helpers ------------------------------------------------------------------------------


def parse_mac(text: str) -> bytes:
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def is_multicast(mac: bytes | memoryview) -> bool:
    return bool(mac[0] & 1)
