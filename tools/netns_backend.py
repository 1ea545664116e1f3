"""`roam replay --backend netns`: play a scenario in the namespace lab, with real kernel TCP and UDP.

    from tools.netns_backend import run_netns
    report = run_netns(scenario, ("bridged", "tunnel"), progress, parallel=True)   # same Report as sim.run.replay

For each mode a fresh lab is built from the scenario (:mod:`tools.topology`): the
internet, the sites and their hosts, the peers and the VM.  Endpoints are small
socket programs -- this module run as ``python -m tools.netns_backend endpoint``
-- started with ``lab.popen`` in the VM's and each peer's namespace.  The driver
(this process) tells them, on their stdin and at the scenario's times, which
servers to open and which connections to start; they run the connections' request
/response schedule exactly like the simulator's flows (a request every
``interval`` once the previous one was answered; UDP resends while unanswered),
and log each thing they observe as a timestamped JSON line: established, an answer
(progress), an error (ECONNRESET, ETIMEDOUT through ``TCP_USER_TIMEOUT``,
EHOSTUNREACH from an ICMP error...), their own address gone, the source a server
saw.  Migrations are done for real: the VM's link goes down at ``at``, and after
the downtime its host end is moved (``Topology.move_vm``) to the new host and
plugged in as the mode requires.

The verdict and reason of each connection come only from those logs: survived
when it was established, no endpoint saw it break, and its client was answered
after the last migration's downtime ended (clients go on past the scenario's
duration until they are, or give up); reset by peer when an endpoint was reset
(ECONNRESET, ECONNREFUSED); unreachable when an endpoint got an unreachable error
or lost its own address; timed out otherwise.  The mode's name only chooses how the VM
is plugged in, never an outcome.

Modes (how the VM is plugged in; :class:`_Driver` and its subclasses):

* ``bridged``: the VM's link on the host's LAN bridge, an address of that site
  (a per-site lease table: the same address again on a LAN that knows its MAC;
  re-leased or kept on a move, as the scenario says), the site's gateway.
* ``host-only``: an address on a link to the host only, no gateway; the host does
  not forward.
* ``nat``: ``roam nat --external br0`` running in every host namespace, with the
  scenario's ``[[forward]]`` mappings; the VM on the NAT network behind it.
* ``nat+state``: as nat; on a move the old host's latest NAT snapshot is rebound to
  the new host's address and the new host's ``roam nat`` restarted on it.
* ``tunnel``: ``roam tunnel proxy`` on the home LAN, ``roam tunnel host`` started on
  the VM's host (stopped when it leaves); the VM keeps its home address.

A mode the lab cannot run (a missing command, a scenario without a home site...)
comes back as a ModeRun with ``error`` set, never a verdict.

Not reproduced: link latency and loss (the lab's links are plain veths; a warning
says so when the scenario has loss).  Reasons can differ from the simulator's where
the simulator knows something no endpoint could observe: e.g. a packet to an address
that left its LAN is "unreachable" there at once, while a real router holds the old
neighbour entry for a while and the sender just times out.
"""
from __future__ import annotations

import errno
import heapq
import ipaddress
import json
import os
import selectors
import socket
import struct
import sys
import threading
import time
from typing import Callable

# Only the standard library at module level: the endpoint (``python -m
# tools.netns_backend endpoint``) imports this module inside every namespace.

TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)  # linux/in.h; not exported by every Python
VM_EPHEMERAL = 40000  # client ports, as in sim.run
PEER_EPHEMERAL = 50000
SETTLE = 0.2  # seconds between every endpoint being up and time zero
READY_TIMEOUT = 30.0  # seconds the endpoints may take to start
GRACE = 2.0  # seconds after the last possible give-up before the driver stops waiting

#: What a reset by the peer looks like to a socket: an RST on a connection (ECONNRESET) or in answer to a
#: SYN / an ICMP port unreachable on a connected UDP socket (ECONNREFUSED).  Not an orderly close (EOF) nor
#: EPIPE (a write after the connection ended, for whatever reason: the RST itself is reported as ECONNRESET).
RESET_ERRORS = {"ECONNRESET", "ECONNREFUSED"}
#: Errors that say the destination or the sender's own address cannot be reached.  EINVAL is not among them:
#: it means "unreachable" only together with the socket's address having gone (``address_gone``).
UNREACHABLE_ERRORS = {"EHOSTUNREACH", "ENETUNREACH", "EADDRNOTAVAIL", "ENONET"}


def _errname(e: int | str) -> str:
    if isinstance(e, str):
        return e
    return errno.errorcode.get(e, str(e))


# =====================================================================================
# The endpoint program (runs inside a namespace; JSON lines in, JSON lines out)
# =====================================================================================
_REQ = struct.Struct("!cHHH")  # b"R", connection index, request length, response length
_DGRAM = struct.Struct("!cHH")  # b"H" (first) / b"D", connection index, response length


class _Endpoint:
    def __init__(self, t0: float, deadline: float, out) -> None:
        self.t0 = t0
        self.deadline = deadline  # absolute monotonic: never run past it
        self.out = out
        self.sel = selectors.DefaultSelector()
        self.timers: list = []
        self.seq = 0
        self.quit = False

    # -- plumbing -----------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def emit(self, **ev) -> None:
        ev["t"] = round(self.now(), 6)
        self.out.write(json.dumps(ev) + "\n")
        self.out.flush()

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, fn))

    def run(self) -> None:
        stdin = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
        os.set_blocking(stdin.fileno(), False)
        self.sel.register(stdin.fileno(), selectors.EVENT_READ, self._commands)
        self._inbuf = b""
        while not self.quit and time.monotonic() < self.deadline:
            now = self.now()
            while self.timers and self.timers[0][0] <= now:
                _, _, fn = heapq.heappop(self.timers)
                fn()
                now = self.now()
            wait = min(0.5, max(0.0, (self.timers[0][0] - now) if self.timers else 0.5))
            for key, mask in self.sel.select(wait):
                key.data(key.fileobj, mask)

    def _commands(self, fd, mask) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.quit = True
            return
        self._inbuf += chunk
        while b"\n" in self._inbuf:
            line, self._inbuf = self._inbuf.split(b"\n", 1)
            if line.strip():
                self.command(json.loads(line))

    def command(self, c: dict) -> None:
        op = c["op"]
        if op == "quit":
            self.quit = True
        elif op == "clock":  # time zero of the scenario (a monotonic instant shared by the machine)
            self.t0 = c["t0"]
        elif op == "tcp_listen":
            _TcpServer(self, c)
        elif op == "udp_listen":
            _UdpServer(self, c)
        elif op == "tcp_connect":
            _TcpClient(self, c)
        elif op == "udp_connect":
            _UdpClient(self, c)
        else:
            self.emit(ev="bad_command", op=op)


