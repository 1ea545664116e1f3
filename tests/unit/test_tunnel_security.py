"""Regressions for issue 11 §3: replays prove nothing, per-session keys, immediate re-attach after a
proxy restart, key and status file modes, SIGHUP, and `roam tunnel status` on dead ends.

Each test fails on the code before its fix (checked by putting the old behaviour back).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conntrack.answer import Action, Answer
from tests.unit.test_tunnel_ends import EP_A, EP_B, KEY, OTHER_KEY, PEER, VM1, VM2, Net, attached_pair, frame
from tests.unit.test_tunnel_io import PROXY_ADDR, PairTap, Wired
from tools import cmd_tunnel
from tunnel import AeadCipher, Cause, Drop, EventKind, HostEnd, ProxyEnd, SessionState, proves_peer
from tunnel.crypto import session_cipher
from tunnel.io import HostDriver, ProxyDriver
from tunnel.stream import encode
from tunnel.wire import COOKIE_LIFETIME, HEADER_LEN, MsgType, parse_header

ROOT = Path(__file__).resolve().parents[2]
EVIL = ("203.0.113.66", 666)


def kinds(answer: Answer) -> list:
    return [(to, parse_header(m).type) for to, m in answer.sends]


# -- replayed ATTACHes ------------------------------------------------------------------------


def test_a_replayed_attach_proves_nothing_changes_nothing_and_draws_a_smaller_answer():
    """An ATTACH captured before a restart, replayed after it any number of times from anywhere: a
    CHALLENGE (EPOCH) smaller than it, no session, no event, nothing that proves the sender."""
    net, a = attached_pair()
    hello, proof = net.captured["a"][:2]
    restarted = ProxyEnd(net.cipher)
    for m in [hello, proof] * 50:
        answer = restarted.receive(m, EVIL, net.now)
        assert answer[:3] == (Action.CONSUME, Cause.CHALLENGE, None) and answer.events == ()
        assert not proves_peer(answer)  # it once was CONSUME/CONTROL: "authentic"
        ((to, epoch),) = answer.sends
        assert to == EVIL and parse_header(epoch).type == MsgType.EPOCH and len(epoch) < len(m)
    assert not restarted.sessions and restarted.macs.lookup(VM1) is None and not restarted.addresses
    # Against the proxy that issued its cookie: a replay after the session closed opens nothing,
    # within the cookie's lifetime (REPLAYED) and after it (a challenge, nothing else).
    net.host("a", a.close(net.now))
    net.transfer()
    assert not net.proxy.sessions
    assert net.to_proxy(proof, EVIL) == Answer(Action.DROP, Drop.REPLAYED)
    net.of_proxy(net.proxy.expire(net.now + COOKIE_LIFETIME + 5))
    answer = net.proxy.receive(proof, EVIL, net.now + COOKIE_LIFETIME + 5)
    assert answer.reason == Cause.CHALLENGE and not proves_peer(answer) and not net.proxy.sessions


def test_the_real_handshake_proves_the_peer_and_its_epoch_answer_is_smaller_than_the_hello():
    net = Net()
    a = net.add_host("a", EP_A, [])  # no MACs named: the smallest hello
    ((_, hello),) = net.host("a", a.start(0.0)).sends
    answer = net.to_proxy(hello, EP_A)
    assert not proves_peer(answer) and len(answer.sends[0][1]) < len(hello)
    net.transfer()
    assert a.state == SessionState.ATTACHED
    # the ATTACH that opened the session proved its sender
    proof = net.captured["a"][-1]
    replayed = ProxyEnd(net.cipher).receive(proof, EP_A, 0.0)  # ... which a replay of it does not
    assert not proves_peer(replayed)
    assert proves_peer(Answer(Action.CONSUME, Cause.CONTROL)) and proves_peer(Answer(Action.ACCEPT, Cause.DATA))
    assert not proves_peer(Answer(Action.DROP, Drop.REPLAYED))


def test_a_hello_of_a_live_session_draws_nothing():
    """A replayed hello of a live session is dropped with no answer (it was reflected as EPOCH)."""
    net, a = attached_pair()
    hello = net.captured["a"][0]
    for _ in range(10):
        assert net.to_proxy(hello, EVIL) == Answer(Action.DROP, Drop.REPLAYED)
    assert net.take_proxy_out() == [] and net.proxy.counters["epochs_sent"] == 1


# -- the 511-connection lock-out ----------------------------------------------------------------


def _replay_fill(pd: ProxyDriver, attach: bytes, n: int, now: float) -> list[socket.socket]:
    """``n`` connections, each replaying the captured ATTACH (the attacker's side kept open)."""
    socks = []
    for i in range(n):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pd.adopt(theirs, ("tcp", "attacker", i), now)
        ours.send(encode(attach))
        socks.append(ours)
        if i % 64 == 63:
            pd.run_once(0)
    for _ in range(4):
        pd.run_once(0)
    return socks


def test_attaches_replayed_on_every_connection_cannot_lock_a_restarted_host_out():
    """The incident: one ATTACH captured before a proxy restart, replayed on 511 connections (and the
    512th), once marked them all authenticated and locked the restarted host out for 49 s or more."""
    net, a = attached_pair()
    captured = net.captured["a"][1]
    now = 100.0
    lan = PairTap("roamp0")
    pd = ProxyDriver(ProxyEnd(AeadCipher(KEY)), lan, None, "tcp", lambda: now, max_tcp_conns=512)
    attackers = _replay_fill(pd, captured, 512, now)
    try:
        assert len(pd.conns) == 512
        assert all(c.last_authentic is None for c in pd.conns.values())  # none proved anything
        assert not pd.engine.sessions
        # The legitimate host end connects: room is made (the oldest unauthenticated goes) and it attaches.
        host_sock, proxy_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pd.adopt(proxy_sock, ("tcp", "host", 1), now)
        assert ("tcp", "host", 1) in pd.conns and pd.counters["tcp_evicted"] == 1
        host = HostEnd(AeadCipher(KEY), [VM1])
        hd = HostDriver(host, PairTap("rt0"), PROXY_ADDR, "tcp", lambda: now, sock=host_sock)
        hd.begin(now)
        for _ in range(8):
            pd.run_once(0)
            hd.run_once(0)
        assert host.state == SessionState.ATTACHED and pd.conns[("tcp", "host", 1)].last_authentic == now
        hd.shutdown()
    finally:
        for s in attackers:
            s.close()
        pd.shutdown()
        lan.wire.close()


def test_the_lock_out_over_real_tcp_on_loopback(tmp_path):
    """The same over real TCP sockets on 127.0.0.1: 511 replaying connections, then the host end's."""
    net, a = attached_pair()
    captured = net.captured["a"][1]
    clock = [100.0]
    lan = PairTap("roamp0")
    pd = ProxyDriver(ProxyEnd(AeadCipher(KEY)), lan, ("127.0.0.1", 0), "tcp", lambda: clock[0], max_tcp_conns=512)
    port = pd.listener.getsockname()[1]
    attackers = []
    try:
        for i in range(511):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(encode(captured))
            attackers.append(s)
            if i % 32 == 31:
                for _ in range(3):
                    pd.run_once(0)
        for _ in range(50):
            pd.run_once(0.01)
            if len(pd.conns) == 511 and all(c.decoder.pending == 0 for c in pd.conns.values()):
                break
        assert len(pd.conns) == 511 and pd.counters.get("tcp_over_limit", 0) == 0
        assert all(c.last_authentic is None for c in pd.conns.values())
        host = HostEnd(AeadCipher(KEY), [VM1])
        hd = HostDriver(host, PairTap("rt0"), ("127.0.0.1", port), "tcp", lambda: clock[0])
        hd.begin(clock[0])
        for _ in range(200):
            pd.run_once(0.005)
            hd.run_once(0.005)
            if host.state == SessionState.ATTACHED:
                break
        assert host.state == SessionState.ATTACHED and len(pd.engine.sessions) == 1
        # One more attacker connection now evicts an unauthenticated one, never the host end's.
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        attackers.append(extra)
        for _ in range(20):
            pd.run_once(0.005)
        authentic = [c for c in pd.conns.values() if c.last_authentic is not None]
        assert len(authentic) == 1 and pd.counters["tcp_evicted"] >= 1
        hd.shutdown()
    finally:
        for s in attackers:
            s.close()
        pd.shutdown()
        lan.wire.close()


# -- per-session keys ---------------------------------------------------------------------------


def test_sessions_with_the_same_id_and_sequence_never_share_a_key_stream():
    """Two host ends that draw the same session id and nonce (a restart with the same randomness,
    or two hosts), attached to two proxies (or one restarted): the same header, so the same nonce,
    yet different keys: the two ciphertexts do not XOR to the two plaintexts' XOR."""
    same = lambda n: b"\x5a" * n  # noqa: E731 - both host ends draw the very same numbers
    sealed = []
    for seed in (1, 2):
        net = Net()
        net.proxy = ProxyEnd(net.cipher, random_bytes=lambda n, s=seed: bytes([s]) * n)
        h = net.add_host("h", EP_A, [VM1], random_bytes=same)
        net.host("h", h.start(0.0))
        net.transfer()
        assert h.state == SessionState.ATTACHED
        sealed.append(h.send_frame(frame(PEER, VM1, bytes([seed]) * 46), 0.0).data)
    (m1, m2), (f1, f2) = sealed, (frame(PEER, VM1, b"\x01" * 46), frame(PEER, VM1, b"\x02" * 46))
    assert m1[:HEADER_LEN] == m2[:HEADER_LEN]  # same session id and sequence number
    xor_c = bytes(x ^ y for x, y in zip(m1[HEADER_LEN:-16], m2[HEADER_LEN:-16]))
    assert xor_c != bytes(x ^ y for x, y in zip(f1, f2))  # under one shared key it was equal


def test_the_session_key_depends_on_both_nonces_and_the_session():
    psk = AeadCipher(KEY)
    n1, n2 = b"\x01" * 16, b"\x02" * 16
    keys = [session_cipher(psk, s, h, p) for s in (1, 2) for h in (n1, n2) for p in (n1, n2)]
    sealed = {k.seal(b"h" * 16, bytes(12), b"payload") for k in keys}
    assert len(sealed) == len(keys)
    assert session_cipher(AeadCipher(OTHER_KEY), 1, n1, n2).seal(b"h" * 16, bytes(12), b"payload") not in sealed


# -- immediate re-attach after a proxy restart ----------------------------------------------------


def test_after_a_proxy_kill_the_hosts_first_message_brings_a_reset_and_an_immediate_reattach():
    net, a = attached_pair()
    old = a.session
    net.proxy = ProxyEnd(net.cipher, random_bytes=lambda n: b"\x44" * n)  # kill -9 and restart: no DETACH
    net.from_vm("a", frame(PEER, VM1))  # the next frame (or keepalive) the host end sends
    net.transfer()
    assert a.state == SessionState.ATTACHED and a.session != old and a.previous == old
    assert net.now < a.dead_after  # not after the 15 s dead timer: at once
    assert net.proxy.counters["resets_sent"] == 1 and a.counters["resets_received"] == 1
    assert net.proxy.macs.lookup(VM1) == a.session
    kinds_seen = [e.kind for e in net.events]
    assert EventKind.NEW_SESSION_ID in kinds_seen


def test_a_reset_counts_only_for_our_acknowledged_session_and_once():
    net, a = attached_pair()
    restarted = ProxyEnd(net.cipher)
    m = a.send_frame(frame(PEER, VM1), net.now).data
    (_, reset), = restarted.receive(m, EP_A, net.now).sends
    forged = reset[:-1] + bytes([reset[-1] ^ 1])
    assert net.to_host("a", forged) == Answer(Action.DROP, Drop.AUTH_FAILED)
    wrong_key = ProxyEnd(AeadCipher(OTHER_KEY)).receive(m, EP_A, net.now).sends[0][1]
    assert net.to_host("a", wrong_key) == Answer(Action.DROP, Drop.AUTH_FAILED)
    old = a.session
    assert net.to_host("a", reset).reason == Cause.CONTROL and a.session != old
    assert net.to_host("a", reset) == Answer(Action.DROP, Drop.UNKNOWN_SESSION)  # a replay: old session
    # a reset for a message we never sent (a sequence number ahead of ours) is STALE
    net.transfer()
    assert a.state == SessionState.ATTACHED
    m2 = a.send_frame(frame(PEER, VM1), net.now).data
    ahead = bytearray(m2)
    ahead[8:16] = (parse_header(m2).seq + 5).to_bytes(8, "big")
    (_, reset2), = ProxyEnd(net.cipher).receive(bytes(ahead), EP_A, net.now).sends
    assert net.to_host("a", reset2) == Answer(Action.DROP, Drop.STALE)


def test_resets_are_rate_limited_and_never_larger_than_what_they_answer():
    p = ProxyEnd(AeadCipher(KEY))
    net, a = attached_pair()
    m = a.send_frame(frame(PEER, VM1), net.now).data
    sent = sum(len(p.receive(m, EVIL, 0.0).sends) for _ in range(1000))
    assert sent == 100  # the burst, then nothing until time passes
    assert len(p.receive(m, EVIL, 0.5).sends) == 1
    short = m[:HEADER_LEN + 8]
    assert p.receive(short, EVIL, 10.0).sends == ()


# -- key rotation (SIGHUP) ----------------------------------------------------------------------


def test_rekey_keeps_live_sessions_and_new_ones_use_the_new_key():
    net, a = attached_pair()
    new = AeadCipher(OTHER_KEY)
    net.proxy.rekey(new)
    net.from_vm("a", frame(PEER, VM1))
    net.transfer()
    assert net.lan == [frame(PEER, VM1)]  # the live session goes on under its own key
    # a host end still on the old key can attach (the proxy answers hellos under the previous key)...
    b = net.add_host("b", EP_B, [VM2])
    net.host("b", b.start(net.now))
    net.transfer()
    assert b.state == SessionState.ATTACHED
    # ...and one on the new key too
    c = net.add_host("c", ("192.0.2.30", 1), [bytes.fromhex("020000000003")])
    c.rekey(new)
    net.host("c", c.start(net.now))
    net.transfer()
    assert c.state == SessionState.ATTACHED and len(net.proxy.sessions) == 3
    with pytest.raises(ValueError):
        net.proxy.rekey(__import__("tunnel").PlainCipher())


def test_sighup_reloads_the_key_in_both_drivers_and_keeps_the_session(tmp_path):
    w = Wired("udp")
    try:
        w.pump()
        sid = w.host.session
        new = AeadCipher(OTHER_KEY)
        w.hd.key_loader = w.pd.key_loader = lambda: new
        w.hd.request_reload()  # what SIGHUP does
        w.pd.request_reload()
        w.pump()
        assert w.host.cipher is new and w.proxy.cipher is new
        assert w.hd.counters["reloads"] == 1 and w.pd.counters["reloads"] == 1
        assert w.host.session == sid and not w.hd.stopping and not w.pd.stopping
        w.host_tap.wire.send(frame(PEER, VM1))
        w.pump()
        assert len(w.lan_tap.frames()) == 1
        # a key that cannot be read leaves the running one
        w.pd.key_loader = lambda: (_ for _ in ()).throw(cmd_tunnel.KeyFileRefused("mode 644"))
        w.pd.request_reload()
        w.pump()
        assert w.proxy.cipher is new and w.pd.counters["reload_errors"] == 1
    finally:
        w.close()


def test_the_command_line_maps_sighup_to_reload_not_stop():
    calls = []

    class FakeDriver:
        key_loader = None

        def request_stop(self, *_):
            calls.append("stop")

        def request_reload(self, *_):
            calls.append("reload")

        def run(self):
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGTERM)

    d = FakeDriver()
    cmd_tunnel._run(d, argparse.Namespace(plaintext=False, key_file="k", insecure_key_perms=False))
    assert calls == ["reload", "stop"] and d.key_loader is not None


