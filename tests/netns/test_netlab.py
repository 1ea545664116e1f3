"""The lab helper itself: namespaces, veth across them, traffic, and cleanup."""
from __future__ import annotations

import os
import socket

import pytest

from tools.lab import netlab


def _present(names):
    return [n for n in names if os.path.exists(os.path.join(netlab.NETNS_DIR, n))]


def test_two_namespaces_ping_and_cleanup(lab):
    a, b = lab.ns("left"), lab.ns("right")
    lab.veth(a, "l0", b, "r0")
    lab.addr(a, "l0", "198.18.0.1/24")
    lab.addr(b, "r0", "198.18.0.2/24")

    assert lab.ping(a, "198.18.0.2", count=3) == 3
    # An address nobody has: no replies (the helper really counts replies).
    assert lab.ping(a, "198.18.0.77", count=1, timeout=0.3) == 0

    # The veth ends live only in our namespaces, never in the root namespace.
    with netlab.IPRoute() as root:
        root_links = {link.get_attr("IFLA_IFNAME") for link in root.get_links()}
    assert "l0" not in root_links and "r0" not in root_links

    sleeper = lab.popen(b, ["sleep", "60"])
    names = list(lab.namespaces)
    assert _present(names) == names
    lab.close()
    assert _present(names) == []
    assert sleeper.poll() is not None
    lab.close()  # idempotent


def test_routed_path_and_sockets_in_namespaces(lab):
    client, router, server = lab.ns("client"), lab.ns("router"), lab.ns("server")
    lab.veth(client, "c0", router, "rc")
    lab.veth(router, "rs", server, "s0")
    lab.addr(client, "c0", "198.18.0.2/24")
    lab.addr(router, "rc", "198.18.0.1/24")
    lab.addr(router, "rs", "203.0.113.1/24")
    lab.addr(server, "s0", "203.0.113.2/24")
    lab.route(client, "default", "198.18.0.1")
    lab.route(server, "default", "203.0.113.1")

    lab.sysctl(router, "net.ipv4.ip_forward", "0")
    assert lab.ping(client, "203.0.113.2", count=1, timeout=0.3) == 0
    lab.sysctl(router, "net.ipv4.ip_forward", "1")
    assert lab.ping(client, "203.0.113.2", count=2) == 2

    # UDP through the router with sockets created in the namespaces.
    with lab.socket(server, socket.AF_INET, socket.SOCK_DGRAM) as srv, \
            lab.socket(client, socket.AF_INET, socket.SOCK_DGRAM) as cli:
        srv.bind(("203.0.113.2", 0))
        srv.settimeout(2)
        cli.settimeout(2)
        cli.sendto(b"hello", srv.getsockname())
        data, peer = srv.recvfrom(100)
        assert data == b"hello" and peer[0] == "198.18.0.2"


def test_move_link_and_bridge(lab):
    home, host1, host2 = lab.ns("home"), lab.ns("host1"), lab.ns("host2")
    lab.veth(home, "h0", host1, "vm0")
    lab.bridge(home, "br0", ports=["h0"])
    lab.addr(home, "br0", "198.18.5.1/24")
    lab.addr(host1, "vm0", "198.18.5.2/24")
    assert lab.ping(host1, "198.18.5.1", count=1) == 1
    lab.move_link(host1, "vm0", host2)
    assert lab.ipr(host1).link_lookup(ifname="vm0") == []
    lab.addr(host2, "vm0", "198.18.5.2/24")  # the move dropped the address
    assert lab.ping(host2, "198.18.5.1", count=1) == 1


def test_refuses_foreign_namespace(lab):
    with pytest.raises(netlab.LabError):
        lab.run("not-ours", ["true"])
    with pytest.raises(netlab.LabError):
        lab.ipr("not-ours")


def test_cleanup_stale_only_touches_dead_creators():
    if os.geteuid() != 0:
        pytest.skip("real-kernel test skipped: needs root")
    # A namespace named as if made by a dead pid, and one by a live pid (ours).
    dead_pid = 2 ** 22 + 17  # above pid_max's default ceiling: never alive
    # Own prefix, so this test can never remove another run's namespaces.
    dead = netlab.Lab("roamstale", suffix=f"p{dead_pid}x00aa")
    live = netlab.Lab("roamstale")
    try:
        d = dead.ns("stale")
        lv = live.ns("busy")
        removed = netlab.cleanup_stale("roamstale", min_age=0)
        assert d in removed
        assert lv not in removed and _present([lv]) == [lv]
    finally:
        dead.close()
        live.close()


def test_close_ends_strays_and_survives_errors():
    """A process that escaped tracking (backgrounded by a shell) still dies with the
    lab, and an exception inside the block still removes every namespace."""
    if netlab.probe():
        pytest.skip(f"real-kernel test skipped: {netlab.probe()}")
    names = []
    stray = 0
    with pytest.raises(RuntimeError, match="boom"):
        with netlab.Lab("roam") as lab:
            a = lab.ns("strays")
            names = list(lab.namespaces)
            out = lab.run(a, ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"]).stdout
            stray = int(out.strip())
            assert netlab._pid_alive(stray)
            raise RuntimeError("boom")
    assert _present(names) == []
    assert not os.path.exists(f"/proc/{stray}") or open(f"/proc/{stray}/stat").read().split()[2] == "Z"
