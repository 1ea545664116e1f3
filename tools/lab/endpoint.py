"""The endpoint program of the namespace lab: a scenario's sockets, run inside a namespace.

    python -m tools.lab.endpoint T0 MAX_SECONDS      (started by tools.lab.netns, one per namespace)

The driver tells it, on stdin as JSON lines and at the scenario's times, which servers
to open and which connections to start; it runs each connection's client on the one
client schedule (``sim.schedule``, the simulator's too) and logs each thing it observes
as a timestamped JSON line on stdout: established, an answer (progress), an error
(ECONNRESET, ETIMEDOUT through ``TCP_USER_TIMEOUT``, EHOSTUNREACH from an ICMP
error...), its own address gone, the source a server saw.  It never judges: the
driver hands those lines to the one judge (``tools.lab.logs`` -> ``sim.judge``).

Only the standard library and ``sim.schedule`` (itself standard library only): this
module starts inside every namespace, on a machine that may be busy.
"""
from __future__ import annotations

import errno
import heapq
import json
import os
import select
import selectors
import socket
import struct
import sys
import time
from typing import Callable

from sim.schedule import Schedule, Step, Transport

TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)  # linux/in.h; not exported by every Python

#: What a reset by the peer looks like to a socket: an RST on a connection (ECONNRESET) or in answer to a
#: SYN / an ICMP port unreachable on a connected UDP socket (ECONNREFUSED).  Not an orderly close (EOF) nor
#: EPIPE (a write after the connection ended, for whatever reason: the RST itself is reported as ECONNRESET).
RESET_ERRORS = {"ECONNRESET", "ECONNREFUSED"}
#: Errors that say the destination or the sender's own address cannot be reached.  EINVAL is not among them:
#: it means "unreachable" only together with the socket's address having gone (``address_gone``).
UNREACHABLE_ERRORS = {"EHOSTUNREACH", "ENETUNREACH", "EADDRNOTAVAIL", "ENONET"}


#: A tick this late (a frozen process thawed) re-arms from when it ran, as the simulator's deferred tick
#: does; an on-time one from when it was due, so that ticks do not drift from the simulator's.
SLIP = 0.02
#: A move's barrier runs this long before the move's instant (before any tick due at it), and holds at most
#: HOLD_MAX seconds for the driver's ``go``.
BARRIER_BEFORE, HOLD_MAX = 1e-6, 2.0


class _Client:
    """What a TCP and a UDP client share: the one client schedule (``sim.schedule``; UDP gives up on it,
    TCP on its socket), the request and response sizes, and the tick times: every ``interval`` from the
    start, on the scenario's clock."""

    def __init__(self, ep: "_Endpoint", c: dict, udp: bool, header: int) -> None:
        self.ep, self.idx = ep, c["idx"]
        self.interval, self.timeout = c["interval"], c["timeout"]
        self.due = c.get("start", ep.now())
        # the last migration's arrival ("settle"): be answered after it before stopping
        self.schedule = Schedule(udp, self.interval, self.timeout, c["end"], c.get("settle"))
        self.request = max(c["request"], header)
        self.response = c["response"]
        self.local = ""

    def next_due(self, now: float) -> float:
        self.due = (self.due if now - self.due < SLIP else now) + self.interval
        return self.due


def _errname(e: int | str) -> str:  # an errno, or a reason of our own ("EOF")
    if isinstance(e, str):
        return e
    return errno.errorcode.get(e, str(e))


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
        self.cut: set[float] = set()  # the moves whose link cut the driver has reported (``go``)
        self._stdin = -1

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
        self._stdin = stdin.fileno()
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

    def _barrier(self, at: float) -> None:
        """A move's instant on this endpoint's own clock, however late a busy machine runs it: say so and
        wait for the driver's ``go`` (the VM's link cut meanwhile), then run what is due at ``at`` and say
        ``synced`` (the driver freezes the VM after that).  So what was due at the move goes out after the
        cut and before the pause, as in the simulator, whatever the load."""
        self.emit(ev="barrier", at=at)
        fd = self._stdin
        limit = time.monotonic() + HOLD_MAX
        while at not in self.cut and not self.quit and time.monotonic() < limit:  # a go that came first counts
            if select.select([fd], [], [], 0.05)[0]:
                self._commands(fd, None)
        self.at(at, lambda: self.emit(ev="synced", at=at))

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
        elif op == "barrier":  # a move at ``at``: hold there until the driver has cut the link
            self.at(c["at"] - BARRIER_BEFORE, lambda: self._barrier(c["at"]))
        elif op == "go":  # the link is cut for the move at ``at``
            self.cut.add(c["at"])
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


def _tcp_recv(ep, sock, idx, side: str) -> bytes | int | None:
    """recv() on a TCP socket: the bytes (b"" at EOF); None when there is nothing to read or the error is an
    ICMP report the connection lives on (logged as an ``error`` line); the errno that ended the connection."""
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in SOFT_ERRORS and not _tcp_dead(sock):
            _drain_errqueue(sock)
            ep.emit(ev="error", idx=idx, side=side, err=_errname(exc.errno))
            return None
        return exc.errno


