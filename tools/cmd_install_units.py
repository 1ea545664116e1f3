"""`roam install-units`: the systemd units of the daemons, where systemd reads them.

The units live in the repository (``contrib/systemd/``; a wheel carries them to
``share/roam/systemd``).  They name ``/usr/local/bin/roam``; the copy installed names the roam
this command was started as, so a virtualenv's roam is the one systemd starts.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from .cli import add_command

DEFAULT_PREFIX = "/etc/systemd/system"
SHIPPED_ROAM = "/usr/local/bin/roam"  # the path the shipped units name
UNITS = ("roam-nat.service", "roam-tunnel-proxy.service", "roam-tunnel-host.service")

_DESC = """\
Install the Type=notify systemd units of `roam nat`, `roam tunnel proxy` and `roam tunnel host`
into DIR (default /etc/systemd/system), their ExecStart= naming this roam. Each reads its options
from /etc/roam/UNIT.env (ROAM_ARGS=...). Then it says what to run next. With --dry-run nothing
is written: it prints what would be.
"""


def register(sub, help_text: str) -> None:
    p = add_command(sub, "install-units", help_text, _DESC,
                    ("roam install-units", "roam install-units --prefix /tmp/units --dry-run"))
    p.add_argument("--prefix", metavar="DIR", default=DEFAULT_PREFIX,
                   help=f"where the units go (default {DEFAULT_PREFIX})")
    p.add_argument("--dry-run", action="store_true", help="print what would be written, write nothing")
    p.add_argument("--roam", metavar="PATH", default=None,
                   help="the roam executable ExecStart= names (default: the one on PATH)")
    p.set_defaults(func=run)


def source_dir() -> Path | None:
    """Where the shipped units are: the source tree's contrib/systemd, or a wheel's share/roam/systemd."""
    for d in (Path(__file__).resolve().parent.parent / "contrib" / "systemd",
              Path(sys.prefix) / "share" / "roam" / "systemd"):
        if all((d / u).is_file() for u in UNITS):
            return d
    return None


def _roam_path(given: str | None) -> str | None:
    path = given or shutil.which("roam")
    if path is None:
        return None
    path = os.path.abspath(path)
    return path if os.access(path, os.X_OK) else None


def run(args: argparse.Namespace) -> int:
    src = source_dir()
    if src is None:
        print("roam install-units: the shipped units (contrib/systemd/) are not there: install roam from "
              "its source tree or wheel", file=sys.stderr)
        return 1
    roam = _roam_path(args.roam)
    if roam is None:
        print(f"roam install-units: {'--roam ' + args.roam if args.roam else 'roam on PATH'}: no such "
              "executable (give --roam PATH)", file=sys.stderr)
        return 2
    prefix = Path(args.prefix)
    for unit in UNITS:
        text = (src / unit).read_text().replace(SHIPPED_ROAM, roam)
        dest = prefix / unit
        if args.dry_run:
            print(f"would write {dest} (ExecStart: {roam})")
            continue
        try:
            prefix.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            tmp.write_text(text)
            tmp.chmod(0o644)
            os.replace(tmp, dest)
        except OSError as exc:
            where = exc.filename or dest
            print(f"roam install-units: cannot write {where}: {exc.strerror or exc}"
                  + (" (run it with sudo)" if isinstance(exc, PermissionError) else ""), file=sys.stderr)
            return 1
        print(f"wrote {dest}")
    print("\nnext: put each daemon's options in /etc/roam/<unit>.env, for example\n"
          "  /etc/roam/roam-nat.env:          ROAM_ARGS=--config /etc/roam/nat.conf --external eth0\n"
          "  /etc/roam/roam-tunnel-proxy.env: ROAM_ARGS=--listen 192.0.2.1:4789 --bridge br-home "
          "--key-file /etc/roam/tunnel.key\n"
          "  /etc/roam/roam-tunnel-host.env:  ROAM_ARGS=--proxy 192.0.2.1:4789 --tap roamh0 --bridge br-vm "
          "--key-file /etc/roam/tunnel.key\n"
          "then:\n"
          "  systemctl daemon-reload\n"
          "  systemctl enable --now roam-nat          (and/or roam-tunnel-proxy, roam-tunnel-host)")
    return 0
