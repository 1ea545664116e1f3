"""The real guest's image, built at set-up from Debian packages only, cached by its inputs.

    python -m tools.lab.guest [--state DIR]     (prints the kernel and initramfs paths)

What goes in, and why each:

* the kernel the ``linux-image-cloud-amd64`` package depends on, fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb -x`` (never installed: the host's
  own kernel is not touched): ``vmlinuz`` and the few virtio modules the guest needs;
* ``busybox`` from ``busybox-static``: the guest's shell, ``ip`` and ``insmod``;
* ``roam-ep``, the endpoint program (``guest_endpoint.c``; its socket executor
  ``roam-ep serve``, ``guest_executor.c``, is what ``roam replay --backend qemu`` drives),
  built with Debian's ``gcc -static`` so it needs nothing from the guest;
* ``/init`` (:data:`INIT`): load the modules, address ``eth0`` from the kernel command
  line (``roam.ip=``, ``roam.gw=``), then serve a shell on the virtio-serial port
  ``ctl``: the driver sends command lines, and what the commands print (the endpoint's
  JSON observations) comes back on the same port.

The image lives in ``<state>/guest/<key>/`` where the key hashes every input (package
versions, the init script, the endpoint source, this module's build recipe): a change
to any of them builds a new image, an unchanged set reuses the old one.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

#: Debian packages the qemu backend needs on the host (README set-up).
HOST_PACKAGES = ("qemu-system-x86", "busybox-static", "gcc", "libc6-dev")
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
#: Loaded in this order by /init (the unpacked modules have no modules.dep).
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
           "failover", "net_failover", "virtio_net", "virtio_console")
#: The endpoint program's sources: the line programs and main, the executor (``roam-ep serve``), what they share.
ENDPOINT_SOURCES = tuple(Path(__file__).with_name(n) for n in ("guest_endpoint.c", "guest_executor.c",
                                                                "guest_common.h"))
CTL_PORT = "ctl"  # the virtio-serial port's name
READY = "roam-guest ready"  # the first line /init writes on the control port

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
for m in __MODULES__; do insmod /lib/modules/$m.ko || echo "roam: insmod $m failed"; done
for arg in $(cat /proc/cmdline); do
  case "$arg" in roam.ip=*) ip="${arg#roam.ip=}";; roam.gw=*) gw="${arg#roam.gw=}";; esac
done
ip link set lo up
ip link set eth0 up
[ -n "$ip" ] && ip addr add "$ip" dev eth0
[ -n "$gw" ] && ip route add default via "$gw"
port=
for i in 1 2 3 4 5 6 7 8 9 10; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = __CTL__ ] && port="/dev/${p##*/}"
  done
  [ -n "$port" ] && [ -e "$port" ] && break
  sleep 0.2
done
[ -z "$port" ] && { echo "roam: no control port"; exec sh; }
echo "roam: control port $port"
exec 3<>"$port"
echo "__READY__ $(cat /proc/sys/kernel/osrelease)" >&3
# a read of the port while the host end is not connected is an end of file: start again
while :; do sh <&3 >&3 2>&3; sleep 0.2; done
""".replace("__MODULES__", " ".join(MODULES)).replace("__CTL__", CTL_PORT).replace("__READY__", READY)

_RECIPE = 2  # bump when the build steps below change what they produce


class GuestError(RuntimeError):
    """The guest image cannot be built here; the message says which step and what to install."""


@dataclass(frozen=True, slots=True)
class GuestImage:
    kernel: Path
    initrd: Path
    key: str
    kernel_release: str


def state_dir(override: str | os.PathLike | None = None) -> Path:
    """Where cached build products live: ``override``, ``$ROAM_STATE_DIR``, or /var/cache/roam."""
    return Path(override or os.environ.get("ROAM_STATE_DIR") or "/var/cache/roam")


