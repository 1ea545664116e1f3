"""A real guest in a lab: QEMU started inside a host's namespace, live-migrated by QEMU to another.

The mechanics are production's, nothing staged:

* each QEMU runs in its host's network namespace (``ip netns exec``) with the guest's
  virtio-net NIC on a TAP there (``-netdev tap,ifname=...,script=no``), the TAP made
  beforehand on that host's bridge (:func:`make_tap`), so the destination's link is up
  before the guest resumes there, as on a real hypervisor;
* a migration is QEMU's own: the destination starts with ``-incoming defer``, then QMP
  ``migrate-incoming`` on it, ``migrate`` on the source, ``query-migrate`` until done,
  the destination's ``RESUME`` event, ``quit`` the source; the guest is really paused
  for the downtime, and QEMU's RARPs and the guest's gratuitous ARP follow the resume;
* the guest is driven over a virtio-serial port (``ctl``): command lines go in, the
  endpoint's JSON observations come out, each stamped with the host's monotonic clock
  on arrival (the guest's own clock stops while it is paused).

Every QEMU is owned by its pid (started with :meth:`netlab.Lab.popen`, so the lab's
cleanup stops it at the latest), asked to ``quit`` over QMP and killed if it does not.
TCG by default: KVM on these machines runs only patched guests.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

from tools.lab.netlab import Lab

from .guest import CTL_PORT, READY, GuestImage
from .qmp import Qmp, QmpError

QEMU = "qemu-system-x86_64"
MEMORY_MIB = 128  # 64 does not boot the cloud kernel, 80 does
#: A held migration's pre-copy rate while the guest runs: slow enough that the ~50 MiB a 128 MiB guest
#: sends cannot all go (and QEMU converge) within the pre-copy's lead, so the guest pauses when asked.
PRECOPY_BPS = 32 << 20
FULL_BPS = 10 << 30  # once paused: as fast as it goes


class QemuError(RuntimeError):
    """A guest did not start, answer or migrate; the message names the QEMU and the step."""


def qemu_missing() -> str | None:
    """Why no guest can run here (a sentence), or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (apt-get install --no-install-recommends qemu-system-x86)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (TAP devices cannot be made)"
    return None


def make_tap(lab: Lab, ns: str, name: str, bridge: str) -> str:
    """A persistent TAP in ``ns`` on ``bridge``, up: QEMU attaches to it by name; it goes with the namespace."""
    lab.tap(ns, name)
    ipr = lab.ipr(ns)
    ipr.link("set", index=lab.index(ns, name), master=lab.index(ns, bridge))
    lab.up(ns, name)
    return name


@dataclass(frozen=True, slots=True)
class GuestSpec:
    """What every QEMU of one guest shares (a migration needs the same machine on both ends)."""

    image: GuestImage
    mac: str
    address: str | None = None  # "198.18.0.10/24": eth0's address
    gateway: str | None = None
    memory_mib: int = MEMORY_MIB
    accel: str = "tcg"

    def argv(self, tap: str, qmp: str, ctl: str, console: str, incoming: bool, hold: bool = False) -> list[str]:
        append = ["console=ttyS0", "quiet", "panic=-1", "init_on_free=1"]
        if self.address:
            append.append(f"roam.ip={self.address}")
        if self.gateway:
            append.append(f"roam.gw={self.gateway}")
        accel = "tcg,tb-size=64" if self.accel == "tcg" else self.accel
        argv = [QEMU, "-accel", accel, "-cpu", "qemu64", "-m", str(self.memory_mib),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
                "-append", " ".join(append),
                "-serial", f"file:{console}",
                "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n0,mac={self.mac},romfile=",
                "-device", "virtio-serial-pci,romfile=",
                "-chardev", f"socket,id=ctl,path={ctl},server=on,wait=off",
                "-device", f"virtserialport,chardev=ctl,name={CTL_PORT}",
                "-qmp", f"unix:{qmp},server=on,wait=off"]
        if incoming:
            argv += ["-incoming", "defer"]
        if hold:  # a destination that stays paused after the migration until `cont`
            argv.append("-S")
        return argv


@dataclass(frozen=True, slots=True)
class Migration:
    """One move as QEMU measured it (ms), and when it began, the guest paused and resumed (host monotonic s).

    ``paused`` and ``resumed`` are the source's STOP and the destination's RESUME events (QEMU stamps
    them with the wall clock; converted here): the guest runs on through the pre-copy, so the
    judge's move is ``paused`` .. ``resumed``, not the migration's start.
    """

    source: str
    destination: str
    total_ms: float
    downtime_ms: float
    setup_ms: float
    ram_bytes: int
    started: float
    paused: float
    resumed: float


