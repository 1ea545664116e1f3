"""Tunnel segments: one sealed message cut to fit the path MTU over UDP, and put back together.

Why.  With offload a DATA message carries a GSO super-frame of up to ~64 KiB; sent
as one UDP datagram it would leave as ~45 IP fragments, which the kernel reassembles
with no bound we choose, and which one lost fragment (or a middlebox that drops
fragments) kills silently.  So a message larger than the end's ``segment_size`` (the
largest UDP payload the path takes, e.g. 1500 - 28) is cut into SEGMENT messages,
each one UDP datagram, sent with UDP GSO in one system call.

Sealed once, reassembled before opening (the measured choice): one ChaCha20-Poly1305
call over 64 KiB cost 32 us here (2026-12-02), 46 calls over its 1436-byte pieces 84 us; sealing
each segment on its own would also add 16 bytes of tag per segment.  Segments are
not authenticated one by one: a forged or altered segment makes its message fail
authentication when it is opened (AUTH_FAILED), and until then it only occupies a
bounded slot.

Format: a segment is the DATA message's own 16-byte header with the type byte set to
SEGMENT (same flags, session and sequence number), then ``u8 index``, ``u8 count``,
then a piece of the DATA message's body (ciphertext and tag)::

    | ver | SEGMENT | flags | 0 | session | seq | index | count | body[index * piece ...] |

Every segment but the last is exactly ``segment_size`` bytes, the layout UDP GSO
(``UDP_SEGMENT``) sends and UDP GRO hands back.  The receiver rebuilds the DATA header
from the segment header and opens the rebuilt message as if it had come whole; so
the header stays the associated data, and a segment whose flags were flipped builds
a message that does not verify.

Bounds (:class:`Reassembly`): at most :data:`MAX_PENDING` messages in reassembly
per session, and the bytes held for an end's sessions together at most ``budget``
(a :class:`Budget` the proxy shares between its sessions) beyond each session's own
``reserve``.  The reserve (one whole message at the proxy) is why segments forged
under other sessions' clear-text ids, which only fail when their message is opened,
cannot spend what a session needs: each can always put one message together, its own
older ones giving way to it.  A message whose
segments do not all arrive is lost, and counted, when a newer one needs its slot or
one :data:`REORDER_SPAN` sequence numbers newer is whole.
"""
from __future__ import annotations

import struct

from conntrack.errors import LocalProtocolError

from .wire import HEADER_LEN, Drop, WireError

#: The message type byte of a segment (see :class:`tunnel.wire.MsgType`).
SEGMENT_TYPE = 9
SEGMENT_HEAD = HEADER_LEN + 2  # the header, index, count
MAX_SEGMENTS = 255
#: Messages in reassembly at once, per session: UDP reorders little, and each slot may hold ~64 KiB.
MAX_PENDING = 4
#: A message still incomplete when one this many sequence numbers newer is whole has lost a segment:
#: given up then (counted) rather than when its slot is needed.
REORDER_SPAN = 16
#: The smallest ``segment_size`` we cut to (IPv4's minimum reassembly size 576, less IP and UDP).
MIN_SEGMENT_SIZE = 576 - 28
_INDEX = struct.Struct("!BB")
_INDICES = bytes(range(256))