# -- key and status files -----------------------------------------------------------------------


def _cli(*argv, umask=0o022, **kw):
    return subprocess.run([sys.executable, "-m", "tools.cli", "tunnel", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, preexec_fn=lambda: os.umask(umask), **kw)


def test_genkey_writes_keys_0600(tmp_path):
    out = tmp_path / "k.key"
    r = _cli("genkey", "--out", str(out))
    assert r.returncode == 0 and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert len(out.read_text().strip()) == 44
    again = _cli("genkey", "--out", str(out))
    assert again.returncode != 0 and "exists" in again.stderr.lower()  # never over an existing key
    redirected = tmp_path / "r.key"
    with open(redirected, "w") as f:  # `genkey > r.key` under umask 022: the shell made it 0644
        os.chmod(redirected, 0o644)
        r = subprocess.run([sys.executable, "-m", "tools.cli", "tunnel", "genkey"], cwd=ROOT, stdout=f,
                           stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 0 and stat.S_IMODE(redirected.stat().st_mode) == 0o600
    cmd_tunnel.load_cipher(str(redirected))


def test_keys_readable_by_others_are_refused_unless_told(tmp_path, capsys):
    key = tmp_path / "k.key"
    key.write_text(__import__("tunnel").generate_key_text() + "\n")
    key.chmod(0o644)
    with pytest.raises(cmd_tunnel.KeyFileRefused, match="644"):
        cmd_tunnel.load_cipher(str(key))
    args = argparse.Namespace(plaintext=False, key_file=str(key), insecure_key_perms=False)
    assert cmd_tunnel._cipher(args) is None and "insecure-key-perms" in capsys.readouterr().err
    args.insecure_key_perms = True
    assert cmd_tunnel._cipher(args) is not None
    key.chmod(0o600)
    assert cmd_tunnel.load_cipher(str(key)).fingerprint


def test_status_files_are_0600_in_a_0700_directory(tmp_path):
    d = tmp_path / "status"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)  # left by an older roam
    w = Wired("udp", status_dir=str(d))
    try:
        w.pump()
        files = list(d.iterdir())
        assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    finally:
        w.close()
    fresh = tmp_path / "new" / "status"
    w = Wired("udp", status_dir=str(fresh))
    try:
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    finally:
        w.close()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_status_says_never_and_marks_ends_whose_process_is_gone(tmp_path, capsys):
    import json
    live = {"role": "host", "pid": os.getpid(), "pid_start": cmd_tunnel_process_start(), "state": "ATTACHING",
            "session": "00000001", "macs": [], "last_heard_ago": None, "transport": "udp", "proxy": "x",
            "uptime": 0.5, "cipher": "chacha20-poly1305", "tap": "rt0", "tap_mtu": 1500}
    dead = dict(live, pid=_dead_pid(), state="ATTACHED", last_heard_ago=1.5)
    reused = dict(live, pid_start=(live["pid_start"] or 0) + 1, state="ATTACHED")  # our pid, another process
    proxy = {"role": "proxy", "pid": _dead_pid(), "listen": "x", "sessions": [
        {"session": "00000002", "state": "ATTACHED", "endpoint": "e", "last_heard_ago": 2.0, "named_macs": [],
         "counters": {}}]}
    for name, st in (("host-1.json", live), ("host-2.json", dead), ("host-3.json", reused), ("proxy-4.json", proxy)):
        (tmp_path / name).write_text(json.dumps(st))
    ends = {st["file"]: st for st in cmd_tunnel.read_status_dir(str(tmp_path))}
    assert [ends[n]["alive"] for n in ("host-1.json", "host-2.json", "host-3.json", "proxy-4.json")] == [
        True, False, False, False]
    assert cmd_tunnel.cmd_status(argparse.Namespace(status_dir=str(tmp_path), json=False)) == 0
    out = capsys.readouterr().out
    assert "Nones" not in out and "last heard never" in out
    assert out.count("GONE (was ATTACHED)") == 3  # the two dead hosts and the dead proxy's session
    lines = [ln for ln in out.splitlines() if "session 00000001 ATTACHING" in ln]
    assert len(lines) == 1  # the live one is shown as it is


def cmd_tunnel_process_start():
    from tunnel.io.loop import process_start
    return process_start(os.getpid())
