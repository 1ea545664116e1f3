"""The drivers' loops without root: socketpairs stand in for the TAPs and for the UDP/TCP sockets.

A host driver and a proxy driver wired together carry an attach, a frame each way, and junk
(a counted drop); the clock is a number the test moves, and the loops are stepped by hand
(``run_once(0)``), so nothing waits on real time.
"""
from __future__ import annotations

import json
import socket

import pytest

from conntrack.errors import LocalProtocolError
from tools.cmd_tunnel import read_status_dir
from tunnel import AeadCipher, Drop, HostEnd, ProxyEnd, SessionState
from tunnel.crypto import Key
from tunnel.io import HostDriver, ProxyDriver
from tunnel.io.transport import CONNECTED_PEER
from tunnel.stream import encode

CIPHER = AeadCipher(Key(bytes(range(32))))
VM = bytes.fromhex("020000000001")
PEER = bytes.fromhex("02000000aaaa")
PROXY_ADDR = ("192.0.2.1", 4789)  # only a name here: the sockets are socketpairs, nothing is sent to it


def frame(dst: bytes, src: bytes, body: bytes = bytes(46)) -> bytes:
    return dst + src + b"\x08\x00" + body


class PairTap:
    """A TAP stand-in: the driver's end of a SOCK_SEQPACKET socketpair (one frame per packet, like a TAP
    descriptor); the test holds the other end, the VM's (or the home LAN's) side of the link."""

    def __init__(self, name: str) -> None:
        self.sock, self.wire = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.setblocking(False)
        self.wire.settimeout(0)
        self.name, self.mtu = name, 1500

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> bytes | None:
        try:
            return self.sock.recv(65536)
        except BlockingIOError:
            return None

    def write(self, f: bytes) -> bool:
        try:
            self.sock.send(f)
            return True
        except BlockingIOError:
            return False

    def close(self) -> None:
        self.sock.close()

    def frames(self) -> list[bytes]:
        """What the driver wrote to the TAP so far."""
        out = []
        while True:
            try:
                out.append(self.wire.recv(65536))
            except BlockingIOError:
                return out


class Wired:
    """A host driver and a proxy driver joined by a socketpair (datagram for udp, stream for tcp)."""

    def __init__(self, transport: str, status_dir=None) -> None:
        self.now = 100.0
        clock = lambda: self.now  # noqa: E731 - the test's clock
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.host_sock, self.proxy_sock = socket.socketpair(socket.AF_UNIX, kind)
        self.host_tap, self.lan_tap = PairTap("rt0"), PairTap("roamp0")
        self.host = HostEnd(CIPHER, [VM])
        self.proxy = ProxyEnd(CIPHER)
        self.hd = HostDriver(self.host, self.host_tap, PROXY_ADDR, transport, clock, status_dir, sock=self.host_sock)
        if transport == "udp":
            self.pd = ProxyDriver(self.proxy, self.lan_tap, None, transport, clock, status_dir, sock=self.proxy_sock)
            self.endpoint = CONNECTED_PEER
        else:
            self.pd = ProxyDriver(self.proxy, self.lan_tap, None, transport, clock, status_dir)
            self.endpoint = ("tcp", "socketpair", 1)
            self.pd.adopt(self.proxy_sock, self.endpoint, self.now)
        self.hd.begin(self.now)

    def pump(self, rounds: int = 8) -> None:
        for _ in range(rounds):
            self.pd.run_once(0)
            self.hd.run_once(0)

    def close(self) -> None:
        for d in (self.hd, self.pd):
            try:
                d.shutdown()
            except OSError:
                pass
        for t in (self.host_tap, self.lan_tap):
            t.wire.close()


@pytest.fixture(params=["udp", "tcp"])
def wired(request):
    w = Wired(request.param)
    yield w
    w.close()


def test_drivers_attach_and_carry_a_frame_each_way(wired):
    w = wired
    w.pump()
    assert w.host.state == SessionState.ATTACHED
    (s,) = w.proxy.sessions.values()
    assert s.endpoint == w.endpoint and w.proxy.macs.lookup(VM) == s.id
    w.host_tap.wire.send(frame(PEER, VM))  # the VM sends
    w.pump()
    assert w.lan_tap.frames() == [frame(PEER, VM)]
    w.lan_tap.wire.send(frame(VM, PEER, b"reply" + bytes(41)))  # the LAN answers
    w.pump()
    assert w.host_tap.frames() == [frame(VM, PEER, b"reply" + bytes(41))]
    assert not w.hd.drops and not w.pd.drops
    assert w.host.counters["tx_frames"] == 1 and w.host.counters["rx_frames"] == 1


