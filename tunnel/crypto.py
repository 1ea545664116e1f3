"""Authenticated encryption of tunnel messages, the pre-shared key, and the replay window.

* Cipher: ChaCha20-Poly1305 (RFC 8439, from ``cryptography``) with a 32-byte
  pre-shared key read from a key file (one line: the key in base64, as
  ``roam tunnel genkey`` writes it; ``#`` lines are comments).  A session's own
  key may be AES-256-GCM instead, when both ends asked for it in the handshake
  (:attr:`tunnel.wire.Flag.AES`): where the CPU has AES instructions OpenSSL's
  AES-GCM is the faster (measured on the bench machine: 5 us to seal 64 KiB against
  ChaCha20-Poly1305's 18 us), and ChaCha20-Poly1305 is the faster where it has not.
  The session key of each suite comes from its own HKDF label, so no key serves both.
* The 16-byte header is the associated data: it travels in clear but any change
  to it fails authentication.
* Keys.  The pre-shared key never seals a message itself: each session has its
  own key, HKDF-SHA256 of the pre-shared key with both ends' random nonces
  (16 bytes each, exchanged in ATTACH and EPOCH) as salt and the session id in
  the info; a host end's *hello* (its first ATTACH, before it knows the proxy's
  nonce) is sealed under HKDF of the pre-shared key and its own nonce.  Every
  nonce is fresh for every session, every EPOCH and every host-end start, so a
  session key is never used by two sessions, across restarts or proxies (short
  of a 128-bit collision).
* Nonce (12 bytes) = direction (1 byte: 1 from the proxy, 0 from a host end) ||
  session id (4) || sequence number (7, so sequence numbers stay below 2**56).
  Each sender counts its sequence numbers up from 0 under each key and never
  reuses one: (key, nonce) never repeats.
* RESET messages carry no payload: a 16-byte HMAC-SHA256 of the header under a
  key derived from the pre-shared key (deterministic: the same header always gets
  the same MAC, and nothing else is ever MACed under that key).
* Cookies (the proxy's, in EPOCH): HMAC-SHA256 under a secret the proxy draws at
  start, so a restart invalidates every cookie it issued.
* Replay protection: :class:`ReplayWindow`, a sliding bitmap in the style of
  RFC 6479 (a ring of 64-bit blocks, window of (blocks - 1) * 64 sequence numbers).
  A message is checked against the window before and recorded only *after* it
  authenticated, so forged messages cannot move the window.
* Keys never appear in ``repr``/``str``/logs: :class:`Key` shows a fingerprint only.
* :class:`PlainCipher` carries payloads unencrypted and unauthenticated, for
  benchmarks only; its messages carry the PLAINTEXT flag, and an encrypting end
  rejects them (and the reverse).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from conntrack.errors import LocalProtocolError

from .wire import (
    CLEAR_LEN, COOKIE_LEN, HEADER, HEADER_LEN, MAX_SEQ, TAG_LEN, VERSION, Drop, Header, WireError, build_header,
    parse_header,
)

KEY_LEN = 32
#: HKDF ``info`` labels: one per use, with the wire version, so no derived key serves two purposes.
INFO_HELLO = b"roam-tunnel 2 hello"
INFO_SESSION = b"roam-tunnel 2 session"
INFO_SESSION_AES = b"roam-tunnel 2 session aes-256-gcm"
INFO_RESET = b"roam-tunnel 2 reset"


class KeyFileError(ValueError):
    """The key file does not hold a key (the message never contains key material)."""


class Key:
    """A 32-byte pre-shared key that refuses to show itself."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) != KEY_LEN:
            raise KeyFileError(f"a key is {KEY_LEN} bytes, got {len(secret)}")
        self._secret = bytes(secret)

    @property
    def fingerprint(self) -> str:
        """A short hash that lets two ends compare keys without revealing them."""
        return hashlib.sha256(b"roam-tunnel-key-fingerprint" + self._secret).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"Key(fingerprint={self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and other._secret == self._secret

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __reduce__(self):  # no pickling a key into some log or cache by accident
        raise TypeError("a Key cannot be pickled")


def generate_key_text() -> str:
    """A new random key in the key file's format (base64 text, no newline)."""
    return base64.b64encode(os.urandom(KEY_LEN)).decode("ascii")