#: The schedule's view of a TCP client's state.
_TCP_TRANSPORT = {"connecting": Transport.CONNECTING, "up": Transport.UP, "broken": Transport.BROKEN}


class _TcpClient(_Client):
    def __init__(self, ep: _Endpoint, c: dict) -> None:
        super().__init__(ep, c, False, _REQ.size)
        self.state = "connecting"
        self.got = 0
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
            err = exc.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS):
            self.broken(err)
            return
        ep.sel.register(s, selectors.EVENT_WRITE, self.io)
        # connect() is bounded by the timeout too (TCP_USER_TIMEOUT plus this loop's own bound)
        ep.at(self.started + self.timeout + 0.05, self.connect_deadline)
        self.tick()

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
            self.schedule.answered(self.ep.now())
            self.local = sock.getsockname()[0]
            peer = sock.getpeername()
            self.ep.sel.modify(sock, selectors.EVENT_READ, self.io)
            self.ep.emit(ev="established", idx=self.idx, side="client", local=list(sock.getsockname()),
                         remote=list(peer))
            return
        data = _tcp_recv(self.ep, sock, self.idx, "client")
        if data is None:
            return
        if isinstance(data, int):
            self.broken(data)
            return
        if not data:
            self.broken("EOF")
            return
        self.got += len(data)
        if self.schedule.awaiting and self.got >= self.response:
            self.got -= self.response
            self.schedule.answered(self.ep.now())
            self.ep.emit(ev="answer", idx=self.idx, side="client")

    def tick(self) -> None:
        now = self.ep.now()
        step = self.schedule.tick(now, _TCP_TRANSPORT[self.state])
        if step == Step.DONE:
            self.done = True
            self.ep.emit(ev="done", idx=self.idx, side="client")
            return
        if step == Step.STOP:
            return
        if step == Step.SEND:
            try:
                self.sock.send(_REQ.pack(b"R", self.idx, self.request, self.response)
                               + bytes(self.request - _REQ.size))
            except BlockingIOError:
                pass
            except OSError as exc:
                self.broken(exc.errno)
                return
        self.ep.at(self.next_due(now), self.tick)

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
        ep.emit(ev="listening", port=c["port"])

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
        data = _tcp_recv(self.ep, conn, st["idx"], "server")
        if data is None:
            return
        if isinstance(data, int):
            self.close(conn, st, _errname(data))
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
                self.close(conn, st, _errname(exc.errno or errno.EIO))
                return

    def close(self, conn, st, name: str) -> None:
        gone = _address_gone(st["local"]) if name not in RESET_ERRORS else False
        self.ep.emit(ev="broken", idx=st["idx"], side="server", err=name, address_gone=gone, peer=st["peer"])
        self.ep.sel.unregister(conn)
        conn.close()


class _UdpClient(_Client):
    def __init__(self, ep: _Endpoint, c: dict) -> None:
        super().__init__(ep, c, True, _DGRAM.size)
        self.sent = 0
        self.established = False
        self.state = "up"
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
        self.schedule.answered(self.ep.now())
        if not self.established:
            self.established = True
            self.local = sock.getsockname()[0]
            self.ep.emit(ev="established", idx=self.idx, side="client", local=list(sock.getsockname()),
                         remote=list(sock.getpeername()))
        self.ep.emit(ev="answer", idx=self.idx, side="client", n=len(data))

    def tick(self) -> None:
        now = self.ep.now()
        step = self.schedule.tick(now, Transport.UP if self.state == "up" else Transport.BROKEN)
        if step == Step.STOP:
            return
        if step == Step.GIVE_UP:
            self.state = "broken"
            gone = _address_gone(self.local)
            self.ep.emit(ev="broken", idx=self.idx, side="client", err="ETIMEDOUT", why="no answer",
                         address_gone=gone)
            return
        if step == Step.DONE:
            self.ep.emit(ev="done", idx=self.idx, side="client")
            return
        mark = b"H" if self.sent == 0 else b"D"
        self.sent += 1
        try:
            self.sock.send(_DGRAM.pack(mark, self.idx, self.response) + bytes(self.request - _DGRAM.size))
        except BlockingIOError:
            pass
        except OSError as exc:
            self.error(exc.errno)
        self.ep.at(self.next_due(now), self.tick)


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
        ep.emit(ev="listening", port=c["port"])

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


def main(argv: list[str]) -> int:
    """``python -m tools.lab.endpoint T0 MAX_SECONDS``: run commands from stdin."""
    t0, limit = float(argv[0]), float(argv[1])
    ep = _Endpoint(t0, time.monotonic() + limit, sys.stdout)
    ep.emit(ev="ready")
    ep.run()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m tools.lab.endpoint T0 MAX_SECONDS  (started by the netns backend)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