def split(message: bytes, segment_size: int) -> bytes:
    """``message`` (a sealed DATA message larger than ``segment_size``) as segments laid end to end,
    every one but the last ``segment_size`` bytes: one buffer for one UDP GSO send."""
    if segment_size < MIN_SEGMENT_SIZE:
        raise LocalProtocolError(Drop.OVERSIZED, f"segment size {segment_size} below {MIN_SEGMENT_SIZE}")
    piece = segment_size - SEGMENT_HEAD
    mv = memoryview(message)
    body = mv[HEADER_LEN:]
    count = -(-len(body) // piece)
    if count > MAX_SEGMENTS:
        raise LocalProtocolError(Drop.OVERSIZED, f"{len(message)} bytes need {count} segments, at most {MAX_SEGMENTS}")
    head = bytes((message[0], SEGMENT_TYPE)) + bytes(mv[2:HEADER_LEN])
    parts: list[bytes | memoryview] = []
    for i in range(count):
        parts.append(head)
        parts.append(_INDEX.pack(i, count))
        parts.append(body[i * piece:(i + 1) * piece])
    return b"".join(parts)


def datagrams(buf: bytes, segment_size: int) -> list[memoryview]:
    """The datagrams of a buffer :func:`split` made (or UDP GRO coalesced): ``segment_size`` bytes each,
    the last one shorter or equal."""
    mv = memoryview(buf)
    return [mv[i:i + segment_size] for i in range(0, len(buf), segment_size)]


def run(buf: bytes, size: int) -> tuple[int, int, int, bytes] | None:
    """``(first, k, count, pieces)`` when ``buf`` holds ``k`` consecutive segments of one message, ``size``
    bytes apart, from index ``first`` of ``count`` (what one UDP GRO read hands over for one GSO send:
    a whole message, or the part of it one send carried), ``pieces`` their bodies joined; None for
    anything else (the caller then takes the datagrams one by one).  The fast path: a GRO read costs
    a few column checks and one join, not a reassembly step per datagram."""
    n = len(buf)
    k = -(-n // size)
    if k < 2 or n <= (k - 1) * size + SEGMENT_HEAD:
        return None
    first, count = buf[HEADER_LEN], buf[HEADER_LEN + 1]
    if count < 2 or first + k > count:
        return None
    # Column by column (extended slices run in C): every segment's header byte j equals the first's,
    # the indices count up, and every count is the same.
    if buf[HEADER_LEN::size] != _INDICES[first:first + k] or buf[HEADER_LEN + 1::size] != bytes((count,)) * k:
        return None
    for j in range(HEADER_LEN):
        if buf[j::size] != buf[j:j + 1] * k:
            return None
    mv = memoryview(buf)
    return first, k, count, b"".join([mv[i * size + SEGMENT_HEAD:(i + 1) * size] for i in range(k)])


class Budget:
    """Bytes an end may hold in reassembly, over all its sessions."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit


class Reassembly:
    """The messages of one session being put back together, keyed by sequence number."""

    __slots__ = ("pending", "budget", "max_message", "lost", "reserve", "size")

    def __init__(self, budget: Budget, max_message: int, reserve: int = 0) -> None:
        #: seq -> [count, received, size, pieces]; insertion order is arrival order (oldest first)
        self.pending: dict[int, list] = {}
        self.budget = budget
        self.max_message = max_message
        self.lost = 0  # messages given up, their segments incomplete
        self.reserve = reserve  # bytes this session holds without drawing on the shared budget
        self.size = 0  # bytes held

    def _need(self, n: int) -> int:
        """What holding ``n`` more bytes draws from the shared budget (past the reserve)."""
        return max(0, self.size + n - self.reserve) - max(0, self.size - self.reserve)

    def _hold(self, n: int) -> None:
        self.budget.left -= self._need(n)
        self.size += n

    def _release(self, n: int) -> None:
        self.budget.left -= self._need(-n)  # (negative: given back)
        self.size -= n

    def add(self, segment: bytes | memoryview, seq: int) -> bytes | None:
        """Hold one segment (the caller checked its header and the sequence number's freshness).
        Returns the body of the whole message once its last segment came, else None.  Raises
        :class:`WireError` for a segment that cannot belong (BAD_PAYLOAD) or came before (REPLAYED)."""
        if len(segment) <= SEGMENT_HEAD:
            raise WireError(Drop.TRUNCATED, f"segment of {len(segment)} bytes")
        index, count = _INDEX.unpack_from(segment, HEADER_LEN)
        if count < 2 or index >= count:
            raise WireError(Drop.BAD_PAYLOAD, f"segment {index} of {count}")
        n = len(segment) - SEGMENT_HEAD
        entry = self.pending.get(seq)
        if entry is None:
            if (count - 1) * (MIN_SEGMENT_SIZE - SEGMENT_HEAD) >= self.max_message:  # more than any message needs
                raise WireError(Drop.OVERSIZED, f"{count} segments")
            if len(self.pending) >= MAX_PENDING:
                self._give_up(next(iter(self.pending)))
            entry = self.pending[seq] = [count, 0, 0, [None] * count]
        elif entry[0] != count:
            raise WireError(Drop.BAD_PAYLOAD, f"segment says {count} segments, its message {entry[0]}")
        pieces = entry[3]
        if pieces[index] is not None:
            raise WireError(Drop.REPLAYED, f"segment {index} again")
        if entry[2] + n > self.max_message:
            raise WireError(Drop.OVERSIZED, "segments larger than a message")
        self._make_room(seq, n)
        pieces[index] = bytes(segment[SEGMENT_HEAD:])
        self._hold(n)
        entry[1] += 1
        entry[2] += n
        if entry[1] < count:
            return None
        return self._complete(seq, entry)

    def _make_room(self, seq: int, n: int) -> None:
        """Over the budget, this session's other messages go, oldest first; then, if still over, refused."""
        while self.budget.left < self._need(n):
            older = next((q for q in self.pending if q != seq), None)
            if older is None:
                raise WireError(Drop.OVERSIZED, "reassembly budget spent")
            self._give_up(older)

    def _complete(self, seq: int, entry: list) -> bytes:
        del self.pending[seq]
        self._release(entry[2])
        for old in [q for q in self.pending if q + REORDER_SPAN < seq]:
            self._give_up(old)
        return b"".join(entry[3])

    def add_run(self, seq: int, first: int, k: int, count: int, pieces: bytes) -> bytes | None:
        """:meth:`add` for ``k`` consecutive segments at once (see :func:`run`): the same checks, the same
        bounds, the whole message's body once its last run or segment came."""
        entry = self.pending.get(seq)
        if entry is not None and entry[0] != count:
            raise WireError(Drop.BAD_PAYLOAD, f"segments say {count} segments, their message {entry[0]}")
        if entry is not None and any(p is not None for p in entry[3][first:first + k]):
            raise WireError(Drop.REPLAYED, f"segments {first}..{first + k - 1} again")
        if first == 0 and k == count:
            self.discard(seq)
            return pieces
        if entry is None:
            if (count - 1) * (MIN_SEGMENT_SIZE - SEGMENT_HEAD) >= self.max_message:
                raise WireError(Drop.OVERSIZED, f"{count} segments")
            if len(self.pending) >= MAX_PENDING:
                self._give_up(next(iter(self.pending)))
            entry = self.pending[seq] = [count, 0, 0, [None] * count]
        n = len(pieces)
        if entry[2] + n > self.max_message:
            raise WireError(Drop.OVERSIZED, "segments larger than a message")
        self._make_room(seq, n)
        slots = entry[3]
        slots[first] = pieces
        for i in range(first + 1, first + k):
            slots[i] = b""  # their bytes ride in ``pieces``, at ``first``
        self._hold(n)
        entry[1] += k
        entry[2] += n
        return self._complete(seq, entry) if entry[1] == count else None

    def discard(self, seq: int) -> None:
        """Forget a message (opened, or found forged) without counting it lost."""
        entry = self.pending.pop(seq, None)
        if entry is not None:
            self._release(entry[2])

    def clear(self) -> None:
        """The session ended: give back every held byte (messages in flight are lost, counted)."""
        for seq in list(self.pending):
            self._give_up(seq)

    def _give_up(self, seq: int) -> None:
        entry = self.pending.pop(seq)
        self._release(entry[2])
        self.lost += 1

    @property
    def held(self) -> int:
        return self.size
