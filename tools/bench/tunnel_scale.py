"""`roam bench tunnel`'s scale figures: the proxy engine serving N host ends and M VM MACs, in memory.

Issue 11 asks that one proxy serve at least 100 host ends and 1,000 VM MACs.  The
engines are sans-I/O, so :class:`Fabric` wires N real :class:`~tunnel.host.HostEnd`
engines and one :class:`~tunnel.proxy.ProxyEnd` in this process (real crypto in the suite the
daemons negotiate here by default, real handshakes, each answer's ``data``/``sends``
delivered to the other side, time passed in), the VMs' MACs learned from their frames as
a host agent learns them.  The
same wiring drives ``tests/unit/test_tunnel_scale.py``.

Printed (never asserted):

* **attach**: CPU seconds (``time.process_time``) the proxy spends per session attach (hello,
  EPOCH, ATTACH, ACK), for the first and the last tenth of the N attaches: a cost that grows
  with the number of sessions shows as a ratio above 1;
* **idle**: the proxy's CPU per session per second while nothing but keepalives flows (the host
  ends' keepalives and ACKs, the proxy's timers), over a minute of simulated time: what each
  attached host end costs the proxy when its VMs are quiet;
* **memory per session / per MAC**: Python memory (``tracemalloc``) the proxy engine holds, as
  what dropping it gives back: with N sessions less with none, divided by N (and with M MACs
  less with none, divided by M); OpenSSL's own cipher contexts are outside tracemalloc's view,
  so this is a lower bound;
* **LAN -> many MACs**: frames/s the proxy forwards from its LAN to M MACs in turn, against
  frames/s to one MAC (the reference, same run);
* **LAN broadcast**: the proxy's time per broadcast frame from its LAN (one seal per host end), with
  N host ends against a tenth of them; **next_deadline()**: per call (the I/O loop makes one per
  wake-up); **status as written**: ``status()`` and its JSON, as the I/O loop writes it once a second
  and after every pass that had an event;
* **move**: time for the proxy to process a moved VM's first frame at its new host (its MAC moved,
  announced on the LAN and to the other N-1 host ends, what was kept re-sent), median of repeats,
  with M MACs known, against the same with a tenth of the MACs and hosts.
"""
from __future__ import annotations

import gc
import json
import random
import statistics
import time
import tracemalloc
from collections import deque
from typing import Callable

from conntrack.answer import Action
from tools.bench.table import render
from tunnel import AeadCipher, HostEnd, ProxyEnd, SessionState
from tunnel.crypto import Key, aes_is_fast

LAN_PEER = bytes.fromhex("02000000aaaa")
LAN_PEER_IP = bytes([198, 18, 0, 10])
BCAST = b"\xff" * 6
#: QEMU's announcement when a migrated guest resumes (a RARP): a VM's first frame at its new host.
RARP = b"\x80\x35"
#: Deliveries one :meth:`Fabric.pump` may make before it gives up (a loop between the ends is a bug).
MAX_DELIVERIES = 1_000_000
#: VMs per host end the benchmark makes (one MAC byte numbers them).
MAX_PER_HOST = 256


def vm_mac(host: int, vm: int) -> bytes:
    """VM ``vm`` (< :data:`MAX_PER_HOST`) of host end ``host`` (< 65536)."""
    return bytes([0x02, 0x00, 0x01, host >> 8, host & 0xFF, vm])


def vm_ip(host: int, vm: int) -> bytes:
    """A documentation address (198.18.0.0/15) per VM."""
    n = host * 256 + vm + 256
    return bytes([198, 18 + (n >> 16 & 1), n >> 8 & 0xFF, n & 0xFF])


def ip_frame(dst: bytes, src: bytes, src_ip: bytes, tag: int) -> bytes:
    """An untagged IPv4 frame from ``src`` (address ``src_ip``), told apart by ``tag`` (in its body)."""
    body = bytearray(46)
    body[0] = 0x45
    body[12:16] = src_ip
    body[20:28] = tag.to_bytes(8, "big")
    return dst + src + b"\x08\x00" + bytes(body)


def tag_of(frame: bytes) -> int:
    return int.from_bytes(frame[34:42], "big")


def rarp(mac: bytes) -> bytes:
    """What QEMU sends for a migrated guest the moment it resumes (its first frame at the new host)."""
    return BCAST + mac + RARP + bytes(46)


