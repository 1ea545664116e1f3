"""Thin I/O drivers around the tunnel engines: TAP, UDP/TCP sockets and one selector loop.

The engines (:class:`~tunnel.host.HostEnd`, :class:`~tunnel.proxy.ProxyEnd`) do no
I/O; these drivers only move bytes and time between them and the kernel.  The
clock is passed in (``clock=time.monotonic`` from the command line), so nothing
here reads it on its own.

MTU and overhead.  Each Ethernet frame gains a 16-byte header and a 16-byte tag
(32 bytes), then UDP/IPv4 (28) or UDP/IPv6 (48): a frame of F bytes becomes an
outer IPv4 packet of F + 60 bytes, so a full frame from a 1500-MTU TAP (1514
bytes) is a 1574-byte packet.  The TAP MTU defaults to 1500 so that the VM and
the home LAN keep their ordinary MTU (a smaller TAP MTU would make the bridges
silently drop the full-size frames the LAN's hosts send); the UDP socket is set
to ``IP_PMTUDISC_DONT`` so the kernel *fragments* outer datagrams larger than the
path MTU instead of refusing them.  Give ``--mtu 1426`` (IPv4 underlay of 1500;
1406 for IPv6) and the same MTU on the VM and the LAN to avoid fragmentation.
Over TCP the stream carries any frame size (2 bytes of length each).  Frames
above the TAP MTU (+ 14 header + 8 for two VLAN tags) are counted as OVERSIZED
and dropped, never truncated: reads use a 64 KiB buffer.

Hostile networks.  Errors the network hands back (ICMP errors surfacing as
ECONNREFUSED, ENETUNREACH while an address changes, resets, EMFILE on accept) are
counted in the driver's counters and logged (at most once per
:data:`LOG_EVERY` seconds per kind), never raised out of :meth:`_Driver.run`.
The TCP proxy holds at most ``max_tcp_conns`` connections (a new one beyond that
evicts the oldest connection that has not yet sent an authentic message, or is
refused when all are authenticated), closes a connection that has sent nothing
authentic within ``tcp_auth_timeout`` seconds of opening (or, once
authenticated, within ``tcp_idle_timeout`` of its last authentic message), and
stops accepting for :data:`ACCEPT_PAUSE` seconds when accept() runs out of
descriptors or memory.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
from collections import Counter
from typing import Callable, Hashable

from .events import TunnelEvent
from .host import HostEnd
from .proxy import ProxyEnd
from .stream import StreamDecoder, encode
from .tap import Tap
from .wire import WireError

log = logging.getLogger("roam.tunnel")

IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DONT = getattr(socket, "IP_PMTUDISC_DONT", 0)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
IPV6_PMTUDISC_DONT = 0
SOCKBUF = 4 << 20
TCP_BACKLOG_MAX = 4 << 20
BATCH = 64  # reads per readiness event: bounded, so one busy source cannot starve the rest
STATUS_EVERY = 1.0
ADDRESS_CHECK_EVERY = 0.25
LOG_EVERY = 5.0  # a recurring network error is logged at most this often per kind (always counted)
#: TCP proxy defaults: connections held at once, and seconds a connection may stay without
#: an authentic message (before its first one; the idle bound after it defaults to the
#: engine's session timeout).
MAX_TCP_CONNS = 512
TCP_AUTH_TIMEOUT = 10.0
ACCEPT_PAUSE = 0.25  # accept() out of descriptors/memory: stop accepting this long
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def parse_endpoint(text: str) -> tuple[str, int]:
    """``IP:PORT`` or ``[IPv6]:PORT``."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not IP:PORT: {text!r}")
    socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    return host, int(port)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _udp_socket(family: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setblocking(False)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, SOCKBUF)
        except OSError:
            pass
    if family == socket.AF_INET:
        s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
    else:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT)
    return s


class _TcpConn:
    """One TCP connection carrying length-framed messages."""

    def __init__(self, sock: socket.socket, endpoint: Hashable, max_len: int, opened: float = 0.0) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.decoder = StreamDecoder(max_len)
        self.out = bytearray()
        self.connected = True
        self.writing = False  # registered for EVENT_WRITE
        self.opened = opened
        self.last_authentic: float | None = None  # time of its latest authentic message (proxy side)
        self.closed = False

    def queue(self, message: bytes, counters: Counter) -> None:
        """Send now if nothing waits, else append (bounded); OSError means the connection broke."""
        if len(self.out) > TCP_BACKLOG_MAX:
            counters["tcp_backlog_drops"] += 1
            return
        data = encode(message)
        if not self.out and self.connected:
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            data = data[n:]
        self.out += data

    def flush(self) -> None:
        while self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            del self.out[:n]


