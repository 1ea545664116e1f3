"""`roam tunnel`'s option checks: a bad value is the option's own error (argparse's `error:`, exit
status 2), before any key is read or any device or socket made, never a traceback or a daemon that
misbehaves later (a nan keepalive spinning the loop, a broadcast --mac refused after the TAP exists).
"""
from __future__ import annotations

import argparse
import functools

#: The TAP MTUs an end can carry: the kernel's least (68, IPv4's) up to the largest whose frame (+ 14
#: header + 8 for two VLAN tags) still fits one sealed message with offload's virtio-net header
#: (``tunnel.wire.OFFLOAD_MAX_FRAME`` - 22; not imported: start-up time, see tools/cli.py).
MTU_MIN, MTU_MAX = 68, 65443
#: The underlay MTUs: IPv4's least reassembly size (``tunnel.segment.MIN_SEGMENT_SIZE`` + 28) up to
#: an IP packet's largest.
PATH_MTU_MIN, PATH_MTU_MAX = 576, 65535


def endpoint(text: str) -> str:
    """argparse type: ``IP:PORT`` or ``[IPv6]:PORT``, checked here so that a typo is the option's error."""
    from tunnel.io.transport import parse_endpoint
    try:
        parse_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (an IP address and a port; [IPv6]:PORT)") from None
    return text


def ifname(text: str) -> str:
    """argparse type: a name the kernel takes for an interface (1..15 bytes, no '/', ':' or blank)."""
    if not 0 < len(text.encode()) < 16 or text in (".", "..") or any(c in "/:" or c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"an interface name of 1 to 15 bytes without '/', ':' or blanks, "
                                         f"got {text!r}")
    return text


def conflicts(args) -> str | None:
    """What the options say together that argparse cannot check one by one (None: nothing)."""
    if not args.plaintext and not args.key_file:
        return "the following arguments are required: --key-file (unless --plaintext; make one with " \
            "`roam tunnel genkey --out FILE`)"
    dead, keep = getattr(args, "dead_after", None), getattr(args, "keepalive", None)
    if dead is not None and keep is not None and dead <= keep:
        return (f"argument --dead-after: must be more than --keepalive ({keep:g}), got {dead:g}: else the "
                "session is declared dead between two keepalives")
    return None


def checked(parser: argparse.ArgumentParser, run):
    """``run``, once :func:`conflicts` found nothing; else the parser's own error (usage, exit 2)."""
    @functools.wraps(run)
    def func(args) -> int:
        why = conflicts(args)
        if why:
            parser.error(why)
        return run(args)
    return func


def parse_unicast_mac(text: str) -> bytes:
    """A VM's MAC: six octets, unicast (the host end refuses a multicast one, after its TAP exists) and
    not all zero (no station's)."""
    from tunnel.wire import is_multicast, parse_mac
    try:
        mac = parse_mac(text)
    except ValueError:  # its own words, or int()'s for a digit that is not hex
        raise ValueError(f"not a MAC address: {text!r}") from None
    if is_multicast(mac) or mac == bytes(6):
        raise ValueError(f"not a VM's unicast MAC ({'all zero' if mac == bytes(6) else 'multicast or broadcast'}): "
                         f"{text!r}")
    return mac


def unicast_mac(text: str) -> str:
    """argparse type: :func:`parse_unicast_mac`'s check, as the option's error."""
    try:
        parse_unicast_mac(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
