"""The host end's driver: the VM's TAP on one side, UDP or TCP to the proxy on the other.

Around :class:`~tunnel.host.HostEnd`: it reads frames from the TAP and messages from
the proxy, hands them to the engine, and carries its answers (:meth:`Driver.carry`):
``"proxy"`` messages to the transport, frames to the TAP.  Its own jobs are the
transport's: reconnecting TCP with backoff, and watching the local source address
toward the proxy (every :data:`ADDRESS_CHECK_EVERY` seconds), which tells the engine
it roamed.

As a host agent serving every VM of its bridge, it also watches the bridge's ports
(:mod:`tunnel.io.bridgewatch`: a VM whose TAP leaves is forgotten at once) and
answers the control socket (:mod:`tunnel.io.control`: ``attach|detach --mac``).
Both are on by default: the watch when the TAP joined a bridge, the socket
(``host.sock``) when there is a status directory.
"""
from __future__ import annotations

import errno
import os
import selectors
import socket
from typing import TYPE_CHECKING, Callable, Hashable


from ..host import PROXY, HostEnd
from ..wire import format_mac, parse_mac
from .loop import Driver, log
from .transport import Datagrams, TcpConn, family, same_ip, udp_socket

if TYPE_CHECKING:
    from .bridgewatch import BridgeWatch
    from .control import ControlServer

ADDRESS_CHECK_EVERY = 0.25
TAP = "tap"
CONTROL_NAME = "host.sock"


class HostDriver(Driver):
    """``sock``: a socket already connected to the proxy (in the tests, one end of a socketpair);
    the driver then makes none, never reconnects and does not watch the local address.
    ``control``: the control socket's path (True: ``host.sock`` in ``status_dir``; None: none);
    ``watch``: the bridge whose ports to watch (True: the TAP's; None: none)."""

    role = "host"
    peer_name = "proxy"
    tap_data_to = PROXY  # a frame from the TAP goes on sealed, to the proxy
    tap_out = TAP
    engine: HostEnd

    def __init__(self, engine: HostEnd, tap, proxy: tuple[str, int], transport: str,
                 clock: Callable[[], float], status_dir: str | None = None, *,
                 sock: socket.socket | None = None, control: str | bool | None = True,
                 watch: str | bool | None = True) -> None:
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
        self.control: ControlServer | None = None
        self.watch: BridgeWatch | None = None
        try:
            self._agent(status_dir, control, watch)
        except BaseException:
            self.close_sockets()
            raise

    def _agent(self, status_dir: str | None, control: str | bool | None, watch: str | bool | None) -> None:
        """The agent's ears: the bridge's ports, and the control socket."""
        own = getattr(self.tap, "mac", None)
        if own:
            self.engine.local_macs.add(parse_mac(own))
        if watch is True:
            watch = getattr(self.tap, "bridge", None)
        if watch:
            from .bridgewatch import BridgeWatch
            self.watch = BridgeWatch(watch, own=self.tap.name)
            self.sel.register(self.watch.fileno(), selectors.EVENT_READ, self._on_bridge)
            self._local_macs(self.clock())
            self.extra_status["bridge"] = watch
            log.info("host: watching bridge %s (%d port(s) besides ours)", watch, len(self.watch.ports))
        if control is True:
            control = os.path.join(status_dir, CONTROL_NAME) if status_dir else None
        if control:
            from .control import ControlError, ControlServer
            try:
                self.control = ControlServer(control, self.sel, self._request, self.clock, self.counters)
            except ControlError as exc:  # another agent has it: run without one, say so
                self.counters["control_unavailable"] += 1
                log.warning("host: no control socket: %s", exc)
            else:
                self.extra_status["control"] = control

    def _request(self, verb: str, arg: str, now: float) -> dict:
        """A control request (``attach``/``detach`` a MAC, ``list``): what the agent serves after it."""
        if verb in ("attach", "detach"):
            mac = parse_mac(arg)
            if verb == "attach":
                answer = self.engine.serve(mac, now)
            else:
                answer = self.engine.forget([mac], now, "detached by request")
            self.carry(answer, now)
            self.flush(now)
        return {"macs": [format_mac(m) for m in self.engine.macs]}

    def _on_bridge(self, _mask: int) -> None:
        from .bridgewatch import PortLeft
        now = self.clock()
        watch = self.watch
        assert watch is not None  # registered only with a watch
        try:
            changes = watch.read()
        except OSError as exc:
            self.note("bridge_watch_errors", now, "reading the bridge's changes: %s", exc)
            return
        for c in changes:
            if isinstance(c, PortLeft):
                self.counters["bridge_ports_left"] += 1
                log.info("host: port %s left bridge %s (MACs behind it: %s)", c.name, watch.bridge,
                         ", ".join(format_mac(m) for m in c.macs) or "none")
                if c.macs:
                    self.carry(self.engine.forget(c.macs, now, f"{c.name} left {watch.bridge}"), now)
            else:
                self.counters["bridge_ports_joined"] += 1
                log.info("host: port %s joined bridge %s", c.name, watch.bridge)
        self._local_macs(now)
        self.flush(now)

    def _local_macs(self, now: float) -> None:
        """The host's own MACs on the bridge are no VM's: never learned (and forgotten if they were)."""
        local = self.engine.local_macs
        assert self.watch is not None  # called only with a watch
        new = self.watch.local - local
        if new:
            local.update(new)
            mistaken = [m for m in new if m in self.engine.learned]
            if mistaken:
                self.carry(self.engine.forget(mistaken, now, "the host's own"), now)

    def deadline(self) -> float | None:
        times = [t for t in (self.engine.next_deadline(), self._reconnect_at, self._next_check,
                             None if self.control is None else self.control.deadline()) if t is not None]
        return min(times) if times else None

    def begin(self, now: float) -> None:
        if not self.given:
            self.local = self._local_source()
        self.extra_status["local"] = self.local
        if self.transport == "udp":
            self.carry(self.engine.start(now), now)
        elif self._given_sock is not None:  # self.given
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
        if self.control is not None:
            self.control.sweep(now)
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
        control, watch = getattr(self, "control", None), getattr(self, "watch", None)
        if control is not None:
            control.close()
            self.control = None
        if watch is not None:
            watch.close()
            self.watch = None
