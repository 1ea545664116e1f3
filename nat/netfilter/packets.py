"""The plugin's packet thread: the queue clients' receive loops, verdicts out.

Apart from :mod:`.plugin` (its dispatch, :meth:`Plugin._answer`, and the control loop)
because the thread is one idea: block in the queue socket's recv (one syscall a packet, no
select round per wake-up), take the plugin's lock per burst, answer, and hand the kernel
path's set changes over before the verdicts that rely on them.
"""
from __future__ import annotations

import errno
import logging
import socket
import threading
from typing import Any

from .queue import NF_ACCEPT, NF_DROP

log = logging.getLogger("roam.nat")

_BURST = 32  # --gso: packets taken from the queue before their verdicts go out together
_DRAIN = 512  # the kernel path's events the packet thread reads before a burst, at most


class PacketThread:
    """What :class:`.plugin.Plugin` runs in its packet thread (a mixin: the state is the plugin's)."""

    _lock: threading.Lock
    engine: Any
    kernel: Any
    offload: bool
    bugs: int
    largest_packet: int
    gso_packets: int
    _stop: bool
    _stop_packets: bool
    _packet_error: OSError | None
    offloader: Any
    clock: Any

    def _answer(self, hook: int, indev: int, outdev: int, data: bytes, info: int,
                mark: int = 0) -> bytes | bytearray | None:
        raise NotImplementedError

    def _install_deferred(self) -> None:
        raise NotImplementedError

    def _on_packet(self, p) -> None:
        """NetfilterQueue's callback (in the packet thread)."""
        with self._lock:
            try:
                data = p.get_payload()
                out = self._answer(p.hook, p.indev, p.outdev, data, 0, p.get_mark() if self.offload else 0)
                if out is None:
                    p.drop()
                    return
                if out is not data:
                    p.set_payload(out)
                p.accept()
            except Exception:  # the binding refused: ours too
                self._bug()
                try:
                    p.drop()
                except Exception:
                    pass

    def _bug(self) -> None:
        """A bug of ours, not the peer's: counted apart (and logged at 1, 2, 4, 8...)."""
        self.bugs += 1
        if self.bugs & (self.bugs - 1) == 0:
            log.exception("internal error on a packet (%d so far); packet dropped", self.bugs)

    def _gso_verdict(self, q, p) -> None:
        """One packet from our own queue client (--gso); OSError from the socket goes up."""
        data = p.payload
        if len(data) > self.largest_packet:
            self.largest_packet = len(data)
        if p.skbinfo & 2:  # NFQA_SKB_GSO
            self.gso_packets += 1
        out = self._answer(p.hook, p.indev, p.outdev, data, p.skbinfo, p.mark)
        if out is None:
            q.verdict(p.id, NF_DROP)
        elif out is data:
            q.verdict(p.id, NF_ACCEPT)
        else:
            q.verdict(p.id, NF_ACCEPT, out)

    def _gso_loop(self, q, wsig: socket.socket) -> None:
        """The packet thread with --gso: our own client's recv loop until told to stop."""
        while not self._stop_packets:
            try:
                try:
                    batch = q.receive()
                except (BlockingIOError, TimeoutError, socket.timeout):
                    continue
                # a burst: what else is queued already (bounded), verdicts sent together
                for _ in range(_BURST - 1):
                    try:
                        more = q.receive(socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    batch.extend(more)
                with self._lock:
                    if self.kernel is not None:
                        # the kernel path's flows made meanwhile first: their NEW events are in the
                        # socket before any packet that depends on them is queued (an answer to one of
                        # them; another endpoint's flow that must not be given a port one holds) --
                        # unless roam runs behind (a backlog): then the main loop learns them, and a
                        # port given meanwhile may clash (removed, counted)
                        self.offloader.on_events(self.clock(), _DRAIN)
                    try:
                        for p in batch:
                            self._gso_verdict(q, p)
                    finally:
                        if self.kernel is not None:  # the sets before the verdicts that rely on them
                            self.kernel.sync()
                        q.flush()
                        self._install_deferred()
                    self.engine.counters["queue_overruns"] = q.overruns
            except OSError as exc:
                self._fail(exc, wsig)
                return

    def _packet_loop(self, nfq, wsig: socket.socket) -> None:
        """The packet thread: the binding's blocking recv loop until told to stop."""
        while not self._stop_packets:
            try:
                nfq.run(block=True)  # returns when the receive timeout passes with nothing queued
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    with self._lock:
                        self.engine.counters["queue_overruns"] += 1
                    continue
                self._fail(exc, wsig)
                return

    def _fail(self, exc: OSError, wsig: socket.socket) -> None:
        """The queue socket failed: stop, and wake the main loop, which raises it."""
        self._packet_error = exc
        self._stop = True
        try:
            wsig.send(b"x")
        except OSError:
            pass