def _event_time(event: dict) -> float:
    """A QMP event's wall-clock stamp on this process's monotonic clock."""
    ts = event.get("timestamp", {})
    wall = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
    if wall <= 0:
        return time.monotonic()
    return time.monotonic() - (time.time() - wall)


class _Control:
    """The host end of one QEMU's control port: lines in, stamped with the host clock on arrival."""

    def __init__(self, path: str, sink: list, lock: threading.Lock, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise QemuError(f"no control socket at {path}") from None
                time.sleep(0.05)
        self.sock, self.sink, self.lock = s, sink, lock
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            now = time.monotonic()
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace").strip()
                if not text:
                    continue
                try:
                    ev = json.loads(text)
                    if not isinstance(ev, dict):
                        raise ValueError
                except ValueError:
                    ev = {"raw": text}
                ev["ht"] = now
                with self.lock:
                    self.sink.append(ev)

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=2)


class Qemu:
    """One QEMU process in one host namespace (a guest has one, two during a migration)."""

    def __init__(self, lab: Lab, ns: str, tap: str, spec: GuestSpec, workdir: str, name: str,
                 incoming: bool, sink: list, lock: threading.Lock, hold: bool = False) -> None:
        self.lab, self.ns, self.tap, self.name = lab, ns, tap, name
        self.qmp_path = os.path.join(workdir, f"{name}.qmp")
        self.ctl_path = os.path.join(workdir, f"{name}.ctl")
        self.console = os.path.join(workdir, f"{name}.console")
        self.stderr_path = os.path.join(workdir, f"{name}.stderr")
        argv = spec.argv(tap, self.qmp_path, self.ctl_path, self.console, incoming, hold)
        self._stderr = open(self.stderr_path, "wb")
        self.proc = lab.popen(ns, argv, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr)
        self.pid = self.proc.pid
        self.qmp: Qmp | None = None
        self.ctl: _Control | None = None
        try:
            self.qmp = Qmp(self.qmp_path, timeout=15.0)
            self.ctl = _Control(self.ctl_path, sink, lock)
        except (QmpError, QemuError) as exc:
            self.kill()
            raise QemuError(f"QEMU {name} in {ns} did not start: {exc}; {self.stderr_tail()}") from exc

    def stderr_tail(self) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read()[-600:].decode(errors="replace").strip()
        except OSError:
            return ""

    def quit(self, wait: float = 10.0) -> None:
        """``quit`` over QMP and wait for the process; kill it if it does not go."""
        if self.proc.poll() is None and self.qmp is not None:
            try:
                self.qmp.execute("quit", timeout=5)
            except QmpError:
                pass  # QEMU may close the monitor before it answers
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """Stop the process by its pid (TERM, then KILL) and close our sockets; safe to repeat."""
        if self.proc.poll() is None:
            self.lab.stop(self.proc, wait=3.0)
        for c in (self.qmp, self.ctl):
            if c is not None:
                c.close()
        self.qmp = self.ctl = None
        if not self._stderr.closed:
            self._stderr.close()


