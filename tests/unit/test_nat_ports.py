from nat.ports import PortPool, PortRange


def test_port_preservation():
    pool = PortPool((1024, 65535), (600, 1023), seed=1)
    assert pool.allocate(40000) == 40000
    second = pool.allocate(40000)
    assert second != 40000 and 1024 <= second <= 65535


def test_range_classes_rfc4787_req3a():
    pool = PortPool((1024, 65535), (600, 1023), seed=1)
    assert 600 <= pool.allocate(22) <= 1023  # 22 itself is outside the low pool: not preserved
    for _ in range(50):
        assert 600 <= pool.allocate(100) <= 1023
        assert pool.allocate(5000) >= 1024


def test_preservation_only_inside_the_pool():
    pool = PortPool((20000, 20010), (900, 910), seed=3)
    assert 20000 <= pool.allocate(5000) <= 20010
    assert pool.allocate(20005) == 20005


def test_full_pool_returns_none_and_free_makes_room():
    pool = PortPool((5000, 5003), None, seed=2)
    got = [pool.allocate(1) for _ in range(4)]
    assert sorted(got) == [5000, 5001, 5002, 5003]
    assert pool.allocate(1) is None
    assert pool.use().used == 4 and pool.use().size == 4
    pool.free(5002)
    assert pool.allocate(1) == 5002


def test_reserved_ports_never_allocated():
    r = PortRange(10, 12, reserved=frozenset({11}))
    got = {r.allocate(), r.allocate()}
    assert got == {10, 12} and r.allocate() is None
    assert not r.take(11)
