"""The virtio-net header an offloading end's TAP puts before every frame, and taking it off.

An end whose TAP gives and takes virtio-net headers (``IFF_VNET_HDR``: the default) sees
every frame as a 10-byte little-endian ``struct virtio_net_hdr`` and the frame.  A
session that negotiated offload carries both as they are (GSO super-frames, partial
checksums).  A session that did not carries plain frames: the header comes off on the
way out (:func:`strip`) and a zero header goes on on the way in (:data:`NO_OFFLOAD`).

The drivers turn the TAP's offloads off while no session can carry them, so the
kernel segments and checksums before the TAP; a frame already queued before that
may still want work: a partial checksum is completed here (one pass over the
frame), a GSO super-frame is dropped (NEEDS_OFFLOAD, counted: TCP sends it again).
"""
from __future__ import annotations

from conntrack.checksum import internet_checksum

from .wire import VNET_HDR_LEN, Drop, WireError

NEEDS_CSUM = 0x01
GSO_NONE = 0
#: The header of a frame that wants nothing done (what a plain frame gets on the way to the TAP).
NO_OFFLOAD = bytes(VNET_HDR_LEN)


def gso_type(frame: bytes | memoryview) -> int:
    return frame[1] & 0x7F  # without VIRTIO_NET_HDR_GSO_ECN


def strip(frame: bytes) -> bytes:
    """The plain frame behind a virtio-net header; its checksum completed if it was left partial."""
    if gso_type(frame) != GSO_NONE:
        raise WireError(Drop.NEEDS_OFFLOAD, "a GSO super-frame for a session without offload")
    if not frame[0] & NEEDS_CSUM:
        return frame[VNET_HDR_LEN:]
    out = bytearray(frame[VNET_HDR_LEN:])
    start = frame[6] | frame[7] << 8
    at = start + (frame[8] | frame[9] << 8)
    if at + 2 > len(out):
        raise WireError(Drop.BAD_PAYLOAD, f"checksum at {at} past the frame's {len(out)} bytes")
    csum = internet_checksum(memoryview(out)[start:]) or 0xFFFF  # the field holds the pseudo-header sum
    out[at] = csum >> 8
    out[at + 1] = csum & 0xFF
    return bytes(out)
