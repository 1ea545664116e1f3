"""The host agent's control socket, without root: a host driver and a proxy driver wired by socketpairs
(:mod:`tests.unit.test_tunnel_io`), the request made by ``roam tunnel attach|detach``'s own client."""
from __future__ import annotations

import argparse
import os
import socket
import stat
import threading

import pytest

from tools.tunnel_control import add_control_commands
from tunnel import SessionState
from tunnel.io.control import MAX_LINE, ControlError, ControlServer, request

from .test_tunnel_io import PEER, VM, Wired, frame

VM2 = bytes.fromhex("020000000002")


def ask(w: Wired, fn, rounds: int = 2000):
    """Run ``fn`` (a blocking client) in a thread while the drivers' loops turn; its result."""
    out: dict = {}

    def client():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    t = threading.Thread(target=client)
    t.start()
    for _ in range(rounds):  # bounded: the request takes a few turns
        if not t.is_alive():
            break
        w.hd.run_once(0.005)
        w.pd.run_once(0)
    t.join(5)
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
def agent(tmp_path):
    w = Wired("udp", str(tmp_path / "status"))
    w.pump()
    assert w.host.state == SessionState.ATTACHED
    yield w, str(tmp_path / "status" / "host.sock")
    w.close()


def test_attach_and_detach_over_the_socket_move_the_mac_at_the_proxy(agent):
    w, path = agent
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    reply = ask(w, lambda: request(path, "attach", "02:00:00:00:00:02"))
    assert reply == {"ok": True, "macs": ["02:00:00:00:00:01", "02:00:00:00:00:02"]}
    w.pump()
    (s,) = w.proxy.sessions.values()
    assert s.named == (VM, VM2) and w.proxy.macs.lookup(VM2) == s.id  # nobody else spoke for it
    reply = ask(w, lambda: request(path, "detach", "02:00:00:00:00:02"))
    assert reply == {"ok": True, "macs": ["02:00:00:00:00:01"]}
    w.pump()
    assert s.named == (VM,) and w.proxy.macs.lookup(VM2) is None  # dropped at once
    assert w.hd.counters["control_attach"] == 1 and w.hd.counters["control_detach"] == 1


def test_the_command_line_client_and_bad_requests(agent, capsys):
    w, path = agent
    parser = argparse.ArgumentParser()
    add_control_commands(parser.add_subparsers())
    args = parser.parse_args(["detach", "--mac", "02:00:00:00:00:01", "--control", path])
    assert ask(w, lambda: args.func(args)) == 0
    assert capsys.readouterr().out == "serving: no MAC yet\n"
    w.host_tap.wire.send(frame(PEER, VM))  # the VM speaks again: learned again
    w.pump()
    args = parser.parse_args(["macs", "--status-dir", os.path.dirname(path)])
    assert ask(w, lambda: args.func(args)) == 0
    assert capsys.readouterr().out == "serving: 02:00:00:00:00:01\n"
    args = parser.parse_args(["attach", "--mac", "nonsense", "--control", path])
    assert args.func(args) == 2 and "--mac: not a MAC address: 'nonsense'" in capsys.readouterr().err
    assert ask(w, lambda: request(path, "attach", "01:00:5e:00:00:01")) == {
        "ok": False, "error": "not a unicast MAC: 01005e000001"}
    assert ask(w, lambda: request(path, "reboot"))["ok"] is False
    assert ask(w, lambda: request(path, "attach", "x" * (MAX_LINE + 10)))["error"] == \
        f"request longer than {MAX_LINE} bytes"
    assert w.hd.counters["control_bad_requests"] == 3
    args = parser.parse_args(["macs", "--control", path + ".none"])
    assert args.func(args) == 1 and "no host agent answers on" in capsys.readouterr().err


def test_a_live_agents_socket_is_not_taken_a_dead_ones_is(agent, tmp_path):
    w, path = agent
    with pytest.raises(ControlError, match="another agent answers"):
        ControlServer(path, w.hd.sel, lambda *a: {}, lambda: 0.0)
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()  # a socket file nobody listens on: left by an agent that died
    import selectors
    sel = selectors.DefaultSelector()
    c = ControlServer(stale, sel, lambda *a: {}, lambda: 0.0)
    c.close()
    sel.close()
    assert not os.path.exists(stale)
    with open(stale, "w"):
        pass
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(stale, w.hd.sel, lambda *a: {}, lambda: 0.0)


def test_the_host_commands_agent_options_as_the_driver_takes_them():
    from tools.tunnel_control import add_agent_options, agent_kwargs
    p = argparse.ArgumentParser()
    add_agent_options(p)
    assert agent_kwargs(p.parse_args([])) == {"control": True, "watch": True}
    assert agent_kwargs(p.parse_args(["--control", "/run/x.sock"])) == {"control": "/run/x.sock", "watch": True}
    assert agent_kwargs(p.parse_args(["--no-control", "--no-watch-bridge"])) == {"control": None, "watch": False}


def test_an_agent_that_binds_between_our_look_and_our_bind_is_another_agent(agent, monkeypatch):
    """Two agents started at once with one status dir: both look, find nothing, and bind; the second is told
    another agent answers (and runs without a control socket, as when it had looked later), never crashes."""
    import tunnel.io.control as control

    w, path = agent
    monkeypatch.setattr(control, "_clear_stale", lambda p: None)  # its look came before the other's bind
    with pytest.raises(ControlError, match="another agent answers"):
        ControlServer(path, w.hd.sel, lambda *a: {}, lambda: 0.0)
