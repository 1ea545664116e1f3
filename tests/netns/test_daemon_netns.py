"""`roam nat` and `roam tunnel proxy|host` as systemd runs them: sd_notify and the journal's log lines.

A real AF_UNIX datagram socket stands in for systemd's notify socket (NOTIFY_SOCKET); the
daemons run in namespaces this test makes.  READY=1 must come only once the rules (NAT) or the
TAP and the listening socket (tunnel) are in place: the test freezes the daemon (SIGSTOP) the
moment READY arrives and looks; STOPPING=1 must come on SIGTERM, before a clean exit.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns.test_nat_plugin import RULES_OFFLOAD, Site

ROOT = Path(__file__).resolve().parents[2]
_STAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d")


class Notify:
    """systemd's side of sd_notify: a datagram socket at a path, read with bounded waits."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.got: list[dict[str, str]] = []

    def wait_for(self, key: str, proc: subprocess.Popen, seconds: float = 30.0) -> dict[str, str]:
        """The first message carrying ``key``=1 (earlier ones kept in ``got``); fails if the process ends."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.sock.settimeout(0.2)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:  # nothing queued: a daemon gone will send nothing more
                if proc.poll() is not None:
                    raise AssertionError(f"daemon exited ({proc.returncode}) before {key}; got {self.got}")
                continue
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.got.append(msg)
            if msg.get(key) == "1":
                return msg
        raise AssertionError(f"no {key}=1 within {seconds} s; got {self.got}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_factory(tmp_path):
    made: list[Notify] = []

    def make(name: str) -> Notify:
        n = Notify(tmp_path / f"{name}.notify")
        made.append(n)
        return n
    yield make
    for n in made:
        n.close()


def _env(notify: Notify, log_file) -> dict[str, str]:
    """As systemd sets it: the notify socket, and JOURNAL_STREAM naming the daemon's stderr."""
    st = os.fstat(log_file.fileno())
    return dict(os.environ, NOTIFY_SOCKET=notify.path, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")


def _frozen(proc: subprocess.Popen):
    """SIGSTOP now, SIGCONT when the block ends: what is seen inside is what READY was sent with."""
    class Freeze:
        def __enter__(self):
            os.kill(proc.pid, signal.SIGSTOP)

        def __exit__(self, *exc):
            os.kill(proc.pid, signal.SIGCONT)
    return Freeze()


def test_nat_ready_only_once_its_rules_are_in_and_stopping_on_sigterm(lab, tmp_path, notify_factory):
    site = Site(lab, tmp_path)
    notify = notify_factory("nat")
    log_path = tmp_path / "nat.log"
    with open(log_path, "wb") as log:
        proc = lab.popen(site.host, [sys.executable, "-m", "tools.cli", "nat", "--config", site.conf,
                                     "--external", "ext0", "--internal", "hv0", "--queue", "3",
                                     "--state-dir", str(tmp_path)],
                         stdout=log, stderr=log, cwd=ROOT, env=_env(notify, log))
    ready = notify.wait_for("READY", proc)
    with _frozen(proc):
        assert site.rules().count("roam-nat q3") == RULES_OFFLOAD
    assert "hv0" in ready.get("STATUS", "") or "198.18.0.0/24" in ready.get("STATUS", "")
    assert "ext0" in ready["STATUS"]

    os.kill(proc.pid, signal.SIGTERM)
    notify.wait_for("STOPPING", proc, seconds=20)
    assert proc.wait(timeout=30) == 0
    assert "roam-nat" not in site.rules()

    lines = log_path.read_text().splitlines()
    start = [l for l in lines if "roam nat running" in l]
    assert start and start[0].startswith("<6>INFO roam.nat: roam nat running: queue 3, external ext0 (203.0.113.1)")
    assert not [l for l in lines if _STAMP.search(l)], lines  # the journal stamps them, we do not


def _tunnel(lab, ns, tmp_path, notify, role: str, *args: str) -> tuple[subprocess.Popen, Path]:
    log_path = tmp_path / f"{role}.log"
    with open(log_path, "wb") as log:
        proc = lab.popen(ns, [sys.executable, "-m", "tools.cli", "tunnel", role, *args,
                              "--key-file", str(tmp_path / "tunnel.key"), "--status-dir", str(tmp_path / "status"),
                              "--log-format", "json"],
                         stdout=log, stderr=log, cwd=ROOT, env=_env(notify, log))
    return proc, log_path


def _links(lab, ns) -> dict[str, dict]:
    return {l["ifname"]: l for l in json.loads(lab.run(ns, ["ip", "-j", "link", "show"]).stdout)}


def _port_taken(lab, ns, port: int) -> bool:
    s = lab.socket(ns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        return True
    finally:
        s.close()
    return False


def test_tunnel_proxy_and_host_ready_once_devices_are_in_and_stopping_on_sigterm(lab, tmp_path, notify_factory):
    ns = lab.ns("tun")
    lab.bridge(ns, "br0")
    lab.bridge(ns, "brvm")
    key = subprocess.run([sys.executable, "-m", "tools.cli", "tunnel", "genkey", "--out", str(tmp_path / "tunnel.key")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert key.returncode == 0, key.stderr
    pn, hn = notify_factory("proxy"), notify_factory("host")
    proxy, proxy_log = _tunnel(lab, ns, tmp_path, pn, "proxy", "--listen", "127.0.0.1:4789", "--bridge", "br0")
    pn.wait_for("READY", proxy)
    with _frozen(proxy):
        links = _links(lab, ns)
        assert links["roamp4789"].get("master") == "br0"
        assert _port_taken(lab, ns, 4789)

    host, host_log = _tunnel(lab, ns, tmp_path, hn, "host", "--proxy", "127.0.0.1:4789", "--tap", "rt0",
                             "--bridge", "brvm", "--mac", "02:00:00:00:00:50")
    ready = hn.wait_for("READY", host)
    with _frozen(host):
        assert _links(lab, ns)["rt0"].get("master") == "brvm"
    assert "127.0.0.1:4789" in ready["STATUS"] and "rt0" in ready["STATUS"]

    for proc, n in ((host, hn), (proxy, pn)):
        os.kill(proc.pid, signal.SIGTERM)
        n.wait_for("STOPPING", proc, seconds=20)
        assert proc.wait(timeout=30) == 0
    assert "roamp4789" not in _links(lab, ns) and "rt0" not in _links(lab, ns)

    for path, start in ((proxy_log, "proxy on 127.0.0.1:4789 (udp), tap roamp4789 in bridge br0"),
                        (host_log, "host end to 127.0.0.1:4789 (udp), tap rt0 in bridge brvm")):
        records = []
        for line in path.read_text().splitlines():
            assert line.startswith("<"), line  # the journal's priority prefix, then one JSON object
            records.append(json.loads(line[line.index(">") + 1:]))
        assert {"level", "logger", "message"} <= set(records[0]) and "time" not in records[0]
        assert any(r["message"] == start and r["level"] == "INFO" and r["logger"] == "roam.tunnel" for r in records), \
            records
