"""The drivers' one selector loop, their one answer helper and the status file.

A driver only moves bytes and time between the kernel and an engine
(:class:`~tunnel.host.HostEnd`, :class:`~tunnel.proxy.ProxyEnd`).  Every engine call
returns an :class:`~conntrack.answer.Answer`, and every answer goes through
:meth:`Driver.carry`, the one place that queues its bytes, logs its events and
counts its drop by reason; :meth:`Driver.flush`, once per batch of reads, sends
what the batch's answers queued (so a burst read from the TAP leaves as a burst,
and the other end wakes once for it, not once per message).  The host and proxy
drivers only say where ``data`` and each ``sends`` destination go
(:meth:`Driver.send_to`).  The clock is passed in
(``clock=time.monotonic`` from the command line), so nothing here reads it on its own.

Signals: :meth:`Driver.request_stop` (SIGTERM, SIGINT) and :meth:`Driver.request_reload`
(SIGHUP: the key file is read again with :attr:`Driver.key_loader` and given to the
engine's ``rekey``, live sessions kept) only set a flag and wake the loop.

The status file (``<role>-<pid>.json``, mode 0600 in a 0700 directory: it names
sessions, endpoints and MACs) carries the pid and the process's start time, so
``roam tunnel status`` can tell a file left by a dead end (or a reused pid).

Hostile networks.  Errors the network hands back (ICMP errors surfacing as
ECONNREFUSED, ENETUNREACH while an address changes, resets, EMFILE on accept) are
counted in the driver's counters and logged (at most once per :data:`LOG_EVERY`
seconds per kind), never raised out of :meth:`Driver.run`.  A peer's malformed
input is a counted drop; our own misuse of a codec
(:class:`~conntrack.errors.LocalProtocolError`) is logged as a bug, counted, and the
loop goes on.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import socket
from collections import Counter
from typing import TYPE_CHECKING, Callable, Hashable, Iterable

from conntrack.answer import Action, Answer
from conntrack.errors import LocalProtocolError

from ..events import TunnelEvent
from ..wire import WireError
from .transport import Datagrams, TcpConn, endpoint_text

if TYPE_CHECKING:
    from ..crypto import Cipher
    from ..host import HostEnd
    from ..proxy import ProxyEnd

log = logging.getLogger("roam.tunnel")

BATCH = 64  # reads per readiness event: bounded, so one busy source cannot starve the rest
STATUS_EVERY = 1.0
#: after an event, the status goes out at most this often (a busy proxy has many events a second)
STATUS_SOONEST = 0.1
LOG_EVERY = 5.0  # a recurring network error is logged at most this often per kind (always counted)
_DROP = Action.DROP


class Driver:
    """What both drivers share: the TAP read loop, timers, the answer helper, status, shutdown.

    ``tap`` is anything with ``fileno() read() write(frame) close()`` and ``name``/``mtu``:
    a :class:`~tunnel.io.tap.Tap`, or in the tests a socketpair standing in for one.
    """

    role = "?"
    peer_name = "?"  # what the other end is called in the logs
    engine: HostEnd | ProxyEnd  # set by the subclass
    #: The engine's method that takes a frame the TAP gave us (``send_frame``, ``from_lan``).
    tap_input: Callable[[bytes, float], Answer]
    #: Where the ``data`` of an answer to a TAP frame goes (the proxy end's LAN frames have none).
    tap_data_to: Hashable = None
    #: The destination, in answers, of frames for the TAP (and of ``data`` answering a peer's message).
    tap_out: Hashable = None
    #: The engine's methods that take a message from a peer, ``(message, endpoint, now)``, and a UDP GRO
    #: read, ``(buf, size, endpoint, now)``.
    net_input: Callable[..., Answer]
    net_input_whole: Callable[..., Answer | None]
    udp: socket.socket | None = None
    dgram: Datagrams  # with ``udp``: its batched reads and GSO sends

    def __init__(self, tap, clock: Callable[[], float], status_dir: str | None) -> None:
        self.tap = tap
        self.clock = clock
        self.sel = selectors.DefaultSelector()
        self.counters: Counter[str] = Counter()
        #: Every drop this process saw, by reason name: the engine's answers and the driver's own (framing).
        self.drops: Counter[str] = Counter()
        self.stopping = False
        self._out: list[tuple[Hashable, bytes]] = []  # what this batch's answers send, in order
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self.sel.register(tap.fileno(), selectors.EVENT_READ, self._on_tap)
        self.status_path = None
        if status_dir:
            os.makedirs(status_dir, mode=0o700, exist_ok=True)
            st = os.stat(status_dir)
            if st.st_uid == os.geteuid() and st.st_mode & 0o077:  # made by an older roam: tighten it
                os.chmod(status_dir, 0o700)
            self.status_path = os.path.join(status_dir, f"{self.role}-{os.getpid()}.json")
        self._next_status = 0.0
        self._status_dirty = False  # an event happened: publish the status soon (STATUS_SOONEST)
        self._status_written = float("-inf")
        self.started = clock()
        self.extra_status: dict = {}
        self._log_next: dict[str, float] = {}
        #: Reads the key file again on SIGHUP (set by the command line); None: nothing to reload.
        self.key_loader: Callable[[], Cipher] | None = None
        self._reload = False

    # -- the one answer helper ----------------------------------------------------------------

    def carry(self, answer: Answer, now: float, data_to: Hashable = None) -> Answer:
        """Carry out one engine answer: its ``sends``, then its ``data`` (to ``data_to``), queued for
        :meth:`flush`; its events logged, its drop counted by reason.  Returns the answer."""
        if answer.sends:
            self._out.extend(answer.sends)
        if answer.data is not None:
            self._out.append((data_to, answer.data))
        if answer.events:
            self.log_events(answer.events)
            self.sync_tap_offload(now)
        if answer.action == _DROP:
            self.drop(answer.reason.name.lower(), now)
        return answer

    def sync_tap_offload(self, now: float) -> None:
        """Let the TAP hand us GSO super-frames and partial checksums only while the engine can carry
        them (:attr:`HostEnd.tap_offload`, :attr:`ProxyEnd.tap_offload`): else the kernel segments and
        checksums before the TAP, which is cheaper than anything we could do."""
        want = bool(getattr(self.engine, "tap_offload", False))
        if not getattr(self.tap, "offload", False) or want == getattr(self.tap, "offloads_on", want):
            return
        try:
            self.tap.set_offload(want)
        except OSError as exc:
            self.note("tap_offload_errors", now, "cannot turn the TAP's offloads %s: %s", "on" if want else "off", exc)
            return
        self._status_dirty = True
        log.info("%s: TAP offloads %s", self.role, "on (GSO super-frames)" if want else "off (the kernel segments)")

    def drop(self, name: str, now: float) -> None:
        self.drops[name] += 1
        log.debug("%s: dropped (%s)", self.role, name)

    def send_to(self, to: Hashable, data: bytes, now: float) -> None:
        """Send ``data`` to an answer's destination: the TAP, or a peer over UDP or TCP."""
        if to == self.tap_out:
            if not self.tap.write(data):
                self.counters["tap_tx_dropped"] += 1
            return
        udp = self.udp
        if udp is None:
            self.send_stream(to, data, now)
            return
        addr = self.udp_address(to)
        try:
            seg = self.engine.segment_size
            if seg and len(data) > seg:  # a message cut into segments: one GSO send
                self.counters["udp_tx_datagrams"] += self.dgram.send(data, seg, addr)
            elif addr is None:
                udp.send(data)
            else:
                udp.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.counters["udp_tx_dropped"] += 1
        except OSError as exc:  # ENETUNREACH, EHOSTUNREACH, ECONNREFUSED after an ICMP error...
            self.note("udp_tx_errors", now, "udp send to %s: %s", self.peer_name if addr is None else
                      endpoint_text(addr), exc)

    def udp_address(self, to: Hashable) -> tuple | None:
        """Where a message for ``to`` goes over UDP (None: the socket is connected to its one peer)."""
        raise NotImplementedError

    def send_stream(self, to: Hashable, data: bytes, now: float) -> None:
        """Queue a message for ``to`` on its TCP connection."""
        raise NotImplementedError

    def udp_peer(self, addr) -> Hashable | None:
        """The endpoint a datagram from ``addr`` comes from, as the engine knows it; None: not a peer
        of ours (counted by the driver, dropped)."""
        raise NotImplementedError

    def _on_udp(self, _mask: int) -> None:
        now = self.clock()
        carry, read, peer, to = self.carry, self.dgram.receive, self.udp_peer, self.tap_out
        receive, whole = self.net_input, self.net_input_whole
        for _ in range(BATCH):
            try:
                data, addr, size = read()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ICMP errors surface here (ECONNREFUSED...): counted, the next read goes on
                self.note("udp_rx_errors", now, "udp receive: %s", exc)
                continue
            ep = peer(addr)
            if ep is None:
                continue
            if size and len(data) > size:  # UDP GRO: datagrams of ``size`` bytes laid end to end
                answer = whole(data, size, ep, now)  # consecutive segments of one message: one step
                if answer is not None:
                    self.counters["udp_rx_runs"] += 1
                    carry(answer, now, to)
                    continue
                mv = memoryview(data)
                for i in range(0, len(data), size):
                    carry(receive(mv[i:i + size], ep, now), now, to)
            else:
                carry(receive(data, ep, now), now, to)
        self.flush(now)

    def stream_io(self, c: TcpConn, mask: int, now: float) -> list[bytes] | None:
        """One readiness event of a TCP connection: flush what waits, read what came.  The messages
        read; None when the connection is lost (:meth:`stream_lost` was told why)."""
        if mask & selectors.EVENT_WRITE:
            try:
                c.flush()
            except OSError as exc:
                self.stream_lost(c, now, "tcp_errors", str(exc))
                return None
        if not mask & selectors.EVENT_READ:
            return []
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            self.stream_lost(c, now, "tcp_errors", str(exc))
            return None
        if data == b"":
            self.stream_lost(c, now, "tcp_closed_by_peer", f"closed by the {self.peer_name}")
            return None
        try:
            return c.decoder.feed(data)
        except WireError as exc:  # the stream cannot be resynchronised: a counted drop, the connection lost
            self.drop(exc.reason.name.lower(), now)
            self.stream_lost(c, now, "tcp_bad_framing", str(exc))
            return None

    def stream_lost(self, c: TcpConn, now: float, key: str, why: str) -> None:
        """Connection ``c`` failed (``key`` names how, for the counters; ``why`` for the log)."""
        raise NotImplementedError

    def flush(self, now: float) -> None:
        """After a batch: send what its answers queued, then what the transport does once per batch."""
        if self._out:
            out, self._out = self._out, []
            send_to = self.send_to
            for to, data in out:
                send_to(to, data, now)
        self.flush_transport(now)

    def flush_transport(self, now: float) -> None:
        """After a batch's sends (the TCP drivers update their write interest)."""

    def note(self, key: str, now: float, fmt: str, *args) -> None:
        """Count ``key``; log it (with the running count) at most once per LOG_EVERY seconds."""
        self.counters[key] += 1
        if now >= self._log_next.get(key, 0.0):
            self._log_next[key] = now + LOG_EVERY
            log.info("%s: " + fmt + " [%s: %d so far]", self.role, *args, key, self.counters[key])
        else:
            log.debug("%s: " + fmt, self.role, *args)

    def log_events(self, events: Iterable[TunnelEvent]) -> None:
        self._status_dirty = True
        for e in events:
            log.info("%s: %s session %08x%s%s", self.role, e.kind.name.lower(), e.session,
                     f" endpoint {e.endpoint}" if e.endpoint is not None else "",
                     f" ({e.detail})" if e.detail else "")

    # -- the loop -----------------------------------------------------------------------------

    # Signal handlers: each only sets a flag and wakes the selector (signal-safe).
    def request_stop(self, *_args) -> None:
        self.stopping = True
        self._wake()

    def request_reload(self, *_args) -> None:
        self._reload = True
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def reload(self, now: float) -> bool:
        """SIGHUP: a new key for the engine's next sessions (rotation); live ones keep theirs.  A key
        that cannot be read leaves the running one in place."""
        self._reload = False
        if self.key_loader is None:
            log.info("%s: SIGHUP: nothing to reload", self.role)
            return False
        try:
            cipher = self.key_loader()
            self.engine.rekey(cipher)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the running key stays
            self.counters["reload_errors"] += 1
            log.error("%s: SIGHUP: key not reloaded, keeping the running one: %s", self.role, exc)
            return False
        self.counters["reloads"] += 1
        self._status_dirty = True
        log.info("%s: SIGHUP: key reloaded (fingerprint %s); %s kept", self.role,
                 getattr(cipher, "fingerprint", "?"), "sessions" if self.role == "proxy" else "the session")
        return True

    def _on_wake(self, _mask: int) -> None:
        try:
            self._wake_r.recv(64)
        except OSError:
            pass

    def _on_tap(self, _mask: int) -> None:
        now = self.clock()
        read, take, carry, to = self.tap.read, self.tap_input, self.carry, self.tap_data_to
        for _ in range(BATCH):
            try:
                frame = read()
            except OSError as exc:
                self.note("tap_rx_errors", now, "reading the TAP: %s", exc)
                break
            if frame is None:
                break
            carry(take(frame, now), now, to)
        self.flush(now)

    def deadline(self) -> float | None:
        """The engine's next deadline and the driver's own timers, whichever comes first."""
        raise NotImplementedError

    #: Called once the TAP and sockets are in place and the loop begins (sd_notify READY=1), and
    #: when it stops (STOPPING=1); set by the command line.
    on_ready: Callable[[], None] | None = None
    on_stopping: Callable[[], None] | None = None
    #: The last status :meth:`write_status` computed and when (the clock's time): read by other
    #: threads (the metrics), as the engine itself is only ever touched by the loop.
    published: tuple[float, dict] | None = None

    def run(self) -> None:
        """Until :meth:`request_stop`: begin, one pass per wake-up, then shut down."""
        try:
            self.sync_tap_offload(self.clock())
            self.begin(self.clock())
            self.write_status(self.clock())
            if self.on_ready is not None:
                self.on_ready()
            while not self.stopping:
                self.run_once()
        finally:
            if self.on_stopping is not None:
                self.on_stopping()
            self.shutdown()

    def run_once(self, max_wait: float = 1.0) -> None:
        """One pass, and as little as possible in it: timers (the engine's and the driver's own,
        which deadline() includes) and the status file only when due, then one select (at most
        ``max_wait`` seconds; the tests pass 0) whose handlers move the frames and flush."""
        now = self.clock()
        if self._reload:
            self.reload(now)
        d = self.deadline()
        if d is not None and d <= now:
            self.carry(self.engine.expire(now), now)
            self.housekeeping(now)
            self.flush(now)
            d = self.deadline()
        if now >= self._next_status or self._status_dirty and now >= self._status_written + STATUS_SOONEST:
            self._status_dirty = False
            self.write_status(now)
            self._status_written, self._next_status = now, now + STATUS_EVERY
        # an event's status goes out within STATUS_SOONEST, not after every pass: at 100 sessions and 1,000 MACs
        # a write costs ~5 ms, and a move's burst of events would stall the loop that long each time
        due = self._status_written + STATUS_SOONEST if self._status_dirty else self._next_status
        wake = min(due, self._next_status) if d is None or d > due else d
        for key, mask in self.sel.select(min(max(0.0, wake - now), max_wait)):
            try:
                key.data(mask)
            except LocalProtocolError as exc:  # our bug, not the peer's: logged, and the loop goes on
                self.counters["bugs"] += 1
                log.exception("%s: internal error (a bug): %s", self.role, exc)

    def begin(self, now: float) -> None:
        pass

    def housekeeping(self, now: float) -> None:
        pass

    # -- status and shutdown ------------------------------------------------------------------

    def status(self, now: float) -> dict:
        st = self.engine.status(now)
        st.update(pid=os.getpid(), pid_start=process_start(os.getpid()), tap=self.tap.name, tap_mtu=self.tap.mtu, uptime=round(now - self.started, 3),
                  drops=dict(self.drops), driver=dict(self.counters), **self.extra_status)
        return st

    def write_status(self, now: float) -> None:
        st = self.status(now)
        self.published = (now, st)
        if not self.status_path:
            return
        tmp = self.status_path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # a .tmp left by an older roam may have been wider
            with os.fdopen(fd, "w") as f:
                json.dump(st, f, indent=1, default=str)
            os.replace(tmp, self.status_path)
        except OSError as exc:  # EMFILE under a flood, a full disk: the status waits, the tunnel goes on
            self.note("status_write_errors", now, "cannot write the status file: %s", exc)

    def shutdown(self) -> None:
        """Closing: the engine says goodbye (its answer carried), queued bytes get a moment, all closes."""
        now = self.clock()
        try:
            self.carry(self.engine.close(now), now)
            self.flush(now)
            self.drain()
        finally:
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

    def drain(self) -> None:
        """Give queued TCP bytes a last chance before the sockets close."""

    def close_sockets(self) -> None:
        pass


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22): with the pid,
    it names one process, so a status file whose pid was reused is still seen as stale."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None
