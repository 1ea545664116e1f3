"""Network namespaces for real-kernel tests, the NAT/tunnel labs and `roam lab`.

Every lab rule in DESIGN.md lives here so callers cannot get it wrong:

* Namespaces are named ``<prefix>-<role>-<suffix>``; the suffix (``p<pid>x<random>``)
  is unique per Lab, so concurrent test runs on one machine never collide, and it
  carries the creator's pid so a later run can tell a *stale* namespace (creator
  dead) from one that is merely busy (see :func:`cleanup_stale`).
* Links are made directly inside namespaces (a veth is created in one namespace
  with its peer placed in the other by the same netlink request); nothing ever
  exists, even for a moment, in the root namespace.
* :meth:`Lab.close` is the one cleanup path: it stops every process the lab started
  (and anything else still running inside the lab's own namespaces), then removes
  the namespaces, which takes their veths, bridges, TAPs and iptables rules with
  them.  It is idempotent and also runs at interpreter exit.

Configuration goes through pyroute2 netlink sockets bound to each namespace; only
things netlink cannot do (sysctl, running programs) go through ``ip netns exec``.
"""
from __future__ import annotations

import atexit
import errno
import ipaddress
import os
import re
import secrets
import select
import signal
import socket
import struct
import subprocess
import threading
import time
import weakref
from typing import Iterable, Sequence

from pyroute2 import IPRoute, netns

from conntrack.checksum import internet_checksum

NETNS_DIR = "/run/netns"
_ROLE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
# <prefix>-<role>-p<pid>x<4 hex>; the role may itself contain '-'-free words only.
_NAME = re.compile(r"^(?P<prefix>[a-z0-9]+)-(?P<role>[a-z0-9_]+)-p(?P<pid>\d+)x[0-9a-f]{4}$")

_live_labs: "weakref.WeakSet[Lab]" = weakref.WeakSet()


class LabError(RuntimeError):
    """A lab operation failed; the message names the namespace and the step."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _ns_pids(name: str) -> list[int]:
    """Pids of processes whose network namespace is ``name`` (same inode)."""
    try:
        st = os.stat(os.path.join(NETNS_DIR, name))
    except FileNotFoundError:
        return []
    target = (st.st_dev, st.st_ino)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
            if (ns.st_dev, ns.st_ino) == target:
                pids.append(int(entry))
        except OSError:  # raced with exit, or not ours to see
            continue
    return pids


def _kill_pids(pids: Iterable[int], wait: float) -> None:
    """SIGTERM, then SIGKILL whatever is left after ``wait`` seconds (bounded)."""
    pids = [p for p in pids if p != os.getpid()]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _pid_alive(p)]
        if pids:
            time.sleep(0.05)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


_suffix_lock = threading.Lock()


def _fresh_suffix() -> str:
    """``p<pid>x<4 hex>``, used by no live lab of this process and by no namespace on the machine: 16
    random bits alone met a twin (the campaign makes 150 labs, five at a time, in one process)."""
    taken = {lab.suffix for lab in list(_live_labs)} | {n.rsplit("-", 1)[-1] for n in list_lab_namespaces()}
    for _ in range(256):
        s = f"p{os.getpid()}x{secrets.token_hex(2)}"
        if s not in taken:
            return s
    raise LabError("no free lab suffix: 256 draws were all taken")


def list_lab_namespaces(prefix: str | None = None) -> list[str]:
    """Namespaces that follow our naming (optionally only one prefix)."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    out = []
    for n in sorted(names):
        m = _NAME.match(n)
        if m and (prefix is None or m["prefix"] == prefix):
            out.append(n)
    return out


def remove_namespace(name: str, prefix: str) -> str | None:
    """Stop what runs inside one of our namespaces and delete it; an error sentence or None.

    A name that does not follow our naming with this prefix is refused, never touched.
    """
    m = _NAME.match(name)
    if not m or m["prefix"] != prefix:
        return f"{name}: not a {prefix} lab namespace (refusing to touch it)"
    if name not in list_lab_namespaces(prefix):
        return None
    _kill_pids(_ns_pids(name), wait=2.0)
    try:
        netns.remove(name)
    except OSError as exc:
        return f"{name}: {exc}"
    return None


def cleanup_stale(prefix: str = "roam", min_age: float = 60.0) -> list[str]:
    """Remove namespaces left behind by killed runs; returns the names removed.

    Only names matching ``<prefix>-<role>-p<pid>x<hex>`` are considered, and only
    when the creating pid is gone *and* the namespace is older than ``min_age``
    seconds: a run on this machine that is alive (another helper's tests, a
    running ``roam lab``) is never touched, and the age guard covers a pid that
    lives in another pid namespace and merely looks dead from here.
    """
    removed = []
    now = time.time()
    for name in list_lab_namespaces(prefix):
        m = _NAME.match(name)
        assert m is not None
        if _pid_alive(int(m["pid"])):
            continue
        try:
            age = now - os.stat(os.path.join(NETNS_DIR, name)).st_mtime
        except FileNotFoundError:
            continue
        if age < min_age:
            continue
        _kill_pids(_ns_pids(name), wait=2.0)
        try:
            netns.remove(name)
        except OSError:
            continue
        removed.append(name)
    return removed


