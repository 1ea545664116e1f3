"""Whether this process may do what a command needs, asked before it starts (one clear line, not
a traceback from deep inside iptables or pyroute2).

Capabilities, not the uid: root in a container or under a unit with a narrow
``CapabilityBoundingSet=`` is uid 0 yet cannot make a namespace ("mount rundir failed") or
touch iptables ("Permission denied (you must be root)").
"""
from __future__ import annotations

#: capability numbers (linux/capability.h) of what roam's commands need
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_SYS_ADMIN: "CAP_SYS_ADMIN"}


def effective() -> int | None:
    """This process's effective capability set (None when /proc cannot tell)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return None


def missing(*caps: int) -> list[str]:
    """The names of ``caps`` this process lacks (none when it cannot be told: the command then tries)."""
    have = effective()
    if have is None:
        return []
    return [_NAMES.get(c, f"capability {c}") for c in caps if not have >> c & 1]


def refusal(why: str, *caps: int) -> str | None:
    """One line saying root is needed and for what, or None when the capabilities are there."""
    lacking = missing(*caps)
    if not lacking:
        return None
    return f"needs root ({why}; this process lacks {' and '.join(lacking)}); run it with sudo"


def lab_refusal(why: str = "it builds network namespaces") -> str | None:
    """Why the namespace lab cannot be built by this process, or None: namespaces need CAP_SYS_ADMIN
    (pyroute2 mounts their run directory), their links CAP_NET_ADMIN, and the lab's files uid 0."""
    import os

    found = refusal(why, CAP_SYS_ADMIN, CAP_NET_ADMIN)
    if found is None and os.geteuid() != 0:
        found = f"needs root ({why}); run it with sudo"
    return found
