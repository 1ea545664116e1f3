"""The proxy's driver: its TAP on the home-LAN bridge on one side, the host ends over UDP or TCP.

Around :class:`~tunnel.proxy.ProxyEnd`: it reads frames from the TAP and messages from
host ends, hands them to the engine, and carries its answers (:meth:`Driver.carry`):
``data`` and ``"lan"`` frames to the TAP, ``(endpoint, message)`` to the host ends.

Its own job is guarding the TCP listener: it holds at most ``max_tcp_conns``
connections (a new one beyond that evicts the oldest connection that has not yet
sent an authentic message, or is refused when all are authenticated), closes a
connection that has sent nothing authentic within ``tcp_auth_timeout`` seconds of
opening (or, once authenticated, within ``tcp_idle_timeout`` of its last authentic
message), and stops accepting for :data:`ACCEPT_PAUSE` seconds when accept() runs out
of descriptors or memory.  A message counts as authentic when the engine's answer
proves its sender holds the key now (:func:`tunnel.events.proves_peer`): not a DROP,
and not the CHALLENGE any ATTACH of an unknown session draws, for a replayed ATTACH
draws it too (replayed on every connection, it once locked a restarted proxy's host
ends out until the idle timeout).
"""
from __future__ import annotations

import errno
import selectors
import socket
from typing import Callable, Hashable, cast

from conntrack.answer import Action

from ..events import proves_peer
from ..proxy import TO_LAN, ProxyEnd
from .loop import BATCH, Driver
from .transport import CONNECTED_PEER, Datagrams, TcpConn, endpoint_text, family, udp_socket

#: TCP proxy defaults: connections held at once, and seconds a connection may stay without
#: an authentic message (before its first one; the idle bound after it defaults to the
#: engine's session timeout).
MAX_TCP_CONNS = 512
TCP_AUTH_TIMEOUT = 10.0
ACCEPT_PAUSE = 0.25  # accept() out of descriptors/memory: stop accepting this long
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_DROP = Action.DROP


