"""The host agent's control socket: orchestration hooks say which VMs come and go.

``roam tunnel attach --mac MAC`` / ``detach --mac MAC`` (say, from libvirt's qemu
hook: ``prepare``/``started`` on the destination, ``release``/``stopped`` on the
source) reach the running agent over a unix stream socket, mode 0600 (root's
business: naming a MAC moves a VM's traffic), by default ``host.sock`` in its
status directory.  One request per connection, one line each way::

    attach 02:00:00:00:00:01     ->  {"ok": true, "macs": ["02:00:00:00:00:01", ...]}
    detach 02:00:00:00:00:01     ->  {"ok": true, "macs": [...]}
    list                         ->  {"ok": true, "macs": [...]}
    anything else                ->  {"ok": false, "error": "..."}

Non-blocking inside the agent's selector loop: at most :data:`MAX_CLIENTS` clients
at once, a request line at most :data:`MAX_LINE` bytes, a client silent for
:data:`CLIENT_TIMEOUT` seconds is closed.  A socket file left by a dead agent is
replaced; one a live agent answers on is not (:class:`ControlError`).
"""
from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import stat
from typing import Callable

MAX_CLIENTS = 8
MAX_LINE = 256
CLIENT_TIMEOUT = 2.0
VERBS = ("attach", "detach", "list")


class ControlError(OSError):
    pass


class _Client:
    __slots__ = ("sock", "buf", "opened")

    def __init__(self, sock: socket.socket, opened: float) -> None:
        self.sock, self.buf, self.opened = sock, b"", opened


class ControlServer:
    """``handle(verb, argument, now)`` does a request and returns the reply (a dict made JSON)."""

    def __init__(self, path: str, sel: selectors.BaseSelector, handle: Callable[[str, str, float], dict],
                 clock: Callable[[], float], counters: dict | None = None) -> None:
        self.path, self.sel, self.handle, self.clock = path, sel, handle, clock
        self.clients: dict[int, _Client] = {}
        self.counters: dict[str, int] = {} if counters is None else counters
        _clear_stale(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)  # created 0600: no window in which others may connect
            try:
                s.bind(path)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            s.listen(MAX_CLIENTS)
            s.setblocking(False)
        except OSError as exc:
            s.close()
            if exc.errno == errno.EADDRINUSE:  # another agent bound it between our look and our bind
                raise ControlError(f"{path}: another agent answers on it") from None
            raise
        self.sock = s
        sel.register(s, selectors.EVENT_READ, self._on_accept)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _on_accept(self, _mask: int) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        if len(self.clients) >= MAX_CLIENTS:
            self._count("control_refused")
            conn.close()
            return
        conn.setblocking(False)
        c = _Client(conn, self.clock())
        self.clients[conn.fileno()] = c
        self.sel.register(conn, selectors.EVENT_READ, lambda mask, c=c: self._on_client(c))

    def _on_client(self, c: _Client) -> None:
        try:
            data = c.sock.recv(MAX_LINE + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)
            return
        c.buf += data
        if b"\n" not in c.buf and data and len(c.buf) <= MAX_LINE:
            return  # more to come
        line = c.buf.split(b"\n", 1)[0]
        if len(line) > MAX_LINE:
            self._count("control_bad_requests")
            reply = {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
        else:
            reply = self._request(line)
        try:
            c.sock.setblocking(True)
            c.sock.settimeout(0.5)  # the reply is one short line: a client that reads nothing loses it
            c.sock.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass
        self._close(c)

    def _request(self, line: bytes) -> dict:
        words = line.decode("ascii", "replace").split()
        if not words or words[0] not in VERBS:
            self._count("control_bad_requests")
            return {"ok": False, "error": f"unknown request {line[:40]!r}: one of {', '.join(VERBS)}"}
        verb, arg = words[0], " ".join(words[1:])
        if verb != "list" and len(words) != 2:
            self._count("control_bad_requests")
            return {"ok": False, "error": f"{verb} takes one MAC address"}
        try:
            reply = self.handle(verb, arg, self.clock())
        except ValueError as exc:
            self._count("control_bad_requests")
            return {"ok": False, "error": str(exc)}
        self._count(f"control_{verb}")
        return {"ok": True, **reply}

    def deadline(self) -> float | None:
        """When the oldest client times out (None: no client)."""
        return min(c.opened for c in self.clients.values()) + CLIENT_TIMEOUT if self.clients else None

    def sweep(self, now: float) -> None:
        """Close clients silent too long (called with the driver's housekeeping)."""
        for c in [c for c in self.clients.values() if now - c.opened > CLIENT_TIMEOUT]:
            self._count("control_timeouts")
            self._close(c)

    def _close(self, c: _Client) -> None:
        self.clients.pop(c.sock.fileno(), None)
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def close(self) -> None:
        for c in list(self.clients.values()):
            self._close(c)
        try:
            self.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _clear_stale(path: str) -> None:
    """Remove a socket file no agent answers on; refuse one a live agent does, or any other file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody there: left by an agent that died
        return
    finally:
        probe.close()
    raise ControlError(f"{path}: another agent answers on it")


def request(path: str, verb: str, arg: str = "", timeout: float = 5.0) -> dict:
    """One request to the agent at ``path`` (the client side); raises OSError when none answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(f"{verb} {arg}".strip().encode() + b"\n")
        data = b""
        while b"\n" not in data and len(data) < 65536:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    try:
        return json.loads(data.decode())
    except ValueError:
        raise OSError(f"{path}: the agent's answer is not JSON: {data[:80]!r}") from None
