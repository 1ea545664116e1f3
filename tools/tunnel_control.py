"""`roam tunnel attach|detach|macs`: tell a running host agent which VMs come and go.

    roam tunnel attach --mac MAC [--mac MAC]... [--control PATH | --status-dir DIR]
    roam tunnel detach --mac MAC [--mac MAC]... [--control PATH | --status-dir DIR]
    roam tunnel macs [--control PATH | --status-dir DIR]

For orchestration hooks (libvirt's ``/etc/libvirt/hooks/qemu``: ``attach`` on the
destination when the guest is prepared there, ``detach`` on the source when it is
released).  Neither is needed for a VM that speaks: the agent learns a VM from its
first frame and forgets it when its TAP leaves the bridge.  ``attach`` is a claim:
the proxy moves the VM's traffic at once only if the VM speaks nowhere else
(else at its first frame here); ``detach`` moves it away at once.
"""
from __future__ import annotations

import os
import sys

from .tunnel_options import parse_unicast_mac

DEFAULT_STATUS_DIR = "/run/roam/tunnel"  # also the default of `roam tunnel host|proxy|status --status-dir`
CONTROL_NAME = "host.sock"


def add_agent_options(host_parser) -> None:
    """The agent's options on ``roam tunnel host`` (both ears on by default)."""
    host_parser.add_argument("--control", metavar="PATH",
                             help=f"the control socket for `roam tunnel attach|detach` (default {CONTROL_NAME} in "
                             "--status-dir; mode 600)")
    host_parser.add_argument("--no-control", action="store_true", help="no control socket")
    host_parser.add_argument("--no-watch-bridge", action="store_true",
                             help="do not watch --bridge's ports (by default a VM whose TAP leaves the bridge is "
                             "forgotten at once, and the bridge's own MACs are never taken for a VM's)")


def agent_kwargs(args) -> dict:
    """What :func:`add_agent_options` parsed, as :class:`tunnel.io.HostDriver` takes it."""
    control = None if getattr(args, "no_control", False) else (getattr(args, "control", None) or True)
    return {"control": control, "watch": not getattr(args, "no_watch_bridge", False)}


def add_control_commands(subparsers) -> None:
    """Add ``attach``, ``detach`` and ``macs`` to ``roam tunnel``'s sub-commands."""
    for verb, text in (("attach", "tell the running host agent a VM is here (its MAC: a claim)"),
                       ("detach", "tell the running host agent a VM left (the proxy drops its MAC at once)")):
        p = subparsers.add_parser(verb, help=text, description=text + ". " + _WHY)
        p.add_argument("--mac", action="append", required=True, metavar="MAC", help="the VM's MAC (repeatable)")
        _where(p)
        p.set_defaults(func=lambda args, verb=verb: cmd_request(args, verb))
    m = subparsers.add_parser("macs", help="list the VM MACs the running host agent serves",
                              description="List the VM MACs the running host agent serves (given and learned).")
    _where(m)
    m.set_defaults(func=lambda args: cmd_request(args, "list", "macs"))


_WHY = ("Over the agent's control socket (mode 600, host.sock in its --status-dir): for orchestration hooks. "
        "An agent learns VMs from their frames and forgets those whose TAP leaves its bridge by itself.")


def _where(p) -> None:
    p.add_argument("--status-dir", default=DEFAULT_STATUS_DIR,
                   help=f"the agent's --status-dir (default {DEFAULT_STATUS_DIR}); its socket is {CONTROL_NAME} there")
    p.add_argument("--control", metavar="PATH", help="the agent's control socket (default: in --status-dir)")


def control_path(args) -> str:
    return args.control or os.path.join(args.status_dir, CONTROL_NAME)


def cmd_request(args, verb: str, command: str = "") -> int:
    """Send the request(s) (``verb``: the control socket's word); print what the agent serves after
    them.  0: done; 1: no agent or refused; 2: a bad --mac.  Messages name ``command`` (the user's)."""
    from tunnel.io.control import request
    command = command or verb
    path = control_path(args)
    macs = getattr(args, "mac", None) or [""]
    if verb != "list":
        for m in macs:
            try:
                parse_unicast_mac(m)
            except ValueError as exc:
                print(f"roam tunnel {command}: --mac: {exc}", file=sys.stderr)
                return 2
    reply: dict = {}
    for m in macs:
        try:
            reply = request(path, verb, m)
        except OSError as exc:
            print(f"roam tunnel {command}: no host agent answers on {path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if not reply.get("ok"):
            print(f"roam tunnel {command}: the agent refused: {reply.get('error')}", file=sys.stderr)
            return 1
    print("serving: " + (", ".join(reply.get("macs") or []) or "no MAC yet"))
    return 0
