"""The netfilter plugin: NFQUEUE in, the NAT engine, verdicts out; rules, addresses, signals.

A thin driver around :class:`nat.engine.NatEngine`.  Where the packets come from:

* ``raw PREROUTING -i EXT -j NFQUEUE --queue-num N`` — inbound, translated before
  routing and before the kernel's conntrack (priority -200) looks at them;
* ``mangle POSTROUTING -o EXT -j NFQUEUE --queue-num N`` — outbound, translated after
  the kernel's conntrack attached its entry (made with the internal addresses).

So the kernel's own tracker sees only internal-side tuples in both directions and stays
consistent, and no kernel NAT is involved.  No ``--queue-bypass``: with no listener the
kernel drops queued packets, so nothing leaves untranslated while the rules exist
(running, crashed or killed).  Rules carry the comment ``roam-nat qN pid P``; a start
replaces rules of a dead owner and refuses to run beside a live one.

The clock comes from the caller (``clock``), as DESIGN.md wants nothing below tools/
to read it.

Packets are handled in a thread of their own, blocked in the binding's C receive loop
(one recv syscall a packet, no select round per wake-up); the main thread waits for
address events, signals and the housekeeping timer.  One lock serialises the two around
the engine.
"""
from __future__ import annotations

import errno
import ipaddress

import logging
import os
import re
import select
import signal
import socket
import struct
import threading

from .config import ConfigError, NatConfig, load
from .engine import Action, NatEngine, Reason, Side, Stage
from . import snapshot
from .nfqueue import NF_ACCEPT, NF_DROP, NfQueue, fill_l4_checksum

log = logging.getLogger("roam.nat")

HOOK_PREROUTING = 0
HOOK_POSTROUTING = 4
_HOUSEKEEPING = 1.0  # seconds between expiry/status/snapshot rounds
_BURST = 32  # --gso: packets taken from the queue before their verdicts go out together
_RECV_TIMEOUT = 0.2  # seconds the idle packet thread waits in recv before looking for a stop
_ACCEPT, _NOT_OURS = Action.ACCEPT, Reason.NOT_OURS
_INTERNAL, _EXTERNAL = Side.INTERNAL, Side.EXTERNAL
_FULL, _HAIRPIN_DST, _HAIRPIN_SRC = Stage.FULL, Stage.HAIRPIN_DST, Stage.HAIRPIN_SRC


class PluginError(RuntimeError):
    """The plugin cannot start (message says why and what to do)."""


# ----------------------------------------------------------------------------- addresses
def iface_networks(ifname: str) -> list[str]:
    """The IPv4 networks on ``ifname`` in this namespace (CIDRs)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise PluginError(f"no interface {ifname!r} in this network namespace")
        nets = []
        for a in ipr.get_addr(index=idx[0], family=socket.AF_INET):
            nets.append(str(ipaddress.IPv4Network(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}", strict=False)))
        return nets


def iface_address(ifname: str) -> str | None:
    """The primary IPv4 address of ``ifname`` (None if it has none)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return None
        for a in ipr.get_addr(index=idx[0], family=socket.AF_INET):
            if not a["flags"] & 0x01:  # IFA_F_SECONDARY
                return a.get_attr("IFA_ADDRESS")
    return None


def iface_index(ifname: str) -> int:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        return idx[0] if idx else 0


def resolve_internal(specs: list[str], cfg: NatConfig) -> tuple[str, ...]:
    nets: list[str] = []
    for spec in specs:
        try:
            nets.append(str(ipaddress.IPv4Network(spec, strict=False)))
        except ValueError:
            found = iface_networks(spec)
            if not found:
                raise PluginError(f"--internal {spec}: the interface has no IPv4 address to take the network from")
            nets.extend(found)
    return tuple(nets) or cfg.internal


