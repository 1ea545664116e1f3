"""The host end's driver: the VM's TAP on one side, UDP or TCP to the proxy on the other.

Around :class:`~tunnel.host.HostEnd`: it reads frames from the TAP and messages from
the proxy, hands them to the engine, and carries its answers (:meth:`Driver.carry`):
``"proxy"`` messages to the transport, frames to the TAP.  Its own jobs are the
transport's: reconnecting TCP with backoff, and watching the local source address
toward the proxy (every :data:`ADDRESS_CHECK_EVERY` seconds), which tells the engine
it roamed.
"""
from __future__ import annotations

import errno
import os
import selectors
import socket
from typing import Callable, Hashable


from ..host import PROXY, HostEnd
from .loop import Driver, log
from .transport import Datagrams, TcpConn, family, same_ip, udp_socket

ADDRESS_CHECK_EVERY = 0.25
TAP = "tap"


class HostDriver(Driver):
    """``sock``: a socket already connected to the proxy (in the tests, one end of a socketpair);
    the driver then makes none, never reconnects and does not watch the local address."""

    role = "host"
    peer_name = "proxy"
    tap_data_to = PROXY  # a frame from the TAP goes on sealed, to the proxy
    tap_out = TAP

    def __init__(self, engine: HostEnd, tap, proxy: tuple[str, int], transport: str,
                 clock: Callable[[], float], status_dir: str | None = None, *,
                 sock: socket.socket | None = None) -> None:
        super().__init__(tap, clock, status_dir)
        self.engine = engine
        self.tap_input = engine.send_frame
        receive, whole = engine.receive, engine.receive_whole
        self.net_input = lambda m, _ep, now: receive(m, now)  # our one peer: no endpoint to name
        self.net_input_whole = lambda buf, size, _ep, now: whole(buf, size, now)
        self.proxy = proxy
        self.family = family(proxy[0])
        self.transport = transport
        self.given = sock is not None
        self.local: str | None = None
        self._next_check: float | None = None if self.given else 0.0
        self.udp: socket.socket | None = None
        self.conn: TcpConn | None = None
        self._given_sock = sock
        self._reconnect_at: float | None = None
        self._reconnect_delay = 0.1
        self.extra_status = {"proxy": f"{proxy[0]}:{proxy[1]}", "transport": transport}
        if transport == "udp":
            self.udp = sock if sock is not None else udp_socket(self.family)
            self.udp.setblocking(False)
            self.dgram = Datagrams(self.udp)
            self.sel.register(self.udp, selectors.EVENT_READ, self._on_udp)

    def deadline(self) -> float | None:
        times = [t for t in (self.engine.next_deadline(), self._reconnect_at, self._next_check) if t is not None]
        return min(times) if times else None

    def begin(self, now: float) -> None:
        if not self.given:
            self.local = self._local_source()
        self.extra_status["local"] = self.local
        if self.transport == "udp":
            self.carry(self.engine.start(now), now)
        elif self.given:
            self._adopt(self._given_sock, now)
        else:
            self._connect(now)
        self.flush(now)

    def udp_address(self, to: Hashable) -> tuple | None:
        return None if self.given else self.proxy

    def udp_peer(self, addr) -> Hashable | None:
        if not self.given and addr[0] != self.proxy[0] and not same_ip(addr[0], self.proxy[0]):
            self.counters["rx_not_from_proxy"] += 1
            return None
        return PROXY

    def send_stream(self, to: Hashable, data: bytes, now: float) -> None:
        if self.conn is not None and self.conn.connected:
            try:
                self.conn.queue(data, self.counters)
            except OSError as exc:
                self._schedule_reconnect(now, str(exc))
        else:
            self.counters["tx_no_transport"] += 1

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
        self.conn = TcpConn(s, self.proxy, self.engine.max_message)
        self.conn.connected = False
        self.sel.register(s, selectors.EVENT_WRITE, self._on_tcp)
        self._reconnect_at = None

    def _adopt(self, s: socket.socket, now: float) -> None:
        """A stream connected to the proxy, given by the caller."""
        s.setblocking(False)
        self.conn = TcpConn(s, self.proxy, self.engine.max_message)
        self.sel.register(s, selectors.EVENT_READ, self._on_tcp)
        self._connected(now)

    def _connected(self, now: float) -> None:
        self._reconnect_delay = 0.1
        log.info("host: tcp connected to %s:%d", *self.proxy[:2])
        self.carry(self.engine.start(now) if self.engine.state.name == "IDLE" else self.engine.roamed(now), now)

    def _schedule_reconnect(self, now: float, why: str) -> None:
        if self.conn is not None:
            try:
                self.sel.unregister(self.conn.sock)
            except (KeyError, ValueError):
                pass
            self.conn.sock.close()
            self.conn = None
        self.counters["tcp_reconnects"] += 1
        if self.given:
            log.info("host: tcp connection to proxy lost (%s); it was given, none to make", why)
            return
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
            self.sel.modify(c.sock, selectors.EVENT_READ, self._on_tcp)
            self._connected(now)
            self.flush(now)
            return
        messages = self.stream_io(c, mask, now)
        if messages is None:
            return
        for m in messages:
            self.carry(self.engine.receive(m, now), now, TAP)
        self.flush(now)

    def stream_lost(self, c: TcpConn, now: float, key: str, why: str) -> None:
        self._schedule_reconnect(now, why)

    # -- timers and output -------------------------------------------------------------------

    def housekeeping(self, now: float) -> None:
        if self._reconnect_at is not None and now >= self._reconnect_at:
            self._reconnect_at = None
            self._connect(now)
        if self._next_check is not None and now >= self._next_check:
            self._next_check = now + ADDRESS_CHECK_EVERY
            local = self._local_source()
            if local is not None and local != self.local:
                log.info("host: local address changed %s -> %s: re-attaching", self.local, local)
                self.local = local
                self.extra_status["local"] = local
                if self.transport == "udp":
                    self.carry(self.engine.roamed(now), now)
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

    def flush_transport(self, now: float) -> None:
        c = self.conn
        if c is not None and c.connected and c.writing != bool(c.out):
            c.writing = bool(c.out)
            self.sel.modify(c.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if c.writing else 0), self._on_tcp)

    def drain(self) -> None:
        if self.conn is not None and self.conn.connected:
            self.conn.drain(0.5)

    def close_sockets(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.conn is not None:
            self.conn.sock.close()