def arp_from_lan() -> bytes:
    """The LAN peer's ARP request (broadcast): the proxy learns it behind the LAN, and its binding."""
    arp = bytes.fromhex("0001080006040001") + LAN_PEER + LAN_PEER_IP + bytes(6) + bytes([198, 18, 0, 1])
    return BCAST + LAN_PEER + b"\x08\x06" + arp + bytes(18)


class Fabric:
    """N host ends and one proxy wired in memory: what one end sends, the other receives.

    Host end ``i`` sits at endpoint :attr:`eps` ``[i]``.  :attr:`tap` ``[i]`` collects the frames host
    end ``i`` gave its TAP, :attr:`lan` those the proxy gave the LAN.  ``proxy_cpu`` accumulates the
    CPU time spent in the proxy's calls (``time.process_time``)."""

    def __init__(self, n_hosts: int, seed: int = 11, clock: Callable[[], float] = time.process_time,
                 **proxy_kw) -> None:
        rnd = random.Random(seed)
        cipher = AeadCipher(Key(rnd.randbytes(32)))
        proxy_kw.setdefault("max_sessions", max(256, n_hosts))
        aes = aes_is_fast()  # (the suite the daemons negotiate here by default: --cipher auto)
        self.proxy = ProxyEnd(cipher, random_bytes=rnd.randbytes, aes=aes, **proxy_kw)
        self.hosts = [HostEnd(cipher, random_bytes=rnd.randbytes, aes=aes) for _ in range(n_hosts)]
        self.eps = [(f"198.51.100.{1 + i % 250}", 40000 + i) for i in range(n_hosts)]
        self._host_at = {ep: i for i, ep in enumerate(self.eps)}
        self.tap: list[list[bytes]] = [[] for _ in range(n_hosts)]
        self.lan: list[bytes] = []
        self.now = 0.0
        self.clock = clock
        self.proxy_cpu = 0.0
        self.deliveries = 0
        self._queue: deque = deque()  # ("proxy", endpoint, message) or ("host", i, message)

    # -- inputs ---------------------------------------------------------------------------

    def start(self, i: int) -> None:
        self._from_host(i, self.hosts[i].start(self.now))

    def vm_sends(self, i: int, frame: bytes) -> None:
        """A frame a VM on host ``i`` sent (read from host end ``i``'s TAP)."""
        self._from_host(i, self.hosts[i].send_frame(frame, self.now), data_to_proxy=True)

    def from_lan(self, frame: bytes):
        a = self._proxy_call(self.proxy.from_lan, frame, self.now)
        self._from_proxy(a)
        return a

    def tick(self, dt: float) -> None:
        """Time passes: every end's timers that are due run."""
        self.now += dt
        for i, h in enumerate(self.hosts):
            d = h.next_deadline()
            if d is not None and d <= self.now:
                self._from_host(i, h.expire(self.now))
        d = self.proxy.next_deadline()
        if d is not None and d <= self.now:
            self._from_proxy(self._proxy_call(self.proxy.expire, self.now))

    # -- delivery -------------------------------------------------------------------------

    def pump(self) -> int:
        """Deliver everything on its way, and what that causes, until nothing is left; deliveries made."""
        n = 0
        q = self._queue
        while q:
            n += 1
            if n > MAX_DELIVERIES:
                raise RuntimeError(f"more than {MAX_DELIVERIES} deliveries in one pump: the ends loop")
            to, where, message = q.popleft()
            if to == "proxy":
                self._from_proxy(self._proxy_call(self.proxy.receive, message, where, self.now))
            else:
                a = self.hosts[where].receive(message, self.now)
                if a.action == Action.ACCEPT and a.data is not None:
                    self.tap[where].append(a.data)
                self._from_host(where, a)
        self.deliveries += n
        return n

    def take_queued(self) -> list[tuple]:
        """What is on its way, taken out (the caller delivers it): ``("proxy", endpoint, message)``,
        ``("host", i, message)``."""
        out = list(self._queue)
        self._queue.clear()
        return out

    def _proxy_call(self, f, *args):
        t = self.clock()
        a = f(*args)
        self.proxy_cpu += self.clock() - t
        return a

    def _from_host(self, i: int, a, data_to_proxy: bool = False) -> None:
        """Host end ``i``'s answer: its ``sends`` go to the proxy, and its ``data`` too when it is a sealed
        message (``send_frame``; from ``receive`` it is a frame for the TAP, taken by :meth:`pump`)."""
        for _, m in a.sends:
            self._queue.append(("proxy", self.eps[i], m))
        if data_to_proxy and a.action == Action.ACCEPT and a.data is not None:
            self._queue.append(("proxy", self.eps[i], a.data))

    def _from_proxy(self, a) -> None:
        for to, m in a.sends:
            if to == "lan":
                self.lan.append(m)
            else:
                self._queue.append(("host", self._host_at[to], m))
        if a.action == Action.ACCEPT and a.data is not None:
            self.lan.append(a.data)

    # -- set-ups --------------------------------------------------------------------------

    def attach_all(self) -> None:
        for i in range(len(self.hosts)):
            self.start(i)
        self.pump()

    def attached(self) -> bool:
        return (len(self.proxy.sessions) == len(self.hosts)
                and all(h.state == SessionState.ATTACHED for h in self.hosts))

    def vms_speak(self, per_host: int, tag: int = 0) -> None:
        """Every host's VMs send their first frame (unicast to the LAN peer): learned, named, placed."""
        for i in range(len(self.hosts)):
            for v in range(per_host):
                self.vm_sends(i, ip_frame(LAN_PEER, vm_mac(i, v), vm_ip(i, v), tag))
        self.pump()

    def clear(self) -> None:
        for t in self.tap:
            t.clear()
        self.lan.clear()