def parse_key_text(text: str) -> Key:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(lines) != 1:
        raise KeyFileError(f"a key file holds one base64 line, found {len(lines)}")
    try:
        raw = base64.b64decode(lines[0], validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError("the key line is not base64") from None
    return Key(raw)


def load_key(path: str | os.PathLike) -> Key:
    with open(path, encoding="ascii", errors="replace") as f:
        return parse_key_text(f.read(4096))


_NONCE = struct.Struct("!BIBHI")  # direction, session, sequence as 8 + 16 + 32 bits


def nonce(flags: int, session: int, seq: int) -> bytes:
    return _NONCE.pack(flags & 0x01, session, (seq >> 48) & 0xFF, (seq >> 32) & 0xFFFF, seq & 0xFFFFFFFF)


def nonce_for(h: Header) -> bytes:
    return nonce(int(h.flags), h.session, h.seq)


def hkdf(secret: bytes, salt: bytes, info: bytes, length: int = KEY_LEN) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


#: What a cipher opens: a message's bytes, or views into the buffer it was read into (no copy).
Buf = bytes | bytearray | memoryview


class Cipher(Protocol):
    plaintext: bool
    overhead: int
    fingerprint: str  # names the key without showing it (status, logs)

    def seal(self, header: bytes, nonce: bytes, payload: bytes) -> bytes: ...
    def open(self, header: Buf, nonce: bytes, body: Buf) -> bytes: ...
    def derive(self, salt: bytes, info: bytes, aes: bool = False) -> "Cipher": ...
    def mac(self, info: bytes, data: bytes) -> bytes: ...


def hello_cipher(psk: Cipher, session: int, host_nonce: bytes) -> Cipher:
    """What seals a session's hellos: the pre-shared key and the host end's nonce."""
    return psk.derive(host_nonce, INFO_HELLO + session.to_bytes(4, "big"))


def session_cipher(psk: Cipher, session: int, host_nonce: bytes, proxy_nonce: bytes, aes: bool = False) -> Cipher:
    """The session key: the pre-shared key and both ends' nonces (``aes``: an AES-256-GCM key)."""
    return psk.derive(host_nonce + proxy_nonce, (INFO_SESSION_AES if aes else INFO_SESSION)
                      + session.to_bytes(4, "big"), aes)


def aes_is_fast(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has AES instructions (x86 ``aes``, arm64 ``aes`` among the flags or
    features): then AES-256-GCM is the faster suite (``roam tunnel --cipher auto``)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return False


def reset_tag(psk: Cipher, header: bytes) -> bytes:
    return psk.mac(INFO_RESET, header)


def cookie(secret: bytes, session: int, host_nonce: bytes, proxy_nonce: bytes, issued: int) -> bytes:
    """The proxy's cookie: only the run that drew ``secret`` can make or check one."""
    data = session.to_bytes(4, "big") + host_nonce + proxy_nonce + (issued & 0xFFFFFFFF).to_bytes(4, "big")
    return hmac.new(secret, data, hashlib.sha256).digest()[:COOKIE_LEN]


class AeadCipher:
    """ChaCha20-Poly1305 (or AES-256-GCM: ``aes``) under a key."""

    plaintext = False
    overhead = TAG_LEN

    __slots__ = ("_aead", "_secret", "_mac_keys", "fingerprint", "aes")

    def __init__(self, key: Key, aes: bool = False) -> None:
        self._aead = AESGCM(key._secret) if aes else ChaCha20Poly1305(key._secret)
        self.aes = aes
        self._secret = key._secret
        self._mac_keys: dict[bytes, bytes] = {}
        self.fingerprint = key.fingerprint

    def derive(self, salt: bytes, info: bytes, aes: bool = False) -> "AeadCipher":
        """A cipher under HKDF(this key, salt, info)."""
        return AeadCipher(Key(hkdf(self._secret, salt, info)), aes)

    def mac(self, info: bytes, data: bytes) -> bytes:
        """A 16-byte HMAC-SHA256 of ``data`` under HKDF(this key, "", info)."""
        k = self._mac_keys.get(info)
        if k is None:
            k = self._mac_keys[info] = hkdf(self._secret, b"", info)
        return hmac.new(k, data, hashlib.sha256).digest()[:TAG_LEN]

    def __repr__(self) -> str:
        return f"AeadCipher({'aes-256-gcm' if self.aes else 'chacha20-poly1305'}, key={self.fingerprint})"

    def seal(self, header: bytes, nonce: bytes, payload: bytes) -> bytes:
        return header + self._aead.encrypt(nonce, payload, header)

    def open(self, header: Buf, nonce: bytes, body: Buf) -> bytes:
        if len(body) < TAG_LEN:
            raise WireError(Drop.TRUNCATED, f"body needs a {TAG_LEN}-byte tag, have {len(body)} bytes")
        try:
            return self._aead.decrypt(nonce, body, header)
        except InvalidTag:
            raise WireError(Drop.AUTH_FAILED, "tag does not verify") from None


class PlainCipher:
    """No encryption, no authentication: for benchmarks only (the CLI warns)."""

    plaintext = True
    overhead = 0
    fingerprint = "plaintext"

    def __repr__(self) -> str:
        return "PlainCipher(UNAUTHENTICATED, benchmarks only)"

    def seal(self, header: bytes, nonce: bytes, payload: bytes) -> bytes:
        return header + bytes(payload)

    def open(self, header: Buf, nonce: bytes, body: Buf) -> bytes:
        return bytes(body)

    aes = False

    def derive(self, salt: bytes, info: bytes, aes: bool = False) -> "PlainCipher":
        return self

    def mac(self, info: bytes, data: bytes) -> bytes:
        return bytes(TAG_LEN)


def seal_message(cipher: Cipher, h: Header, payload: bytes) -> bytes:
    """Header + sealed payload; the header's PLAINTEXT flag follows the cipher."""
    build_header(h)  # range checks
    return seal_parts(cipher, int(h.type), int(h.flags), h.session, h.seq, payload)


def seal_parts(cipher: Cipher, mtype: int, flags: int, session: int, seq: int, payload: bytes,
               clear: bytes = b"") -> bytes:
    """:func:`seal_message` for the data path: plain ints, no intermediate values.  ``clear`` (an
    ATTACH's handshake block, an EPOCH's nonce) follows the header unencrypted, authenticated with it."""
    if cipher.plaintext:
        flags |= 0x02
    if seq > MAX_SEQ:  # callers check their counter first: reaching this is our bug
        raise LocalProtocolError(Drop.SEQ_EXHAUSTED, f"sequence {seq} out of range")
    return cipher.seal(HEADER.pack(VERSION, mtype, flags, 0, session, seq) + clear, nonce(flags, session, seq),
                       payload)


def open_body(cipher: Cipher, h: Header, buf: bytes | bytearray | memoryview) -> bytes:
    """Authenticate and decrypt the message whose header ``h`` was parsed from ``buf``."""
    if h.plaintext != cipher.plaintext:
        raise WireError(Drop.MODE_MISMATCH, "plaintext message to an encrypting end" if h.plaintext
                        else "encrypted message to a plaintext end")
    mv = memoryview(buf)
    n = HEADER_LEN + CLEAR_LEN.get(h.type, 0)
    if len(mv) < n:
        raise WireError(Drop.TRUNCATED, f"{h.type.name.lower()} needs {n} bytes before its body, have {len(mv)}")
    return cipher.open(mv[:n], nonce(int(h.flags), h.session, h.seq), mv[n:])


def clear_part(h: Header, buf: bytes | bytearray | memoryview) -> bytes:
    """The clear block after the header of a message whose body :func:`open_body` opened."""
    return bytes(buf[HEADER_LEN:HEADER_LEN + CLEAR_LEN.get(h.type, 0)])


def open_message(cipher: Cipher, buf: bytes | bytearray | memoryview, max_len: int) -> tuple[Header, bytes]:
    """Check, authenticate and decrypt one message; the only failure is :class:`WireError`.

    Replay is not checked here (that needs the session's window): callers look up
    the session, check its window, call :func:`open_body`, then record the sequence number.
    """
    if len(buf) > max_len:
        raise WireError(Drop.OVERSIZED, f"message of {len(buf)} bytes, at most {max_len}")
    h = parse_header(buf)
    return h, open_body(cipher, h, buf)


class ReplayWindow:
    """Sliding anti-replay window over sequence numbers (RFC 6479's bitmap ring).

    ``check(seq)`` says whether ``seq`` may be new; ``update(seq)`` records an
    *authenticated* one.  The window spans ``(blocks - 1) * 64`` numbers below the
    highest seen; older numbers are refused.
    """

    __slots__ = ("blocks", "size", "top", "_bits")

    def __init__(self, blocks: int = 32) -> None:
        if blocks < 2:
            raise ValueError("a replay window needs at least two blocks")
        self.blocks = blocks
        self.size = (blocks - 1) * 64
        self.top = -1  # highest sequence number recorded, -1 before the first
        self._bits = [0] * blocks

    def check(self, seq: int) -> bool:
        if not 0 <= seq <= MAX_SEQ:
            return False
        if seq > self.top:
            return True
        if seq + self.size <= self.top:
            return False
        return not (self._bits[(seq >> 6) % self.blocks] >> (seq & 63)) & 1

    def update(self, seq: int) -> bool:
        """Record ``seq``; False (and no change) if it is a replay or too old."""
        if not self.check(seq):
            return False
        if seq > self.top:
            new_block = seq >> 6
            if self.top < 0:
                self._bits = [0] * self.blocks
            else:
                cur = self.top >> 6
                for i in range(1, min(new_block - cur, self.blocks) + 1):
                    self._bits[(cur + i) % self.blocks] = 0
            self.top = seq
        self._bits[(seq >> 6) % self.blocks] |= 1 << (seq & 63)
        return True


assert HEADER_LEN == 16