def _address_gone(addr: str) -> bool:
    """Is ``addr`` no longer an address of this machine?  (Binding to it says.)"""
    if not addr or addr == "0.0.0.0":
        return False
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((addr, 0))
        return False
    except OSError as exc:
        return exc.errno == errno.EADDRNOTAVAIL
    finally:
        s.close()


SOFT_ERRORS = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
_TCP_CLOSE = 7  # tcpi_state of a connection the kernel has ended


def _tcp_dead(sock) -> bool:
    """Has the kernel ended this connection?  (An error then is its death, not an ICMP report.)"""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == _TCP_CLOSE
    except OSError:
        return True


def _drain_errqueue(sock) -> None:
    """Empty the socket's error queue (IP_RECVERR), bounded; call it only after recv() reported the error."""
    for _ in range(64):
        try:
            sock.recvmsg(512, 512, socket.MSG_ERRQUEUE)
        except OSError:
            break


def _proven(answered: float | None, settle: float | None) -> bool:
    """Answered since the last migration's downtime ended?  (A client goes on past the end until then.)"""
    return settle is None or (answered is not None and answered > settle)


class _TcpClient:
    def __init__(self, ep: _Endpoint, c: dict) -> None:
        self.ep, self.idx = ep, c["idx"]
        self.interval, self.timeout, self.end = c["interval"], c["timeout"], c["end"]
        self.settle = c.get("settle")  # the last migration's arrival: be answered after it before stopping
        self.answered: float | None = None
        self.request = max(c["request"], _REQ.size)
        self.response = c["response"]
        self.state = "connecting"
        self.awaiting = False
        self.got = 0
        self.local = ""
        self.done = False
        s = self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(self.timeout * 1000))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # ICMP errors on an established connection are reported (once) instead of kept silent
        # until the timeout: an observation, not the end of the connection
        s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        s.setblocking(False)
        self.started = ep.now()
        ep.emit(ev="start", idx=self.idx, side="client")
        try:
            s.bind((c.get("src") or "", c.get("sport", 0)))
            err = s.connect_ex((c["dst"], c["port"]))
        except OSError as exc:
            err = exc.errno
        if err not in (0, errno.EINPROGRESS):
            self.broken(err)
            return
        ep.sel.register(s, selectors.EVENT_WRITE, self.io)
        # connect() is bounded by the timeout too (TCP_USER_TIMEOUT plus this loop's own bound)
        ep.at(self.started + self.timeout + 0.05, self.connect_deadline)
        ep.at(self.started + self.interval, self.tick)

    def connect_deadline(self) -> None:
        if self.state == "connecting":
            self.broken("ETIMEDOUT", why="connect")

    def io(self, sock, mask) -> None:
        if self.state == "connecting":
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.broken(err)
                return
            self.state = "up"
            self.answered = self.ep.now()
            self.local = sock.getsockname()[0]
            peer = sock.getpeername()
            self.ep.sel.modify(sock, selectors.EVENT_READ, self.io)
            self.ep.emit(ev="established", idx=self.idx, side="client", local=list(sock.getsockname()),
                         remote=list(peer))
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in SOFT_ERRORS and not _tcp_dead(sock):
                _drain_errqueue(sock)
                self.ep.emit(ev="error", idx=self.idx, side="client", err=_errname(exc.errno))
                return
            self.broken(exc.errno)
            return
        if not data:
            self.broken("EOF")
            return
        self.got += len(data)
        if self.awaiting and self.got >= self.response:
            self.got -= self.response
            self.awaiting = False
            self.answered = self.ep.now()
            self.ep.emit(ev="answer", idx=self.idx, side="client")

    def tick(self) -> None:
        if self.state == "broken":
            return
        now = self.ep.now()
        if now >= self.end and _proven(self.answered, self.settle):
            if self.state == "up" and not self.awaiting:
                self.done = True
                self.ep.emit(ev="done", idx=self.idx, side="client")
                return
            if self.state == "up":  # waiting for the last answer: look again later
                self.ep.at(now + self.interval, self.tick)
                return
        if self.state == "up" and not self.awaiting:
            self.awaiting = True
            try:
                self.sock.send(_REQ.pack(b"R", self.idx, self.request, self.response)
                               + bytes(self.request - _REQ.size))
            except BlockingIOError:
                pass
            except OSError as exc:
                self.broken(exc.errno)
                return
        self.ep.at(now + self.interval, self.tick)

    def broken(self, err, why: str = "") -> None:
        if self.state == "broken":
            return
        self.state = "broken"
        name = _errname(err)
        gone = _address_gone(self.local) if name not in RESET_ERRORS else False
        self.ep.emit(ev="broken", idx=self.idx, side="client", err=name, why=why, address_gone=gone)
        try:
            self.ep.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()


