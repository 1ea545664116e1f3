"""Length framing for the TCP transport: ``u16 length`` then one tunnel message.

The decoder takes the byte stream split at any points and returns whole
messages; a zero or too large length is :class:`~tunnel.wire.WireError`
(BAD_LENGTH), after which the stream cannot be resynchronised and the driver
closes the connection.  Framing a message the prefix cannot express is our bug:
:class:`~conntrack.errors.LocalProtocolError`.
"""
from __future__ import annotations

import struct

from conntrack.errors import LocalProtocolError

from .wire import Drop, WireError

LENGTH = struct.Struct("!H")
MAX_MESSAGE = 0xFFFF


def encode(message: bytes) -> bytes:
    if not 0 < len(message) <= MAX_MESSAGE:
        raise LocalProtocolError(Drop.BAD_LENGTH, f"message of {len(message)} bytes cannot be framed")
    return LENGTH.pack(len(message)) + message


class StreamDecoder:
    __slots__ = ("max_len", "_buf", "failed")

    def __init__(self, max_len: int = MAX_MESSAGE) -> None:
        self.max_len = min(max_len, MAX_MESSAGE)
        self._buf = bytearray()
        self.failed = False

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if self.failed:
            raise WireError(Drop.BAD_LENGTH, "stream already failed")
        self._buf += data
        out: list[bytes] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 2:
            (n,) = LENGTH.unpack_from(buf, pos)
            if n == 0 or n > self.max_len:
                if out:  # hand over the good messages first; fail on the next call
                    break
                self.failed = True
                del buf[:]
                raise WireError(Drop.BAD_LENGTH, f"length prefix {n}, allowed 1..{self.max_len}")
            if len(buf) - pos - 2 < n:
                break
            out.append(bytes(buf[pos + 2: pos + 2 + n]))
            pos += 2 + n
        if pos:
            del buf[:pos]
        return out
