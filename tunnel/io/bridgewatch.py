"""Which VMs a host agent's bridge holds: ports joining and leaving it, seen through rtnetlink.

A host agent serves every VM on one bridge (its own TAP is one port of it).  A VM
arrives when its TAP (QEMU's, or a lab's veth) joins the bridge, and leaves when
it leaves it or is deleted (the migration's source after the move, a VM shut
down).  The bridge's forwarding database says which MACs each port learned
(``RTM_NEWNEIGH``, family ``AF_BRIDGE``): when a port leaves, the MACs last learned
behind it are the VMs that left, and the agent forgets them at once (the proxy
then drops them, or gives them to the host that named them), rather than letting
them age out while the VM runs elsewhere.  Its permanent entries are the host's
own MACs (the bridge's, its ports'): frames from those are the host's, never a
VM's, and the agent learns none of them.

One rtnetlink socket subscribed to link and neighbour changes, ``select()``-able
(:meth:`BridgeWatch.fileno`); :meth:`BridgeWatch.read` turns what it reads into
:class:`PortJoined` / :class:`PortLeft` values for the driver.  Bounded: at most
:data:`MAX_MACS` MACs remembered (the oldest go first).
"""
from __future__ import annotations

import errno
import logging
import socket
from collections import OrderedDict
from typing import NamedTuple

AF_BRIDGE = getattr(socket, "AF_BRIDGE", 7)
NUD_PERMANENT = 0x80  # the bridge's own and its ports' own addresses: not a VM's
MAX_MACS = 4096
RTMGRP_LINK, RTMGRP_NEIGH = 0x1, 0x4
READS = 64  # datagrams per wake-up at most


class PortJoined(NamedTuple):
    index: int  # type: ignore[assignment]  # a field named like tuple.index (the kernel's name for it)
    name: str


class PortLeft(NamedTuple):
    index: int  # type: ignore[assignment]  # a field named like tuple.index (the kernel's name for it)
    name: str
    macs: tuple[bytes, ...]  # learned behind it last: the VMs that left with it


class BridgeWatch:
    """Ports of ``bridge`` but ``own`` (the agent's TAP), and the MACs learned behind each."""

    def __init__(self, bridge: str, own: str | None = None) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl

        if not logging.getLogger("pyroute2").level:  # importing it reset its level: its chatter stays out
            logging.getLogger("pyroute2").setLevel(logging.WARNING)
        self.bridge = bridge
        self.own = own
        self.ports: dict[int, str] = {}
        self.macs: OrderedDict[bytes, int] = OrderedDict()  # MAC -> port it was last learned behind
        #: The host's own MACs on the bridge (the bridge's, its ports', our TAP's): never a VM's.
        self.local: set[bytes] = set()
        self.resyncs = 0
        # Our own socket, read until empty at each wake-up: pyroute2's reader buffers what it read
        # ahead, and a select() on its descriptor would then sleep on messages already taken.
        self._marshal = MarshalRtnl()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                   socket.NETLINK_ROUTE)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._sock.bind((0, RTMGRP_LINK | RTMGRP_NEIGH))  # subscribed before the dump: nothing falls between
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=bridge)
                if not found:
                    raise OSError(f"bridge {bridge!r} not found")
                self.index = found[0]
                self._dump(ipr)
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> list[PortJoined | PortLeft]:
        """What the messages waiting say (call when readable; bounded: the rest waits for the next call)."""
        out: list[PortJoined | PortLeft] = []
        for _ in range(READS):
            try:
                data = self._sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                out += self._resync()  # the kernel dropped messages for us: look again
                continue
            for m in self._marshal.parse(data):
                got = self._message(m)
                if got is not None:
                    out.append(got)
        return out

    def close(self) -> None:
        self._sock.close()

    # -- internals --------------------------------------------------------------------------

    def _message(self, m) -> PortJoined | PortLeft | None:
        ev = m.get("event")
        if ev == "RTM_NEWLINK":
            return self._link(m)
        if ev == "RTM_DELLINK":
            return self._left(m["index"])
        if ev == "RTM_NEWNEIGH":
            self._neigh(m)  # learns behind which port a MAC is: no change to report
        return None

    def _dump(self, ipr) -> list[PortJoined | PortLeft]:
        out = [got for link in ipr.get_links() if (got := self._link(link)) is not None]
        for n in ipr.get_neighbours(family=AF_BRIDGE):
            self._neigh(n)
        return out

    def _resync(self) -> list[PortJoined | PortLeft]:
        """After lost messages: the ports as they are now (those gone have left)."""
        from pyroute2 import IPRoute
        self.resyncs += 1
        with IPRoute() as ipr:
            present = {link["index"] for link in ipr.get_links() if link.get_attr("IFLA_MASTER") == self.index}
            out = [got for i in list(self.ports) if i not in present and (got := self._left(i)) is not None]
            return out + self._dump(ipr)

    def _link(self, m) -> PortJoined | PortLeft | None:
        index, name, master = m["index"], m.get_attr("IFLA_IFNAME"), m.get_attr("IFLA_MASTER")
        if index == self.index or (name is not None and name == self.own):
            return None
        if master == self.index:
            if index not in self.ports:
                self.ports[index] = name or str(index)
                return PortJoined(index, self.ports[index])
            return None
        return self._left(index)

    def _left(self, index: int) -> PortLeft | None:
        name = self.ports.pop(index, None)
        if name is None:
            return None
        gone = tuple(mac for mac, port in self.macs.items() if port == index)
        for mac in gone:
            del self.macs[mac]
        return PortLeft(index, name, gone)

    def _neigh(self, m) -> None:
        if m["family"] != AF_BRIDGE:
            return None
        lladdr = m.get_attr("NDA_LLADDR")
        if not lladdr:
            return None
        mac = bytes.fromhex(lladdr.replace(":", ""))
        if len(mac) != 6 or mac[0] & 1:
            return None
        if m["state"] & NUD_PERMANENT:
            if m["ifindex"] == self.index or m.get_attr("NDA_MASTER") == self.index:
                if len(self.local) < MAX_MACS:
                    self.local.add(mac)
            return None
        if m["ifindex"] not in self.ports:
            return None
        self.macs.pop(mac, None)
        self.macs[mac] = m["ifindex"]
        while len(self.macs) > MAX_MACS:
            self.macs.popitem(last=False)
        return None