def _split_cidr(cidr: str) -> tuple[str, int, int]:
    iface = ipaddress.ip_interface(cidr)
    family = 2 if iface.version == 4 else 10  # AF_INET / AF_INET6
    return str(iface.ip), iface.network.prefixlen, family


class Lab:
    """A set of namespaces and processes that live and die together.

    Use as a context manager (or call :meth:`close`).  Namespace arguments are
    the full names returned by :meth:`ns`.
    """

    def __init__(self, prefix: str = "roam", suffix: str | None = None) -> None:
        if not _ROLE.match(prefix) or "_" in prefix:
            raise ValueError(f"prefix must be lowercase letters/digits, got {prefix!r}")
        self.prefix = prefix
        self.namespaces: list[str] = []
        self._ipr: dict[str, IPRoute] = {}
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        with _suffix_lock:  # drawn and taken at once: labs made in parallel threads never share one
            self.suffix = suffix or _fresh_suffix()
            _live_labs.add(self)

    # -- context manager ---------------------------------------------------
    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- namespaces ----------------------------------------------------------
    def name(self, role: str) -> str:
        return f"{self.prefix}-{role}-{self.suffix}"

    def ns(self, role: str) -> str:
        """Create namespace for ``role`` with ``lo`` up; return its full name."""
        if not _ROLE.match(role):
            raise ValueError(f"role must match {_ROLE.pattern}, got {role!r}")
        name = self.name(role)
        if name in self.namespaces:
            raise LabError(f"namespace {name} already made by this lab")
        try:
            netns.create(name)
        except Exception as exc:
            raise LabError(f"cannot create namespace {name}: {exc}") from exc
        # Record before anything else can fail, so close() removes it.
        self.namespaces.append(name)
        self.up(name, "lo")
        return name

    def ipr(self, ns: str) -> IPRoute:
        """The (cached) netlink socket bound to ``ns``, for anything not wrapped here."""
        self._own(ns)
        if ns not in self._ipr:
            self._ipr[ns] = IPRoute(netns=ns)
        return self._ipr[ns]

    def _own(self, ns: str) -> None:
        if ns not in self.namespaces:
            raise LabError(f"{ns!r} is not a namespace of this lab (refusing to touch it)")

    def index(self, ns: str, ifname: str) -> int:
        idx = self.ipr(ns).link_lookup(ifname=ifname)
        if not idx:
            raise LabError(f"no interface {ifname} in {ns}")
        return idx[0]

    # -- links ---------------------------------------------------------------
    def up(self, ns: str, ifname: str) -> None:
        self.ipr(ns).link("set", index=self.index(ns, ifname), state="up")

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str, mtu: int | None = None) -> tuple[str, str]:
        """A veth pair with ``if_a`` in ``ns_a`` and ``if_b`` in ``ns_b``, both up.

        One netlink request creates the pair in ``ns_a`` and the peer directly in
        ``ns_b`` (IFLA_NET_NS_FD on the peer), so neither end touches the root
        namespace.
        """
        self._own(ns_b)
        peer: dict = {"ifname": if_b}
        if ns_b != ns_a:
            peer["net_ns_fd"] = ns_b
        kw = {"mtu": mtu} if mtu else {}
        try:
            self.ipr(ns_a).link("add", ifname=if_a, kind="veth", peer=peer, **kw)
        except Exception as exc:
            raise LabError(f"veth {ns_a}:{if_a} <-> {ns_b}:{if_b}: {exc}") from exc
        if mtu:
            self.ipr(ns_b).link("set", index=self.index(ns_b, if_b), mtu=mtu)
        self.up(ns_a, if_a)
        self.up(ns_b, if_b)
        return if_a, if_b

    def bridge(self, ns: str, name: str, ports: Sequence[str] = ()) -> str:
        """A bridge in ``ns`` enslaving ``ports`` (interfaces already in ``ns``), up."""
        ipr = self.ipr(ns)
        ipr.link("add", ifname=name, kind="bridge")
        br = self.index(ns, name)
        for port in ports:
            ipr.link("set", index=self.index(ns, port), master=br)
            self.up(ns, port)
        self.up(ns, name)
        return name

    def tap(self, ns: str, name: str) -> str:
        """A persistent TAP device in ``ns`` (a process in ``ns`` attaches by name)."""
        self.ipr(ns).link("add", ifname=name, kind="tuntap", mode="tap")
        self.up(ns, name)
        return name

    def move_link(self, ns_from: str, ifname: str, ns_to: str, up: bool = True) -> None:
        """Move ``ifname`` to ``ns_to`` (VM migration).

        The kernel drops the interface's addresses and routes on the move and
        brings it down; callers re-add addresses in the new namespace.
        """
        self._own(ns_to)
        self.ipr(ns_from).link("set", index=self.index(ns_from, ifname), net_ns_fd=ns_to)
        if up:
            self.up(ns_to, ifname)

    def delete_link(self, ns: str, ifname: str) -> None:
        self.ipr(ns).link("del", index=self.index(ns, ifname))

    # -- addresses and routes ------------------------------------------------
    def addr(self, ns: str, ifname: str, cidr: str) -> None:
        """Add ``cidr`` (``"198.18.0.1/24"`` or IPv6) to ``ifname``.

        IPv6 duplicate address detection is turned off on the interface first:
        a tentative address cannot be bound or used for seconds, which would
        force timing waits on every test.
        """
        ip, plen, family = _split_cidr(cidr)
        if family == 10:
            self.sysctl(ns, f"net.ipv6.conf.{ifname}.accept_dad", "0")
        try:
            self.ipr(ns).addr("add", index=self.index(ns, ifname), address=ip, prefixlen=plen, family=family)
        except Exception as exc:
            raise LabError(f"addr {cidr} on {ns}:{ifname}: {exc}") from exc

    def flush_addr(self, ns: str, ifname: str) -> None:
        self.ipr(ns).flush_addr(index=self.index(ns, ifname))

    def route(self, ns: str, dst: str, gateway: str | None = None, dev: str | None = None) -> None:
        """Route ``dst`` ("default" or a CIDR) via ``gateway`` and/or out of ``dev``."""
        kw: dict = {}
        probe = gateway or (None if dst == "default" else dst.split("/")[0])
        v6 = probe is not None and ":" in probe
        kw["family"] = 10 if v6 else 2
        kw["dst"] = ("::/0" if v6 else "0.0.0.0/0") if dst == "default" else dst
        if gateway:
            kw["gateway"] = gateway
        if dev:
            kw["oif"] = self.index(ns, dev)
        try:
            self.ipr(ns).route("add", **kw)
        except Exception as exc:
            raise LabError(f"route {dst} via {gateway} dev {dev} in {ns}: {exc}") from exc

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.run(ns, ["sysctl", "-q", "-w", f"{key}={value}"])

    # -- sockets -----------------------------------------------------------------
    def socket(self, ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
               proto: int = 0) -> socket.socket:
        """A socket living in ``ns``, usable from this process (closed by the caller).

        A socket belongs to the namespace it was created in, whatever process
        uses it later; pyroute2 creates it in a short-lived child that entered
        ``ns`` and passes the descriptor back, so this process never leaves the
        root namespace.
        """
        self._own(ns)
        return netns.create_socket(ns, family, type, proto)

    def ping(self, ns: str, dst: str, count: int = 3, timeout: float = 2.0, ident: int | None = None) -> int:
        """Send ``count`` ICMP echo requests from ``ns`` to ``dst``; return replies seen.

        Done over a raw socket rather than the ``ping`` program (iputils is not
        installed on these machines).  Each request waits at most ``timeout`` s.
        """
        v6 = ":" in dst
        fam = socket.AF_INET6 if v6 else socket.AF_INET
        proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
        req_type, rep_type = (128, 129) if v6 else (8, 0)
        ident = secrets.randbelow(0xFFFF) + 1 if ident is None else ident
        replies = 0
        with self.socket(ns, fam, socket.SOCK_RAW, proto) as s:
            s.settimeout(timeout)
            for seq in range(1, count + 1):
                payload = b"roam-lab-ping" + seq.to_bytes(2, "big")
                hdr = struct.pack("!BBHHH", req_type, 0, 0, ident, seq)
                csum = 0 if v6 else internet_checksum(hdr + payload)  # kernel fills ICMPv6's
                s.sendto(struct.pack("!BBHHH", req_type, 0, csum, ident, seq) + payload, (dst, 0))
                deadline = time.monotonic() + timeout
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    s.settimeout(left)
                    try:
                        data, _ = s.recvfrom(65535)
                    except socket.timeout:
                        break
                    icmp = data if v6 else data[(data[0] & 0x0F) * 4:]
                    if len(icmp) >= 8:
                        t, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
                        if t == rep_type and rid == ident and rseq == seq:
                            replies += 1
                            break
        return replies

    # -- processes -------------------------------------------------------------
    def _argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        self._own(ns)
        return ["ip", "netns", "exec", ns, *map(str, argv)]

    def run(self, ns: str, argv: Sequence[str], timeout: float = 30.0, check: bool = True,
            input: str | bytes | None = None, text: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``ns`` to completion (bounded by ``timeout``), capturing output.

        With ``check`` a non-zero exit raises LabError carrying stderr, which is
        what one needs to read in a failed test.
        """
        full = self._argv(ns, argv)
        try:
            cp = subprocess.run(full, capture_output=True, timeout=timeout, input=input, text=text)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"timed out after {timeout}s in {ns}: {' '.join(map(str, argv))}") from exc
        if check and cp.returncode != 0:
            raise LabError(f"exit {cp.returncode} in {ns}: {' '.join(map(str, argv))}\n{cp.stderr}")
        return cp

    def popen(self, ns: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start ``argv`` inside ``ns``; it is stopped by :meth:`close` at the latest.

        It gets its own session so that close() can signal the whole group
        (e.g. socat's forked children) by its id.
        """
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self._argv(ns, argv), **kw)
        self._procs.append(p)
        return p

    def tcpdump(self, ns: str, args: list[str], timeout: float = 10.0) -> subprocess.Popen:
        """tcpdump -U in ``ns``, returned once it says "listening on" (its filter is attached by then)."""
        p = self.popen(ns, ["tcpdump", "-n", "-U", "--immediate-mode", *args],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert p.stderr is not None  # stderr=PIPE
        err = b""
        end = time.monotonic() + timeout
        while b"listening on" not in err:
            left = end - time.monotonic()
            if left <= 0 or p.poll() is not None:
                self.stop(p)
                raise LabError(f"tcpdump did not start listening (exit {p.returncode}): "
                               f"{err.decode(errors='replace')}")
            if select.select([p.stderr], [], [], min(left, 0.5))[0]:
                chunk = os.read(p.stderr.fileno(), 4096)
                if not chunk:  # stderr closed: tcpdump is exiting
                    p.wait(timeout=5)
                err += chunk
        return p

    def stop_tcpdump(self, p: subprocess.Popen) -> None:
        """SIGINT: tcpdump writes out what it holds and closes the file; anything but a clean exit fails."""
        rc = self.stop(p, wait=10, sig=signal.SIGINT)
        if rc != 0:
            raise LabError(f"tcpdump did not stop cleanly (exit {rc})")

    def stop(self, p: subprocess.Popen, wait: float = 3.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal ``p``'s group, wait up to ``wait`` s, then SIGKILL; returns its exit code."""
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream:
                stream.close()
        return p.returncode

    # -- teardown --------------------------------------------------------------
    def detach(self) -> list[str]:
        """Let the namespaces outlive this process (`roam lab up`); returns their names.

        Closes the netlink sockets and forgets the processes; nothing is removed, at
        exit or later: ``remove_namespace`` ends them.
        """
        names = list(self.namespaces)
        for ipr in self._ipr.values():
            try:
                ipr.close()
            except Exception:  # a socket that will not close is harmless here
                pass
        self._ipr.clear()
        self._procs.clear()
        self.namespaces.clear()
        self._closed = True
        _live_labs.discard(self)
        return names

    def close(self) -> None:
        """Stop processes, close sockets, delete namespaces. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for p in self._procs:
            try:
                self.stop(p)
            except Exception as exc:  # keep going: namespaces must still go
                errors.append(f"stop pid {p.pid}: {exc}")
        self._procs.clear()
        for ipr in self._ipr.values():
            try:
                ipr.close()
            except Exception as exc:
                errors.append(f"close netlink socket: {exc}")
        self._ipr.clear()
        # Anything still inside our namespaces was started by us (directly or by a child).
        leftovers = [pid for name in self.namespaces for pid in _ns_pids(name)]
        if leftovers:
            _kill_pids(leftovers, wait=2.0)
        for name in reversed(self.namespaces):
            try:
                netns.remove(name)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    errors.append(f"remove {name}: {exc}")
            except Exception as exc:
                errors.append(f"remove {name}: {exc}")
        self.namespaces.clear()
        _live_labs.discard(self)
        if errors:
            raise LabError("lab cleanup incomplete: " + "; ".join(errors))


@atexit.register
def _close_all() -> None:
    for lab in list(_live_labs):
        try:
            lab.close()
        except Exception:
            pass


def probe(prefix: str = "roam") -> str | None:
    """Why a lab cannot run here (a sentence), or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, netfilter)"
    try:
        with Lab(prefix) as lab:
            a, b = lab.ns("probea"), lab.ns("probeb")
            lab.veth(a, "p0", b, "p1")
    except Exception as exc:
        return f"cannot make network namespaces/veth here: {exc}"
    return None
