"""The plugin's iptables rules (legacy xtables, through python-iptables).

Where the packets come from:

* ``raw PREROUTING -i EXT -j NFQUEUE --queue-num N`` -- inbound, translated before
  routing and before the kernel's conntrack (priority -200) looks at them;
* ``mangle POSTROUTING -o EXT -j NFQUEUE --queue-num N`` -- outbound, translated after
  the kernel's conntrack attached its entry (made with the internal addresses).

So the kernel's own tracker sees only internal-side tuples in both directions and stays
consistent, and no kernel NAT is involved.  That is ``--no-offload``; with offload (the
default) the kernel's entries carry the NAT and only flows without one are queued
(:meth:`Rules._install_offload`).  No ``--queue-bypass``: with no listener the
kernel drops queued packets, so nothing leaves untranslated while the rules exist
(running, crashed or killed).  Rules carry the comment ``roam-nat qN pid P``; a start
refuses to run beside a live owner (of this queue, or of any queue on this external
interface), inserts its own rules ahead of a dead owner's and only then deletes those:
there is no instant without a rule, so a restart after ``kill -9`` leaks nothing.
With ``--workers N`` each queue rule becomes one per worker and port range (``tcp``/``udp``
port-range and ``u32`` lane matches: the internal source port from the inside, the
destination port from outside, to queue N+k) ahead of the one to worker 0's queue;
:mod:`.workers` says why not ``--queue-balance``, and why lanes.

NAT66 (``nat66``) adds the same rules in ip6tables (``Table6``, the same queue, comments
ending in ``v6``, ``pre-ct6``, ``hairpin6-src``, ``hairpin6-dst``): offloaded or per packet as
IPv4's, fail-closed as theirs, and removed with them.
"""
from __future__ import annotations

import ipaddress
import os
import re
from typing import Any

from . import PluginError

_ANY = "roam-nat q"  # the start of every roam nat rule's comment, whatever its queue
#: a connection's first packet: NEW alone is any packet before a reply, and a later one of a connection
#: whose NAT was set up already (as none: made while roam was stopped) would be marked and leave untranslated
_FIRST = ("conntrack", {"ctstate": "NEW", "ctstatus": "!CONFIRMED"})


def lane_u32(by: str, lane: tuple[int, int, int]) -> str:
    """The ``u32`` match of a port lane (:func:`nat.ports.in_lane`): from the IPv4 header
    length to the transport header, whose first word is sport << 16 | dport, then
    ``(port >> 1) & (modulus - 1)`` in ``lo..hi``.  (The port-range match beside it has
    already refused a non-first fragment, whose "header" would be payload.)"""
    m, lo, hi = lane
    return f"0>>22&0x3C@0>>{17 if by == 'sport' else 1}&{hex(m - 1)}={lo}:{hi}"


