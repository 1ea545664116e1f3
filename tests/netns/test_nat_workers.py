"""`roam nat --workers 2` (issue 10, section 4) on real packets in namespaces: new flows spread
over two processes by port, each handing out only its own lane of the pools, one status;
a signal or a dead worker leaves no rule and no process.

The topology is test_nat_plugin.py's (``Site``); only the command line differs."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from nat import parse_toml
from nat.netfilter.workers import Slices

from .test_nat_plugin import EXT, PEER, ROOT, VM, Site, _wait

#: the default pools dealt to two workers (tests/unit/test_nat_workers.py checks the arithmetic)
SLICES = Slices(parse_toml('internal = ["198.18.0.0/24"]'), 2)


class Workers(Site):
    def start(self, internal="hv0", n=2, extra=()):
        with open(self.log, "a") as log:
            self.proc = self.lab.popen(self.host, [sys.executable, "-m", "tools.cli", "-v", "nat", "--config",
                                                  self.conf, "--external", "ext0", "--internal", internal, "--queue",
                                                  "3", "--state-dir", self.dir, "--workers", str(n), *extra],
                                       stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        pid = self.proc.pid

        def ready():
            st = self.status()
            return (st is not None and st["pid"] == pid and self.proc.poll() is None
                    and len(st.get("workers", [])) == n and all(w["running"] for w in st["workers"]))
        _wait(ready, 20, "roam nat --workers to start (log: %s)" % self.log)
        return [w["pid"] for w in self.status()["workers"]]


@pytest.fixture
def site(lab, tmp_path):
    return Workers(lab, tmp_path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _queues(site) -> set[str]:
    out = site.lab.run(site.host, ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout
    return {l.split()[0] for l in out.splitlines() if l.strip()}


def _settled(site) -> dict:
    """The merged status once the workers' counts stand still (each worker writes its file and
    the parent merges them every second): two reads 1.2 s apart that agree, within 10 s."""
    last = site.status()
    for _ in range(8):
        time.sleep(1.2)
        st = site.status()
        if [w.get("queued_packets") for w in st["workers"]] == [w.get("queued_packets") for w in last["workers"]]:
            return st
        last = st
    raise AssertionError("the workers' queued packet counts did not settle")


@pytest.mark.parametrize("kernel_path", [True, False], ids=["kernel-path", "no-kernel-path"])
def test_new_connections_spread_over_two_workers_each_in_its_own_ports(site, kernel_path):
    """120 TCP connections from chosen source ports (and privileged ones, below the low range,
    which are never kept): every one goes through, the peer sees the external address and
    the port itself (only its lane's worker could hand it out), or for a privileged one a low
    port of worker 0's lane; then 64 connections from ports the VM's kernel picks (in
    sequence): both workers get some -- queued, or with the kernel path (the default) NATed
    by the kernel alone in each lane, learned by that lane's worker, the port in its own sets
    only; `roam nat status` shows one view with a line per worker."""
    lab = site.lab
    pids = site.start(extra=() if kernel_path else ("--no-kernel-path",))
    assert len(set(pids)) == 2 and all(_alive(p) for p in pids)
    assert {"3", "4"} <= _queues(site)
    srv = site.sock(site.inet)
    srv.bind((PEER, 7200))
    srv.listen(256)
    seen = {}

    def serve():
        for _ in range(200):
            try:
                c, addr = srv.accept()
            except OSError:
                return
            tag = c.recv(16)
            seen[int(tag)] = addr
            c.sendall(b"ok" + tag)
            c.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    sports = list(range(20000, 20040)) + list(range(45000, 45040)) + list(range(900, 920)) + list(range(300, 320))
    failed = []
    for sp in sports:
        c = site.sock(site.vm)
        c.bind((VM, sp))
        try:
            c.connect((PEER, 7200))
            c.sendall(b"%d" % sp)
            if c.recv(16) != b"ok%d" % sp:
                failed.append(sp)
        except OSError as exc:
            failed.append((sp, exc))
        finally:
            c.close()
    srv.close()
    t.join(5)
    assert not failed, failed
    owners = {0: 0, 1: 0}
    for sp in sports:
        addr, port = seen[sp]
        assert addr == EXT, (sp, seen[sp])
        owners[SLICES.owner(6, sp)] += 1
        if sp < 600:  # privileged, below the low range: a low port of worker 0's lane, not its own
            assert 600 <= port <= 1023 and SLICES.owner(6, port) == 0, (sp, port)
        else:
            assert port == sp, (sp, port)
    assert owners[0] and owners[1]
    _wait(lambda: all(w.get("queued_packets", 0) > 0 for w in site.status()["workers"]), 5,
          "both workers' queued packets in the merged status")
    st = _settled(site)
    assert [w["queue"] for w in st["workers"]] == [3, 4]
    assert [w["ports"][:2] for w in st["workers"]] == [[[1024, 65535], [600, 1023]]] * 2
    assert [w["lane"] for w in st["workers"]] == [[8, 0, 3], [8, 4, 7]]
    # a burst of connections from the ports the VM's kernel hands out one after another
    before = [w.get("queued_packets", 0) for w in st["workers"]]
    srv = site.sock(site.inet)
    srv.bind((PEER, 7201))
    srv.listen(256)
    clients = []
    for _ in range(64):
        c = site.sock(site.vm)
        c.connect((PEER, 7201))
        clients.append(c)
        srv.accept()[0].close()
    picked = [c.getsockname()[1] for c in clients]
    for c in clients:
        c.close()
    srv.close()
    assert {SLICES.owner(6, p) for p in picked} == {0, 1}, picked
    if kernel_path:
        _wait(lambda: all(w.get("kernel_flows", 0) >= sum(SLICES.owner(6, p) == k for p in picked)
                          for k, w in enumerate(site.status()["workers"])), 5,
              "each worker to learn its lane's share of the burst from the kernel path")
        assert [w.get("queued_packets", 0) for w in site.status()["workers"]] == before  # not one packet queued
        sets = site.sets()
        parent = site.proc.pid
        for k in (0, 1):
            held = {int(p) for p in sets[f"roam-q{3 + k}-p{parent}-tcp"]}
            assert {p for p in picked if SLICES.owner(6, p) == k} <= held, (k, picked, held)
            # (nat.conf's inbound mapping 8080 is every worker's: held in every worker's sets)
            assert all(SLICES.owner(6, p) == k for p in held if p >= 1024 and p != 8080), (k, held)
    else:
        _wait(lambda: all(w.get("queued_packets", 0) > b for w, b in zip(site.status()["workers"], before)), 5,
              "both workers to take part of a burst from sequential ports")
    _wait(lambda: site.status()["engine"]["counters"].get("translated_out", 0) >= len(sports), 5,
          "the merged translated count")
    out = lab.run(site.host, [sys.executable, "-m", "tools.cli", "nat", "status", "--queue", "3",
                              "--state-dir", site.dir], check=False)
    assert out.returncode == 0, out
    lines = [l for l in out.stdout.splitlines() if l.startswith("worker ")]
    assert len(lines) == 2, out.stdout
    for k, line in enumerate(lines):
        m = re.match(rf"worker {k} pid {pids[k]} \(running\), queue {3 + k}, ports .*: queued packets (\d+)"
                     r".*kernel path flows (\d+)$", line)
        assert m and int(m.group(1)) > 0 and (int(m.group(2)) > 0) == kernel_path, line
    assert lab.stop(site.proc) == 0
    assert not site.sets()  # the parent removed every worker's sets


def test_sigterm_leaves_no_rule_no_queue_and_no_process(site):
    pids = site.start()
    rules = [l for l in site.rules().splitlines() if "roam-nat q3" in l]
    assert any("--queue-num 4" in l for l in rules) and any("--queue-num 3" in l for l in rules), rules
    assert lab_ok(site)
    os.kill(site.proc.pid, signal.SIGTERM)  # the parent alone: it passes the signal on
    assert site.proc.wait(timeout=30) == 0
    assert "roam-nat" not in site.rules()
    assert not {"3", "4"} & _queues(site)
    assert not [p for p in pids if _alive(p)]
    assert not site.sets()
    with open(site.log) as f:
        log = f.read()
    assert f"removed {len(rules)} rules" in log, log[-2000:]


def lab_ok(site) -> bool:
    """A ping through the NAT (worker 0's: ICMP) works."""
    return site.lab.ping(site.vm, PEER, count=1) == 1


def test_kill9_of_one_worker_stops_all_and_removes_the_rules(site):
    """Fail-closed: the parent sees the death, removes the rules and stops the other worker."""
    pids = site.start()
    os.kill(pids[1], signal.SIGKILL)
    _wait(lambda: site.proc.poll() is not None, 25, "the parent to stop")
    assert site.proc.returncode == 1
    assert "roam-nat" not in site.rules()
    assert not {"3", "4"} & _queues(site)
    assert not site.sets()
    _wait(lambda: not _alive(pids[0]), 5, "worker 0 to be gone")
    with open(site.log) as f:
        log = f.read()
    assert f"worker 1 (pid {pids[1]}, queue 4) was killed by signal 9" in log, log[-2000:]


def test_sighup_reaches_every_worker(site):
    """A new inbound mapping in the config, SIGHUP to the parent: both workers take it."""
    pids = site.start()
    with open(site.conf, "a") as f:
        f.write("8081 = 198.18.0.2:81\n")
    os.kill(site.proc.pid, signal.SIGHUP)

    def both():
        parts = []
        for k in (0, 1):
            try:
                with open(os.path.join(site.dir, f"nat-q3.w{k}.status.json")) as f:
                    parts.append(json.load(f)["engine"]["inbound_mappings"])
            except (OSError, ValueError):
                return False
        return parts == [2, 2]
    _wait(both, 10, "both workers to hold two inbound mappings")
    assert all(_alive(p) for p in pids) and site.proc.poll() is None
    assert site.lab.stop(site.proc) == 0


def test_sigusr1_makes_every_worker_write_its_snapshot_now(site):
    """SIGUSR1 to the parent (a migration hook's "the state now"): each worker writes its own
    snapshot at once, and every process stays up."""
    pids = site.start()

    def asked(k):
        try:
            with open(os.path.join(site.dir, f"nat-q3.w{k}.status.json")) as f:
                return json.load(f).get("snapshots_asked")
        except (OSError, ValueError):
            return None
    _wait(lambda: [asked(0), asked(1)] == [0, 0], 10, "both workers' status")
    os.kill(site.proc.pid, signal.SIGUSR1)
    _wait(lambda: [asked(0), asked(1)] == [1, 1], 10, "both workers' snapshots asked for")
    assert all(_alive(p) for p in pids) and site.proc.poll() is None
    assert site.lab.stop(site.proc) == 0


def test_too_many_workers_are_refused_before_any_rule(site):
    cp = site.lab.run(site.host, [sys.executable, "-m", "tools.cli", "nat", "--config", site.conf, "--external", "ext0",
                                  "--internal", "hv0", "--queue", "3", "--state-dir", site.dir, "--workers", "65"],
                      check=False, timeout=60)
    assert cp.returncode == 1 and "--workers 65: give 1 to 64" in cp.stderr, cp
    assert "roam-nat" not in site.rules()


def test_kill9_of_the_parent_takes_the_workers_and_a_restart_replaces_its_rules(site):
    """The workers die with the parent (its rules stay: fail-closed, nothing listens); a new run
    puts its own rules in ahead of the stale ones, removes those, and NATs again."""
    pids = site.start()
    n_rules = len([l for l in site.rules().splitlines() if "roam-nat q3" in l])
    site.lab.stop(site.proc, sig=signal.SIGKILL)
    _wait(lambda: not any(_alive(p) for p in pids), 10, "the workers to die with their parent")
    assert len([l for l in site.rules().splitlines() if "roam-nat q3" in l]) == n_rules  # still dropping
    assert site.lab.ping(site.vm, PEER, count=1, timeout=1) == 0
    dead = site.proc.pid
    names = ("tcp", "udp", "keep", "moved", "alive")
    assert {f"roam-q{q}-p{dead}-{n}" for q in (3, 4) for n in names} == set(site.sets())  # stale, kept
    site.start()
    assert len([l for l in site.rules().splitlines() if "roam-nat q3" in l]) == n_rules
    with open(site.log) as f:
        assert f"replaced {n_rules} stale rules" in f.read()
    assert all(f"-p{site.proc.pid}-" in name for name in site.sets()), site.sets()  # the dead run's removed
    assert lab_ok(site)
    assert site.lab.stop(site.proc) == 0 and "roam-nat" not in site.rules() and not site.sets()


def test_established_flows_of_both_workers_survive_a_restart_each_readopted_by_its_owner(site):
    """Two TCP connections, one per worker (source ports in the two lanes), offloaded;
    the parent is killed with -9 (the kernel keeps forwarding them), a new run starts: each
    worker adopts only its own entry (none removes the other's), and both connections go on."""
    srv = site.sock(site.inet)
    srv.bind((PEER, 7300))
    srv.listen(4)
    pids = site.start()
    conns = []
    assert [SLICES.owner(6, sp) for sp in (20001, 45001)] == [0, 1]
    for sp in (20001, 45001):
        c = site.sock(site.vm)
        c.bind((VM, sp))
        c.connect((PEER, 7300))
        s, addr = srv.accept()
        assert addr == (EXT, sp)  # kept: each port is in its own worker's lane
        conns.append((c, s))
    _wait(lambda: [w.get("offloaded", 0) for w in site.status()["workers"]] == [1, 1], 5,
          "one offloaded flow per worker")
    site.lab.stop(site.proc, sig=signal.SIGKILL)
    _wait(lambda: not any(_alive(p) for p in pids), 10, "the workers to die with their parent")
    for c, s in conns:  # the kernel forwards them meanwhile
        c.sendall(b"during")
        assert s.recv(10) == b"during"
    site.start()
    _wait(lambda: [w.get("offloaded", 0) for w in site.status()["workers"]] == [1, 1], 10,
          "each worker to hold its own flow again")
    for c, s in conns:
        c.sendall(b"after")
        assert s.recv(10) == b"after"
        s.sendall(b"back")
        assert c.recv(10) == b"back"
        c.close()
        s.close()
    srv.close()
    with open(site.log) as f:
        log = f.read()
    assert "removed the kernel's entry of an earlier run" not in log, log[-3000:]
    assert site.lab.stop(site.proc) == 0


def test_a_signal_at_any_instant_of_start_up_leaves_no_rule_no_queue_no_process(site):
    t0 = time.monotonic()
    site.start()
    startup = time.monotonic() - t0
    assert site.lab.stop(site.proc, wait=20) == 0
    rng = random.Random()
    tries = []
    w1 = os.path.join(site.dir, "nat-q3.w1.status.json")
    for i in range(8):
        if os.path.exists(w1):
            os.unlink(w1)
        with open(site.log, "a") as log:
            proc = site.lab.popen(site.host, [sys.executable, "-m", "tools.cli", "-v", "nat", "--config", site.conf,
                                              "--external", "ext0", "--internal", "hv0", "--queue", "3",
                                              "--state-dir", site.dir, "--workers", "2"],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if i < 4:
            delay = rng.uniform(0, startup * 1.2)
            time.sleep(delay)
        elif i < 6:  # right as the rules appear, before the workers
            delay = -1.0
            _wait(lambda: "roam-nat q3" in site.rules() or proc.poll() is not None, 15, "rules to appear")
        else:  # right as the second worker is up
            delay = -2.0
            _wait(lambda: os.path.exists(w1) or proc.poll() is not None, 15, "worker 1 to start")
        tries.append(round(delay, 3))
        sig = (signal.SIGTERM, signal.SIGINT)[i % 2]
        os.kill(proc.pid, sig)
        rc = proc.wait(timeout=40)
        # once rules are in, the handlers are: a clean stop (before, while Python starts, a signal may
        # end it any way: a KeyboardInterrupt in an import, the default action; no rule was in yet)
        assert rc == 0 or delay >= 0, (tries, rc)
        assert "roam-nat" not in site.rules(), tries
        assert not {"3", "4"} & _queues(site), tries
        assert not site.sets(), tries
        out = site.lab.run(site.host, ["ps", "-eo", "pid,args"], check=False).stdout
        assert not [l for l in out.splitlines() if "--workers" in l and site.dir in l], (tries, out)


def test_an_address_change_moves_every_workers_flows_and_the_hairpin_rules(site):
    """The new address: both workers' old flows die, the parent points every hairpin rule
    (one per worker and port range) at it, and both workers NAT to it."""
    site.start()
    lab = site.lab
    n_rules = len([l for l in site.rules().splitlines() if "roam-nat q3" in l])
    us = site.sock(site.inet, socket.SOCK_DGRAM)
    us.bind(("0.0.0.0", 5301))
    ucs = []
    assert [SLICES.owner(17, sp) for sp in (20002, 45002)] == [0, 1]
    for sp in (20002, 45002):
        uc = site.sock(site.vm, socket.SOCK_DGRAM)
        uc.bind((VM, sp))
        uc.sendto(b"1", (PEER, 5301))
        assert us.recvfrom(10)[1] == (EXT, sp)
        ucs.append(uc)
    lab.flush_addr(site.host, "ext0")
    lab.addr(site.host, "ext0", "203.0.113.5/24")
    _wait(lambda: (site.status() or {}).get("engine", {}).get("external_ip") == "203.0.113.5", 10,
          "the workers to see the new address")
    # the kernel path's flows (from each VM's own port, one per lane): ended by their DESTROYs, the
    # kernel's MASQUERADE removing them as the address went (queued ones roam would have killed)
    off = lambda: (site.status() or {}).get("offload") or {}  # noqa: E731
    _wait(lambda: off().get("kernel_flows") == 2 and off().get("flows") == 0, 5, "both workers' flows ended")
    _wait(lambda: f"-d {EXT}/32" not in site.rules(), 5, "the hairpin rules to move")
    rules = [l for l in site.rules().splitlines() if "roam-nat q3" in l]
    assert len(rules) == n_rules and sum("-d 203.0.113.5/32" in l for l in rules) == 11, rules
    for uc, sp in zip(ucs, (20002, 45002)):
        uc.sendto(b"2", (PEER, 5301))
        _, src = us.recvfrom(10)
        assert src[0] == "203.0.113.5"
        us.sendto(b"r", src)
        assert uc.recvfrom(10)[0] == b"r"
        uc.close()
    us.close()
    assert site.lab.stop(site.proc) == 0