# -- the benchmark ----------------------------------------------------------------------------

def _built(hosts: int, per_host: int, attach_cpu: list[float] | None = None) -> Fabric:
    """N attached host ends with ``per_host`` VMs each, learned; the proxy's CPU per attach into
    ``attach_cpu``."""
    f = Fabric(hosts, mac_capacity=max(4096, 2 * hosts * per_host))
    for i in range(hosts):  # one at a time: each attach's cost on its own
        cpu = f.proxy_cpu
        f.start(i)
        f.pump()
        if attach_cpu is not None:
            attach_cpu.append(f.proxy_cpu - cpu)
    if not f.attached():
        raise RuntimeError("not every host end attached")
    f.from_lan(arp_from_lan())
    f.tick(0.01)
    f.vms_speak(per_host)
    f.clear()
    return f


def _memory(hosts: int, per_host: int) -> tuple[float, float]:
    """Python bytes the proxy holds per session and per MAC: what dropping the proxy engine gives back
    (tracemalloc), with N sessions against none, and with M MACs against none."""
    empty, sessions, macs = (_held_by_proxy(hosts, per_host, n_sessions, n_vms)
                             for n_sessions, n_vms in ((0, 0), (hosts, 0), (hosts, per_host)))
    return (sessions - empty) / hosts, (macs - sessions) / (hosts * per_host)


