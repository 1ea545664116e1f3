"""The tunnel's wire format: one header, one message, and the one error.

Every tunnel message, over UDP (one per datagram) or TCP (length-framed, see
:mod:`tunnel.stream`), is a 16-byte header followed by a body::

    0      1      2      3      4            8                    16
    +------+------+------+------+------------+--------------------+
    | ver  | type | flags| rsvd | session id | sequence number    |
    +------+------+------+------+------------+--------------------+
    | body: sealed payload (payload + 16-byte Poly1305 tag)       |
    +-------------------------------------------------------------+

* ``ver`` is :data:`VERSION`; anything else is rejected, so a later format can
  change everything after the first byte.
* ``flags``: :attr:`Flag.FROM_PROXY` says which end sent it (each end accepts only
  the other's messages, and the direction is part of the nonce);
  :attr:`Flag.PLAINTEXT` marks the benchmark-only unencrypted mode;
  :attr:`Flag.OFFLOAD` says DATA payloads start with a 10-byte virtio-net header
  (little-endian ``struct virtio_net_hdr``) and may be GSO super-frames: both
  ends must run with ``--offload``, a mismatch is a counted MODE_MISMATCH drop.
* ``session id`` names one attachment of a host end to the proxy; ``sequence`` is
  the sender's per-session counter (below 2**56, see :mod:`tunnel.crypto`).
* The whole header is the AEAD's associated data: changing any bit of it fails
  authentication.

Payloads by type (after decryption):

* ``DATA``: one Ethernet frame (14 bytes or more, at most the configured maximum),
  after the virtio-net header in offload mode.
* ``ATTACH``: ``u32 previous session`` (0 = none), ``u64 proxy epoch`` (0 = not
  known yet), ``u8 n``, ``n`` MAC addresses: the VMs the host end serves (VNET's
  HANDLE command named its MAC the same way).
* ``EPOCH``: ``u64`` the proxy's epoch, a random number it draws when it starts.
  The proxy acts on an ATTACH only if it names the current epoch, and answers any
  other with EPOCH (changing nothing), so an ATTACH captured before a proxy
  restart cannot be replayed after it.  EPOCH messages use sequence numbers drawn
  at random from [2**55, 2**56), apart from the session's own counter, and do not
  move the host's replay window (a replayed EPOCH costs one more round trip).
* ``ATTACH_ACK``: ``u64`` sequence number of the ATTACH it answers.
* ``KEEPALIVE``, ``KEEPALIVE_ACK``, ``DETACH``: empty.

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

VERSION = 1
HEADER = struct.Struct("!BBBBIQ")
HEADER_LEN = HEADER.size  # 16
TAG_LEN = 16
#: Bytes the tunnel adds around an Ethernet frame, before UDP/IP (or TCP/IP + 2).
OVERHEAD = HEADER_LEN + TAG_LEN  # 32
MAX_SEQ = (1 << 56) - 1
MAX_MACS = 64
ETH_MIN = 14
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
    EPOCH = 7  # proxy -> host: "attach again naming this epoch" (a cookie against replayed ATTACHes)


class Flag(IntFlag):
    NONE = 0
    FROM_PROXY = 0x01
    PLAINTEXT = 0x02
    OFFLOAD = 0x04  # DATA payloads start with a 10-byte virtio-net header (``--offload`` ends)


_KNOWN_FLAGS = int(Flag.FROM_PROXY | Flag.PLAINTEXT | Flag.OFFLOAD)
#: Length of the virtio-net header (struct virtio_net_hdr, little-endian) in offload mode.
VNET_HDR_LEN = 10
#: Largest frame in offload mode: a GSO super-frame that still fits a 65535-byte TCP-framed message.
OFFLOAD_MAX_FRAME = 0xFFFF - 16 - 16 - VNET_HDR_LEN


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


#: EPOCH messages take random sequence numbers from [EPOCH_SEQ_MIN, MAX_SEQ].
EPOCH_SEQ_MIN = 1 << 55


def build_epoch(epoch: int) -> bytes:
    return _U64.pack(epoch)


def parse_epoch(buf: bytes | bytearray | memoryview) -> int:
    if len(buf) != 8:
        raise WireError(Drop.BAD_PAYLOAD, f"epoch is 8 bytes, have {len(buf)}")
    (epoch,) = _U64.unpack_from(buf, 0)
    if epoch == 0:
        raise WireError(Drop.BAD_PAYLOAD, "epoch 0 is reserved")
    return epoch


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