class _TcpServer:
    def __init__(self, ep: _Endpoint, c: dict) -> None:
        self.ep, self.timeout = ep, c["timeout"]
        s = self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(self.timeout * 1000))
        s.bind((c.get("bind") or "", c["port"]))
        s.listen(64)
        s.setblocking(False)
        ep.sel.register(s, selectors.EVENT_READ, self.accept)

    def accept(self, sock, mask) -> None:
        try:
            conn, peer = sock.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(self.timeout * 1000))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        st = {"buf": b"", "idx": None, "peer": list(peer), "local": conn.getsockname()[0]}
        self.ep.sel.register(conn, selectors.EVENT_READ, lambda s, m: self.io(s, st))

    def io(self, conn, st) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in SOFT_ERRORS and not _tcp_dead(conn):
                _drain_errqueue(conn)
                self.ep.emit(ev="error", idx=st["idx"], side="server", err=_errname(exc.errno))
                return
            self.close(conn, st, _errname(exc.errno))
            return
        if not data:
            self.close(conn, st, "EOF")
            return
        st["buf"] += data
        while len(st["buf"]) >= _REQ.size:
            mark, idx, req, resp = _REQ.unpack_from(st["buf"])
            if mark != b"R" or req < _REQ.size:
                self.close(conn, st, "EPROTO")
                return
            if len(st["buf"]) < req:
                break
            st["buf"] = st["buf"][req:]
            if st["idx"] is None:
                st["idx"] = idx
                self.ep.emit(ev="saw", idx=idx, side="server", address=st["peer"][0], port=st["peer"][1])
            try:
                conn.send(bytes(max(1, resp)))
            except BlockingIOError:
                pass
            except OSError as exc:
                self.close(conn, st, _errname(exc.errno))
                return

    def close(self, conn, st, name: str) -> None:
        gone = _address_gone(st["local"]) if name not in RESET_ERRORS else False
        self.ep.emit(ev="broken", idx=st["idx"], side="server", err=name, address_gone=gone, peer=st["peer"])
        self.ep.sel.unregister(conn)
        conn.close()


class _UdpClient:
    def __init__(self, ep: _Endpoint, c: dict) -> None:
        self.ep, self.idx = ep, c["idx"]
        self.interval, self.timeout, self.end = c["interval"], c["timeout"], c["end"]
        self.settle = c.get("settle")
        self.answered: float | None = None
        self.request = max(c["request"], _DGRAM.size)
        self.response = c["response"]
        self.sent = 0
        self.waiting_since: float | None = None
        self.established = False
        self.state = "up"
        self.local = ""
        s = self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)  # ICMP errors are observations
        s.setblocking(False)
        ep.emit(ev="start", idx=self.idx, side="client")
        try:
            s.bind((c.get("src") or "", c.get("sport", 0)))
            s.connect((c["dst"], c["port"]))
            self.local = s.getsockname()[0]
        except OSError as exc:
            self.error(exc.errno)
        ep.sel.register(s, selectors.EVENT_READ, self.io)
        self.tick()

    def error(self, err) -> None:
        self.ep.emit(ev="error", idx=self.idx, side="client", err=_errname(err))

    def io(self, sock, mask) -> None:
        # recv first: it reports the pending ICMP error (EHOSTUNREACH...) once; draining the error queue
        # first could clear that error unseen.  Then drain what is left, as the TCP path does.
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            _drain_errqueue(sock)
            return
        except OSError as exc:
            self.error(exc.errno)
            _drain_errqueue(sock)
            return
        if self.state != "up":
            return
        self.waiting_since = None
        self.answered = self.ep.now()
        if not self.established:
            self.established = True
            self.local = sock.getsockname()[0]
            self.ep.emit(ev="established", idx=self.idx, side="client", local=list(sock.getsockname()),
                         remote=list(sock.getpeername()))
        self.ep.emit(ev="answer", idx=self.idx, side="client", n=len(data))

    def tick(self) -> None:
        if self.state != "up":
            return
        now = self.ep.now()
        if self.waiting_since is not None and now - self.waiting_since >= self.timeout:
            self.state = "broken"
            gone = _address_gone(self.local)
            self.ep.emit(ev="broken", idx=self.idx, side="client", err="ETIMEDOUT", why="no answer",
                         address_gone=gone)
            return
        if now >= self.end and self.waiting_since is None and _proven(self.answered, self.settle):
            self.ep.emit(ev="done", idx=self.idx, side="client")
            return
        if self.waiting_since is None:
            self.waiting_since = now
        mark = b"H" if self.sent == 0 else b"D"
        self.sent += 1
        try:
            self.sock.send(_DGRAM.pack(mark, self.idx, self.response) + bytes(self.request - _DGRAM.size))
        except BlockingIOError:
            pass
        except OSError as exc:
            self.error(exc.errno)
        self.ep.at(now + self.interval, self.tick)


class _UdpServer:
    def __init__(self, ep: _Endpoint, c: dict) -> None:
        self.ep, self.session = ep, c.get("session", False)
        self.known: set[tuple] = set()
        self.last: dict[int, tuple] = {}
        s = self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((c.get("bind") or "", c["port"]))
        s.setblocking(False)
        ep.sel.register(s, selectors.EVENT_READ, self.io)

    def io(self, sock, mask) -> None:
        for _ in range(64):
            try:
                data, src = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error for an earlier answer: nothing to do for a server
            if len(data) < _DGRAM.size:
                continue
            mark, idx, resp = _DGRAM.unpack_from(data)
            if self.last.get(idx) != src:
                self.last[idx] = src
                self.ep.emit(ev="saw", idx=idx, side="server", address=src[0], port=src[1])
            if self.session and src not in self.known:
                if mark != b"H":  # mid-session datagram from a source the application never met
                    self.ep.emit(ev="ignored", idx=idx, side="server", address=src[0], port=src[1])
                    continue
                self.known.add(src)
            try:
                sock.sendto(bytes(max(1, resp)), src)
            except OSError:
                pass


def endpoint_main(argv: list[str]) -> int:
    """``python -m tools.netns_backend endpoint T0 MAX_SECONDS``: run commands from stdin."""
    t0, limit = float(argv[0]), float(argv[1])
    ep = _Endpoint(t0, time.monotonic() + limit, sys.stdout)
    ep.emit(ev="ready")
    ep.run()
    return 0


