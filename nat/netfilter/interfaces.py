"""The kernel's view of the NAT's interfaces, over rtnetlink (pyroute2).

Queries (an interface's networks, primary address, index; the internal networks from
``--internal``) and :class:`AddressEvents`, a netlink socket that wakes the plugin's
main loop on any address or link change.
"""
from __future__ import annotations

import ipaddress
import socket

from ..config import NatConfig
from . import PluginError


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


#: IFA_F_* flags that make an IPv6 address unusable as the NAT's source (RFC 4862): a tentative
#: (DAD running), duplicate or deprecated one
_IFA6_UNUSABLE = 0x40 | 0x08 | 0x20
_IFA6_TEMPORARY = 0x01  # an RFC 4941 privacy address: rotated daily, never the NAT's


def iface_address6(ifname: str, keep: str | None = None) -> str | None:
    """A usable global IPv6 address of ``ifname`` (None if it has none): NAT66's external address,
    as MASQUERADE picks a source (link-local ones never cross the NAT).  ``keep``, the one in use,
    stays while it is usable: a new address (a second prefix) must not end every flow; privacy
    (temporary) addresses are never picked."""
    from pyroute2 import IPRoute

    usable: list[str] = []
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return None
        for a in ipr.get_addr(index=idx[0], family=socket.AF_INET6):
            flags = a.get_attr("IFA_FLAGS") or a["flags"]
            if a["scope"] == 0 and not flags & (_IFA6_UNUSABLE | _IFA6_TEMPORARY):
                usable.append(str(ipaddress.IPv6Address(a.get_attr("IFA_ADDRESS"))))
    if keep is not None and keep in usable:
        return keep
    return usable[0] if usable else None


def iface_index(ifname: str) -> int:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        return idx[0] if idx else 0


def resolve_internal(specs: list[str], cfg: NatConfig) -> tuple[str, ...]:
    """``--internal`` values (CIDRs or interfaces) as CIDRs; none given: the config's."""
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


class RouteCache:
    """Which interface the kernel routes a destination out of, cached (cleared on any address,
    link or route event): offload decides a new flow before routing, and only flows that leave
    the external interface are NATed, as MASQUERADE ``-o EXT`` would."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self._ipr = IPRoute()
        self._oif: dict[bytes, int] = {}

    def oif(self, dst: bytes) -> int:
        o = self._oif.get(dst)
        if o is None:
            try:
                fam = socket.AF_INET if len(dst) == 4 else socket.AF_INET6
                r = self._ipr.route("get", dst=socket.inet_ntop(fam, dst), family=fam)
                o = r[0].get_attr("RTA_OIF") or 0 if r else 0
            except Exception:  # no route: nothing leaves through the external interface
                o = 0
            if len(self._oif) > 65536:
                self._oif.clear()
            self._oif[dst] = o
        return o

    def clear(self) -> None:
        self._oif.clear()

    def close(self) -> None:
        self._ipr.close()


class AddressEvents:
    """A netlink socket subscribed to address, link and route changes (IPv6 too with ``v6``; select()-able)."""

    def __init__(self, v6: bool = False) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import (RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR,
                                           RTMGRP_IPV6_ROUTE, RTMGRP_LINK)

        self._ipr = IPRoute()
        try:
            self._ipr.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_LINK | RTMGRP_IPV4_ROUTE
                           | ((RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE) if v6 else 0))
        except BaseException:
            self._ipr.close()
            raise

    def fileno(self) -> int:
        return self._ipr.fileno()

    def drain(self) -> None:
        """Read what woke us (the caller looks the address up again, whatever it was)."""
        self._ipr.get()

    def close(self) -> None:
        self._ipr.close()
