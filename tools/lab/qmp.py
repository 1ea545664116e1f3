"""A QMP client: QEMU's JSON monitor over a unix socket, standard library only.

QEMU serves one client per QMP socket (a second connection hangs until the first
closes), so a :class:`Qmp` is made once per QEMU and kept; events that arrive while a
command waits for its answer are queued, never lost, for :meth:`Qmp.wait_event`.
"""
from __future__ import annotations

import json
import socket
import time


class QmpError(RuntimeError):
    """QEMU answered a command with an error, or the monitor went away."""


class Qmp:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.events: list[dict] = []
        self._buf = b""
        self._id = 0
        deadline = time.monotonic() + timeout
        while True:  # QEMU creates the socket a moment after it starts
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"no QMP monitor at {path} after {timeout}s") from None
                time.sleep(0.05)
        greeting = self._read(deadline)
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Qmp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, deadline: float) -> dict:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"QMP {self.path}: no answer in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise QmpError(f"QMP {self.path}: no answer in time") from None
            except OSError as exc:
                raise QmpError(f"QMP {self.path}: {exc}") from exc
            if not chunk:
                raise QmpError(f"QMP {self.path}: QEMU closed the monitor")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, arguments: dict | None = None, timeout: float = 10.0):
        """Run ``command`` and return its ``return`` value; QmpError on an ``error`` answer."""
        self._id += 1
        msg = {"execute": command, "id": self._id}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise QmpError(f"QMP {self.path}: {exc}") from exc
        deadline = time.monotonic() + timeout
        while True:
            m = self._read(deadline)
            if "event" in m:
                self.events.append(m)
            elif m.get("id") == self._id:
                if "error" in m:
                    raise QmpError(f"{command}: {m['error'].get('class')}: {m['error'].get('desc')}")
                return m.get("return")

    def wait_event(self, name: str, timeout: float = 10.0) -> dict:
        """The first queued or arriving event called ``name`` (removed from the queue)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            m = self._read(deadline)
            if "event" in m:
                self.events.append(m)

    def wait_migration(self, timeout: float = 60.0, poll: float = 0.05) -> dict:
        """Poll ``query-migrate`` until it is over; the final answer (QmpError if it failed).

        QEMU 7.2 may say "completed" while total-time and downtime are still 0 for a
        moment: such an answer is asked again (briefly) before it is returned.
        """
        deadline = time.monotonic() + timeout
        zero_tries = 0
        while True:
            info = self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                if (info.get("total-time") and "downtime" in info) or zero_tries >= 40:
                    return info
                zero_tries += 1
            elif status in ("failed", "cancelled"):
                raise QmpError(f"migration {status}: {info.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise QmpError(f"migration not over after {timeout}s: {info}")
            time.sleep(poll)
