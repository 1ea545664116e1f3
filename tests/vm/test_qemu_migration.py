"""A real guest keeps its TCP connections through QEMU live migrations between two hosts.

Two hypervisor namespaces (``ha``, ``hb``) and a peer hang off one shared L2 segment (the
bridge ``lan`` in namespace ``lan``); each host has a bridge ``br0`` holding its uplink and
a TAP for the guest.  The guest boots on A with two flows to the peer: its own client
sending a numbered 32-byte line every 50 ms to the peer's echo server, and the peer's
client doing the same to the guest's echo server.  QEMU migrates it to B and back.  The
verdicts come from the one judge (``sim.judge``) fed with what the endpoints logged, and
every byte sent must have come back, in order, exactly once.  QEMU's downtime and the
peer's longest stall are printed, not asserted (TCG on shared cores is noisy).
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from sim.judge import Move, judge
from sim.results import Outcome
from tools.lab.logs import observations
from tools.lab.qemu import GuestSpec, make_tap

ROOT = Path(__file__).resolve().parents[2]
GUEST_IP, PEER_IP = "198.18.0.10", "198.18.0.100"
MAC = "52:54:00:18:00:0a"
OUT_PORT, IN_PORT = 7000, 7001  # the peer's echo server, the guest's echo server
INTERVAL_MS, TIMEOUT_MS = 50, 20000
DURATION_MS = 16000  # the flows outlast both moves (each ~1-2 s on TCG) with seconds to spare
LINE = 32


def shared_l2(lab) -> dict[str, str]:
    """role -> namespace: ``lan`` (bridge ``lan``), hosts ``ha``/``hb`` (``br0`` with ``up0`` and ``tap0``), ``peer``."""
    ns = {r: lab.ns(r) for r in ("lan", "ha", "hb", "peer")}
    lab.bridge(ns["lan"], "lan")
    for role, port in (("ha", "la"), ("hb", "lb"), ("peer", "lp")):
        lab.veth(ns[role], "up0", ns["lan"], port)
        lab.ipr(ns["lan"]).link("set", index=lab.index(ns["lan"], port), master=lab.index(ns["lan"], "lan"))
    for role in ("ha", "hb"):
        lab.bridge(ns[role], "br0", ports=["up0"])
        make_tap(lab, ns[role], "tap0", "br0")
    lab.addr(ns["peer"], "up0", f"{PEER_IP}/24")
    return ns


class _Lines:
    """A process's JSON stdout lines, read by a thread as they come."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.events = proc, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip():
                self.events.append(json.loads(line))

    def wait(self, pred, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in list(self.events):
                if pred(e):
                    return e
            time.sleep(0.05)
        raise AssertionError(f"the peer logged no {what} in {timeout}s: {self.events[-5:]}")


def _peer(lab, ns: str, *args) -> _Lines:
    p = lab.popen(ns, [sys.executable, "-m", "tests.vm.echo_peer", *map(str, args)], cwd=str(ROOT),
                  stdout=subprocess.PIPE, text=True)
    return _Lines(p)


def _fdb_port(lab, lan: str, mac: str) -> str | None:
    out = lab.run(lan, ["bridge", "fdb", "show", "br", "lan"]).stdout
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == mac and "dev" in f:
            return f[f.index("dev") + 1]
    return None


def _wait_fdb(lab, lan: str, mac: str, port: str, timeout: float = 5.0) -> str | None:
    deadline = time.monotonic() + timeout
    while True:
        seen = _fdb_port(lab, lan, mac)
        if seen == port or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def _longest_gap(times: list[float]) -> float:
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def test_tcp_survives_live_migration_there_and_back(vmlab):
    lab = vmlab.lab
    ns = shared_l2(lab)
    g = vmlab.guest(GuestSpec(vmlab.image, MAC, f"{GUEST_IP}/24"))
    boot_s = g.boot(ns["ha"], "tap0")

    server = _peer(lab, ns["peer"], "server", OUT_PORT)
    server.wait(lambda e: e["ev"] == "listening", 20, "listening line")
    g.send(f"roam-ep server 1 {IN_PORT} {TIMEOUT_MS} &")
    g.wait_for(lambda e: e.get("ev") == "listening", 10, "guest server's listening line")
    t0 = time.monotonic()
    g.send(f"roam-ep client 0 {PEER_IP} {OUT_PORT} {INTERVAL_MS} {TIMEOUT_MS} {DURATION_MS} &")
    client = _peer(lab, ns["peer"], "client", 1, GUEST_IP, IN_PORT, INTERVAL_MS, DURATION_MS)
    g.wait_for(lambda e: e.get("ev") == "established" and e.get("idx") == 0, 10, "guest client's connection")
    client.wait(lambda e: e["ev"] == "established", 10, "client connection")
    assert _wait_fdb(lab, ns["lan"], MAC, "la") == "la"

    time.sleep(2.0)
    there = g.migrate(ns["hb"], "tap0")
    assert g.current.ns == ns["hb"]
    assert _wait_fdb(lab, ns["lan"], MAC, "lb") == "lb", "the LAN did not learn the guest's MAC on host B"
    time.sleep(2.0)
    back = g.migrate(ns["ha"], "tap0")
    assert g.current.ns == ns["ha"]
    assert _wait_fdb(lab, ns["lan"], MAC, "la") == "la", "the LAN did not learn the guest's MAC back on host A"
    for m in (there, back):
        assert m.total_ms > 0 and m.ram_bytes > 0, m  # QEMU really migrated (query-migrate's own figures)
        assert m.started <= m.paused <= m.resumed, m

    limit = DURATION_MS / 1e3 + TIMEOUT_MS / 1e3 + 10
    done = g.wait_for(lambda e: e.get("ev") in ("done", "broken") and e.get("idx") == 0, limit, "guest client's end")
    peer_done = client.wait(lambda e: e["ev"] in ("done", "broken"), limit, "client end")
    server_end = server.wait(lambda e: e["ev"] in ("closed", "broken"), 10, "server end")
    g.wait_for(lambda e: e.get("ev") in ("closed", "broken") and e.get("side") == "server", 10, "guest server's end")

    # every byte came back, in order, once: the guest's client ...
    assert done["ev"] == "done", done
    assert done["sent"] > 0 and done["answered"] == done["sent"], done
    assert done["bytes_echoed"] == done["bytes_sent"] == done["sent"] * LINE, done
    assert done["mismatches"] == 0, done
    assert server_end["ev"] == "closed" and server_end["echoed"] == done["bytes_sent"], server_end
    # ... and the peer's client, through the guest's server
    assert peer_done["ev"] == "done", peer_done
    assert peer_done["answered"] == peer_done["sent"] > 0 and peer_done["mismatches"] == 0, peer_done
    guest_events = [dict(e, gt=e.get("t"), t=e["ht"] - t0, who="vm") for e in g.snapshot() if "ev" in e]
    g_server_end = [e for e in guest_events if e["ev"] in ("closed", "broken") and e.get("side") == "server"]
    assert [(e["ev"], e["echoed"]) for e in g_server_end] == [("closed", peer_done["bytes_sent"])]
    assert [e["address"] for e in guest_events if e["ev"] == "saw"] == [PEER_IP]
    assert [e["address"] for e in server.events if e["ev"] == "saw"] == [GUEST_IP]

    # the one judge's verdicts, from the endpoints' observations only
    peer_events = [dict(e, t=e["t"] - t0, who="peer:p") for e in server.events + client.events if e["ev"] != "rx"]
    events = guest_events + peer_events
    moves = [Move(m.paused - t0, m.resumed - m.paused) for m in (there, back)]
    out = judge("out", observations(events, 0, "vm", "peer:p"), moves, INTERVAL_MS / 1e3)
    inb = judge("in", observations(events, 1, "peer:p", "peer:p"), moves, INTERVAL_MS / 1e3)
    assert (out.outcome, out.cause) == (Outcome.SURVIVED, None), out
    assert (inb.outcome, inb.cause) == (Outcome.SURVIVED, None), inb
    assert out.peer_saw[0][1] == GUEST_IP and inb.peer_saw[0][1] == GUEST_IP

    rx = [e["t"] for e in server.events if e["ev"] == "rx"]
    answers = [e["t"] for e in client.events if e["ev"] == "answer"]
    print(f"\nboot {boot_s:.2f} s; " + "; ".join(
        f"migration {i}: QEMU total {m.total_ms:.0f} ms, downtime {m.downtime_ms:.0f} ms "
        f"(paused to resumed {(m.resumed - m.paused) * 1e3:.0f} ms), "
        f"{m.ram_bytes / 2**20:.1f} MiB" for i, m in enumerate((there, back), 1)))
    print(f"peer's longest stall: {_longest_gap(rx) * 1e3:.0f} ms receiving, {_longest_gap(answers) * 1e3:.0f} ms "
          f"between answers; judge's interruption: out {out.interruption_ms:.0f} ms, in {inb.interruption_ms:.0f} ms")
