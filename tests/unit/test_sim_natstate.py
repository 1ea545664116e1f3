"""nat+state: the old NAT's snapshot, re-bound to the new host's address, drives the new engine."""
from __future__ import annotations

import nat
from conntrack import TcpFlag, build, parse_ip
from sim import wire

VM, PEER = wire.addr("198.18.0.10"), wire.addr("198.51.100.10")
OLD, NEW = "203.0.113.10", "203.0.113.140"


def _engine(ext: str) -> nat.NatEngine:
    return nat.NatEngine(nat.NatConfig(internal=("198.18.0.0/24",), external_ip=ext), seed=1)


def test_rebound_state_keeps_the_port_and_takes_the_new_address():
    old = _engine(OLD)
    syn = old.process(build.tcp(VM, PEER, 40000, 443, 1, 0, TcpFlag.SYN), nat.Side.INTERNAL, 1.0)
    out = parse_ip(syn.data)
    assert out.src == wire.addr(OLD)
    reply = build.tcp(PEER, wire.addr(OLD), 443, out.sport, 9, 2, TcpFlag.SYN | TcpFlag.ACK)
    assert old.process(reply, nat.Side.EXTERNAL, 1.1).action == nat.Action.ACCEPT
    snap = old.snapshot(2.0)

    assert _engine(NEW).restore(snap, 2.5) == 0  # the engine alone refuses another address's state
    new = _engine(NEW)
    assert new.restore(snap, 2.5, rebind=True) == 1  # what sim's nat+state does on a move
    v = new.process(build.tcp(VM, PEER, 40000, 443, 2, 10, TcpFlag.ACK | TcpFlag.PSH, bytes(50)), nat.Side.INTERNAL,
                    3.0)
    moved = parse_ip(v.data)
    assert (moved.src, moved.sport) == (wire.addr(NEW), out.sport)  # what the peer sees: new address, same port
    assert build.verify(v.data)
    back = new.process(build.tcp(PEER, wire.addr(NEW), 443, out.sport, 10, 52, TcpFlag.ACK), nat.Side.EXTERNAL,
                       3.1)
    assert back.action == nat.Action.ACCEPT and parse_ip(back.data).dst == VM
