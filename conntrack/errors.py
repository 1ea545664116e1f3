"""The one error family of every codec in roam, split as h11 splits it.

Malformed input is data, not a crash: a codec fails only with a :class:`ProtocolError`
carrying a machine-readable ``reason``.  Whose fault it is decides what a driver does:

* :class:`ParseError` (the peer's fault: bytes we cannot read or must not accept) becomes
  a counted drop with its reason;
* :class:`LocalProtocolError` (ours: a caller asked a codec for something impossible,
  e.g. to build a frame larger than the format allows) is a bug, logged as one.

Each component keeps its own reason enum (``Malformed`` here, the tunnel's ``Drop``);
the types are shared so that one ``except ParseError`` covers every codec.
"""
from __future__ import annotations

from enum import IntEnum


class Malformed(IntEnum):
    """Why a packet, frame or capture record was rejected."""

    TRUNCATED = 1
    BAD_ETHERTYPE = 2
    BAD_VLAN = 3
    BAD_IP_VERSION = 4
    BAD_IHL = 5
    BAD_TOTAL_LENGTH = 6
    BAD_EXTENSION_HEADER = 7
    BAD_TCP_OFFSET = 8
    BAD_UDP_LENGTH = 9
    BAD_ICMP = 10
    BAD_FRAGMENT = 11
    UNSUPPORTED_PROTOCOL = 12
    BAD_CAPTURE_HEADER = 13
    BAD_CAPTURE_RECORD = 14
    UNSUPPORTED_LINKTYPE = 15
    BAD_CAPTURE_BLOCK = 16  # a pcapng block that is cut short or does not add up
    BAD_CAPTURE_COMPRESSION = 17  # a gzip-compressed capture whose gzip stream is damaged


class ProtocolError(ValueError):
    """Root of the family: a reason code (any component's ``IntEnum``) and a detail."""

    def __init__(self, reason: IntEnum, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        name = reason.name.lower()
        super().__init__(f"{name}: {detail}" if detail else name)


class ParseError(ProtocolError):
    """The peer's fault: input we cannot read or must not accept (h11's RemoteProtocolError)."""


class LocalProtocolError(ProtocolError):
    """Our fault: the caller asked for something the format cannot express."""
