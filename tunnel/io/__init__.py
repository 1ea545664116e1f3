"""The tunnel's I/O: TAP devices, UDP/TCP transports, and the host end's and the proxy's loops.

The only part of :mod:`tunnel` that touches the kernel or the clock; the engines never
import it.

* :mod:`tunnel.io.tap`       TAP devices (``/dev/net/tun`` and the interface ioctls)
* :mod:`tunnel.io.transport` UDP socket options, endpoints, one TCP connection's queue
* :mod:`tunnel.io.loop`      the selector loop, the one answer helper, the status file
* :mod:`tunnel.io.host`      :class:`HostDriver` (the host agent)
* :mod:`tunnel.io.bridgewatch` the agent's bridge: ports joining and leaving it (rtnetlink)
* :mod:`tunnel.io.control`   the agent's control socket (``roam tunnel attach|detach``)
* :mod:`tunnel.io.proxy`     :class:`ProxyDriver`
"""
from .host import HostDriver
from .loop import Driver
from .proxy import ProxyDriver
from .transport import parse_endpoint

__all__ = ["Driver", "HostDriver", "ProxyDriver", "parse_endpoint"]
