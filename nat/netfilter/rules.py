"""The plugin's iptables rules (legacy xtables, through python-iptables).

Where the packets come from:

* ``raw PREROUTING -i EXT -j NFQUEUE --queue-num N`` -- inbound, translated before
  routing and before the kernel's conntrack (priority -200) looks at them;
* ``mangle POSTROUTING -o EXT -j NFQUEUE --queue-num N`` -- outbound, translated after
  the kernel's conntrack attached its entry (made with the internal addresses).

So the kernel's own tracker sees only internal-side tuples in both directions and stays
consistent, and no kernel NAT is involved.  No ``--queue-bypass``: with no listener the
kernel drops queued packets, so nothing leaves untranslated while the rules exist
(running, crashed or killed).  Rules carry the comment ``roam-nat qN pid P``; a start
replaces rules of a dead owner and refuses to run beside a live one.
"""
from __future__ import annotations

import os
import re

from . import PluginError


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