def _held_by_proxy(hosts: int, per_host: int, attach: int, vms: int) -> int:
    """Bytes freed when the proxy engine of a fabric with ``attach`` of ``hosts`` host ends attached and
    ``vms`` VMs per host end learned goes away (tracemalloc: Python's allocations only)."""
    gc.collect()
    tracemalloc.start()
    try:
        f = Fabric(hosts, mac_capacity=max(4096, 2 * hosts * per_host))
        for i in range(attach):
            f.start(i)
        f.pump()
        f.tick(0.01)
        if vms:
            f.vms_speak(vms)
        f.clear()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        del f.proxy
        gc.collect()
        return held - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def measure(hosts: int = 100, macs: int = 1000, frames: int = 20000, repeats: int = 21) -> dict:
    """The figures :func:`report` prints (``macs`` rounded to a whole number per host)."""
    per_host = max(1, round(macs / hosts))
    out: dict = {"hosts": hosts, "macs": hosts * per_host}
    # Attach: the proxy's CPU per attach (hello, EPOCH, ATTACH, ACK), first and last tenth of them.
    costs: list[float] = []
    f = _built(hosts, per_host, costs)
    tenth = max(1, hosts // 10)
    out["attach_first"] = statistics.fmean(costs[:tenth])
    out["attach_last"] = statistics.fmean(costs[-tenth:])
    out["bytes_per_session"], out["bytes_per_mac"] = _memory(hosts, per_host)
    # LAN -> many MACs, against LAN -> one MAC; frames are not delivered to the host ends (the proxy alone).
    out["fps_many"] = _lan_rate(f, [vm_mac(i, v) for i in range(hosts) for v in range(per_host)], frames)
    out["fps_one"] = _lan_rate(f, [vm_mac(0, 0)], frames)
    small_hosts = max(2, hosts // 10)
    small = _built(small_hosts, per_host)
    out["small"] = (small_hosts, small_hosts * per_host)
    for key, fab in (("", f), ("_small", small)):
        p = fab.proxy
        bcast = ip_frame(BCAST, LAN_PEER, LAN_PEER_IP, 0)
        out["flood" + key] = _per_call(lambda: p.from_lan(bcast, fab.now), max(10, frames // hosts))
        out["deadline" + key] = _per_call(p.next_deadline, frames)
        out["status" + key] = _per_call(lambda: json.dumps(p.status(fab.now), indent=1, default=str),
                                        max(3, repeats))
    out["move"], out["move_messages"] = _moves(f, hosts, per_host, repeats)
    out["move_small"], out["move_small_messages"] = _moves(small, small_hosts, per_host, repeats)
    out["idle"], out["idle_small"] = _idle(f), _idle(small)  # last: a minute passes
    return out


def _idle(f: Fabric, seconds: int = 60) -> float:
    """The proxy's CPU seconds per session per second over ``seconds`` of simulated time, 1 s ticks: only
    the ends' timers run (keepalives, their answers, the proxy's own expiry)."""
    cpu = f.proxy_cpu
    for _ in range(seconds):
        f.tick(1.0)
        f.pump()
    f.clear()
    return (f.proxy_cpu - cpu) / (len(f.hosts) * seconds)


def _per_call(fn, n: int) -> float:
    """Median seconds per call of ``fn`` over 5 runs of ``n`` calls."""
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n)
    return statistics.median(runs)


def _lan_rate(f: Fabric, macs: list[bytes], frames: int) -> float:
    src_ip = LAN_PEER_IP
    batch = [ip_frame(m, LAN_PEER, src_ip, n) for n, m in zip(range(frames), _cycle(macs, frames))]
    p, now = f.proxy, f.now
    t = time.perf_counter()
    for fr in batch:
        p.from_lan(fr, now)
    return frames / (time.perf_counter() - t)


def _cycle(items: list, n: int):
    for k in range(n):
        yield items[k % len(items)]


def _moves(f: Fabric, hosts: int, per_host: int, repeats: int) -> tuple[float, float]:
    """Median seconds for the proxy to take a moved VM's first frame at its new host (the message that
    moves its MAC), and the median messages that one call sent."""
    times, sent = [], []
    where = {(i, v): i for i in range(hosts) for v in range(per_host)}
    for r in range(repeats):
        vm = (r % hosts, r // hosts % per_host)
        old = where[vm]
        new = (old + 1 + r % (hosts - 1)) % hosts
        f.tick(1.0)  # past the flap hold
        f.from_lan(ip_frame(vm_mac(*vm), LAN_PEER, LAN_PEER_IP, r))  # something to re-send
        f.pump()
        f.pump()
        f.vm_sends(new, rarp(vm_mac(*vm)))  # queued: the ATTACH naming it, then the frame
        (_, ep, attach), (_, _, first) = f.take_queued()
        # The ATTACH: a claim, deferred (the VM speaks at the old host); then the timed frame.
        f._from_proxy(f.proxy.receive(attach, ep, f.now))
        t = time.perf_counter()
        a = f.proxy.receive(first, ep, f.now)
        times.append(time.perf_counter() - t)
        sent.append(len(a.sends))
        f._from_proxy(a)
        f.pump()
        if f.proxy.macs.lookup(vm_mac(*vm)) != f.hosts[new].session:
            raise RuntimeError(f"the VM {vm} did not move to host end {new}")
        where[vm] = new
        f.clear()
    return statistics.median(times), statistics.median(sent)


def report(m: dict) -> str:
    hosts, macs = m["hosts"], m["macs"]
    tenth = max(1, hosts // 10)
    sh, sm = m["small"]
    rows = [
        (f"attach, sessions 1-{tenth}", "CPU ms/session", m["attach_first"] * 1e3, "1.00"),
        (f"attach, sessions {hosts - tenth + 1}-{hosts}", "CPU ms/session", m["attach_last"] * 1e3,
         f"{m['attach_last'] / m['attach_first']:.2f}"),
        (f"idle, {sh} sessions", "CPU us/session/s", m["idle_small"] * 1e6, "1.00"),
        (f"idle, {hosts} sessions", "CPU us/session/s", m["idle"] * 1e6, f"{m['idle'] / m['idle_small']:.2f}"),
        (f"memory, {hosts} sessions", "bytes/session", m["bytes_per_session"], ""),
        (f"memory, {macs} MACs", "bytes/MAC", m["bytes_per_mac"], ""),
        ("LAN -> 1 MAC", "frames/s", m["fps_one"], "1.00"),
        (f"LAN -> {macs} MACs", "frames/s", m["fps_many"], f"{m['fps_many'] / m['fps_one']:.2f}"),
        (f"LAN broadcast, {sh} host ends", "ms/frame", m["flood_small"] * 1e3, "1.00"),
        (f"LAN broadcast, {hosts} host ends", "ms/frame", m["flood"] * 1e3, f"{m['flood'] / m['flood_small']:.2f}"),
        (f"next_deadline(), {sh} sessions", "us/call", m["deadline_small"] * 1e6, "1.00"),
        (f"next_deadline(), {hosts} sessions", "us/call", m["deadline"] * 1e6,
         f"{m['deadline'] / m['deadline_small']:.2f}"),
        (f"status as written, {sh} sessions, {sm} MACs", "ms/write", m["status_small"] * 1e3, "1.00"),
        (f"status as written, {hosts} sessions, {macs} MACs", "ms/write", m["status"] * 1e3,
         f"{m['status'] / m['status_small']:.2f}"),
        (f"move, {sh} hosts, {sm} MACs", "ms (median)", m["move_small"] * 1e3, "1.00"),
        (f"move, {hosts} hosts, {macs} MACs", "ms (median)", m["move"] * 1e3,
         f"{m['move'] / m['move_small']:.2f}"),
    ]
    head = (f"proxy engine at scale: {hosts} host ends, {macs} VM MACs (in memory, one process; memory: "
            "tracemalloc, what dropping the engine gives back, OpenSSL's own not seen)")
    notes = (f"a move sends {m['move_messages']:.0f} messages ({m['move_small_messages']:.0f} with {sh} hosts): the "
             "VM's first frame (QEMU's RARP, a broadcast) to every other host end, the announcement of its\n"
             "address to the LAN and every other host end, and what was kept re-sent.  The proxy's I/O loop "
             "calls next_deadline() once per wake-up, and writes the status (status() and its JSON, as here)\n"
             "once a second and after every pass that had an event (a move, an attach): it stalls the loop that long.")
    return "\n".join([head, render(("what", "unit", "value", "ratio"), rows), notes])


def add_arguments(parser) -> None:
    parser.add_argument("--scale-hosts", type=int, default=100, metavar="N",
                        help="host ends in the proxy-engine scale figures (default 100)")
    parser.add_argument("--scale-macs", type=int, default=1000, metavar="M",
                        help="VM MACs in the proxy-engine scale figures (default 1000)")
    parser.add_argument("--scale-repeats", type=int, default=21, metavar="R",
                        help="moves measured for the scale figures' median (default 21)")
    parser.add_argument("--scale-frames", type=int, default=20000, metavar="F",
                        help="LAN frames per rate in the scale figures (default 20000)")


def run_scale(args) -> str:
    """The scale table for ``roam bench tunnel``'s options."""
    if args.scale_hosts < 2:
        raise SystemExit(f"roam bench tunnel: --scale-hosts {args.scale_hosts}: at least 2 (a move needs two hosts)")
    if args.scale_macs > MAX_PER_HOST * args.scale_hosts:
        raise SystemExit(f"roam bench tunnel: --scale-macs {args.scale_macs}: at most {MAX_PER_HOST} per host end "
                         f"(--scale-hosts {args.scale_hosts})")
    return report(measure(args.scale_hosts, args.scale_macs, args.scale_frames, args.scale_repeats))