# =====================================================================================
# The driver (this process): lab, modes, schedule, verdicts
# =====================================================================================
class ModeUnavailable(RuntimeError):
    """A mode this backend cannot run (yet): reported as the ModeRun's error, never a verdict."""


class _Driver:
    """How the VM is plugged in, per mode.  Never decides an outcome."""

    name = ""
    logdir: str | None = None

    def __init__(self, sc, topo) -> None:
        self.sc, self.topo = sc, topo

    def attach(self, host: str, first: bool) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        pass

    def vm_address(self) -> str | None:
        raise NotImplementedError

    def published(self, proto: int, port: int) -> tuple[str, int]:
        return self.vm_address(), port

    def close(self) -> None:
        pass


class _Bridged(_Driver):
    """The VM on the host's LAN bridge with an address of that site (kept or re-leased on a move)."""

    name = "bridged"

    def __init__(self, sc, topo) -> None:
        super().__init__(sc, topo)
        self.address: str | None = None
        self.leases: dict[str, dict[str, str]] = {}  # site -> MAC -> address (a DHCP server per site)
        self.next: dict[str, int] = {}

    def lease(self, site: str) -> str:
        got = self.leases.setdefault(site, {}).get(self.sc.vm.mac)
        if got:
            return got
        net = ipaddress.IPv4Network(self.topo.sites[site].prefix)
        s = self.topo.sites[site]
        reserved = {s.gateway, s.proxy} | {h.address for h in self.topo.hosts.values()}
        if s.proxy and self.sc.vm.home_address:
            reserved.add(self.sc.vm.home_address)
        size = net.num_addresses
        n = self.next.get(site, 100)
        for _ in range(size):
            off = n % size
            n += 1
            if off in (0, size - 1) and size > 2:
                continue
            cand = str(net.network_address + off)
            if cand not in reserved and cand not in self.leases[site].values():
                self.next[site] = n
                self.leases[site][self.sc.vm.mac] = cand
                return cand
        raise ModeUnavailable(f"site {site}: no free address to lease")

    def attach(self, host: str, first: bool) -> None:
        topo = self.topo
        topo.plug_bridge("br0")
        site = topo.sites[topo.hosts[host].site]
        if first or self.sc.vm.bridged == "re-lease":
            new = self.lease(site.name)
            if new != self.address:
                topo.vm_readdress(f"{new}/{site.prefixlen}", site.gateway)
                self.address = new

    def vm_address(self) -> str | None:
        return self.address


class _HostOnly(_Driver):
    """The VM on a network only its host reaches: an address, no gateway, the host does not forward."""

    name = "host-only"
    NET = 24

    def attach(self, host: str, first: bool) -> None:
        from .topology import host_only_side

        vm = self.sc.vm
        host_side = host_only_side(vm.host_only_address, self.NET)
        self.topo.lab.sysctl(self.topo.host_ns(host), "net.ipv4.ip_forward", "0")
        self.topo.plug_routed(f"{host_side}/{self.NET}")
        if first:
            self.topo.vm_readdress(f"{vm.host_only_address}/{self.NET}", None)

    def vm_address(self) -> str | None:
        return self.sc.vm.host_only_address


