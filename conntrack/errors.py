"""The one parse error, with a machine-readable reason.

Malformed input is data, not a crash: every codec in roam fails only with
:class:`ParseError`, whose ``reason`` a driver can count and log.
"""
from __future__ import annotations

from enum import IntEnum


class Reason(IntEnum):
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


class ParseError(ValueError):
    """Bytes that are not a packet we can read; the peer's fault, not ours."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.name.lower()}: {detail}" if detail else reason.name.lower())