class ProxyDriver(Driver):
    """``listen=None`` makes no socket of its own: for UDP, ``sock`` is a datagram socket already
    connected to one host end (in the tests, one end of a socketpair; its peer is the endpoint
    :data:`~tunnel.io.transport.CONNECTED_PEER`); for TCP, streams are handed in with :meth:`adopt`."""

    role = "proxy"
    peer_name = "host end"
    tap_out = TO_LAN
    engine: ProxyEnd

    def __init__(self, engine: ProxyEnd, tap, listen: tuple[str, int] | None, transport: str,
                 clock: Callable[[], float], status_dir: str | None = None, *,
                 max_tcp_conns: int = MAX_TCP_CONNS, tcp_auth_timeout: float = TCP_AUTH_TIMEOUT,
                 tcp_idle_timeout: float | None = None, sock: socket.socket | None = None) -> None:
        if max_tcp_conns < 1 or tcp_auth_timeout <= 0 or (tcp_idle_timeout is not None and tcp_idle_timeout <= 0):
            raise ValueError("max_tcp_conns must be >= 1 and the TCP timeouts > 0")
        super().__init__(tap, clock, status_dir)
        self.engine = engine
        self.tap_input = engine.from_lan
        self.net_input, self.net_input_whole = engine.receive, engine.receive_whole
        self.transport = transport
        self.max_tcp_conns = max_tcp_conns
        self.tcp_auth_timeout = tcp_auth_timeout
        self.tcp_idle_timeout = tcp_idle_timeout if tcp_idle_timeout is not None else max(
            engine.session_timeout, tcp_auth_timeout)
        #: How often the TCP connections are checked against their timeouts.
        self._sweep_every = min(1.0, tcp_auth_timeout / 4, self.tcp_idle_timeout / 4)
        self._next_sweep: float | None = None
        self._accept_resume: float | None = None  # accept() paused (out of descriptors) until then
        self.extra_status = {"listen": f"{listen[0]}:{listen[1]}" if listen else "given socket",
                             "transport": transport}
        self.udp: socket.socket | None = None
        self._connected_udp = False
        self.listener: socket.socket | None = None
        self.conns: dict[Hashable, TcpConn] = {}  # in accept order: the oldest first
        if transport == "udp":
            if sock is not None:
                udp, self._connected_udp = sock, True
                sock.setblocking(False)
            elif listen is None:
                raise ValueError("a UDP proxy needs an address to listen on or a connected socket")
            else:
                udp = udp_socket(family(listen[0]))
                udp.bind(listen)
            self.udp = udp
            self.dgram = Datagrams(udp)
            self.sel.register(udp, selectors.EVENT_READ, self._on_udp)
        elif listen is not None:
            self.listener = socket.socket(family(listen[0]), socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(listen)
            self.listener.listen(64)
            self.listener.setblocking(False)
            self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)

    def deadline(self) -> float | None:
        times = [t for t in (self.engine.next_deadline(), self._next_sweep, self._accept_resume) if t is not None]
        return min(times) if times else None

    def housekeeping(self, now: float) -> None:
        if self._accept_resume is not None and now >= self._accept_resume:
            self._accept_resume = None
            assert self.listener is not None  # accepts pause only on a listener
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

    def udp_address(self, to: Hashable) -> tuple | None:
        return None if self._connected_udp else cast(tuple, to)  # our endpoints: (address, port) pairs

    def udp_peer(self, addr) -> Hashable:
        return addr[:2] if addr else CONNECTED_PEER

    def send_stream(self, to: Hashable, data: bytes, now: float) -> None:
        c = self.conns.get(to)
        if c is None:
            self.counters["tx_no_connection"] += 1
            return
        try:
            c.queue(data, self.counters)
        except OSError as exc:
            self._drop_conn(c, "tcp_errors", now, "%s", exc)

    # -- TCP: accept, read, limits -----------------------------------------------------------

    def _on_accept(self, _mask: int) -> None:
        now = self.clock()
        listener = self.listener
        assert listener is not None  # registered only with a listener
        for _ in range(BATCH):
            try:
                s, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    # Out of descriptors or memory: the listener would stay readable and spin the loop.
                    # Pause accepting; the timeouts free descriptors meanwhile.
                    self.note("tcp_accept_errors", now, "accept: %s; pausing accepts for %.2fs", exc, ACCEPT_PAUSE)
                    self.sel.unregister(listener)
                    self._accept_resume = now + ACCEPT_PAUSE
                    return
                # ECONNABORTED, EPROTO, network errors of the pending connection: it is gone, go on.
                self.note("tcp_accept_errors", now, "accept: %s", exc)
                continue
            self.adopt(s, ("tcp", addr[0], addr[1]), now)

    def adopt(self, s: socket.socket, ep: Hashable, now: float) -> None:
        """Take a host end's stream (accepted, or in the tests one end of a socketpair) as endpoint ``ep``."""
        if len(self.conns) >= self.max_tcp_conns and not self._make_room(now):
            self.note("tcp_over_limit", now, "refused %s: %d connections, all authenticated",
                      endpoint_text(ep), len(self.conns))
            s.close()
            return
        c = TcpConn(s, ep, self.engine.max_message, opened=now)
        try:
            s.setblocking(False)
            if s.family != socket.AF_UNIX:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sel.register(s, selectors.EVENT_READ, lambda mask, c=c: self._on_conn(c, mask))
        except OSError as exc:  # reset before we got to it, or no room in epoll
            self.note("tcp_errors", now, "tcp connection %s: %s", endpoint_text(ep), exc)
            s.close()
            return
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

    def _drop_conn(self, c: TcpConn, key: str, now: float, fmt: str, *args) -> None:
        """Close one peer's connection, counted under ``key``; never the proxy."""
        if c.closed:
            return
        c.closed = True
        self.note(key, now, "tcp connection %s closed: " + fmt, endpoint_text(c.endpoint), *args)
        if self.conns.get(c.endpoint) is c:
            del self.conns[c.endpoint]
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def _on_conn(self, c: TcpConn, mask: int) -> None:
        if c.closed:  # dropped earlier in the same round of events
            return
        now = self.clock()
        messages = self.stream_io(c, mask, now)
        if messages is None:
            return
        for m in messages:
            if proves_peer(self.carry(self.engine.receive(m, c.endpoint, now), now, TO_LAN)):
                c.last_authentic = now
        self.flush(now)

    def stream_lost(self, c: TcpConn, now: float, key: str, why: str) -> None:
        self._drop_conn(c, key, now, "%s", why)

    def flush_transport(self, now: float) -> None:
        for c in list(self.conns.values()):
            if c.writing != bool(c.out):
                c.writing = bool(c.out)
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.writing else 0)
                self.sel.modify(c.sock, want, lambda mask, c=c: self._on_conn(c, mask))

    def status(self, now: float) -> dict:
        st = super().status(now)
        if self.transport == "tcp":
            st["tcp"] = {
                "connections": len(self.conns),
                "unauthenticated": sum(1 for c in self.conns.values() if c.last_authentic is None),
                "max_connections": self.max_tcp_conns,
                "auth_timeout": self.tcp_auth_timeout,
                "idle_timeout": self.tcp_idle_timeout,
                "accepting": self._accept_resume is None,
            }
        return st

    def drain(self) -> None:
        for c in self.conns.values():
            c.drain(0.2)

    def close_sockets(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.listener is not None:
            self.listener.close()
        for c in list(self.conns.values()):
            c.sock.close()
        self.conns.clear()