def test_junk_is_a_counted_drop_and_the_tunnel_goes_on(wired):
    w = wired
    w.pump()
    junk = b"junk" * 10
    if w.hd.transport == "udp":
        w.host_sock.send(junk)  # from the host end's socket, as anyone on the path could
    else:
        w.host_sock.send(encode(junk))  # well framed, but not a message
    w.pump()
    assert w.pd.drops == {"bad_version": 1} and w.proxy.drops == {Drop.BAD_VERSION: 1}
    assert w.pd.status(w.now)["drops"] == {"bad_version": 1}
    w.host_tap.wire.send(frame(PEER, VM))
    w.pump()
    assert w.lan_tap.frames() == [frame(PEER, VM)]


def test_a_frame_nobody_takes_is_counted_by_the_driver_by_reason():
    w = Wired("udp")
    try:
        w.lan_tap.wire.send(frame(b"\xff" * 6, PEER))  # before any host end attached
        w.pd.run_once(0)
        assert w.pd.drops == {"no_session": 1}
        w.pump()
        w.host_tap.wire.send(frame(VM, VM))  # hairpin: the destination lives behind the same session
        w.pump()
        assert w.pd.drops == {"no_session": 1, "hairpin": 1} and w.lan_tap.frames() == []
    finally:
        w.close()


def test_tcp_bad_framing_is_a_drop_and_closes_that_connection():
    w = Wired("tcp")
    try:
        w.pump()
        assert len(w.pd.conns) == 1 and w.pd.conns[w.endpoint].last_authentic == w.now
        w.host_sock.send(b"\x00\x00junk")  # a zero length prefix: the stream cannot be resynchronised
        w.pump()
        assert w.pd.drops == {"bad_length": 1} and not w.pd.conns
        assert w.pd.counters["tcp_bad_framing"] == 1
    finally:
        w.close()


def test_tcp_connection_without_an_authentic_message_times_out():
    w = Wired("tcp")
    try:
        stranger, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        w.pd.adopt(theirs, ("tcp", "stranger", 2), w.now)
        stranger.send(encode(b"junk" * 10))
        w.pump()
        assert w.pd.conns[("tcp", "stranger", 2)].last_authentic is None
        w.now += 10.0  # the default auth timeout
        w.pump()
        assert ("tcp", "stranger", 2) not in w.pd.conns and w.endpoint in w.pd.conns
        assert w.pd.counters["tcp_auth_timeouts"] == 1
        stranger.close()
    finally:
        w.close()


def test_timers_keepalives_go_out_through_the_same_helper(wired):
    w = wired
    w.pump()
    before = w.proxy.sessions[w.host.session].counters["rx_messages"]
    w.now += 5.0  # keepalive interval
    w.pump()
    assert w.host.counters["keepalives"] == 1
    assert w.proxy.sessions[w.host.session].counters["rx_messages"] == before + 1


def test_status_file_is_written_read_by_the_cli_and_removed_on_shutdown(tmp_path):
    w = Wired("udp", status_dir=str(tmp_path))
    try:
        w.pump()
        w.now += 1.0
        w.pump()
        ends = {st["role"]: st for st in read_status_dir(str(tmp_path))}
        assert set(ends) == {"host", "proxy"} and all(st["alive"] for st in ends.values())
        assert ends["host"]["state"] == "ATTACHED" and ends["host"]["tap"] == "rt0"
        assert ends["proxy"]["sessions"][0]["session"] == ends["host"]["session"]
        json.dumps(ends)
    finally:
        w.close()
    assert read_status_dir(str(tmp_path)) == []
    assert read_status_dir(str(tmp_path / "none")) == []


def test_host_shutdown_detaches_and_the_proxy_closes_the_session():
    w = Wired("udp")
    try:
        w.pump()
        assert len(w.proxy.sessions) == 1
        w.hd.shutdown()  # sends DETACH on the way out
        w.pd.run_once(0)
        assert not w.proxy.sessions and w.proxy.counters["sessions_closed"] == 1
    finally:
        w.pd.shutdown()


def test_our_own_bug_is_logged_and_counted_the_loop_goes_on(wired, monkeypatch, caplog):
    w = wired
    w.pump()

    def broken(frame, now):
        raise LocalProtocolError(Drop.OVERSIZED, "a bug of ours")

    monkeypatch.setattr(w.hd, "tap_input", broken)  # the engine method the driver hands TAP frames to
    w.host_tap.wire.send(frame(PEER, VM))
    w.pump()
    assert w.hd.counters["bugs"] == 1 and "a bug of ours" in caplog.text
    w.lan_tap.wire.send(frame(VM, PEER))  # the other way still works
    w.pump()
    assert w.host_tap.frames() == [frame(VM, PEER)]
