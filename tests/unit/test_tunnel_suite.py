"""The session keys' AEAD, negotiated in the handshake as offload is: AES-256-GCM when both ends
ask for it (``--cipher auto`` does where the CPU has AES instructions), else ChaCha20-Poly1305.
The ends are wired in memory, with real crypto; the flag is associated data, so a flipped one
breaks the handshake instead of changing the suite."""
from __future__ import annotations

import pytest

from conntrack.answer import Action
from tests.unit.test_tunnel_playbook import EP, PEER, VM, frame
from tests.unit.test_tunnel_offload import CIPHER, rng
from tunnel import Drop, HostEnd, ProxyEnd, SessionState
from tunnel.crypto import aes_is_fast, session_cipher
from tunnel.wire import Flag, MsgType, parse_header


def _handshake(h: HostEnd, p: ProxyEnd, tamper=None) -> list[int]:
    """Run the handshake; the flags of every message on the way.  ``tamper(msg)``: what the
    network does to each message."""
    flags = []
    msgs = [m for _, m in h.start(0.0).sends]
    for _ in range(3):
        back = []
        for m in msgs:
            m = tamper(m) if tamper else m
            flags.append(m[2])
            back += [b for _, b in p.receive(m, EP, 0.0).sends]
        msgs = []
        for m in back:
            m = tamper(m) if tamper else m
            flags.append(m[2])
            msgs += [b for _, b in h.receive(m, 0.0).sends]
    return flags


@pytest.mark.parametrize("host_asks,proxy_takes", [(True, True), (True, False), (False, True), (False, False)])
def test_aes_only_when_both_ends_ask_and_frames_cross_either_way(host_asks, proxy_takes):
    h = HostEnd(CIPHER, [VM], random_bytes=rng(), aes=host_asks)
    p = ProxyEnd(CIPHER, random_bytes=rng(), aes=proxy_takes)
    flags = _handshake(h, p)
    assert h.state == SessionState.ATTACHED
    both = host_asks and proxy_takes
    s = p.sessions[h.session]
    assert s.aes is both and h._s.aes is both
    assert s.cipher.aes is both and h._s.cipher.aes is both  # the session keys are the agreed suite's
    assert bool(flags[0] & Flag.AES) is host_asks  # the hello asks
    assert all(bool(f & Flag.AES) is both for f in flags[1:])  # the EPOCH and everything after agree
    want = "aes-256-gcm" if both else "chacha20-poly1305"
    assert h.status(1.0)["cipher"] == want and p.status(1.0)["sessions"][0]["cipher"] == want
    out = h.send_frame(frame(PEER, VM), 1.0)
    assert p.receive(out.data, EP, 1.0).data == frame(PEER, VM)
    ((_, back),) = p.from_lan(frame(VM, PEER), 1.0).sends
    assert h.receive(back, 1.0).data == frame(VM, PEER)


def test_the_suites_keys_differ_so_no_key_serves_both():
    a = session_cipher(CIPHER, 7, b"h" * 16, b"p" * 16)
    b = session_cipher(CIPHER, 7, b"h" * 16, b"p" * 16, aes=True)
    assert a._secret != b._secret and not a.aes and b.aes


def _flip_aes(m: bytes) -> bytes:
    h = parse_header(m)
    if h.type in (MsgType.EPOCH, MsgType.ATTACH) and not h.flags & Flag.AES:
        return m[:2] + bytes([m[2] | Flag.AES]) + m[3:]
    return m


def test_an_aes_flag_set_on_the_way_breaks_the_handshake_and_changes_no_suite():
    """Someone on the path sets the flag on the hello (the proxy would agree) or on the EPOCH
    (the host end did not ask): the EPOCH is then sealed under the other suite's key, or refused,
    and nothing opens."""
    h = HostEnd(CIPHER, [VM], random_bytes=rng(), aes=False)
    p = ProxyEnd(CIPHER, random_bytes=rng(), aes=True)
    _handshake(h, p, tamper=_flip_aes)
    assert h.state != SessionState.ATTACHED and not p.sessions
    assert p.drops[Drop.AUTH_FAILED] >= 1  # the hello's header is associated data: the flag broke its tag


def test_an_aes_flag_set_on_an_epoch_is_refused_by_a_host_end_that_did_not_ask():
    h = HostEnd(CIPHER, [VM], random_bytes=rng(), aes=False)
    p = ProxyEnd(CIPHER, random_bytes=rng(), aes=True)
    (hello,) = [m for _, m in h.start(0.0).sends]
    ((_, epoch),) = p.receive(hello, EP, 0.0).sends
    assert not parse_header(epoch).flags & Flag.AES  # the host end did not ask: the proxy does not offer
    a = h.receive(_flip_aes(epoch), 0.0)
    assert a.action != Action.ACCEPT and h.drops[Drop.MODE_MISMATCH] == 1 and not a.sends
    assert h.receive(epoch, 0.0).sends  # the real one goes on: the ATTACH that opens the session


def test_a_session_message_with_the_other_suites_flag_is_a_counted_drop():
    h = HostEnd(CIPHER, [VM], random_bytes=rng(), aes=True)
    p = ProxyEnd(CIPHER, random_bytes=rng(), aes=True)
    _handshake(h, p)
    m = h.send_frame(frame(PEER, VM), 1.0).data
    bad = m[:2] + bytes([m[2] & ~Flag.AES]) + m[3:]
    a = p.receive(bad, EP, 1.0)
    assert a.action != Action.ACCEPT and p.drops[Drop.MODE_MISMATCH] == 1
    assert p.receive(m, EP, 1.0).data == frame(PEER, VM)  # the real one still counts


def test_aes_is_fast_reads_the_cpus_flags(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 aes avx2\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd aes pmull sha1\n")
    slow = tmp_path / "slow"
    slow.write_text("processor\t: 0\nflags\t\t: fpu sse2 aesx\n")
    assert aes_is_fast(str(x86)) and aes_is_fast(str(arm))
    assert not aes_is_fast(str(slow)) and not aes_is_fast(str(tmp_path / "missing"))


def test_plaintext_never_asks_for_aes():
    from tunnel.crypto import PlainCipher

    h = HostEnd(PlainCipher(), [VM], random_bytes=rng(), aes=True)
    assert not h.aes


def test_a_host_end_upgraded_before_its_proxy_still_attaches():
    """A proxy from before the AES flag drops a hello that carries it (bad flags, no answer): every
    third unanswered hello goes without it, so the session opens, with ChaCha20-Poly1305."""
    h = HostEnd(CIPHER, [VM], random_bytes=rng(), aes=True, retry=1.0)
    p = ProxyEnd(CIPHER, random_bytes=rng(), aes=True)
    old_proxy_drops = 0
    msgs = [m for _, m in h.start(0.0).sends]
    now = 0.0
    for _ in range(12):  # bounded: hellos, retries, then the handshake's steps
        back = []
        for m in msgs:
            if parse_header(m).flags & Flag.AES:  # what a proxy from before the flag does with it
                old_proxy_drops += 1
                continue
            back += [b for _, b in p.receive(m, EP, now).sends]
        msgs = [b for m in back for _, b in h.receive(m, now).sends]
        if h.state == SessionState.ATTACHED:
            break
        if not msgs:
            now = h.next_deadline()
            msgs = [m for _, m in h.expire(now).sends]
    assert h.state == SessionState.ATTACHED and old_proxy_drops == 2
    assert not h._s.aes and not p.sessions[h.session].aes  # ChaCha20-Poly1305
    assert h.counters["hellos_without_aes"] == 1