class Guest:
    """A real guest: booted on one host, moved by live migration; its observations in :attr:`events`.

    ``events`` holds every line the guest wrote on its control port, parsed (JSON lines)
    or as ``{"raw": text}``, each with ``ht``: the host's monotonic clock at arrival.
    """

    def __init__(self, lab: Lab, spec: GuestSpec, workdir: str | None = None) -> None:
        self.lab, self.spec = lab, spec
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="roam-qemu-")
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.current: Qemu | None = None
        self.migrations: list[Migration] = []
        self._n = 0
        self._pending: tuple[Qemu, Qemu, float] | None = None  # (source, destination, started): a held migration
        self._paused: float | None = None  # the held migration's pause (host monotonic)

    def _start(self, ns: str, tap: str, incoming: bool, hold: bool = False) -> Qemu:
        self._n += 1
        return Qemu(self.lab, ns, tap, self.spec, self.workdir, f"q{self._n}", incoming, self.events, self.lock,
                    hold)

    def boot(self, ns: str, tap: str, timeout: float = 90.0) -> float:
        """Boot on host ``ns`` with its NIC on ``tap``; returns the seconds until the guest's shell was ready."""
        t0 = time.monotonic()
        self.current = self._start(ns, tap, incoming=False)
        self.wait_for(lambda e: e.get("raw", "").startswith(READY), timeout, "the guest's ready line")
        return time.monotonic() - t0

    def send(self, line: str) -> None:
        """One shell command line for the guest (run by its control shell)."""
        if self.current is None or self.current.ctl is None:
            raise QemuError("the guest is not running")
        self.current.ctl.send(line)

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.events)

    def wait_for(self, pred, timeout: float, what: str) -> dict:
        """The first event matching ``pred`` (seen already or arriving within ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.snapshot():
                if pred(e):
                    return e
            q = self.current
            if q is not None and q.proc.poll() is not None:
                raise QemuError(f"QEMU {q.name} exited ({q.proc.returncode}) waiting for {what}: "
                                f"{q.stderr_tail()}; console: {self.console_tail()}")
            if time.monotonic() > deadline:
                raise QemuError(f"no {what} after {timeout}s; console: {self.console_tail()}")
            time.sleep(0.05)

    def console_tail(self, n: int = 800) -> str:
        if self.current is None:
            return ""
        try:
            with open(self.current.console, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def migrate(self, ns: str, tap: str, timeout: float = 120.0) -> Migration:
        """Live-migrate to host ``ns`` (NIC on ``tap``) over a unix socket; QEMU's own figures."""
        src = self.current
        if src is None or src.qmp is None:
            raise QemuError("the guest is not running")
        dst = self._start(ns, tap, incoming=True)
        assert dst.qmp is not None  # a started Qemu has its QMP connection
        uri = f"unix:{os.path.join(self.workdir, f'mig-{dst.name}.sock')}"
        try:
            dst.qmp.execute("migrate-incoming", {"uri": uri})
            started = time.monotonic()
            src.qmp.execute("migrate", {"uri": uri})
            info = src.qmp.wait_migration(timeout=timeout)
            resumed = _event_time(dst.qmp.wait_event("RESUME", timeout=timeout))
            paused = _event_time(src.qmp.wait_event("STOP", timeout=10))
        except (QmpError, QemuError) as exc:
            dst.kill()
            raise QemuError(f"migration {src.name}@{src.ns} -> {dst.name}@{ns} failed: {exc}; "
                            f"{dst.stderr_tail()}") from exc
        self.current = dst
        src.quit()
        ram = info.get("ram", {})
        m = Migration(src.ns, ns, float(info.get("total-time", 0)), float(info.get("downtime", 0)),
                      float(info.get("setup-time", 0)), int(ram.get("transferred", 0)), started, paused, resumed)
        self.migrations.append(m)
        return m

    # -- a migration whose pause and resume the caller times (roam replay --backend qemu) ------------
    def begin_migration(self, ns: str, tap: str) -> None:
        """Start a live migration to host ``ns`` that will not switch over until :meth:`pause` and :meth:`resume`.

        The pre-copy runs while the guest runs (QEMU's own), held back (:data:`PRECOPY_BPS`,
        a ``downtime-limit`` of 1 ms) so that QEMU cannot converge and pause the guest on its
        own before the caller's :meth:`pause`; ``pause-before-switchover`` holds the switch-over
        until :meth:`switch_over` (so the destination's link can be readied while the guest is
        paused, as a hypervisor would); the destination starts with ``-S`` so that the guest
        resumes at the caller's ``cont`` (:meth:`resume`), not at the end of the copy.
        """
        src = self.current
        if src is None or src.qmp is None:
            raise QemuError("the guest is not running")
        if self._pending is not None:
            raise QemuError("a migration is already under way")
        dst = self._start(ns, tap, incoming=True, hold=True)
        assert dst.qmp is not None  # a started Qemu has its QMP connection
        uri = f"unix:{os.path.join(self.workdir, f'mig-{dst.name}.sock')}"
        try:
            dst.qmp.execute("migrate-incoming", {"uri": uri})
            src.qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "pause-before-switchover", "state": True}]})
            src.qmp.execute("migrate-set-parameters", {"downtime-limit": 1, "max-bandwidth": PRECOPY_BPS})
            started = time.monotonic()
            src.qmp.execute("migrate", {"uri": uri})
        except (QmpError, QemuError) as exc:
            dst.kill()
            raise QemuError(f"migration {src.name}@{src.ns} -> {dst.name}@{ns} did not start: {exc}; "
                            f"{dst.stderr_tail()}") from exc
        self._pending = (src, dst, started)

    def pause(self, timeout: float = 30.0) -> float:
        """Pause the guest (``stop`` on the source) mid pre-copy; the host clock at its STOP event."""
        src, dst, _ = self._need_pending()
        try:
            src.qmp.execute("stop")
            self._paused = _event_time(src.qmp.wait_event("STOP", timeout=timeout))
            # the guest is paused: copy the rest at full speed and converge
            src.qmp.execute("migrate-set-parameters", {"downtime-limit": 300, "max-bandwidth": FULL_BPS})
            return self._paused
        except QmpError as exc:
            self._abort()
            raise QemuError(f"pausing {src.name} failed: {exc}") from exc

    def switch_over(self, timeout: float = 120.0) -> None:
        """Wait for the copy to reach the switch-over (the guest paused), then let it complete."""
        src, dst, _ = self._need_pending()
        try:
            deadline = time.monotonic() + timeout
            while True:
                status = src.qmp.execute("query-migrate").get("status")
                if status == "pre-switchover":
                    break
                if status in ("failed", "cancelled", None) or time.monotonic() > deadline:
                    raise QmpError(f"migration {status} before its switch-over")
                time.sleep(0.01)
            src.qmp.execute("migrate-continue", {"state": "pre-switchover"})
        except QmpError as exc:
            self._abort()
            raise QemuError(f"switch-over {src.name} -> {dst.name} failed: {exc}") from exc

    def resume(self, at: float | None = None, timeout: float = 120.0, on_resume=None) -> Migration:
        """Wait for the copy to end, then ``cont`` the destination (not before monotonic ``at``); quit the source.

        Returns QEMU's figures: ``downtime_ms`` is QEMU's own (its switch-over); the guest
        was paused from ``paused`` to ``resumed``, which the caller chose.
        """
        src, dst, started = self._need_pending()
        try:
            info = src.qmp.wait_migration(timeout=timeout)
            paused = self._paused if self._paused is not None else _event_time(src.qmp.wait_event("STOP", 5))
            # the source's "completed" can come before the destination has loaded the state; a `cont` then
            # only sets autostart, which QEMU ignores for a guest that left paused: wait for it to be loaded
            deadline = time.monotonic() + timeout
            while dst.qmp.execute("query-status").get("status") == "inmigrate":
                if time.monotonic() > deadline:
                    raise QemuError("the destination did not finish loading the guest")
                time.sleep(0.005)
            if at is not None and at > time.monotonic():
                time.sleep(at - time.monotonic())
            dst.qmp.execute("cont")
            resumed = _event_time(dst.qmp.wait_event("RESUME", timeout=timeout))
        except (QmpError, QemuError) as exc:
            self._abort()
            raise QemuError(f"migration {src.name}@{src.ns} -> {dst.name}@{dst.ns} failed: {exc}; "
                            f"{dst.stderr_tail()}") from exc
        self._pending = self._paused = None
        self.current = dst
        if on_resume is not None:
            on_resume()
        src.quit()
        ram = info.get("ram", {})
        m = Migration(src.ns, dst.ns, float(info.get("total-time", 0)), float(info.get("downtime", 0)),
                      float(info.get("setup-time", 0)), int(ram.get("transferred", 0)), started, paused, resumed)
        self.migrations.append(m)
        return m

    def _need_pending(self):
        if self._pending is None:
            raise QemuError("no migration under way")
        return self._pending

    def _abort(self) -> None:
        """A failed migration: the destination goes, the source (if paused) runs on."""
        if self._pending is None:
            return
        src, dst, _ = self._pending
        self._pending = self._paused = None
        dst.kill()
        if src.qmp is not None:
            for cmd in ("migrate_cancel", "cont"):
                try:
                    src.qmp.execute(cmd)
                except QmpError:
                    pass

    def release(self) -> dict:
        """Let the running QEMU outlive this process (``roam lab up --vm qemu``): close our sockets, say where it is.

        QMP serves one client at a time: once released, another program can connect.
        """
        q = self.current
        if q is None:
            raise QemuError("the guest is not running")
        for c in (q.qmp, q.ctl):
            if c is not None:
                c.close()
        q.qmp = q.ctl = None
        self.current = None
        return {"pid": q.pid, "ns": q.ns, "tap": q.tap, "qmp": q.qmp_path, "ctl": q.ctl_path,
                "console": q.console, "workdir": self.workdir}

    def close(self) -> None:
        """Quit the running QEMU (kill it if it will not go) and remove the work directory."""
        if self._pending is not None:
            self._pending[1].kill()
            self._pending = None
        if self.current is not None:
            self.current.quit()
            self.current = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def boot_kept(lab: Lab, topo, image: GuestImage, mac: str, host: str, address: str, gateway: str | None,
              workdir: str) -> dict:
    """``roam lab up --vm qemu``: a TAP ``tap0`` on every host's ``br0``, the guest booted on ``host``, left running.

    Returns where it is (pid, namespace, sockets, console log, boot seconds) for the lab's state file.
    """
    for h in topo.hosts.values():
        make_tap(lab, h.ns, "tap0", "br0")
    os.makedirs(workdir, exist_ok=True)
    g = Guest(lab, GuestSpec(image, mac, address, gateway), workdir=workdir)
    boot_s = g.boot(topo.hosts[host].ns, "tap0")
    return {**g.release(), "boot_s": round(boot_s, 2), "image": image.key}


__all__ = ["Guest", "GuestSpec", "Migration", "Qemu", "QemuError", "boot_kept", "make_tap", "qemu_missing"]