# ----------------------------------------------------------------------------- rules
class Rules:
    """The plugin's iptables rules (legacy xtables via python-iptables).

    Always: ``raw PREROUTING -i EXT`` and ``mangle POSTROUTING -o EXT`` to NFQUEUE N.
    With hairpinning: ``raw PREROUTING -s INTERNAL -d EXT_ADDR ! -i EXT`` (first half,
    destination; replaced when the address changes) and ``mangle POSTROUTING -s INTERNAL
    ! -o EXT`` (second half, source) to the same queue.
    """

    def __init__(self, external: str, queue: int, internal: tuple[str, ...] = (), hairpin: bool = False) -> None:
        self.external = external
        self.queue = queue
        self.internal = internal
        self.hairpin = hairpin
        self.tag = f"roam-nat q{queue} "
        self.mine = f"{self.tag}pid {os.getpid()}"

    def _chain(self, tname: str, cname: str):
        import iptc

        t = iptc.Table(iptc.Table.RAW if tname == "raw" else iptc.Table.MANGLE)
        t.refresh()
        return iptc.Chain(t, cname)

    def _comments(self, rule) -> str | None:
        for m in rule.matches:
            if m.name == "comment" and (m.comment or "").startswith(self.tag):
                return m.comment
        return None

    def _each(self):
        for tname, cname in (("raw", "PREROUTING"), ("mangle", "POSTROUTING")):
            chain = self._chain(tname, cname)
            for rule in list(chain.rules):
                c = self._comments(rule)
                if c is not None:
                    yield tname, cname, chain, rule, c

    def remove_stale(self) -> int:
        """Delete rules left by a dead run on this queue; refuse if their owner lives."""
        n = 0
        for tname, cname, chain, rule, c in list(self._each()):
            pid = _pid_of(c)
            if pid and pid != os.getpid() and _is_roam(pid):
                raise PluginError(f"queue {self.queue} is in use by roam nat pid {pid} "
                                  f"(rule '{c}' in {tname} {cname}); stop it or use another --queue")
            chain.delete_rule(rule)
            n += 1
        return n

    def _add(self, tname: str, cname: str, comment: str, *, in_if: str | None = None, out_if: str | None = None,
             src: str | None = None, dst: str | None = None) -> None:
        import iptc

        rule = iptc.Rule()
        if in_if:
            rule.in_interface = in_if
        if out_if:
            rule.out_interface = out_if
        if src:
            rule.src = src
        if dst:
            rule.dst = dst
        m = rule.create_match("comment")
        m.comment = comment
        target = rule.create_target("NFQUEUE")
        target.queue_num = str(self.queue)  # no --queue-bypass: fail-closed
        self._chain(tname, cname).insert_rule(rule)

    def install(self, external_ip: str | None) -> None:
        self._add("raw", "PREROUTING", self.mine, in_if=self.external)
        self._add("mangle", "POSTROUTING", self.mine, out_if=self.external)
        if self.hairpin:
            for net in self.internal:
                self._add("mangle", "POSTROUTING", self.mine + " hairpin-src", out_if="!" + self.external, src=net)
            self.set_address(external_ip)

    def set_address(self, external_ip: str | None) -> None:
        """Point the hairpin rules at the external address (none while there is no address)."""
        if not self.hairpin:
            return
        for _, _, chain, rule, c in list(self._each()):
            if c.endswith("hairpin-dst"):
                chain.delete_rule(rule)
        if external_ip:
            for net in self.internal:
                self._add("raw", "PREROUTING", self.mine + " hairpin-dst", in_if="!" + self.external, src=net,
                          dst=external_ip)

    def remove(self) -> int:
        """Delete our rules (by comment: ours and, harmlessly, stale ones of this queue)."""
        n = 0
        for _, _, chain, rule, _ in list(self._each()):
            chain.delete_rule(rule)
            n += 1
        return n


def _pid_of(comment: str) -> int:
    m = re.search(r"pid (\d+)", comment)
    return int(m.group(1)) if m else 0


