"""The QMP client against a scripted monitor (no QEMU, no root): answers, errors, events, migration polling."""
from __future__ import annotations

import json
import os
import socket
import tempfile
import threading

import pytest

from tools.lab.guest import INIT, MODULES, GuestImage
from tools.lab.qemu import GuestSpec
from tools.lab.qmp import Qmp, QmpError


class FakeMonitor:
    """A unix-socket QMP server playing ``script``: per command name, the lines to send back in order."""

    def __init__(self, script: dict[str, list[list[dict]]]) -> None:
        self.dir = tempfile.mkdtemp(prefix="roam-qmp-")
        self.path = os.path.join(self.dir, "qmp.sock")
        self.script = {k: list(v) for k, v in script.items()}
        self.seen: list[dict] = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.srv.accept()
        f = conn.makefile("rwb")
        f.write(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        f.flush()
        for line in f:
            cmd = json.loads(line)
            self.seen.append(cmd)
            replies = self.script.get(cmd["execute"], [[{"return": {}}]])
            batch = replies.pop(0) if len(replies) > 1 else replies[0]
            for r in batch:
                out = dict(r, id=cmd["id"]) if "event" not in r else r
                f.write(json.dumps(out).encode() + b"\r\n")  # QEMU ends lines with CRLF
            f.flush()

    def close(self) -> None:
        self.srv.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def monitor():
    made = []

    def make(script):
        made.append(FakeMonitor(script))
        return made[-1]

    yield make
    for m in made:
        m.close()


def test_capabilities_first_then_answers(monitor):
    m = monitor({"query-status": [[{"return": {"status": "running"}}]]})
    with Qmp(m.path) as q:
        assert q.execute("query-status") == {"status": "running"}
    assert [c["execute"] for c in m.seen] == ["qmp_capabilities", "query-status"]


def test_error_answer_raises_with_class_and_text(monitor):
    m = monitor({"migrate": [[{"error": {"class": "GenericError", "desc": "no such socket"}}]]})
    with Qmp(m.path) as q, pytest.raises(QmpError, match="migrate: GenericError: no such socket"):
        q.execute("migrate", {"uri": "unix:/nowhere"})
    assert m.seen[-1]["arguments"] == {"uri": "unix:/nowhere"}


def test_events_met_while_waiting_are_queued_not_lost(monitor):
    ev = {"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}}
    m = monitor({"query-status": [[ev, {"event": "STOP"}, {"return": {}}]]})
    with Qmp(m.path) as q:
        q.execute("query-status")
        assert q.wait_event("STOP", timeout=1)["event"] == "STOP"
        assert q.wait_event("RESUME", timeout=1) == ev
        with pytest.raises(QmpError, match="no answer in time"):
            q.wait_event("RESUME", timeout=0.2)


def test_completed_with_zero_times_is_asked_again(monitor):
    m = monitor({"query-migrate": [
        [{"return": {"status": "active"}}],
        [{"return": {"status": "completed", "total-time": 0, "downtime": 0}}],
        [{"return": {"status": "completed", "total-time": 412, "downtime": 88, "ram": {"transferred": 5}}}],
    ]})
    with Qmp(m.path) as q:
        info = q.wait_migration(timeout=5, poll=0.01)
    assert (info["total-time"], info["downtime"]) == (412, 88)
    assert sum(c["execute"] == "query-migrate" for c in m.seen) == 3


def test_failed_migration_raises(monitor):
    m = monitor({"query-migrate": [[{"return": {"status": "failed", "error-desc": "socket closed"}}]]})
    with Qmp(m.path) as q, pytest.raises(QmpError, match="migration failed: socket closed"):
        q.wait_migration(timeout=5, poll=0.01)


def test_no_monitor_is_a_clear_error(tmp_path):
    with pytest.raises(QmpError, match="no QMP monitor"):
        Qmp(str(tmp_path / "absent.sock"), timeout=0.2)


def test_both_ends_of_a_migration_are_the_same_machine():
    spec = GuestSpec(GuestImage("/k", "/i", "key", "6.1"), "52:54:00:00:00:01", "198.18.0.10/24", "198.18.0.1")
    src = spec.argv("tap0", "/q", "/c", "/con-a", incoming=False)
    dst = spec.argv("tap0", "/q", "/c", "/con-b", incoming=True)
    assert dst[-2:] == ["-incoming", "defer"] and "-incoming" not in src
    strip = lambda a: [x for x in a if not x.startswith("file:")]  # only the console log differs
    assert strip(dst[:-2]) == strip(src)
    append = src[src.index("-append") + 1]
    assert "roam.ip=198.18.0.10/24" in append and "roam.gw=198.18.0.1" in append
    assert ["-accel", "tcg,tb-size=64"] == src[1:3]


def test_init_loads_the_modules_in_dependency_order():
    line = next(l for l in INIT.splitlines() if l.startswith("for m in"))
    assert line.split(" in ", 1)[1].split(";")[0].split() == list(MODULES)
    assert MODULES.index("virtio_ring") < MODULES.index("virtio_pci") < MODULES.index("virtio_net")
    assert MODULES.index("net_failover") < MODULES.index("virtio_net")