class _Driver:
    role = "?"

    def __init__(self, tap: Tap, clock: Callable[[], float], status_dir: str | None) -> None:
        self.tap = tap
        self.clock = clock
        self.sel = selectors.DefaultSelector()
        self.counters: Counter[str] = Counter()
        self.stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self.sel.register(tap.fileno(), selectors.EVENT_READ, self._on_tap)
        self.status_path = None
        if status_dir:
            os.makedirs(status_dir, exist_ok=True)
            self.status_path = os.path.join(status_dir, f"{self.role}-{os.getpid()}.json")
        self._next_status = 0.0
        self._status_dirty = False  # an event happened: publish the status at once
        self.started = clock()
        self.extra_status: dict = {}
        self._log_next: dict[str, float] = {}

    def note(self, key: str, now: float, fmt: str, *args) -> None:
        """Count ``key``; log it (with the running count) at most once per LOG_EVERY seconds."""
        self.counters[key] += 1
        if now >= self._log_next.get(key, 0.0):
            self._log_next[key] = now + LOG_EVERY
            log.info("%s: " + fmt + " [%s: %d so far]", self.role, *args, key, self.counters[key])
        else:
            log.debug("%s: " + fmt, self.role, *args)

    # signal-safe: sets a flag and wakes the selector
    def request_stop(self, *_args) -> None:
        self.stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _on_wake(self, _mask: int) -> None:
        try:
            self._wake_r.recv(64)
        except OSError:
            pass

    def _on_tap(self, _mask: int) -> None:
        now = self.clock()
        for _ in range(BATCH):
            try:
                frame = self.tap.read()
            except OSError as exc:
                self.note("tap_rx_errors", now, "reading the TAP: %s", exc)
                break
            if frame is None:
                break
            self.tap_frame(frame, now)
        self.flush(now)

    def tap_frame(self, frame: bytes, now: float) -> None:
        """A frame the TAP gave us: the end's engine takes it."""
        raise NotImplementedError

    def engine_deadline(self) -> float | None:
        raise NotImplementedError

    def run(self) -> None:
        try:
            self.begin(self.clock())
            clock, select = self.clock, self.sel.select
            # One pass per wake-up, and as little as possible in it: the handlers move the frames
            # and flush what they made; timers (the engine's and the driver's own, which
            # engine_deadline() includes) and the status file only when due.
            while not self.stopping:
                now = clock()
                d = self.engine_deadline()
                if d is not None and d <= now:
                    self.engine.expire(now)
                    self.housekeeping(now)
                    self.flush(now)
                    d = self.engine_deadline()
                if self._status_dirty or now >= self._next_status:
                    self._status_dirty = False
                    self.write_status(now)
                    self._next_status = now + STATUS_EVERY
                wake = self._next_status if d is None or d > self._next_status else d
                for key, mask in select(min(max(0.0, wake - now), 1.0)):
                    key.data(mask)
        finally:
            self.shutdown()

    def begin(self, now: float) -> None:
        pass

    def housekeeping(self, now: float) -> None:
        pass

    def log_events(self, events: list[TunnelEvent]) -> None:
        if events:
            self._status_dirty = True
        for e in events:
            log.info("%s: %s session %08x%s%s", self.role, e.kind.name.lower(), e.session,
                     f" endpoint {e.endpoint}" if e.endpoint is not None else "",
                     f" ({e.detail})" if e.detail else "")

    def status(self, now: float) -> dict:
        st = self.engine.status(now)
        st.update(pid=os.getpid(), tap=self.tap.name, tap_mtu=self.tap.mtu, uptime=round(now - self.started, 3),
                  driver=dict(self.counters), **self.extra_status)
        return st

    def write_status(self, now: float) -> None:
        if not self.status_path:
            return
        tmp = self.status_path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.status(now), f, indent=1, default=str)
            os.replace(tmp, self.status_path)
        except OSError as exc:  # EMFILE under a flood, a full disk: the status waits, the tunnel goes on
            self.note("status_write_errors", now, "cannot write the status file: %s", exc)

    def shutdown(self) -> None:
        self.close_sockets()
        self.tap.close()
        if self.status_path:
            for p in (self.status_path, self.status_path + ".tmp"):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def close_sockets(self) -> None:
        pass


