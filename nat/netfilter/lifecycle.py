"""What `roam nat` and its ``--workers`` parent share around their rules: signals and the way out.

Fail-closed at every instant rests on an order both keep: the signal handlers (which only
set flags, and wake the main loop's ``select`` through a socket) go in before the first
rule, so a signal at any point of start-up ends in the caller's ``finally``; that
``finally`` removes the rules first (a failure logged, never raised: the queue is still
closed and the state still saved), and the handlers go back last, so a signal while the
rules were being removed changed nothing.
"""
from __future__ import annotations

import logging
import signal
import socket
from typing import Callable

log = logging.getLogger("roam.nat")


class Signals:
    """Flag-setting handlers and the wake-up socket pair (``rsig`` for the loop's select, ``wsig``
    for a thread that must wake it); :meth:`install` first thing, :meth:`restore` last thing."""

    def __init__(self, handlers: dict[int, Callable]) -> None:
        self.handlers = handlers
        self.rsig, self.wsig = socket.socketpair()
        self.rsig.setblocking(False)
        self.wsig.setblocking(False)
        self._old: dict[int, object] = {}

    def install(self) -> None:
        signal.set_wakeup_fd(self.wsig.fileno())
        for sig, fn in self.handlers.items():
            self._old[sig] = signal.signal(sig, fn)

    def drain(self) -> None:
        """Empty the wake-up socket (the flags say what came)."""
        try:
            self.rsig.recv(64)
        except BlockingIOError:
            pass

    def restore(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig, h in self._old.items():
            signal.signal(sig, h)  # type: ignore[arg-type]
        self.rsig.close()
        self.wsig.close()


def remove_rules(rules, ours: bool, on_stopping: Callable[[], None] | None) -> int:
    """The way out's first step: tell the service manager, then remove this run's rules (0 if they
    never were ours: another run's are not to touch).  Returns how many went."""
    if on_stopping is not None:
        on_stopping()
    if not ours:
        return 0
    try:
        return rules.remove()
    except Exception as exc:  # the caller still stops, unbinds and saves
        log.error("removing rules failed: %s", exc)
        return 0
