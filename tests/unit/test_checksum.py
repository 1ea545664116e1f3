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


def test_an_all_zero_sum_is_zero_and_a_nonzero_one_never_is():
    # end-around carry never turns a non-zero sum into 0: it is 0xFFFF ("negative zero")
    assert ones_sum(b"") == 0 and ones_sum(bytes(6)) == 0 and internet_checksum(bytes(4)) == 0xFFFF
    assert ones_sum(b"\xff\xff") == 0xFFFF and ones_sum(b"\x80\x00\x80\x00") == 1
    assert ones_sum(b"\x00\x01", 0xFFFE) == 0xFFFF


def test_fold_carries_from_the_first_value_over_16_bits():
    assert fold(0x10000) == 1 and fold(0x1FFFF) == 1 and fold(0x2FFFD) == 0xFFFF


def test_pseudo_sum_of_a_jumbo_ipv6_length():
    """RFC 8200 8.1: the IPv6 pseudo-header carries a 32-bit upper-layer length."""
    src, dst = bytes(range(16)), bytes(range(16, 32))
    for length in (0x28, 0x12345, 0xFFFFFFFF):
        header = src + dst + struct.pack("!IxxxB", length, 6)
        assert fold(pseudo_sum(src, dst, 6, length)) == ones_sum(header)


def _with_checksum_zero(src, dst, proto):
    """A segment whose checksum computes to 0: a filler word chosen to make the sum 0xFFFF."""
    seg = bytearray(struct.pack("!HHHH", 5000, 53, 10, 0) + b"\0\0")
    partial = ones_sum(seg, pseudo_sum(src, dst, proto, len(seg)))
    seg[8:10] = struct.pack("!H", 0xFFFF - partial)
    assert internet_checksum(seg, pseudo_sum(src, dst, proto, len(seg))) == 0
    return seg


def test_udp_sends_a_computed_zero_as_ffff_other_protocols_do_not():
    src, dst = bytes([198, 18, 0, 2]), bytes([192, 0, 2, 9])
    assert l4_checksum(src, dst, 17, _with_checksum_zero(src, dst, 17)) == 0xFFFF  # RFC 768
    assert l4_checksum(src, dst, 6, _with_checksum_zero(src, dst, 6)) == 0  # TCP has no "none"