class Rules:
    """The plugin's iptables rules (legacy xtables via python-iptables).

    Always: ``raw PREROUTING -i EXT`` and ``mangle POSTROUTING -o EXT`` to NFQUEUE N.
    With hairpinning: ``raw PREROUTING -s INTERNAL -d EXT_ADDR ! -i EXT`` (first half,
    destination; replaced when the address changes) and ``mangle POSTROUTING -s INTERNAL
    ! -o EXT`` (second half, source) to the same queue.
    """

    def __init__(self, external: str, queue: int, internal: tuple[str, ...] = (), hairpin: bool = False,
                 offload_mark: int = 0, workers: list | None = None, internal6: tuple[str, ...] = (),
                 nat66: bool = False, kernel: list | None = None) -> None:
        self.external = external
        #: the kernel path's sets (:class:`.kernelpath.KernelPath`): the one process's, or with workers
        #: worker k's for its lane; empty: no kernel path
        self.kernel = list(kernel or ())
        self.internal6 = internal6
        self.nat66 = nat66
        #: --workers N: each worker's TCP/UDP ports ([(first, last, lane), ...] per worker; worker k
        #: listens on queue ``queue + k``); None: one queue (:mod:`.workers` says why by port)
        self.workers = workers
        self.offload_mark = offload_mark  # 0: the per-packet rules (--no-offload)
        self.queue = queue
        self.internal = internal
        self.hairpin = hairpin
        self.tag = f"roam-nat q{queue} "
        self.mine = f"{self.tag}pid {os.getpid()}"

    def _chain(self, tname: str, cname: str, v6: bool = False):
        import iptc

        if v6:
            t = iptc.Table6({"raw": iptc.Table6.RAW, "nat": iptc.Table6.NAT}.get(tname, iptc.Table6.MANGLE))
        else:
            t = iptc.Table({"raw": iptc.Table.RAW, "nat": iptc.Table.NAT}.get(tname, iptc.Table.MANGLE))
        t.refresh()
        return iptc.Chain(t, cname)

    def _comments(self, rule, prefix: str | None = None) -> str | None:
        prefix = self.tag if prefix is None else prefix
        for m in rule.matches:
            if m.name == "comment" and (m.comment or "").startswith(prefix):
                return m.comment
        return None

    def _each(self, prefix: str | None = None):
        """(table, chain name, chain, rule, comment) of every rule whose comment starts with
        ``prefix`` (default: this queue's tag; ``_ANY``: every roam nat's); ip6tables' too with NAT66,
        or when its tables exist (a dead NAT66 run's rules go, even if this run has NAT66 off)."""
        for v6 in (False, True) if self.nat66 or _ip6tables_loaded() else (False,):
            yield from self._each_of(prefix, v6)

    def _each_of(self, prefix: str | None, v6: bool):
        chains = [("raw", "PREROUTING"), ("mangle", "PREROUTING"), ("mangle", "POSTROUTING")]
        if not v6 and _loaded("nat"):  # (looking would load it: its hooks change nothing, but --no-offload has none)
            chains.append(("nat", "POSTROUTING"))
        for tname, cname in chains:
            chain = self._chain(tname, cname, v6)
            for rule in list(chain.rules):
                c = self._comments(rule, prefix)
                if c is not None:
                    yield tname, cname, chain, rule, c

    def _mine(self, comment: str) -> bool:
        return comment == self.mine or comment.startswith(self.mine + " ")

    def _on_our_interface(self, rule) -> bool:
        return any((getattr(rule, a) or "").lstrip("!") == self.external for a in ("in_interface", "out_interface"))

    def _concerns_us(self, rule, comment: str) -> bool:
        """A rule of this queue, or of another queue NATing the same external interface."""
        return comment.startswith(self.tag) or self._on_our_interface(rule)

    def check_owners(self) -> None:
        """Refuse to start beside a live roam nat on this queue or on this external interface
        (two NATs on one interface would each drop what the other translated)."""
        for tname, cname, _, rule, c in self._each(_ANY):
            pid = _pid_of(c)
            if not pid or pid == os.getpid() or not _is_roam(pid) or not self._concerns_us(rule, c):
                continue
            if c.startswith(self.tag):
                raise PluginError(f"queue {self.queue} is in use by roam nat pid {pid} "
                                  f"(rule '{c}' in {tname} {cname}); stop it or use another --queue")
            raise PluginError(f"interface {self.external} is already NATed by roam nat pid {pid} on another queue "
                              f"(rule '{c}' in {tname} {cname}); stop it first")

    def remove_stale(self) -> int:
        """Delete rules left by dead runs on this queue or this interface; refuse if their owner lives.

        Called once ours are in (inserted first, so they match first): at no instant is there
        no rule queueing the interface's packets -- a restart after ``kill -9`` leaks nothing."""
        def stale(rule, c: str) -> bool:
            if self._mine(c) or not self._concerns_us(rule, c):
                return False
            pid = _pid_of(c)
            if pid and pid != os.getpid() and _is_roam(pid):
                raise PluginError(f"queue {self.queue} is in use by roam nat pid {pid} "
                                  f"(rule '{c}'); stop it or use another --queue")
            return True
        return self._delete_where(stale, _ANY)

    def _delete_where(self, pred, prefix: str | None = None) -> int:
        """Delete every rule ``pred(rule, comment)`` picks, one at a time: a commit leaves the
        rules listed before it unusable for the next delete (python-iptables), so list again."""
        n = 0
        while True:
            for _, _, chain, rule, c in self._each(prefix):
                if pred(rule, c):
                    chain.delete_rule(rule)
                    n += 1
                    break
            else:
                return n

    def _add(self, tname: str, cname: str, comment: str, *, in_if: str | None = None, out_if: str | None = None,
             src: str | None = None, dst: str | None = None, proto: str | None = None, matches=(),
             mark_target: int = 0, queue: int | None = None, v6: bool = False, target=None) -> None:
        """Insert one rule at the top: the comment comes first among the matches (so the
        listing reads ``... -m comment --comment "roam-nat ..." ...``); ``matches`` are
        (name, {option: value}); the target is NFQUEUE N, MARK --or-mark ``mark_target``, or
        ``target`` (name, {option: value})."""
        import iptc

        rule = iptc.Rule6() if v6 else iptc.Rule()
        if proto:
            rule.protocol = proto
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
        for name, opts in matches:
            m = rule.create_match(name)
            for k, v in opts.items():
                setattr(m, k, v)
        if target is not None:
            t = rule.create_target(target[0])
            for k, v in target[1].items():
                setattr(t, k, v)
        elif mark_target:
            t = rule.create_target("MARK")
            t.or_mark = hex(mark_target)
        else:
            t = rule.create_target("NFQUEUE")
            t.queue_num = str(self.queue if queue is None else queue)  # no --queue-bypass: fail-closed
        self._chain(tname, cname, v6).insert_rule(rule)

    def _queue(self, tname: str, cname: str, comment: str, by: str, protos=("tcp", "udp"), matches=(),
               **kw) -> None:
        """One rule to the queue; with workers, one per worker's port range and lane (``by``:
        ``sport`` for packets from the inside, ``dport`` from outside) ahead of the one to
        worker 0 (the rest)."""
        matches = list(matches)
        self._add(tname, cname, comment, matches=matches, **kw)
        for k, ranges in enumerate(self.workers or ()):
            if k == 0:
                continue  # worker 0's ports: the rule above
            for proto in protos:
                for a, b, lane in ranges:
                    self._add(tname, cname, comment, proto=proto, queue=self.queue + k,
                              matches=matches + [(proto, {by: f"{a}:{b}"}), ("u32", {"u32": lane_u32(by, lane)})],
                              **kw)

    def install(self, external_ip: str | None) -> None:
        """Every rule (NAT66's hairpin ones come with :meth:`set_address6`)."""
        if self.nat66:
            self._install_offload(None, v6=True) if self.offload_mark else self._install6()
        if self.offload_mark:
            return self._install_offload(external_ip)
        self._add("raw", "PREROUTING", self.mine, in_if=self.external)
        self._add("mangle", "POSTROUTING", self.mine, out_if=self.external)
        if self.hairpin:
            for net in self.internal:
                self._add("mangle", "POSTROUTING", self.mine + " hairpin-src", out_if="!" + self.external, src=net)
            self.set_address(external_ip)

    def _unmarked(self) -> list:
        """The two post-conntrack conditions under which a packet reaches the queue: no
        connection (invalid, untracked), or one without roam's mark (no offloaded entry).
        (A connmark match alone would let a packet without a connection through.)"""
        m = hex(self.offload_mark)
        return [[("conntrack", {"ctstate": "INVALID,UNTRACKED"})], [("connmark", {"mark": f"!{m}/{m}"})]]

    def _install_offload(self, external_ip: str | None, v6: bool = False) -> None:
        """Offload: the kernel's conntrack entries carry the decided flows' NAT.

        * ``raw PREROUTING`` (before conntrack): a new TCP flow's SYN and an echo request
          -- inbound on EXT, hairpin to the external address, outbound from the internal
          networks to non-local, non-internal destinations -- get the packet mark and are
          queued: the entry is made before conntrack looks, which then finds it (the SYN
          itself is translated by the kernel; made after, the kernel's own new entry
          would clash with it and TCP would lose the SYN);
        * ``mangle PREROUTING -i EXT`` / hairpin-dst and ``mangle POSTROUTING -o EXT`` /
          hairpin-src (after conntrack): only packets of connections without roam's mark
          (no offloaded entry) or with none: the first packet of other flows, translated
          in user space as with --no-offload, whose entry is made meanwhile.
        No --queue-bypass anywhere: with no plugin, new flows are dropped; offloaded
        flows go on in the kernel.  ``v6``: NAT66's, in ip6tables (their hairpin-dst rules come
        with :meth:`set_address6`)."""
        sfx = " v6" if v6 else ""
        self._chain("nat", "POSTROUTING", v6)  # the nat table's hooks: nf_nat applies the entries' NAT
        mk = self.offload_mark
        pm = [("mark", {"mark": f"!{hex(mk)}/{hex(mk)}"})]
        for cond in self._unmarked():
            self._queue("mangle", "POSTROUTING", self.mine + sfx, "sport", out_if=self.external, matches=cond, v6=v6)
            self._queue("mangle", "PREROUTING", self.mine + sfx, "dport", in_if=self.external, matches=pm + cond,
                        v6=v6)
        marked = [("mark", {"mark": f"{hex(mk)}/{hex(mk)}"})]
        pre = self.mine + (" pre-ct6" if v6 else " pre-ct")
        if not self.workers:
            self._add("raw", "PREROUTING", pre, matches=marked, v6=v6)
        else:  # SYNs and echo requests: to the worker of the port (echo requests: worker 0)
            self._queue("raw", "PREROUTING", pre, "sport", ("tcp",), marked, in_if="!" + self.external)
            self._queue("raw", "PREROUTING", pre, "dport", ("tcp",), marked, in_if=self.external)
        syn = [("tcp", {"tcp_flags": ["FIN,SYN,RST,ACK", "SYN"]})]
        echo = [("icmp6", {"icmpv6_type": "echo-request"})] if v6 else [("icmp", {"icmp_type": "echo-request"})]
        for proto, m in (("tcp", syn), ("icmpv6" if v6 else "icmp", echo)):
            self._add("raw", "PREROUTING", pre, in_if=self.external, proto=proto, matches=m, mark_target=mk, v6=v6)
            for net in self.internal6 if v6 else self.internal:
                self._add("raw", "PREROUTING", pre, in_if="!" + self.external, src=net, dst="!" + net, proto=proto,
                          matches=m + [("addrtype", {"dst_type": "!LOCAL"})], mark_target=mk, v6=v6)
        if self.hairpin:
            for net in self.internal6 if v6 else self.internal:
                for cond in self._unmarked():
                    self._queue("mangle", "POSTROUTING", self.mine + (" hairpin6-src" if v6 else " hairpin-src"),
                                "sport", out_if="!" + self.external, src=net, matches=cond, v6=v6)
            if not v6:
                self.set_address(external_ip)
        if self.kernel and not v6:
            self._install_kernel_path()

    def _install_kernel_path(self) -> None:
        """The kernel path's rules (:mod:`.kernelpath` says when a flow takes it), ahead of the
        others.  TCP: in ``raw`` a SYN that qualifies gets the packet mark KERNEL and is ACCEPTed
        (past roam's pre-conntrack queueing), and its new connection the connmark KERNEL|MARK in
        ``mangle POSTROUTING``; UDP, queued after conntrack anyway: there, a new connection's
        first packet that qualifies (no rule on later packets: ``--ctstate NEW`` first).  In ``nat
        POSTROUTING`` a KERNEL connection's port and endpoint go into the sets, then MASQUERADE
        within the port range (fail-closed: no address, no packet).  With workers each lane's
        rules read (and add to) its own worker's sets."""
        from .kernelpath import KERNEL

        kps, tag = self.kernel, self.mine + " kernel"
        lo, hi = kps[0].port_range
        both = hex(KERNEL | self.offload_mark)
        km = [("mark", {"mark": f"{hex(KERNEL)}/{hex(KERNEL)}"})]
        ckm = [("connmark", {"mark": f"{hex(KERNEL)}/{hex(KERNEL)}"})]
        for proto in ("udp", "tcp"):
            self._add("nat", "POSTROUTING", tag, out_if=self.external, proto=proto, matches=ckm,
                      target=("MASQUERADE", {"to_ports": f"{lo}-{hi}"}))
        self._add("raw", "PREROUTING", tag, proto="tcp", matches=km, target=("ACCEPT", {}))
        self._add("mangle", "POSTROUTING", tag, out_if=self.external, proto="tcp",
                  matches=[_FIRST] + km, target=("CONNMARK", {"or_mark": both}))
        for k, kp in enumerate(kps):
            self._kernel_lane(kp, tag, both, ckm, self.workers[k][0][2] if self.workers else None)

    def _kernel_lane(self, kp, tag: str, both: str, ckm: list, lane: tuple[int, int, int] | None) -> None:
        """The kernel path's rules for the flows of one set of sets: the one process's, or a
        worker's (``lane``: the source ports its rules match, beside the range)."""
        from .kernelpath import KERNEL

        lo, hi = kp.port_range
        in_lane = [("u32", {"u32": lane_u32("sport", lane)})] if lane else []
        for proto in ("udp", "tcp"):
            held = kp.held[6 if proto == "tcp" else 17]
            mine = ckm + ([(proto, {"sport": f"{lo}:{hi}"})] + in_lane if lane else [])
            self._add("nat", "POSTROUTING", tag, out_if=self.external, proto=proto, matches=mine,
                      target=("SET", {"add_set": [kp.keep, "src,src"]}))
            self._add("nat", "POSTROUTING", tag, out_if=self.external, proto=proto, matches=mine,
                      target=("SET", {"add_set": [held, "src"]}))
        for net in self.internal:
            for proto in ("udp", "tcp"):
                first: dict[str, Any] = {"sport": f"{lo}:{hi}"}
                if proto == "tcp":
                    first["tcp_flags"] = ["FIN,SYN,RST,ACK", "SYN"]
                held = kp.held[6 if proto == "tcp" else 17]
                base = [(proto, first)] + in_lane + [
                    ("set", {"match_set": [kp.alive, "src"]}), ("set", {"match_set": ["!", kp.moved, "src,src"]})]
                for which in (("set", {"match_set": ["!", held, "src"]}), ("set", {"match_set": [kp.keep, "src,src"]})):
                    if proto == "tcp":
                        self._add("raw", "PREROUTING", tag, in_if="!" + self.external, src=net, dst="!" + net,
                                  proto=proto, matches=[("addrtype", {"dst_type": "!LOCAL"})] + base + [which],
                                  mark_target=KERNEL)
                    else:
                        self._add("mangle", "POSTROUTING", tag, out_if=self.external, src=net, proto=proto,
                                  matches=[_FIRST, ("addrtype", {"src_type": "!LOCAL"})]
                                  + base + [which], target=("CONNMARK", {"or_mark": both}))

    def set_address(self, external_ip: str | None) -> None:
        """Point the hairpin rules at the external address (none while there is no address)."""
        if not self.hairpin:
            return
        if self.offload_mark:
            return self._set_address_offload(external_ip)
        # the new ones first, then the old ones (by their other address): never none in between
        have = {rule.dst.split("/")[0] for _, _, _, rule, _ in self._each(self.mine + " hairpin-dst")}
        if external_ip and external_ip not in have:
            for net in self.internal:
                self._add("raw", "PREROUTING", self.mine + " hairpin-dst", in_if="!" + self.external, src=net,
                          dst=external_ip)
        self._delete_where(lambda rule, c: c.endswith("hairpin-dst") and rule.dst.split("/")[0] != external_ip)

    def _set_address_offload(self, external_ip: str | None) -> None:
        mk = self.offload_mark
        have = {rule.dst.split("/")[0] for _, _, _, rule, _ in self._each(self.mine + " hairpin-dst")}
        if external_ip and external_ip not in have:
            for net in self.internal:
                for cond in self._unmarked():
                    self._queue("mangle", "PREROUTING", self.mine + " hairpin-dst", "sport",
                                in_if="!" + self.external, src=net, dst=external_ip,
                                matches=[("mark", {"mark": f"!{hex(mk)}/{hex(mk)}"})] + cond)
                self._add("raw", "PREROUTING", self.mine + " hairpin-dst", in_if="!" + self.external, src=net,
                          dst=external_ip, proto="tcp", matches=[("tcp", {"tcp_flags": ["FIN,SYN,RST,ACK", "SYN"]})],
                          mark_target=mk)
        self._delete_where(lambda rule, c: c.endswith("hairpin-dst") and rule.dst.split("/")[0] != external_ip)

    def _install6(self) -> None:
        """NAT66's rules: IPv6's per-packet path (as ``--no-offload``'s for IPv4), the same queue."""
        self._add("raw", "PREROUTING", self.mine + " v6", in_if=self.external, v6=True)
        self._add("mangle", "POSTROUTING", self.mine + " v6", out_if=self.external, v6=True)
        if self.hairpin:
            for net in self.internal6:
                self._add("mangle", "POSTROUTING", self.mine + " hairpin6-src", out_if="!" + self.external, src=net,
                          v6=True)

    def set_address6(self, external_ip6: str | None) -> None:
        """Point NAT66's hairpin rule at the external IPv6 address (the new one in before the old
        one goes, as :meth:`set_address`)."""
        if not (self.nat66 and self.hairpin):
            return
        want = ipaddress.IPv6Address(external_ip6) if external_ip6 else None

        def dst(rule) -> ipaddress.IPv6Address:
            return ipaddress.IPv6Address(rule.dst.split("/")[0])
        have = {dst(rule) for _, _, _, rule, _ in self._each_of(self.mine + " hairpin6-dst", True)}
        mk, tag = self.offload_mark, self.mine + " hairpin6-dst"
        if want is not None and want not in have:
            for net in self.internal6:
                if not mk:
                    self._add("raw", "PREROUTING", tag, in_if="!" + self.external, src=net, dst=str(want), v6=True)
                    continue
                for cond in self._unmarked():  # as _set_address_offload's
                    self._add("mangle", "PREROUTING", tag, in_if="!" + self.external, src=net, dst=str(want),
                              matches=[("mark", {"mark": f"!{hex(mk)}/{hex(mk)}"})] + cond, v6=True)
                self._add("raw", "PREROUTING", tag, in_if="!" + self.external, src=net, dst=str(want), proto="tcp",
                          matches=[("tcp", {"tcp_flags": ["FIN,SYN,RST,ACK", "SYN"]})], mark_target=mk, v6=True)
        self._delete_where(lambda rule, c: c.endswith("hairpin6-dst") and dst(rule) != want)

    def remove(self) -> int:
        """Delete our rules (by comment: ours and, harmlessly, stale ones of this queue)."""
        return self._delete_where(lambda rule, c: True)


def _ip6tables_loaded() -> bool:
    """Whether this namespace has ip6tables tables (none: no rule of ours can be there, and
    looking would load them)."""
    try:
        with open("/proc/net/ip6_tables_names") as f:
            return bool(f.read().split())
    except OSError:
        return False


def _loaded(table: str) -> bool:
    """Whether this namespace has the iptables table ``table``."""
    try:
        with open("/proc/net/ip_tables_names") as f:
            return table in f.read().split()
    except OSError:
        return False


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
