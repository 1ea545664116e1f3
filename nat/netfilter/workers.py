"""`roam nat --workers N`: N plugin processes for new flows, one set of rules, one status.

Which worker gets a packet.  The kernel's ``--queue-balance`` picks a queue by
``nfqueue_hash`` (include/net/netfilter/nf_queue.h, ``hash_v4``): a jhash of the source
and destination *addresses* and the protocol, ordered so that both directions of one
address pair meet -- but no ports, and across a NAT the pair changes (VM->peer out,
peer->external address back).  So under it one VM talking to one server never spreads
over two queues, the same internal endpoint towards two peers lands on two workers
(two external ports: endpoint-independent mapping, RFC 4787 REQ-1, lost), and an
inbound packet to a mapping lands on a worker chosen by its sender, not on the one
that owns the mapping.  ``--queue-cpu-fanout`` is worse (the CPU, not the flow).
Hence dispatch by port instead (``tcp``/``udp`` port-range and ``u32`` lane matches, :mod:`.rules`):

* worker k owns lane k of the TCP/UDP pools (high and low ports, dealt in small
  interleaved lanes: :class:`Slices` says why not halves) and slice k of the ICMP
  identifiers, and allocates only from them: no table is shared;
* a packet from the inside goes to the owner of its internal *source port* -- the
  same internal endpoint always meets the same worker, whatever the destination
  (mapping stays endpoint-independent, and port preservation holds whenever the port is
  free, since the port is in the worker's own lane), and both hairpin halves of a
  flow meet the same worker;
* a packet from outside goes to the owner of its *destination port*: the worker that
  handed out that mapping (endpoint-independent filtering holds), or for an inbound
  mapping of nat.conf the owner of its port.  Every worker knows every inbound mapping
  (the whole config is each worker's), so whichever lane a mapped port falls in, its
  owner can serve it without asking anyone; and the flows an inbound mapping opens are
  owned like any other (by that port), which is what a restart uses to re-adopt them;
* what no worker claims (ICMP, ports outside every range: the host's own sshd, an
  inbound mapping on port 80) goes to worker 0.

With offload most replies never reach user space; those that do (a first inbound
packet, an unsolicited one to an EIF mapping) follow the same rule.  The parent installs
the rules once before the workers start and removes them once; it forwards SIGTERM,
SIGINT and SIGHUP; a worker that dies makes it stop all of them and remove the rules
(fail-closed: until then that worker's queue has no listener and the kernel drops its
packets).  Workers die with the parent (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import signal
from typing import Any, Callable

from conntrack.flow import FlowTuple

from .. import snapshot
from ..ports import lane_count
from . import PluginError
from .ctnetlink import Tuple
from .interfaces import AddressEvents, iface_address
from .kernelpath import KERNEL, KernelPath, remove_stale_sets
from .lifecycle import Signals, remove_rules
from .offload import Offloader

log = logging.getLogger("roam.nat")

MAX_WORKERS = 64
_STATUS_EVERY = 1.0  # seconds between merged status files
_STOP_WAIT = 15.0  # seconds a worker gets to stop before SIGKILL


def partition(first: int, last: int, n: int, what: str = "port range") -> list[tuple[int, int]]:
    """``first..last`` cut into ``n`` contiguous slices, worker k's is ``[first + k*size, ...)``
    (the last one takes the remainder).  A range with fewer ports than workers is refused."""
    if not 1 <= n <= MAX_WORKERS:
        raise PluginError(f"--workers {n}: give 1 to {MAX_WORKERS}")
    total = last - first + 1
    if total < n:
        raise PluginError(f"--workers {n}: the {what} {first}-{last} has {total} port(s), fewer than one per "
                          "worker; widen it in the config or use fewer workers")
    size = total // n
    return [(first + k * size, first + (k + 1) * size - 1 if k < n - 1 else last) for k in range(n)]


def lane_modulus(n: int) -> int:
    """How many lanes the ports are dealt into: a power of two (the rules' u32 match masks),
    at least 4 per worker so consecutive ports change worker every few, at most 64."""
    m = 4
    while m < 4 * n and m < 64:
        m *= 2
    return m


class Slices:
    """Every worker's share of the three pools, and who owns a port.

    TCP/UDP ports are dealt in lanes: worker k owns the ports p of both ranges whose
    ``(p >> 1) % M`` falls in its slice of ``0..M-1`` (:func:`nat.ports.in_lane`).  Contiguous
    halves left one worker idle under the commonest load: connect() hands out ports in
    sequence (even ones, step 2), so a VM's burst of new connections all fell in one half
    (measured: 128 SYNs in flight, all in one worker's queue, the other's empty; two
    workers 0.98x one).  ICMP identifiers keep contiguous slices (echo requests go to
    worker 0)."""

    def __init__(self, cfg, n: int) -> None:
        if not 1 <= n <= MAX_WORKERS:
            raise PluginError(f"--workers {n}: give 1 to {MAX_WORKERS}")
        self.n = n
        self.modulus = lane_modulus(n)
        m = self.modulus
        self.lanes = [(k * m // n, (k + 1) * m // n - 1) for k in range(n)]  # (sizes differ by one at most)
        self.high, self.low = cfg.port_range, cfg.low_port_range
        self.icmp = partition(cfg.icmp_id_range[0], cfg.icmp_id_range[1], n, "ICMP identifier range")
        for what, (a, b) in (("port range", self.high), ("low port range", self.low)):
            for k in range(n):
                if not lane_count(a, b, self.lane(k)):
                    raise PluginError(f"--workers {n}: the {what} {a}-{b} has no port for worker {k} (the ports "
                                      f"are dealt in turns of {2 * self.modulus}); widen it in the config or use "
                                      "fewer workers")

    def lane(self, k: int) -> tuple[int, int, int]:
        return (self.modulus, *self.lanes[k])

    def config(self, cfg, k: int):
        """Worker k's config: the same in every respect but its share of the pools."""
        return cfg.with_(port_lane=self.lane(k), icmp_id_range=self.icmp[k])

    def ports(self, k: int) -> list[tuple[int, int, tuple[int, int, int]]]:
        """Worker k's TCP/UDP ports as the rules dispatch them: (first, last, lane) of each range."""
        return [(*self.high, self.lane(k)), (*self.low, self.lane(k))]

    def owner(self, proto: int, port: int) -> int:
        """The worker a packet to (outside) or from (inside) ``port`` reaches; 0 when no share has it."""
        if proto == 1:
            for k, (a, b) in enumerate(self.icmp):
                if a <= port <= b:
                    return k
            return 0
        if self.high[0] <= port <= self.high[1] or self.low[0] <= port <= self.low[1]:
            v = (port >> 1) & (self.modulus - 1)
            for k, (a, b) in enumerate(self.lanes):
                if a <= v <= b:
                    return k
        return 0


class WorkerOffloader(Offloader):
    """A worker's :class:`Offloader`: it sees (adopts at a restart, reconciles, flushes) only the
    kernel entries whose mapping is its own, so no worker deletes another's entries."""

    slices: Slices
    index = 0

    def mine(self, e) -> bool:
        o, r = e.original, e.reply
        ext = self.engine.external_ip
        if r.dst == ext and o.dst != ext:  # outbound: the port it was given (the kernel path's: its own)
            port = o.sport if e.mark & KERNEL else r.dport
        elif o.dst == ext:  # inbound: the port it came to; hairpin: the port its source was given
            port = r.dport if self.engine.is_internal(o.src) and r.dst == ext else o.dport
        else:  # not the NAT's: worker 0 judges it (removes it, as a single plugin would)
            return self.index == 0
        return self.slices.owner(o.proto, port) == self.index

    def learn(self, e, now: float):
        """A kernel path flow of this worker's lane (the owner of its source port, whose sets let
        it through: by its reply port, a port the kernel chose in another lane, it would be that
        lane's worker's, which knows nothing of the endpoint)."""
        if self.slices.owner(e.original.proto, e.original.sport) != self.index:
            return None
        return super().learn(e, now)

    def fetch(self, now: float):
        gen, entries = super().fetch(now)
        return gen, [e for e in entries if self.mine(e)]

    def flush(self, family: int = 4) -> int:
        """Remove this worker's entries (the address changed): one by one, not the whole mark,
        or one worker's flush would remove entries another just made on the new address
        (IPv4 only: workers refuse NAT66)."""
        n = len(self.flows)
        for k in list(self.flows):
            f = FlowTuple.from_key(k)
            self.ct.delete(Tuple(f.proto, f.src, f.dst, f.sport, f.dport))
        self.flows.clear()
        self._born.clear()
        self._replaced.clear()
        return n


class NoRules:
    """A worker's rules: none (the parent's :class:`Rules` are the only ones)."""

    kernel: list = []  # (empty, never filled: the kernel path's rules are the parent's too)

    def check_owners(self) -> None:
        pass

    def install(self, external_ip) -> None:
        pass

    def remove_stale(self) -> int:
        return 0

    def set_address(self, external_ip) -> None:
        pass

    def set_address6(self, external_ip6) -> None:
        pass

    def remove(self) -> int:
        return 0


def worker_path(path: str, k: int) -> str:
    """Worker k's status or snapshot file beside the parent's (``nat-q3.status.json`` ->
    ``nat-q3.w1.status.json``)."""
    head, dot, tail = path.partition(".")
    return f"{head}.w{k}.{tail}" if dot else f"{path}.w{k}"


def merge_status(parts: list[dict | None], pids: list[int], base: dict) -> dict:
    """One status from the workers' (the layout of :meth:`Plugin._status_data`): counters,
    pools, flows and queued packets summed; per-worker lines under ``workers``."""
    eng: dict[str, Any] = {"external_ip": None, "flows": 0, "mappings_live": 0, "inbound_mappings": 0, "pools": {},
           "counters": {}, "parse_errors": {}}
    off: dict[str, Any] | None = None
    st: dict[str, Any] = dict(base, engine=eng, offload=None, queued_packets=0, internal_errors=0, mappings=[],
                              workers=[])
    for k, p in enumerate(parts):
        row = {"index": k, "pid": pids[k] if k < len(pids) else 0, "queue": base["queue"] + k, "running": False}
        st["workers"].append(row)
        if p is None:
            continue
        e = p["engine"]
        row.update(running=p.get("pid") == row["pid"], ports=p.get("ports"), lane=p.get("lane"),
                   queued_packets=p.get("queued_packets", 0),
                   translated_out=e["counters"].get("translated_out", 0),
                   translated_in=e["counters"].get("translated_in", 0), flows=e["flows"],
                   offloaded=(p.get("offload") or {}).get("flows", 0),
                   kernel_flows=(p.get("offload") or {}).get("kernel_flows", 0))
        eng["external_ip"] = eng["external_ip"] or e.get("external_ip")
        eng["inbound_mappings"] = max(eng["inbound_mappings"], e.get("inbound_mappings", 0))
        for key in ("flows", "mappings_live"):
            eng[key] += e.get(key, 0)
        for proto, u in e.get("pools", {}).items():
            t = eng["pools"].setdefault(proto, {"used": 0, "size": 0})
            t["used"] += u["used"]
            t["size"] += u["size"]
        for key in ("counters", "parse_errors"):
            for name, v in e.get(key, {}).items():
                eng[key][name] = eng[key].get(name, 0) + v
        if p.get("offload") is not None:
            off = off or {}
            for name, v in p["offload"].items():
                off[name] = off.get(name, 0) + v
        st["queued_packets"] += p.get("queued_packets", 0)
        st["internal_errors"] += p.get("internal_errors", 0)
        st["mappings"] += p.get("mappings", [])[:200 - len(st["mappings"])]
        st.setdefault("queue_client", p.get("queue_client"))
    st["offload"] = off
    return st


def supervisor(cfg, config_path: str, external: str, internal: list[str], queue: int, status_path: str,
               snapshot_path: str, clock, wall, n: int, restore: bool = True, drop_log=None,
               kernel_path: bool = True) -> "Supervisor":
    """The parent of ``n`` workers on queues ``queue .. queue+n-1`` (offload only: the per-packet
    path's hairpin halves and ICMP would need one engine for both); with ``kernel_path`` each
    worker's lane has one (:mod:`.kernelpath`), in sets the parent makes."""
    from .interfaces import iface_networks, resolve_internal
    from .offload import MARK
    from .plugin import Plugin
    from .rules import Rules

    iface_networks(external)  # raises PluginError naming it if there is no such interface
    nets = resolve_internal(internal, cfg)
    if not nets:
        raise PluginError("no internal network: give --internal IFACE|CIDR or [host] ip/netmask in the config")
    slices = Slices(cfg, n)
    kernels = [KernelPath(queue + k, cfg.port_range) for k in range(n)] if kernel_path else None
    rules = Rules(external, queue, nets, cfg.hairpinning, MARK, workers=[slices.ports(k) for k in range(n)],
                  kernel=kernels)

    def make(k: int, kernel_owner: int | None):
        p = Plugin(cfg, config_path, external, internal, queue + k, worker_path(status_path, k),
                   worker_path(snapshot_path, k), clock, wall, restore=restore, offload=True, worker=(k, slices),
                   kernel_owner=kernel_owner)
        p.drop_log = drop_log
        return p
    return Supervisor(make, n, rules, external, queue, status_path, wall)


class _Prefix(logging.Filter):
    """A worker's log lines say which worker."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.prefix + str(record.msg)
        return True


def _die_with_parent() -> None:
    """This process gets SIGTERM when its parent dies (a ``kill -9`` of the parent leaves no worker)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Supervisor:
    """The parent of ``--workers N``: rules, the kernel path's sets, signals, worker lives, the
    merged status.

    ``make_worker(k, kernel_owner)`` builds worker k's :class:`Plugin` (in the child, after the
    fork; ``kernel_owner``: the pid whose sets it fills, None: no kernel path)."""

    #: called once every worker is up (sd_notify READY=1), and when stopping
    on_ready: Callable[[], None] | None = None
    on_stopping: Callable[[], None] | None = None

    def __init__(self, make_worker, n: int, rules, external: str, queue: int, status_path: str, wall) -> None:
        self.make_worker = make_worker
        self.n = n
        self.rules = rules
        self.external = external
        self.queue = queue
        self.status_path = status_path
        self.wall = wall
        self.pids: list[int] = []
        self._stop = False
        self._reload = False
        self._snap_now = False
        self._address: str | None = None
        self._parent = os.getpid()

    # -- the merged status --------------------------------------------------------
    def _parts(self) -> list[dict | None]:
        out = []
        for k in range(self.n):
            try:
                with open(worker_path(self.status_path, k), encoding="utf-8") as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                out.append(None)
        return out

    def live_status(self) -> dict:
        """The status as `roam nat status` shows it, merged from the workers' files."""
        return merge_status(self._parts(), self.pids, {
            "pid": os.getpid(), "queue": self.queue, "external_iface": self.external, "written_at": self.wall(),
            "internal": list(self.rules.internal), "snapshot": None, "workers_count": self.n})

    def _all_up(self) -> bool:
        parts = self._parts()
        return all(p is not None and p.get("pid") == pid for p, pid in zip(parts, self.pids))

    # -- workers -----------------------------------------------------------------
    def _spawn(self, k: int, keep: list) -> int:
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:  # the child: never back into the parent's stack (its finally removes the rules)
            log.addFilter(_Prefix(f"worker {k}: "))
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            for s in keep:
                s.close()
            os.setpgid(0, 0)  # a signal to the parent's group is the parent's to pass on, in its order
            _die_with_parent()
            if os.getppid() != self._parent or self._stop:  # (a stop passed on before the handlers reset)
                os._exit(0)
            code = self.make_worker(k, self._parent if self.rules.kernel else None).run()
        except PluginError as exc:
            log.error("%s", exc)
        except BaseException:
            log.exception("failed")
        finally:
            logging.shutdown()
            os._exit(code)

    def _reap(self) -> str | None:
        """Why a worker ended (None: all alive)."""
        for k, pid in enumerate(self.pids):
            if not pid:
                continue
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, 0
            if got:
                self.pids[k] = 0
                how = (f"was killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                       else f"exited with status {os.waitstatus_to_exitcode(status)}")
                return f"worker {k} (pid {pid}, queue {self.queue + k}) {how}"
        return None

    def _signal_all(self, sig: int) -> None:
        for pid in self.pids:
            if pid:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    def _stop_workers(self) -> None:
        """SIGTERM to each, waited for (bounded), SIGKILL to the ones that hang."""
        import time

        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_WAIT
        while any(self.pids) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for k, pid in enumerate(self.pids):
            if pid:
                log.error("worker %d (pid %d) did not stop: killed", k, pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                self.pids[k] = 0

    # -- the loop ------------------------------------------------------------------
    def run(self) -> int:
        """Rules once, then the workers; until a signal (0) or a worker's death (1).  The
        handlers come before any rule, as in :meth:`Plugin.run`; removal comes before the
        workers stop, so no packet is queued to a queue nobody listens to any more."""
        import time

        sigs = Signals({signal.SIGTERM: self._sig_stop, signal.SIGINT: self._sig_stop, signal.SIGHUP: self._sig_reload,
                        signal.SIGCHLD: self._sig_child, signal.SIGUSR1: self._sig_snapshot})
        ours = False
        addrs: AddressEvents | None = None
        failed: str | None = None
        self._parent = os.getpid()
        kernels: list[KernelPath] = []  # the kernel path's sets made (the workers fill them)
        try:
            sigs.install()
            self.rules.check_owners()
            ours = True
            self._address = iface_address(self.external)
            for kp in self.rules.kernel:  # before the rules that read them (empty: closed till filled)
                try:
                    kernels.append(kp)
                    kp.make()
                except Exception as exc:  # (a kernel without IP sets) every new flow is queued
                    log.warning("kernel path off: its IP sets cannot be made (%s)", exc)
                    self.rules.kernel = []
                    for made in kernels:  # (what was made before: no rule will read it)
                        made.destroy()
                    kernels.clear()
                    break
            self.rules.install(self._address)
            stale = self.rules.remove_stale()
            if stale:
                log.warning("replaced %d stale rules of an earlier run on queue %d", stale, self.queue)
            if kernels:
                remove_stale_sets()
            for k in range(self.n):
                if self._stop:
                    break
                self.pids.append(self._spawn(k, [sigs.rsig, sigs.wsig]))
            addrs = AddressEvents()
            waits: list[Any] = [sigs.rsig, addrs]
            ready = False
            next_status = 0.0
            while not self._stop:
                try:
                    r, _, _ = select.select(waits, [], [], _STATUS_EVERY / 4)
                except InterruptedError:
                    continue
                if sigs.rsig in r:
                    sigs.drain()
                failed = self._reap()
                if failed:
                    log.error("%s: stopping every worker and removing the rules", failed)
                    break
                if self._reload:
                    self._reload = False
                    self._signal_all(signal.SIGHUP)
                if self._snap_now:
                    self._snap_now = False
                    self._signal_all(signal.SIGUSR1)
                if addrs in r:
                    addrs.drain()
                    ip = iface_address(self.external)
                    if ip != self._address:
                        self._address = ip
                        self.rules.set_address(ip)
                now = time.monotonic()
                if now >= next_status:
                    next_status = now + _STATUS_EVERY
                    if not ready and self._all_up():
                        ready = True
                        log.info("roam nat running: %d workers on queues %d-%d", self.n, self.queue,
                                 self.queue + self.n - 1)
                        if self.on_ready is not None:
                            self.on_ready()
                    if ready:
                        snapshot.save(self.status_path, self.live_status())
            log.info("roam nat stopping")
            return 1 if failed else 0
        finally:
            removed = remove_rules(self.rules, ours, self.on_stopping)  # before the workers stop
            self._stop_workers()
            for kp in kernels:  # (their rules gone, their workers too)
                kp.destroy()
            if ours:
                try:
                    snapshot.save(self.status_path, self.live_status())
                except OSError as exc:
                    log.error("final status not written: %s", exc)
                log.info("removed %d rules", removed)
            if addrs is not None:
                addrs.close()
            sigs.restore()

    def _sig_stop(self, signum, frame) -> None:
        self._stop = True

    def _sig_reload(self, signum, frame) -> None:
        self._reload = True

    def _sig_snapshot(self, signum, frame) -> None:
        self._snap_now = True

    def _sig_child(self, signum, frame) -> None:
        pass  # the wakeup fd is the point: the loop reaps