def _run(argv: list[str], cwd: str | None = None, what: str = "") -> str:
    try:
        cp = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as exc:
        raise GuestError(f"{what or argv[0]}: {argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestError(f"{what or argv[0]}: timed out") from exc
    if cp.returncode != 0:
        raise GuestError(f"{what or ' '.join(argv)} failed (exit {cp.returncode}): {cp.stderr.strip()[-500:]}")
    return cp.stdout


def ensure_host_packages(packages: tuple[str, ...] = HOST_PACKAGES) -> None:
    """Install what is missing with apt-get (``--no-install-recommends``); GuestError if that cannot be done."""
    missing = [p for p in packages if not _installed(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise GuestError(f"missing Debian packages {' '.join(missing)} (install them as root: "
                         f"apt-get install --no-install-recommends {' '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    cp = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if cp.returncode != 0:  # perhaps the package lists were never fetched
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=900)
        cp = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if cp.returncode != 0:
        raise GuestError(f"cannot install {' '.join(missing)} with apt-get: {cp.stderr.strip()[-400:]}")


def _installed(package: str) -> bool:
    cp = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return cp.returncode == 0 and cp.stdout.endswith("installed")


def kernel_package() -> str:
    """The versioned kernel package ``linux-image-cloud-amd64`` depends on (e.g. linux-image-6.1.0-57-cloud-amd64)."""
    out = _run(["apt-cache", "depends", KERNEL_META], what=f"apt-cache depends {KERNEL_META}")
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise GuestError(f"{KERNEL_META} names no kernel package (run apt-get update?)")


def _candidate(package: str) -> str:
    out = _run(["apt-cache", "policy", package], what=f"apt-cache policy {package}")
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                return version
    raise GuestError(f"no installable version of {package} (run apt-get update?)")


def _gcc_version() -> str:
    return _run(["gcc", "-dumpfullversion"], what="gcc").strip()


def inputs() -> dict:
    """Everything the image is made from; its hash is the cache key."""
    kpkg = kernel_package()
    return {
        "recipe": _RECIPE,
        "kernel": [kpkg, _candidate(kpkg)],
        "busybox": [BUSYBOX_PACKAGE, _candidate(BUSYBOX_PACKAGE)],
        "gcc": _gcc_version(),
        "init": hashlib.sha256(INIT.encode()).hexdigest(),
        "endpoint": hashlib.sha256(b"".join(p.read_bytes() for p in ENDPOINT_SOURCES)).hexdigest(),
        "modules": list(MODULES),
    }


def build(state: str | os.PathLike | None = None, log=None) -> GuestImage:
    """The guest image for the current inputs: the cached one, or a new build (a few seconds)."""
    ensure_host_packages()
    ins = inputs()
    key = hashlib.sha256(json.dumps(ins, sort_keys=True).encode()).hexdigest()[:16]
    out = state_dir(state) / "guest" / key
    kernel, initrd, meta = out / "vmlinuz", out / "initrd.gz", out / "inputs.json"
    if kernel.exists() and initrd.exists() and meta.exists():
        release = json.loads(meta.read_text())["release"]
        return GuestImage(kernel, initrd, key, release)
    if log:
        log(f"building the guest image {key} in {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="roam-guest-", dir=out.parent) as tmp:
        release = _build_into(Path(tmp), ins)
        final = Path(tmp) / "out"
        (final / "inputs.json").write_text(json.dumps({**ins, "release": release}, indent=1, sort_keys=True))
        if out.exists() and not meta.exists():  # a half-made one of a killed build
            shutil.rmtree(out)
        try:
            os.replace(final, out)  # atomic: a concurrent reader sees no image or the whole one
        except OSError:
            if not meta.exists():  # not a concurrent build that finished first
                raise
    return GuestImage(kernel, initrd, key, release)


def _build_into(tmp: Path, ins: dict) -> str:
    debs = tmp / "debs"
    debs.mkdir()
    for pkg, version in (ins["kernel"], ins["busybox"]):
        _run(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=str(debs), what=f"apt-get download {pkg}")
    unpacked = tmp / "unpacked"
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)], what=f"dpkg-deb -x {deb.name}")
    vmlinuz = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise GuestError(f"{ins['kernel'][0]} holds no boot/vmlinuz-*")
    release = vmlinuz[0].name[len("vmlinuz-"):]
    busybox = unpacked / "bin" / "busybox"
    if not busybox.exists():
        raise GuestError(f"{BUSYBOX_PACKAGE} holds no bin/busybox")

    root = tmp / "root"
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib/modules"):
        (root / d).mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    _run(["gcc", "-static", "-O2", "-s", "-o", str(root / "bin" / "roam-ep"),
          *(str(p) for p in ENDPOINT_SOURCES if p.suffix == ".c")],
         what="gcc -static guest_endpoint.c guest_executor.c (needs gcc and libc6-dev)")
    found = {}
    for path in (unpacked / "lib" / "modules" / release).rglob("*.ko*"):
        name = path.name.split(".ko")[0].replace("-", "_")
        if name in MODULES:
            found[name] = path
    missing = [m for m in MODULES if m not in found]
    if missing:
        raise GuestError(f"kernel {release} lacks modules {', '.join(missing)}")
    for name, path in found.items():
        data = path.read_bytes()
        if path.name.endswith(".xz"):
            data = lzma.decompress(data)
        elif path.name.endswith(".gz"):
            data = gzip.decompress(data)
        (root / "lib" / "modules" / f"{name}.ko").write_bytes(data)
    init = root / "init"
    init.write_text(INIT)
    init.chmod(0o755)

    final = tmp / "out"
    final.mkdir()
    shutil.copy2(vmlinuz[0], final / "vmlinuz")
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    cpio = subprocess.run([str(busybox), "cpio", "-o", "-H", "newc"], cwd=str(root), input=("\n".join(
        [".", *names]) + "\n").encode(), capture_output=True, timeout=120)
    if cpio.returncode != 0:
        raise GuestError(f"busybox cpio failed: {cpio.stderr.decode(errors='replace')[-300:]}")
    (final / "initrd.gz").write_bytes(gzip.compress(cpio.stdout, 6, mtime=0))
    return release


def main(argv: list[str]) -> int:
    state = argv[argv.index("--state") + 1] if "--state" in argv else None
    try:
        img = build(state, log=lambda m: print(m, file=sys.stderr))
    except GuestError as exc:
        print(f"roam: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"kernel": str(img.kernel), "initrd": str(img.initrd), "key": img.key,
                      "release": img.kernel_release}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