class HostDriver(_Driver):
    role = "host"

    def __init__(self, engine: HostEnd, tap: Tap, proxy: tuple[str, int], transport: str,
                 clock: Callable[[], float], status_dir: str | None = None) -> None:
        super().__init__(tap, clock, status_dir)
        self.engine = engine
        self.proxy = proxy
        self.family = _family(proxy[0])
        self.transport = transport
        self.local: str | None = None
        self._next_check = 0.0
        self.udp: socket.socket | None = None
        self.conn: _TcpConn | None = None
        self._reconnect_at: float | None = None
        self._reconnect_delay = 0.1
        self.extra_status = {"proxy": f"{proxy[0]}:{proxy[1]}", "transport": transport}
        if transport == "udp":
            self.udp = _udp_socket(self.family)
            self.sel.register(self.udp, selectors.EVENT_READ, self._on_udp)

    def engine_deadline(self) -> float | None:
        times = [t for t in (self.engine.next_deadline(), self._reconnect_at, self._next_check) if t is not None]
        return min(times) if times else None

    def begin(self, now: float) -> None:
        self.local = self._local_source()
        self.extra_status["local"] = self.local
        if self.transport == "udp":
            self.engine.start(now)
        else:
            self._connect(now)

    def tap_frame(self, frame: bytes, now: float) -> None:
        self.engine.send_frame(frame, now)

    # -- UDP ---------------------------------------------------------------------------------

    def _on_udp(self, _mask: int) -> None:
        now = self.clock()
        for _ in range(BATCH):
            try:
                data, addr = self.udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ICMP errors surface here (ECONNREFUSED...): counted, not fatal
                self.note("udp_rx_errors", now, "udp receive: %s", exc)
                continue
            if addr[0] != self.proxy[0] and not _same_ip(addr[0], self.proxy[0]):
                self.counters["rx_not_from_proxy"] += 1
                continue
            self.engine.receive(data, now)
        self.flush(now)

    # -- TCP ---------------------------------------------------------------------------------

    def _connect(self, now: float) -> None:
        try:
            s = socket.socket(self.family, socket.SOCK_STREAM)
        except OSError as exc:  # EMFILE, ENOBUFS...: try again later
            self._schedule_reconnect(now, f"no socket: {exc}")
            return
        try:
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = s.connect_ex(self.proxy)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self._schedule_reconnect(now, os.strerror(err))
            return
        self.conn = _TcpConn(s, self.proxy, self.engine.max_message)
        self.conn.connected = False
        self.sel.register(s, selectors.EVENT_WRITE, self._on_tcp)
        self._reconnect_at = None

    def _schedule_reconnect(self, now: float, why: str) -> None:
        if self.conn is not None:
            try:
                self.sel.unregister(self.conn.sock)
            except (KeyError, ValueError):
                pass
            self.conn.sock.close()
            self.conn = None
        self.counters["tcp_reconnects"] += 1
        log.info("host: tcp connection to proxy lost (%s); reconnecting in %.1fs", why, self._reconnect_delay)
        self._reconnect_at = now + self._reconnect_delay
        self._reconnect_delay = min(self._reconnect_delay * 2, 2.0)

    def _on_tcp(self, mask: int) -> None:
        now = self.clock()
        c = self.conn
        if c is None:
            return
        if not c.connected:
            try:
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError as exc:
                err = exc.errno or errno.EIO
            if err:
                self._schedule_reconnect(now, os.strerror(err))
                return
            c.connected = True
            self._reconnect_delay = 0.1
            self.sel.modify(c.sock, selectors.EVENT_READ, self._on_tcp)
            log.info("host: tcp connected to %s:%d", *self.proxy[:2])
            if self.engine.state.name == "IDLE":
                self.engine.start(now)
            else:
                self.engine.roamed(now)
            self.flush(now)
            return
        if mask & selectors.EVENT_WRITE:
            try:
                c.flush()
            except OSError as exc:
                self._schedule_reconnect(now, str(exc))
                return
        if mask & selectors.EVENT_READ:
            try:
                data = c.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as exc:
                self._schedule_reconnect(now, str(exc))
                return
            if data == b"":
                self._schedule_reconnect(now, "closed by proxy")
                return
            if data:
                try:
                    for m in c.decoder.feed(data):
                        self.engine.receive(m, now)
                except WireError as exc:
                    self.engine.drops[exc.reason] += 1
                    self._schedule_reconnect(now, str(exc))
                    return
        self.flush(now)

    # -- timers and output -------------------------------------------------------------------

    def housekeeping(self, now: float) -> None:
        if self._reconnect_at is not None and now >= self._reconnect_at:
            self._reconnect_at = None
            self._connect(now)
        if now >= self._next_check:
            self._next_check = now + ADDRESS_CHECK_EVERY
            local = self._local_source()
            if local is not None and local != self.local:
                log.info("host: local address changed %s -> %s: re-attaching", self.local, local)
                self.local = local
                self.extra_status["local"] = local
                if self.transport == "udp":
                    self.engine.roamed(now)
                elif self.conn is not None:
                    self._schedule_reconnect(now, "local address changed")
                    self._reconnect_at = now
            elif local is None:
                self.local = None

    def _local_source(self) -> str | None:
        """The source address the kernel would use toward the proxy (no packet sent); None when
        there is none now (ENETUNREACH while an address changes) or no socket to ask with."""
        try:
            s = socket.socket(self.family, socket.SOCK_DGRAM)
        except OSError:
            return None
        try:
            s.connect(self.proxy)
            return s.getsockname()[0]
        except OSError:
            return None
        finally:
            s.close()

    def flush(self, now: float) -> None:
        for m in self.engine.pop_datagrams():
            if self.udp is not None:
                try:
                    self.udp.sendto(m, self.proxy)
                except (BlockingIOError, InterruptedError):
                    self.counters["udp_tx_dropped"] += 1
                except OSError as exc:  # ENETUNREACH while the address changes, ECONNREFUSED after an ICMP error
                    self.note("udp_tx_errors", now, "udp send to the proxy: %s", exc)
            elif self.conn is not None and self.conn.connected:
                try:
                    self.conn.queue(m, self.counters)
                except OSError as exc:
                    self._schedule_reconnect(now, str(exc))
            else:
                self.counters["tx_no_transport"] += 1
        c = self.conn
        if c is not None and c.connected and c.writing != bool(c.out):
            c.writing = bool(c.out)
            self.sel.modify(c.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if c.writing else 0), self._on_tcp)
        for f in self.engine.pop_frames():
            if not self.tap.write(f):
                self.counters["tap_tx_dropped"] += 1
        self.log_events(self.engine.pop_events())

    def shutdown(self) -> None:
        now = self.clock()
        try:
            self.engine.close(now)
            self.flush(now)
            if self.conn is not None and self.conn.connected:
                self.conn.sock.setblocking(True)
                self.conn.sock.settimeout(0.5)
                try:
                    self.conn.sock.sendall(bytes(self.conn.out))
                except OSError:
                    pass
        finally:
            super().shutdown()

    def close_sockets(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.conn is not None:
            self.conn.sock.close()


def _same_ip(a: str, b: str) -> bool:
    try:
        fa, fb = _family(a), _family(b)
        return socket.inet_pton(fa, a) == socket.inet_pton(fb, b)
    except OSError:
        return False


class ProxyDriver(_Driver):
    role = "proxy"

    def __init__(self, engine: ProxyEnd, tap: Tap, listen: tuple[str, int], transport: str,
                 clock: Callable[[], float], status_dir: str | None = None, *,
                 max_tcp_conns: int = MAX_TCP_CONNS, tcp_auth_timeout: float = TCP_AUTH_TIMEOUT,
                 tcp_idle_timeout: float | None = None) -> None:
        if max_tcp_conns < 1 or tcp_auth_timeout <= 0 or (tcp_idle_timeout is not None and tcp_idle_timeout <= 0):
            raise ValueError("max_tcp_conns must be >= 1 and the TCP timeouts > 0")
        super().__init__(tap, clock, status_dir)
        self.engine = engine
        self.transport = transport
        self.max_tcp_conns = max_tcp_conns
        self.tcp_auth_timeout = tcp_auth_timeout
        self.tcp_idle_timeout = tcp_idle_timeout if tcp_idle_timeout is not None else max(
            engine.session_timeout, tcp_auth_timeout)
        #: How often the TCP connections are checked against their timeouts.
        self._sweep_every = min(1.0, tcp_auth_timeout / 4, self.tcp_idle_timeout / 4)
        self._next_sweep: float | None = None
        self._accept_resume: float | None = None  # accept() paused (out of descriptors) until then
        self.extra_status = {"listen": f"{listen[0]}:{listen[1]}", "transport": transport}
        fam = _family(listen[0])
        self.udp: socket.socket | None = None
        self.listener: socket.socket | None = None
        self.conns: dict[Hashable, _TcpConn] = {}  # in accept order: the oldest first
        if transport == "udp":
            self.udp = _udp_socket(fam)
            self.udp.bind(listen)
            self.sel.register(self.udp, selectors.EVENT_READ, self._on_udp)
        else:
            self.listener = socket.socket(fam, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(listen)
            self.listener.listen(64)
            self.listener.setblocking(False)
            self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)

    def engine_deadline(self) -> float | None:
        times = [t for t in (self.engine.next_deadline(), self._next_sweep, self._accept_resume) if t is not None]
        return min(times) if times else None

    def housekeeping(self, now: float) -> None:
        if self._accept_resume is not None and now >= self._accept_resume:
            self._accept_resume = None
            self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
        if self._next_sweep is not None and now >= self._next_sweep:
            for c in list(self.conns.values()):
                if c.last_authentic is None:
                    if now - c.opened >= self.tcp_auth_timeout:
                        self._drop_conn(c, "tcp_auth_timeouts", now, "nothing authentic within %.1fs",
                                        self.tcp_auth_timeout)
                elif now - c.last_authentic >= self.tcp_idle_timeout:
                    self._drop_conn(c, "tcp_idle_timeouts", now, "nothing authentic for %.1fs", self.tcp_idle_timeout)
            self._next_sweep = now + self._sweep_every if self.conns else None

    def tap_frame(self, frame: bytes, now: float) -> None:
        self.engine.from_lan(frame, now)

    def _on_udp(self, _mask: int) -> None:
        now = self.clock()
        for _ in range(BATCH):
            try:
                data, addr = self.udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # a pending ICMP error (ECONNREFUSED...): counted, the next read goes on
                self.note("udp_rx_errors", now, "udp receive: %s", exc)
                continue
            self.engine.receive(data, addr[:2], now)
        self.flush(now)

    # -- TCP: accept, read, limits -----------------------------------------------------------

    def _on_accept(self, _mask: int) -> None:
        now = self.clock()
        for _ in range(BATCH):
            try:
                s, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    # Out of descriptors or memory: the listener would stay readable and spin the loop.
                    # Pause accepting; the timeouts free descriptors meanwhile.
                    self.note("tcp_accept_errors", now, "accept: %s; pausing accepts for %.2fs", exc, ACCEPT_PAUSE)
                    self.sel.unregister(self.listener)
                    self._accept_resume = now + ACCEPT_PAUSE
                    return
                # ECONNABORTED, EPROTO, network errors of the pending connection: it is gone, go on.
                self.note("tcp_accept_errors", now, "accept: %s", exc)
                continue
            ep = ("tcp", addr[0], addr[1])
            if len(self.conns) >= self.max_tcp_conns and not self._make_room(now):
                self.note("tcp_over_limit", now, "refused %s: %d connections, all authenticated",
                          _endpoint_text(ep), len(self.conns))
                s.close()
                continue
            c = _TcpConn(s, ep, self.engine.max_message, opened=now)
            try:
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sel.register(s, selectors.EVENT_READ, lambda mask, c=c: self._on_conn(c, mask))
            except OSError as exc:  # reset before we got to it, or no room in epoll
                self.note("tcp_errors", now, "tcp connection %s: %s", _endpoint_text(ep), exc)
                s.close()
                continue
            old = self.conns.pop(ep, None)
            if old is not None:  # the same address and port again: the old socket is dead
                self._drop_conn(old, "tcp_errors", now, "replaced by a new connection from the same port")
            self.conns[ep] = c
            self.counters["tcp_accepted"] += 1
            if self._next_sweep is None:
                self._next_sweep = now + self._sweep_every

    def _make_room(self, now: float) -> bool:
        """At the limit: close the oldest connection that never sent an authentic message."""
        for c in self.conns.values():
            if c.last_authentic is None:
                self._drop_conn(c, "tcp_evicted", now, "evicted (unauthenticated) at the limit of %d connections",
                                self.max_tcp_conns)
                return True
        return False

    def _drop_conn(self, c: _TcpConn, key: str, now: float, fmt: str, *args) -> None:
        """Close one peer's connection, counted under ``key``; never the proxy."""
        if c.closed:
            return
        c.closed = True
        self.note(key, now, "tcp connection %s closed: " + fmt, _endpoint_text(c.endpoint), *args)
        if self.conns.get(c.endpoint) is c:
            del self.conns[c.endpoint]
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def _on_conn(self, c: _TcpConn, mask: int) -> None:
        if c.closed:  # dropped earlier in the same round of events
            return
        now = self.clock()
        if mask & selectors.EVENT_WRITE:
            try:
                c.flush()
            except OSError as exc:
                self._drop_conn(c, "tcp_errors", now, "%s", exc)
                return
        if mask & selectors.EVENT_READ:
            try:
                data = c.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as exc:
                self._drop_conn(c, "tcp_errors", now, "%s", exc)
                return
            if data == b"":
                self._drop_conn(c, "tcp_closed_by_peer", now, "closed by the host end")
                return
            if data:
                try:
                    for m in c.decoder.feed(data):
                        if self.engine.receive(m, c.endpoint, now):
                            c.last_authentic = now
                except WireError as exc:
                    self.engine.drops[exc.reason] += 1
                    self._drop_conn(c, "tcp_bad_framing", now, "%s", exc)
                    return
        self.flush(now)

    def flush(self, now: float) -> None:
        for ep, m in self.engine.pop_datagrams():
            if self.udp is not None:
                try:
                    self.udp.sendto(m, ep)
                except (BlockingIOError, InterruptedError):
                    self.counters["udp_tx_dropped"] += 1
                except OSError as exc:  # ENETUNREACH, EHOSTUNREACH, ECONNREFUSED after an ICMP error...
                    self.note("udp_tx_errors", now, "udp send to %s: %s", _endpoint_text(ep), exc)
                continue
            c = self.conns.get(ep)
            if c is None:
                self.counters["tx_no_connection"] += 1
                continue
            try:
                c.queue(m, self.counters)
            except OSError as exc:
                self._drop_conn(c, "tcp_errors", now, "%s", exc)
                continue
        for c in list(self.conns.values()):
            if c.writing != bool(c.out):
                c.writing = bool(c.out)
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.writing else 0)
                self.sel.modify(c.sock, want, lambda mask, c=c: self._on_conn(c, mask))
        for f in self.engine.pop_frames():
            if not self.tap.write(f):
                self.counters["tap_tx_dropped"] += 1
        self.log_events(self.engine.pop_events())

    def status(self, now: float) -> dict:
        st = super().status(now)
        if self.listener is not None:
            st["tcp"] = {
                "connections": len(self.conns),
                "unauthenticated": sum(1 for c in self.conns.values() if c.last_authentic is None),
                "max_connections": self.max_tcp_conns,
                "auth_timeout": self.tcp_auth_timeout,
                "idle_timeout": self.tcp_idle_timeout,
                "accepting": self._accept_resume is None,
            }
        return st

    def shutdown(self) -> None:
        now = self.clock()
        try:
            self.engine.close(now)
            self.flush(now)
            for c in self.conns.values():
                if c.out:
                    try:
                        c.sock.setblocking(True)
                        c.sock.settimeout(0.2)
                        c.sock.sendall(bytes(c.out))
                    except OSError:
                        pass
        finally:
            super().shutdown()

    def close_sockets(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.listener is not None:
            self.listener.close()
        for c in list(self.conns.values()):
            c.sock.close()
        self.conns.clear()


def _endpoint_text(ep: Hashable) -> str:
    if isinstance(ep, tuple) and len(ep) == 3 and ep[0] == "tcp":
        return f"tcp {ep[1]}:{ep[2]}"
    if isinstance(ep, tuple) and len(ep) >= 2:
        return f"{ep[0]}:{ep[1]}"
    return str(ep)


def read_status_dir(status_dir: str) -> list[dict]:
    """Status snapshots of the ends running with this status directory (stale ones marked)."""
    out = []
    try:
        names = sorted(os.listdir(status_dir))
    except FileNotFoundError:
        return out
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(status_dir, name)) as f:
                st = json.load(f)
        except (OSError, ValueError):
            continue
        pid = st.get("pid")
        alive = True
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            alive = False
        except (PermissionError, TypeError, ValueError):
            pass
        st["alive"] = alive
        st["file"] = name
        out.append(st)
    return out