class _Nat(_Driver):
    """The VM behind its host's ``roam nat`` (NFQUEUE plugin), one running on every host.

    Same NAT network on every host (the VM keeps ``nat_address``; the host side of its
    link is ``nat_gateway``); each host's ``roam nat`` has that host's address
    (``--external br0``) and the scenario's ``[[forward]]`` mappings for it.  A NAT keeps
    its state when the VM leaves, as a NAT daemon would.
    """

    name = "nat"
    carry_state = False
    READY = 15.0  # seconds a starting `roam nat` may take to publish its status

    def __init__(self, sc, topo) -> None:
        import shutil
        import tempfile

        super().__init__(sc, topo)
        if shutil.which("roam") is None:
            raise ModeUnavailable("the `roam` command is not on PATH (needed to run `roam nat` in the lab)")
        self.procs: dict[str, object] = {}
        self.last_host: str | None = None
        self.warnings: list[str] = []
        self.dir = tempfile.mkdtemp(prefix="roam-netns-nat-")
        try:
            for h in topo.hosts:  # all at once: each takes a second or so to come up
                self._start(h, wait=False)
            for h in topo.hosts:
                self._wait(h)
        except BaseException:
            self.close()  # the caller gets no driver to close: stop what started, remove the dir
            raise

    def _paths(self, host: str) -> tuple[str, str, str]:
        d = os.path.join(self.dir, host)
        return d, os.path.join(d, "nat-q0.status.json"), os.path.join(d, "nat-q0.snapshot.json")

    def _config(self, host: str) -> str:
        from conntrack import Proto

        vm = self.sc.vm
        net = ipaddress.IPv4Network(f"{vm.nat_address}/24", strict=False)
        lines = [f'internal = ["{net}"]', ""]
        for f in self.sc.forwards:
            if f.hosts is None or host in f.hosts:
                proto = "tcp" if f.protocol == Proto.TCP else "udp"
                lines += ["[[inbound]]", f'proto = "{proto}"', f"port = {f.external_port}",
                          f'to = "{vm.nat_address}:{f.port}"', ""]
        d, _, _ = self._paths(host)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "nat.toml")
        with open(path, "w") as fh:
            fh.write("\n".join(lines))
        return path

    def _start(self, host: str, wait: bool = True) -> None:
        import subprocess

        lab, ns = self.topo.lab, self.topo.host_ns(host)
        d, status, _ = self._paths(host)
        cfg = self._config(host)
        if os.path.exists(status):
            os.remove(status)
        lab.sysctl(ns, "net.ipv4.ip_forward", "1")
        log = open(os.path.join(d, "nat.log"), "a")
        p = lab.popen(ns, ["roam", "-v", "nat", "--config", cfg, "--external", "br0", "--state-dir", d],
                      stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[host] = p
        if wait:
            self._wait(host)

    def _wait(self, host: str) -> None:
        d, status, _ = self._paths(host)
        p = self.procs[host]
        deadline = time.monotonic() + self.READY
        while not os.path.exists(status):
            if p.poll() is not None:
                raise ModeUnavailable(f"`roam nat` on {host} exited with {p.returncode}: "
                                      f"{open(os.path.join(d, 'nat.log')).read()[-400:]}")
            if time.monotonic() > deadline:
                raise ModeUnavailable(f"`roam nat` on {host} did not come up within {self.READY:.0f} s")
            time.sleep(0.05)

    def _stop(self, host: str) -> None:
        p = self.procs.pop(host, None)
        if p is not None:
            self.topo.lab.stop(p, wait=5.0)

    def attach(self, host: str, first: bool) -> None:
        vm = self.sc.vm
        self.topo.plug_routed(f"{vm.nat_gateway}/24")
        if first:
            self.topo.vm_readdress(f"{vm.nat_address}/24", vm.nat_gateway)
        self.last_host = host

    def carry(self, old: str, new: str) -> float:
        """nat+state: the old host's NAT state, rebound to the new host's address, restored there.

        ``roam nat`` snapshots its state to its state dir every second (and on exit); the
        latest snapshot of the old host's NAT -- taken while the VM was still there, at
        most a second before it left -- is moved to the new host's external address
        (ports unchanged) by the NAT engine itself, ``restore(snap, now, rebind=True)``
        as the simulator does, in an engine configured as the new host's ``roam nat``
        (which restores its state dir without rebinding), and the new host's ``roam
        nat`` is restarted on the result.
        The old host's NAT keeps running with what it had, as in the simulator.
        Returns the seconds it took.
        """
        from nat import snapshot as natsnap

        t = time.monotonic()
        if old == new:
            return 0.0
        snap = natsnap.load(self._paths(old)[2])
        if snap is None:
            self.warnings.append(f"nat+state: {old}'s roam nat had written no snapshot yet; nothing carried")
            return time.monotonic() - t
        self._stop(new)
        natsnap.save(self._paths(new)[2], self._rebound(snap, new))
        self._start(new)
        return time.monotonic() - t

    def _rebound(self, snap: dict, host: str) -> dict:
        """``snap`` moved to ``host``'s external address by the engine (``restore(rebind=True)``)."""
        import nat as natmod

        vm = self.sc.vm
        fwds = tuple(natmod.PortForward(f.protocol, f.external_port, vm.nat_address, f.port)
                     for f in self.sc.forwards if f.hosts is None or host in f.hosts)
        net = str(ipaddress.IPv4Network(f"{vm.nat_address}/24", strict=False))
        eng = natmod.NatEngine(natmod.NatConfig(internal=(net,), external_ip=self.topo.hosts[host].address,
                                                forwards=fwds))
        eng.restore(snap, 0.0, rebind=True)  # times are relative: restored and taken at the same instant
        return eng.snapshot(0.0)

    def vm_address(self) -> str | None:
        return self.sc.vm.nat_address

    def published(self, proto: int, port: int) -> tuple[str, int]:
        host = self.last_host
        for f in self.sc.forwards:
            if f.protocol == proto and f.port == port and (f.hosts is None or host in f.hosts):
                return self.topo.hosts[host].address, f.external_port
        return self.topo.hosts[host].address, port

    def close(self) -> None:
        import shutil

        for h in list(self.procs):
            self._stop(h)
        if self.logdir:  # keep each host's `roam nat` log with the endpoints' logs
            os.makedirs(self.logdir, exist_ok=True)
            for h in self.topo.hosts:
                src = os.path.join(self._paths(h)[0], "nat.log")
                if os.path.exists(src):
                    shutil.copy(src, os.path.join(self.logdir, f"nat-{h}.log"))
        shutil.rmtree(self.dir, ignore_errors=True)


class _NatState(_Nat):
    name = "nat+state"
    carry_state = True


class _Tunnel(_Driver):
    """The VM on its home LAN through ``roam tunnel``: the proxy in the home namespace, a host end where it runs.

    The proxy joins the home LAN bridge; on the VM's host a bridge ``brvm`` holds the
    VM's link and the host end's TAP.  A move stops the old host end (it detaches
    from the proxy) and starts one on the new host, which attaches from there with
    the VM's MAC; the VM keeps its home address.  Starting ``roam tunnel host`` takes
    the better part of a second, which adds to the scenario's downtime (the interruption
    the report shows includes it).
    """

    name = "tunnel"
    PORT = 4789
    READY = 15.0

    def __init__(self, sc, topo) -> None:
        import shutil
        import subprocess
        import tempfile

        super().__init__(sc, topo)
        if shutil.which("roam") is None:
            raise ModeUnavailable("the `roam` command is not on PATH (needed to run `roam tunnel`)")
        if topo.home is None or sc.home is None or not sc.vm.home_address:
            raise ModeUnavailable("the scenario has no home site with a proxy, or no home_address for the VM")
        self.home = topo.sites[sc.home.name]
        self.proxy_at = f"{self.home.proxy}:{self.PORT}"
        self.logs: dict[str, str] = {}
        self.procs: dict[str, object] = {}
        self.warnings: list[str] = []
        self.proxy = None
        self.here: str | None = None
        self.dir = tempfile.mkdtemp(prefix="roam-netns-tunnel-")
        try:
            self.key = os.path.join(self.dir, "tunnel.key")
            fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(subprocess.run(["roam", "tunnel", "genkey"], capture_output=True, text=True, check=True,
                                       timeout=30).stdout)
            self.proxy = self._popen("proxy", topo.home, ["proxy", "--listen", self.proxy_at, "--bridge", "br0"])
        except BaseException:
            self.close()  # the caller gets no driver to close: the dir holds the key
            raise

    def _popen(self, role: str, ns: str, argv: list[str]):
        import subprocess

        log = os.path.join(self.dir, f"{role}.log")
        self.logs[role] = log
        with open(log, "a") as f:
            return self.topo.lab.popen(ns, ["roam", "-v", "tunnel", *argv, "--key-file", self.key,
                                            "--status-dir", os.path.join(self.dir, f"status-{role}")],
                                       stdout=f, stderr=subprocess.STDOUT)

    def _wait_attached(self, host: str, p) -> None:
        log = self.logs[f"host-{host}"]
        deadline = time.monotonic() + self.READY
        while True:
            with open(log) as f:
                text = f.read()
            if "attached session" in text:
                return
            if p.poll() is not None or self.proxy is None or self.proxy.poll() is not None:
                raise ModeUnavailable(f"`roam tunnel` exited: {text[-400:]}")
            if time.monotonic() > deadline:
                raise ModeUnavailable(f"`roam tunnel host` on {host} did not attach within {self.READY:.0f} s")
            time.sleep(0.05)

    def attach(self, host: str, first: bool) -> None:
        topo, lab = self.topo, self.topo.lab
        ns = topo.host_ns(host)
        if not lab.ipr(ns).link_lookup(ifname="brvm"):
            lab.bridge(ns, "brvm")
        role = f"host-{host}"
        open(os.path.join(self.dir, f"{role}.log"), "w").close()  # a fresh log per start
        keep = self.sc.tunnel_keepalive
        p = self._popen(role, ns, ["host", "--proxy", self.proxy_at, "--tap", "vmtap0", "--bridge", "brvm",
                                   "--mac", self.sc.vm.mac, "--keepalive", f"{keep:g}",
                                   "--dead-after", f"{3 * keep:g}"])
        self.procs[host] = p
        topo.plug_bridge("brvm")
        self.here = host
        if first:
            topo.vm_readdress(f"{self.sc.vm.home_address}/{self.home.prefixlen}", self.home.gateway)
            self._wait_attached(host, p)

    def detach(self) -> None:
        host = self.topo.vm_host
        p = self.procs.pop(host, None) if host else None
        if p is not None:
            self.topo.lab.stop(p, wait=5.0)
            # the TAP is the host end's: it goes with it; the bridge stays for a return
        self.here = None

    def vm_address(self) -> str | None:
        return self.sc.vm.home_address

    def close(self) -> None:
        import shutil

        for p in [*self.procs.values(), self.proxy]:
            if p is not None:
                self.topo.lab.stop(p, wait=5.0)
        self.procs.clear()
        if self.logdir:
            os.makedirs(self.logdir, exist_ok=True)
            for role, log in self.logs.items():
                if os.path.exists(log):
                    shutil.copy(log, os.path.join(self.logdir, f"tunnel-{role}.log"))
        shutil.rmtree(self.dir, ignore_errors=True)


DRIVERS: dict[str, type[_Driver]] = {"bridged": _Bridged, "host-only": _HostOnly, "nat": _Nat,
                                     "nat+state": _NatState, "tunnel": _Tunnel}
NOT_YET: dict[str, str] = {}


class _Proc:
    """An endpoint process: commands in, JSON events out (read without blocking)."""

    def __init__(self, lab, ns: str, role: str, t0: float, limit: float, logdir: str | None) -> None:
        import subprocess

        self.role = role
        if logdir:
            os.makedirs(logdir, exist_ok=True)
        self.errfile = open(os.path.join(logdir, f"{role.replace(':', '-')}.stderr"), "w") if logdir else \
            open(os.devnull, "w")
        self.p = lab.popen(ns, [sys.executable, "-m", "tools.netns_backend", "endpoint", f"{t0!r}", f"{limit:.3f}"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errfile, bufsize=0)
        os.set_blocking(self.p.stdout.fileno(), False)
        self.buf = b""
        self.events: list[dict] = []

    def send(self, **cmd) -> None:
        try:
            self.p.stdin.write((json.dumps(cmd) + "\n").encode())
        except (BrokenPipeError, OSError):
            pass

    def pump(self) -> list[dict]:
        new = []
        while True:
            try:
                chunk = os.read(self.p.stdout.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buf += chunk
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ev["who"] = self.role
            new.append(ev)
        self.events += new
        return new


def _verdicts(sc, events: list[dict], migration_starts: list[float]):
    """ConnResults from what the endpoints logged (and nothing else).

    Survived: the client established it, no endpoint saw it break, and the client was
    answered after the last migration's downtime ended (clients keep asking until then,
    so one that was not is one the run's horizon cut short: broken, timed out).
    """
    from sim.results import ConnResult, Reason, Verdict

    results = {}
    for idx, c in enumerate(sc.connections):
        client = "vm" if c.direction == "outbound" else f"peer:{c.peer}"
        peer_role = f"peer:{c.peer}"
        mine = sorted((e for e in events if e.get("idx") == idx), key=lambda e: e["t"])
        established_at = next((e["t"] for e in mine if e["ev"] == "established" and e["who"] == client), None)
        progress = [e["t"] for e in mine if e["who"] == client and e["ev"] in ("established", "answer")]
        breaks = [e for e in mine if e["ev"] == "broken"]
        errors = {e["err"] for e in mine if e["ev"] in ("broken", "error")}
        gone = any(e.get("address_gone") for e in breaks)
        first = breaks[0] if breaks else None
        settle = _settle(sc)
        proven = settle is None or any(t > settle for t in progress)
        if established_at is not None and first is None and proven:
            verdict, reason = Verdict.SURVIVED, None
        else:
            verdict = Verdict.BROKEN
            if first is not None and first["err"] in RESET_ERRORS:
                reason = Reason.RESET_BY_PEER
            elif gone or errors & UNREACHABLE_ERRORS:
                reason = Reason.UNREACHABLE
            else:
                reason = Reason.TIMED_OUT
        # the longest stall across the moves, as sim.flow measures it
        slack = 1.5 * c.interval + 0.25
        interruption, mark, last = 0.0, None, None
        runs: list[list[float]] = []
        marks = sorted(migration_starts)
        mi = 0
        for t in progress:
            while mi < len(marks) and marks[mi] <= t:
                if mark is None and last is not None and (first is None or first["t"] > marks[mi]):
                    mark = last
                mi += 1
            if mark is not None:
                interruption = max(interruption, t - mark)
                mark = None
            last = t
            if runs and t - runs[-1][1] <= slack:
                runs[-1][1] = t
            else:
                runs.append([t, t])
        saw = []
        for e in mine:
            if e["who"] == peer_role and e["ev"] in ("saw", "established"):
                addr, port = (e["address"], e["port"]) if e["ev"] == "saw" else tuple(e["local"])
                if e["ev"] == "established":  # the peer is the client: it sees the address it dialled
                    addr, port = e["remote"]
                if not saw or saw[-1][1:] != (addr, port):
                    saw.append((e["t"], addr, port))
        side = None
        if first is not None:
            side = "vm" if first["who"] == "vm" else "peer"
        results[c.id] = ConnResult(
            id=c.id, verdict=verdict, reason=reason, established=established_at is not None,
            established_at=established_at, broken_at=None if first is None else first["t"],
            interruption_ms=interruption * 1000 if verdict == Verdict.SURVIVED else None,
            runs=tuple((a, b) for a, b in runs), peer_saw=tuple(saw), broken_side=side)
    return results


def run_mode_netns(sc, mode: str, progress: Callable[[float], None] | None = None,
                   logdir: str | None = None):
    """One mode in a fresh lab; a mode this backend cannot run comes back with ``error`` set."""
    from sim.results import ModeRun

    from .netlab import Lab, LabError
    from .topology import TopologyError, build_for

    if mode in NOT_YET:
        return ModeRun(mode, {}, f"{mode} is not available in the netns backend: {NOT_YET[mode]}")
    if mode not in DRIVERS:
        return ModeRun(mode, {}, f"unknown mode {mode!r}")
    if os.geteuid() != 0:
        return ModeRun(mode, {}, "the netns backend needs root (network namespaces)")
    warnings = []
    if any(s.loss for s in sc.sites) or any(p.loss for p in sc.peers):
        warnings.append("link loss in the scenario is not reproduced by the netns backend (links are lossless)")
    wall0 = time.monotonic()
    try:
        with Lab("roam") as lab:
            try:
                topo = build_for(lab, sc)
            except TopologyError as exc:
                return ModeRun(mode, {}, f"cannot build the lab for this scenario: {exc}")
            try:
                drv = DRIVERS[mode](sc, topo)
            except ModeUnavailable as exc:
                return ModeRun(mode, {}, f"{mode} is not available in the netns backend: {exc}")
            drv.logdir = logdir
            try:
                return _play(sc, mode, topo, drv, progress, logdir, warnings, wall0)
            finally:
                drv.close()
    except (LabError, OSError, ModeUnavailable) as exc:
        return ModeRun(mode, {}, f"the lab failed: {exc}")
    except Exception as exc:  # noqa: BLE001 - any failure is this mode's error, never the other modes' end
        return ModeRun(mode, {}, f"the netns backend failed: {type(exc).__name__}: {exc}")


def _play(sc, mode, topo, drv, progress, logdir, warnings, wall0):
    from conntrack import Proto
    from sim.results import ModeRun

    lab = topo.lab
    drv.attach(sc.vm.host, first=True)
    longest = max([sc.tcp_timeout, sc.udp_timeout] + [sc.timeout_of(c) for c in sc.connections])
    # clients go on past the duration until answered after the last move (or they give up)
    horizon = max(sc.duration, _settle(sc) or 0.0) + longest + GRACE
    provisional = time.monotonic()
    procs = {"vm": _Proc(lab, topo.vm, "vm", provisional, horizon + 60, logdir)}
    for p in sc.peers:
        procs[f"peer:{p.name}"] = _Proc(lab, topo.peers[p.name].ns, f"peer:{p.name}", provisional, horizon + 60,
                                        logdir)
    # time zero once every endpoint is up (Python takes a while to start on a busy machine)
    ready: set[str] = set()
    deadline = time.monotonic() + READY_TIMEOUT
    while len(ready) < len(procs):
        for role, p in procs.items():
            ready |= {role for ev in p.pump() if ev["ev"] == "ready"}
            if p.p.poll() is not None:
                return ModeRun(mode, {}, f"endpoint {role} exited at start (exit {p.p.returncode})")
        if time.monotonic() > deadline:
            return ModeRun(mode, {}, f"endpoints {', '.join(sorted(set(procs) - ready))} not up after "
                           f"{READY_TIMEOUT:.0f} s")
        time.sleep(0.02)
    for p in procs.values():
        p.events.clear()
    t0 = time.monotonic() + SETTLE
    for p in procs.values():
        p.send(op="clock", t0=t0)
    # servers (one per side, protocol and port)
    opened = set()
    for c in sc.connections:
        side = "vm" if c.direction == "inbound" else f"peer:{c.peer}"
        key = (side, c.protocol, c.port)
        if key in opened:
            continue
        opened.add(key)
        bind = "" if side == "vm" else sc.peer(c.peer).address
        if c.protocol == Proto.TCP:
            procs[side].send(op="tcp_listen", port=c.port, bind=bind, timeout=sc.timeout_of(c))
        else:
            procs[side].send(op="udp_listen", port=c.port, bind=bind, session=c.session)
    # the schedule, in scenario seconds
    plan: list[tuple[float, int, str, object]] = []
    for i, c in enumerate(sc.connections):
        plan.append((c.start, 1, "start", i))
    starts = []
    for m in sc.migrations:
        plan.append((m.at, 0, "leave", m))
        plan.append((m.at + m.downtime, 0, "arrive", m))
        starts.append(m.at)
    plan.sort(key=lambda x: (x[0], x[1]))
    status: dict[int, str] = {}  # idx -> "done" | "broken"
    events: list[dict] = []
    n = len(sc.connections)
    pi = 0
    while True:
        now = time.monotonic() - t0
        while pi < len(plan) and plan[pi][0] <= now:
            _, _, what, arg = plan[pi]
            pi += 1
            if what == "start":
                _start(sc, drv, procs, arg)
            elif what == "leave":
                topo.vm_link_down()
                drv.detach()
                if getattr(drv, "carry_state", False):
                    took = drv.carry(topo.vm_host, arg.to)
                    if took > arg.downtime:
                        warnings.append(f"carrying the NAT state to {arg.to} took {took:.2f} s, longer "
                                        f"than the {arg.downtime:.2f} s downtime: the VM arrived late")
            else:
                topo.move_vm(arg.to)
                drv.attach(arg.to, first=False)
        for p in procs.values():
            for ev in p.pump():
                events.append(ev)
                if ev.get("idx") is not None and ev["ev"] in ("broken", "done"):
                    status.setdefault(ev["idx"], "broken" if ev["ev"] == "broken" else "done")
                    if ev["ev"] == "broken":
                        status[ev["idx"]] = "broken"
        if progress:
            progress(min(1.0, max(0.0, now / horizon)))
        if now >= horizon or (pi >= len(plan) and len(status) >= n):
            break
        if any(p.p.poll() is not None for p in procs.values()):
            dead = [r for r, p in procs.items() if p.p.poll() is not None]
            return ModeRun(mode, {}, f"endpoint(s) {', '.join(dead)} exited early (see logs)")
        nxt = plan[pi][0] - now if pi < len(plan) else 0.05
        time.sleep(max(0.0, min(0.05, nxt)))
    # what happens once the driver stops (endpoints closing their sockets) is not the scenario's
    stop_at = time.monotonic() - t0
    for p in procs.values():
        p.send(op="quit")
    for p in procs.values():
        try:
            p.p.wait(timeout=5)
        except Exception:  # noqa: BLE001 - lab.close() stops it
            pass
        events += p.pump()
        p.errfile.close()
    if logdir:
        with open(os.path.join(logdir, "events.jsonl"), "w") as f:
            for e in sorted(events, key=lambda e: e["t"]):
                f.write(json.dumps(e) + "\n")
    results = _verdicts(sc, [e for e in events if e["t"] < stop_at], starts)
    warnings += getattr(drv, "warnings", [])
    return ModeRun(mode, results, None, _router_packets(topo), len(events), {}, time.monotonic() - wall0,
                   tuple(warnings))


def _router_packets(topo) -> int:
    """Packets the internet namespace sent on its links (what crossed the lab's core), from the kernel's counters."""
    total = 0
    try:
        for link in topo.lab.ipr(topo.inet).get_links():
            if link.get_attr("IFLA_IFNAME") == "lo" or link.get_attr("IFLA_LINKINFO") is not None and \
                    link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "bridge":
                continue
            stats = link.get_attr("IFLA_STATS64")
            if stats is not None:
                total += stats["tx_packets"]
    except Exception:  # noqa: BLE001 - a count for the report only
        return 0
    return total


def _settle(sc) -> float | None:
    """When the last migration's downtime ends (None without migrations)."""
    return max((m.at + m.downtime for m in sc.migrations), default=None)


def _start(sc, drv: _Driver, procs: dict, idx: int) -> None:
    from conntrack import Proto

    c = sc.connections[idx]
    timeout = sc.timeout_of(c)
    common = dict(idx=idx, interval=c.interval, request=c.request, response=c.response, timeout=timeout,
                  end=sc.duration, settle=_settle(sc))
    op = "tcp_connect" if c.protocol == Proto.TCP else "udp_connect"
    if c.direction == "outbound":
        procs["vm"].send(op=op, dst=sc.peer(c.peer).address, port=c.port, src="", sport=VM_EPHEMERAL + idx % 20000,
                         **common)
    else:
        addr, port = drv.published(c.protocol, c.port)
        procs[f"peer:{c.peer}"].send(op=op, dst=addr or "0.0.0.0", port=port, src=sc.peer(c.peer).address,
                                     sport=PEER_EPHEMERAL + idx % 15000, **common)


def run_netns(sc, modes: tuple[str, ...] | None = None, progress=None, *, parallel: bool = False,
              logdir: str | None = None):
    """Every mode of the scenario (or ``modes``) in the lab; the same Report as ``sim.run.replay``.

    ``parallel``: run the modes at once, each in its own lab (wall time of the
    slowest instead of the sum).  ``logdir``: keep each endpoint's stderr there.
    """
    from sim.results import ConnInfo, ModeRun, Report

    modes = tuple(modes or sc.modes)
    runs: dict[str, object] = {}
    done: dict[str, float] = {m: 0.0 for m in modes}
    lock = threading.Lock()

    def report(mode: str, frac: float) -> None:
        if not progress:
            return
        if not parallel:
            progress(mode, frac)
            return
        # all modes at once: report the overall fraction in the caller's (mode index + fraction) terms
        with lock:
            done[mode] = frac
            overall = sum(done.values())  # in modes done: 0 .. len(modes)
            i = min(int(overall), len(modes) - 1)
            progress(modes[i], overall - i)

    def one(mode: str) -> None:
        try:
            runs[mode] = run_mode_netns(sc, mode, lambda frac: report(mode, frac),
                                        os.path.join(logdir, mode) if logdir else None)
        except Exception as exc:  # noqa: BLE001 - in a thread: a mode's failure is its error, not a KeyError later
            runs[mode] = ModeRun(mode, {}, f"the netns backend failed: {type(exc).__name__}: {exc}")
        report(mode, 1.0)

    if parallel:
        threads = [threading.Thread(target=one, args=(m,), daemon=True) for m in modes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for m in modes:
            one(m)
    conns = tuple(ConnInfo(c.id, c.protocol_name, c.direction, c.peer, c.port, c.start) for c in sc.connections)
    migs = tuple((m.at, m.to, m.downtime, sc.host(m.to).site) for m in sc.migrations)
    return Report(sc.name, conns, migs, tuple(runs[m] for m in modes), sc.duration, backend="netns")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "endpoint":
        sys.exit(endpoint_main(sys.argv[2:]))
    print("usage: python -m tools.netns_backend endpoint T0 MAX_SECONDS  (started by the netns backend)",
          file=sys.stderr)
    sys.exit(2)
