import random
import struct

from nat.checksum import checksum, ones_sum, udp_update, update


def test_incremental_matches_recompute():
    rng = random.Random(1)
    for _ in range(500):
        data = bytearray(rng.randbytes(rng.randrange(2, 64) * 2))
        c = checksum(data)
        i = rng.randrange(0, len(data) // 2) * 2
        old = bytes(data[i:i + 2])
        new = rng.randbytes(2)
        data[i:i + 2] = new
        inc = update(c, old, new)
        # the updated checksum verifies the changed data (sum of data and checksum is all ones)
        assert checksum(bytes(data) + struct.pack("!H", inc)) == 0
        assert ones_sum(bytes(data) + struct.pack("!H", checksum(data))) == 0xFFFF


def test_rfc1624_example():
    # RFC 1624 section 4: HC = 0xDD2F, m = 0x5555 -> m' = 0x3285 gives HC' = 0x0000
    assert update(0xDD2F, b"\x55\x55", b"\x32\x85") == 0x0000


def test_zero_udp_checksum_stays_zero():
    assert udp_update(0, 0x1234, 0x4321) == 0


def test_udp_never_emits_zero():
    # find a case where the plain update would give 0 and check UDP sends 0xFFFF instead
    assert update(0xDD2F, b"\x55\x55", b"\x32\x85") == 0
    assert udp_update(0xDD2F, 0x5555, 0x3285) == 0xFFFF
