"""conntrack.checksum, the one checksum module (the NAT's rewrite and fast path use it)."""
import random
import struct

from conntrack.checksum import (ADJ, adjust, fold, internet_checksum, l4_checksum, ones_sum, pseudo_sum, udp_adjust,
                                update, word_sum)


def test_incremental_matches_recompute():
    rng = random.Random(1)
    for _ in range(500):
        data = bytearray(rng.randbytes(rng.randrange(2, 64) * 2))
        c = internet_checksum(data)
        i = rng.randrange(0, len(data) // 2) * 2
        old = bytes(data[i:i + 2])
        new = rng.randbytes(2)
        data[i:i + 2] = new
        inc = update(c, old, new)
        # the updated checksum verifies the changed data (sum of data and checksum is all ones)
        assert internet_checksum(bytes(data) + struct.pack("!H", inc)) == 0
        assert ones_sum(bytes(data) + struct.pack("!H", internet_checksum(data))) == 0xFFFF


def test_adjust_many_words_at_once_matches_recompute():
    # what the NAT does: addresses and ports (up to 6 words) changed in one adjust
    rng = random.Random(2)
    for _ in range(300):
        data = bytearray(rng.randbytes(40))
        c = internet_checksum(data)
        old = bytes(data[12:24])
        new = rng.randbytes(12)
        data[12:24] = new
        assert adjust(c, word_sum(old), word_sum(new)) == internet_checksum(data)


def test_rfc1624_example():
    # RFC 1624 section 4: HC = 0xDD2F, m = 0x5555 -> m' = 0x3285 gives HC' = 0x0000
    assert update(0xDD2F, b"\x55\x55", b"\x32\x85") == 0x0000


def test_zero_udp_checksum_stays_zero():
    assert udp_adjust(0, 0x1234, 0x4321) == 0


def test_udp_never_emits_zero():
    # find a case where the plain update would give 0 and check UDP sends 0xFFFF instead
    assert update(0xDD2F, b"\x55\x55", b"\x32\x85") == 0
    assert udp_adjust(0xDD2F, 0x5555, 0x3285) == 0xFFFF


def test_fold_and_word_sum():
    assert fold(0x1FFFE) == 0xFFFF and fold(0x12345) == 0x2346 and fold(0xFFFF) == 0xFFFF
    assert fold(ADJ) == 0xFFFF  # ADJ adds nothing in one's complement: 32 * 0xFFFF
    assert word_sum(b"\x12\x34") == 0x1234
    assert word_sum(b"\x12\x34\xff\xff") == 0x1234 + 0xFFFF
    assert word_sum(bytes(range(16))) == sum(struct.unpack("!8H", bytes(range(16))))


def test_l4_checksum_under_the_pseudo_header():
    src, dst = bytes([198, 18, 0, 2]), bytes([192, 0, 2, 9])
    seg = bytearray(struct.pack("!HHHH", 5000, 53, 9, 0) + b"q")
    c = l4_checksum(src, dst, 17, seg)
    seg[6:8] = struct.pack("!H", c)
    assert internet_checksum(seg, pseudo_sum(src, dst, 17, len(seg))) == 0