def _is_roam(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        return b"roam" in cmd or b"tools.cli" in cmd
    except OSError:
        return False


# ----------------------------------------------------------------------------- the plugin
class Plugin:
    def __init__(self, cfg: NatConfig, config_path: str, external: str, internal: list[str], queue: int,
                 status_path: str, snapshot_path: str, clock, wall, restore: bool = True, gso: bool = False) -> None:
        self.config_path = config_path
        self.external = external
        self.internal_specs = internal
        self.queue = queue
        self.status_path = status_path
        self.snapshot_path = snapshot_path
        self.clock = clock
        self.wall = wall
        self.restore = restore
        # --gso: our own netlink client (nat.nfqueue) with NFQA_CFG_F_GSO, packets up to 64 KiB
        self.gso = gso
        self.largest_packet = 0
        self.gso_packets = 0
        self.csum_filled = 0
        iface_networks(external)  # raises PluginError naming it if there is no such interface
        nets = resolve_internal(internal, cfg)
        if not nets:
            raise PluginError("no internal network: give --internal IFACE|CIDR or [host] ip/netmask in the config")
        self.cfg = cfg.with_(internal=nets)
        self.engine = NatEngine(self.cfg, iface_address(external))
        self._process = self.engine.process
        self.rules = Rules(external, queue, self.cfg.internal, self.cfg.hairpinning)
        self.ext_index = 0
        self._stop = False
        self._reload = False
        self._snap_mark = None
        self.bugs = 0
        # The packet thread and the main loop (addresses, signals, housekeeping) share the
        # engine: each packet and each control step holds this lock.
        self._lock = threading.Lock()
        self._stop_packets = False
        self._packet_error: OSError | None = None

    # -- packets -----------------------------------------------------------------
    def _on_packet(self, p) -> None:
        # per packet (in the packet thread): no enum attribute lookups; one copy each way
        with self._lock:
            self._verdict(p)

    def _verdict(self, p) -> None:
        try:
            if p.hook == HOOK_PREROUTING:
                if p.indev == self.ext_index:
                    v = self._process(p.get_payload(), _EXTERNAL, self.clock(), _FULL)
                else:
                    v = self._process(p.get_payload(), _INTERNAL, self.clock(), _HAIRPIN_DST)
            elif p.outdev == self.ext_index:
                v = self._process(p.get_payload(), _INTERNAL, self.clock(), _FULL)
            else:
                v = self._process(p.get_payload(), _INTERNAL, self.clock(), _HAIRPIN_SRC)
            action, data, reason = v
            if action is _ACCEPT:
                if reason is not _NOT_OURS:
                    p.set_payload(data)
                p.accept()
            else:
                p.drop()
        except Exception:  # a bug of ours, not the peer's: counted apart, packet dropped
            self.bugs += 1
            if self.bugs & (self.bugs - 1) == 0:
                log.exception("internal error on a packet (%d so far); packet dropped", self.bugs)
            try:
                p.drop()
            except Exception:
                pass

    def _gso_verdict(self, q, p) -> None:
        """One packet from our own queue client (--gso): like _verdict, plus checksums."""
        data = p.payload
        n = len(data)
        if n > self.largest_packet:
            self.largest_packet = n
        info = p.skbinfo
        if info & 2:  # NFQA_SKB_GSO
            self.gso_packets += 1
        try:
            if p.hook == HOOK_PREROUTING:
                side, stage = (_EXTERNAL, _FULL) if p.indev == self.ext_index else (_INTERNAL, _HAIRPIN_DST)
            else:
                stage = _FULL if p.outdev == self.ext_index else _HAIRPIN_SRC
                side = _INTERNAL
            action, out, reason = self._process(data, side, self.clock(), stage)
            if action is _ACCEPT:
                if reason is _NOT_OURS:
                    q.verdict(p.id, NF_ACCEPT)
                    return
                if info & 3 and not (info & 2 and p.hook != HOOK_PREROUTING and out[9] == 6):
                    # CSUMNOTREADY: the field held the pseudo-header sum only; GSO: the field
                    # may be a merged packet's first segment's.  A verdict with a payload makes
                    # the kernel take the packet as CHECKSUM_NONE, and in PREROUTING (after raw)
                    # its conntrack verifies the whole super-packet's checksum before
                    # segmentation would recompute it: so write a complete one.  GSO TCP in
                    # POSTROUTING is left alone: nothing checks it before tcp4_gso_segment
                    # recomputes every segment's checksum (ip_summed is not PARTIAL).
                    out = bytearray(out)
                    fill_l4_checksum(out)
                    self.csum_filled += 1
                q.verdict(p.id, NF_ACCEPT, out)
            else:
                q.verdict(p.id, NF_DROP)
        except OSError:
            raise
        except Exception:  # a bug of ours, not the peer's: counted apart, packet dropped
            self.bugs += 1
            if self.bugs & (self.bugs - 1) == 0:
                log.exception("internal error on a packet (%d so far); packet dropped", self.bugs)
            q.verdict(p.id, NF_DROP)

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
                    try:
                        for p in batch:
                            self._gso_verdict(q, p)
                    finally:
                        q.flush()
                    self.engine.counters["queue_overruns"] = q.overruns
            except OSError as exc:
                self._packet_error = exc
                self._stop = True
                try:
                    wsig.send(b"x")
                except OSError:
                    pass
                return

    # -- control -----------------------------------------------------------------
    def _refresh_address(self) -> None:
        ip = iface_address(self.external)
        self.ext_index = iface_index(self.external)
        cur = self.engine.status()["external_ip"]
        if ip != cur:
            killed = self.engine.set_external_address(ip, self.clock())
            self.rules.set_address(ip)
            log.warning("external address of %s: %s -> %s (%d flows dropped)", self.external, cur, ip, killed)

    def _do_reload(self) -> None:
        try:
            cfg = load(self.config_path)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return
        for w in cfg.warnings:
            log.warning("%s", w)
        for note in self.engine.reload(cfg.with_(internal=self.cfg.internal), self.clock()):
            log.info("%s", note)

    def _write_status(self) -> None:
        st = {"pid": os.getpid(), "queue": self.queue, "external_iface": self.external,
              "internal": list(self.cfg.internal), "written_at": self.wall(), "internal_errors": self.bugs,
              "snapshot": self.snapshot_path, "engine": self.engine.status(),
              "queue_client": {"gso": self.gso, "largest_packet": self.largest_packet,
                               "gso_packets": self.gso_packets, "checksums_filled": self.csum_filled},
              "mappings": self.engine.mapping_rows(200)}
        snapshot.save(self.status_path, st)

    def _write_snapshot(self, force: bool = False) -> None:
        """Save mappings and flows, unless no packet went through since the last save."""
        c = self.engine.counters
        mark = (c["translated_out"], c["translated_in"], c["address_changes"], len(self.engine.table))
        if not force and mark == self._snap_mark:
            return
        snapshot.save(self.snapshot_path, self.engine.snapshot(self.clock()))
        self._snap_mark = mark

    def run(self) -> int:
        from netfilterqueue import NetfilterQueue
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_LINK

        os.makedirs(os.path.dirname(self.status_path) or ".", exist_ok=True)
        if self.restore:
            try:
                snap = snapshot.load(self.snapshot_path)
                if snap is not None:
                    n = self.engine.restore(snap, self.clock())
                    log.info("restored %d flows from %s", n, self.snapshot_path)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("snapshot %s not used: %s", self.snapshot_path, exc)
        stale = self.rules.remove_stale()
        if stale:
            log.warning("replaced %d stale rules of an earlier run on queue %d", stale, self.queue)
        try:
            if self.gso:
                nfq = NfQueue(self.queue, gso=True)
                nfq.batch = True
            else:
                nfq = NetfilterQueue()
                nfq.bind(self.queue, self._on_packet, max_len=4096)
        except OSError as exc:
            raise PluginError(f"cannot bind NFQUEUE {self.queue}: {exc}") from None
        ipr = IPRoute()
        rsig, wsig = socket.socketpair()
        rsig.setblocking(False)
        wsig.setblocking(False)
        old_handlers = {}
        packets = None
        nfsock = None
        try:
            ipr.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_LINK)
            self._refresh_address()
            self.rules.install(self.engine.status()["external_ip"])
            # The packet thread blocks in the binding's own recv loop (one syscall a packet, no
            # select round per wake-up); the receive timeout lets it see a stop when idle.
            nfsock = nfq.sock if self.gso else socket.fromfd(nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
            nfsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                              struct.pack("ll", 0, int(_RECV_TIMEOUT * 1e6)))
            signal.set_wakeup_fd(wsig.fileno())
            for sig, fn in ((signal.SIGTERM, self._sig_stop), (signal.SIGINT, self._sig_stop),
                            (signal.SIGHUP, self._sig_reload)):
                old_handlers[sig] = signal.signal(sig, fn)
            self._refresh_address()
            log.info("roam nat running: queue %d, external %s (%s), internal %s", self.queue, self.external,
                        self.engine.status()["external_ip"], ", ".join(self.cfg.internal))
            self._write_status()
            packets = threading.Thread(target=self._gso_loop if self.gso else self._packet_loop, args=(nfq, wsig),
                                       name="roam-nat-packets",
                                       daemon=True)
            packets.start()
            next_house = self.clock() + _HOUSEKEEPING
            while not self._stop:
                timeout = max(0.0, next_house - self.clock())
                try:
                    ready, _, _ = select.select([ipr, rsig], [], [], timeout)
                except InterruptedError:
                    continue
                if self._packet_error is not None:
                    raise self._packet_error
                if ipr in ready:
                    ipr.get()  # any address or link event: look again
                    with self._lock:
                        self._refresh_address()
                if rsig in ready:
                    try:
                        rsig.recv(64)
                    except BlockingIOError:
                        pass
                if self._reload:
                    self._reload = False
                    with self._lock:
                        self._do_reload()
                now = self.clock()
                if now >= next_house:
                    next_house = now + _HOUSEKEEPING
                    with self._lock:
                        self.engine.expire(now)
                        self._write_snapshot()
                        self._write_status()
            log.info("roam nat stopping")
            return 0
        finally:
            signal.set_wakeup_fd(-1)
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            removed = 0
            try:
                removed = self.rules.remove()
            except Exception as exc:  # still unbind and save
                log.error("removing rules failed: %s", exc)
            self._stop_packets = True
            if packets is not None:
                packets.join(10 * _RECV_TIMEOUT + 5)  # what is queued still gets its verdict
                if packets.is_alive():
                    log.error("packet thread did not stop")
            try:
                nfq.close() if self.gso else nfq.unbind()
            except Exception:
                pass
            if nfsock is not None and not self.gso:
                nfsock.close()
            ipr.close()
            rsig.close()
            wsig.close()
            try:
                self._write_snapshot(force=True)
                self._write_status()
            except OSError as exc:
                log.error("final snapshot/status not written: %s", exc)
            log.info("removed %d rules", removed)

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
                self._packet_error = exc
                self._stop = True
                try:
                    wsig.send(b"x")  # wake the main loop, which raises it
                except OSError:
                    pass
                return

    def _sig_stop(self, signum, frame) -> None:
        self._stop = True

    def _sig_reload(self, signum, frame) -> None:
        self._reload = True


