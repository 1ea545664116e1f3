"""`roam lab up|down|status`: the namespace lab, kept up for people to explore.

    roam lab up [--sites N] [--vm netns|qemu]   build it, print its namespaces and addresses
    roam lab status               what is up (from the state files in /run/roam)
    roam lab down [NAME | --all]  remove it
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from typing import Any

from .cli import add_command

STATE_DIR = "/run/roam"


DESCRIPTION = f"""\
Build, show or remove the namespace lab: a home site (LAN with the tunnel proxy's machine and a home
PC), N remote sites each with a hypervisor host, two remote peers, an 'internet' namespace routing
between them, and a VM whose link sits on the first host's LAN bridge (bridged). Every address is in the
documentation ranges (192.0.2.0/24 home, 203.0.113.0/24 sites, 198.51.100.0/24 peers, 198.19.0.0/16
transit); nothing is attached to the root namespace. Namespaces are named roamlab-ROLE-SUFFIX; the lab
is recorded in {STATE_DIR}/lab-SUFFIX.json. Needs root.
"""
EXAMPLES = ("roam lab up --sites 3", "roam lab up --vm qemu", "ip netns exec roamlab-vm-SUFFIX bash",
            "roam lab status", "roam lab down --all")


def _usage(parser: argparse.ArgumentParser, _args: argparse.Namespace) -> int:
    """``roam lab`` without an action: its help, and the usage error's status."""
    parser.print_help()
    return 2


def register(sub, help_text: str) -> None:
    p = add_command(sub, "lab", help_text, DESCRIPTION, EXAMPLES)
    s = p.add_subparsers(dest="lab_command", metavar="ACTION")
    p.set_defaults(func=partial(_usage, p))

    up = s.add_parser("up", help="build the lab and print how to enter it",
                      description="Build the lab and leave it up: print every namespace with its addresses and "
                      "the command to enter it. Refuses when a lab is already up (use `roam lab down` first).")
    up.add_argument("--sites", type=int, default=2, metavar="N", help="remote sites, one host each (1..8, default 2)")
    up.add_argument("--vm", choices=("netns", "qemu"), default="netns",
                    help="the VM: a namespace (default), or a real Linux guest booted by QEMU (TCG) on the first "
                    "host, its virtio NIC on a TAP on that host's br0 (every host has one, for migrations)")
    up.add_argument("--json", action="store_true", help="print what was built as JSON")
    up.add_argument("--state-dir", default=STATE_DIR, help=f"where the state file goes (default {STATE_DIR})")
    up.set_defaults(func=cmd_up)

    down = s.add_parser("down", help="remove a lab (its namespaces and what runs in them)",
                        description="Remove the lab named NAME (its suffix, as `roam lab status` shows), or every "
                        "roamlab namespace with --all (also ones without a state file). Processes running inside "
                        "the lab's namespaces are stopped. Only namespaces named roamlab-ROLE-SUFFIX are touched.")
    down.add_argument("name", nargs="?", metavar="NAME", help="the lab's suffix (default: the only lab up)")
    down.add_argument("--all", action="store_true", help="remove every roamlab namespace")
    down.add_argument("--state-dir", default=STATE_DIR, help=f"where the state files are (default {STATE_DIR})")
    down.set_defaults(func=cmd_down)

    st = s.add_parser("status", help="list the labs that are up",
                      description="List the labs recorded in the state directory, whether their namespaces still "
                      "exist, and any roamlab namespace no state file names.")
    st.add_argument("--json", action="store_true", help="print as JSON")
    st.add_argument("--state-dir", default=STATE_DIR, help=f"where the state files are (default {STATE_DIR})")
    st.set_defaults(func=cmd_status)


def _err(msg: str, code: int = 1) -> int:
    print(f"roam lab: {msg}", file=sys.stderr)
    return code


def _states(state_dir: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    try:
        names = sorted(os.listdir(state_dir))
    except FileNotFoundError:
        return out
    for n in names:
        if n.startswith("lab-") and n.endswith(".json"):
            try:
                with open(os.path.join(state_dir, n)) as f:
                    out[n[4:-5]] = json.load(f)
            except (OSError, ValueError):
                continue
    return out


def _needs_root() -> int | None:
    from .privileges import lab_refusal

    why = lab_refusal("network namespaces, veth, bridges")
    return None if why is None else _err(why, 2)


def cmd_up(args: argparse.Namespace) -> int:
    from .lab.netlab import Lab, LabError, list_lab_namespaces
    from .lab.topology import LAB_PREFIX, TopologyError, build, default_layout, keep

    if (code := _needs_root()) is not None:
        return code
    live = list_lab_namespaces(LAB_PREFIX)
    if live:
        suffixes = sorted({n.rsplit("-", 1)[1] for n in live})
        return _err(f"a lab is already up ({', '.join(suffixes)}); remove it with `roam lab down` "
                    f"(or `roam lab down --all`)")
    try:
        layout = default_layout(args.sites)
    except TopologyError as exc:
        return _err(str(exc), 2)
    image = None
    if args.vm == "qemu":  # before any namespace exists: a missing package is a clean refusal
        from .lab.guest import GuestError, build as build_guest
        from .lab.qemu import qemu_missing

        try:
            image = build_guest(log=lambda m: print(f"roam lab: {m}", file=sys.stderr))
        except GuestError as exc:
            return _err(str(exc), 2)
        if (why := qemu_missing()):
            return _err(why, 2)
    lab = Lab(LAB_PREFIX)
    try:
        sites, hosts, peers, vm = layout
        topo = build(lab, sites, hosts, peers, None if image else vm, home_peer="192.0.2.10")
        site = topo.sites[topo.hosts[vm.host].site]
        import ipaddress
        vm_addr = str(ipaddress.IPv4Network(site.prefix).network_address + 20)
        if image is None:
            topo.plug_bridge("br0")
            topo.vm_readdress(f"{vm_addr}/{site.prefixlen}", site.gateway)
            topo.extra = {"vm_address": vm_addr, "vm_mode": "bridged"}
        else:
            from .lab.qemu import boot_kept

            qemu = boot_kept(lab, topo, image, vm.mac, vm.host, f"{vm_addr}/{site.prefixlen}", site.gateway,
                             os.path.join(args.state_dir, f"qemu-{lab.suffix}"))
            topo.vm_mac, topo.vm_host = vm.mac, vm.host
            topo.extra = {"vm_address": vm_addr, "vm_mode": "bridged", "vm_backend": "qemu", "qemu": qemu}
        desc = topo.describe()
        desc["created"] = time.time()
        os.makedirs(args.state_dir, exist_ok=True)
        path = os.path.join(args.state_dir, f"lab-{lab.suffix}.json")
        with open(path, "w") as f:
            json.dump(desc, f, indent=2)
    except (LabError, TopologyError, OSError, RuntimeError) as exc:  # RuntimeError: QemuError
        lab.close()
        return _err(f"cannot build the lab: {exc}")
    except BaseException:
        lab.close()
        raise
    keep(lab)
    if args.json:
        print(json.dumps(desc, indent=2))
        return 0
    print(f"lab {lab.suffix} is up ({len(desc['namespaces'])} namespaces; state in {path})\n")
    rows = [("inet", topo.inet, "routes between sites and peers; gateways: " +
             ", ".join(f"{s.gateway} ({s.name})" for s in topo.sites.values()))]
    if topo.home:
        home = next(s for s in topo.sites.values() if s.proxy)
        rows.append(("home", topo.home, f"{home.proxy} on br0 (home LAN {home.prefix}; tunnel proxy's place)"))
    for h in topo.hosts.values():
        rows.append((f"host {h.name}", h.ns, f"{h.address} on br0 (site {h.site} {topo.sites[h.site].prefix})"))
    for p in topo.peers.values():
        rows.append((f"peer {p.name}", p.ns, p.address))
    kept = topo.extra.get("qemu")
    if kept:
        rows.append(("vm (qemu)", kept["ns"], f"{vm_addr} on eth0 ({topo.vm_mac}); QEMU pid {kept['pid']}, "
                     f"NIC on {kept['tap']} bridged on {topo.vm_host}"))
    else:
        assert topo.vm is not None  # no QEMU guest: the VM is a namespace
        rows.append(("vm", topo.vm, f"{vm_addr} on eth0 ({topo.vm_mac}); link vm0 bridged on {topo.vm_host}"))
    w1 = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    for role, ns, what in rows:
        print(f"  {role:<{w1}}  {ns:<{w2}}  {what}")
    if qemu:
        print(f"\nguest shell (commands in, output out): socat - UNIX-CONNECT:{qemu['ctl']}"
              f"\nguest console log: {qemu['console']}\nQMP monitor: {qemu['qmp']}"
              f"\nremove:     roam lab down {lab.suffix}")
        return 0
    print(f"\nenter one:  ip netns exec {topo.vm} bash"
          f"\n            ip netns exec {topo.vm} ping -c1 198.51.100.10   (if ping is installed)"
          f"\nremove:     roam lab down {lab.suffix}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from .lab.netlab import list_lab_namespaces
    from .lab.topology import LAB_PREFIX, remove_namespaces

    if (code := _needs_root()) is not None:
        return code
    states = _states(args.state_dir)
    live = list_lab_namespaces(LAB_PREFIX)
    if args.all:
        if args.name:
            return _err("give NAME or --all, not both", 2)
        targets = sorted(set(live) | {n for s in states.values() for n in s.get("namespaces", [])})
        suffixes = list(states)
    else:
        name = args.name
        if name is None:
            known = sorted(set(states) | {n.rsplit("-", 1)[1] for n in live})
            if not known:
                return _err("no lab is up")
            if len(known) > 1:
                return _err(f"several labs are up ({', '.join(known)}): name one, or use --all", 2)
            name = known[0]
        targets = sorted(set(states.get(name, {}).get("namespaces", [])) |
                         {n for n in live if n.endswith("-" + name)})
        if not targets and name not in states:
            return _err(f"no lab named {name!r} (see `roam lab status`)")
        suffixes = [name]
    removed, errors = remove_namespaces(targets)  # stops a kept QEMU too: it runs in a host's namespace
    for sfx in suffixes:
        workdir = os.path.join(args.state_dir, f"qemu-{sfx}")
        if os.path.isdir(workdir):
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        try:
            os.remove(os.path.join(args.state_dir, f"lab-{sfx}.json"))
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors.append(f"state file of {sfx}: {exc}")
    for n in removed:
        print(f"removed {n}")
    for e in errors:
        print(f"roam lab: {e}", file=sys.stderr)
    if not removed and not errors:
        print("nothing to remove")
    return 1 if errors else 0


def cmd_status(args: argparse.Namespace) -> int:
    from .lab.netlab import list_lab_namespaces
    from .lab.topology import LAB_PREFIX

    states = _states(args.state_dir)
    live = set(list_lab_namespaces(LAB_PREFIX))
    named = {n for s in states.values() for n in s.get("namespaces", [])}
    out: dict[str, Any] = {"labs": [], "orphans": sorted(live - named)}
    for sfx, s in states.items():
        ns = s.get("namespaces", [])
        out["labs"].append({"name": sfx, "created": s.get("created"), "namespaces": ns,
                            "present": [n for n in ns if n in live], "missing": [n for n in ns if n not in live],
                            "hosts": s.get("hosts", {}), "peers": s.get("peers", {}), "vm": s.get("vm"),
                            "vm_host": s.get("vm_host"), "vm_address": s.get("extra", {}).get("vm_address"),
                            "qemu": s.get("extra", {}).get("qemu")})
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if not out["labs"] and not out["orphans"]:
        print("no lab is up")
        return 0
    for lab in out["labs"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lab["created"])) if lab["created"] else "?"
        state = "up" if not lab["missing"] else ("gone" if not lab["present"] else "partly gone")
        print(f"lab {lab['name']}: {state}, {len(lab['present'])}/{len(lab['namespaces'])} namespaces, made {when}")
        for h, d in lab["hosts"].items():
            print(f"  host {h}: {d['address']} in {d['ns']}")
        for p, d in lab["peers"].items():
            print(f"  peer {p}: {d['address']} in {d['ns']}")
        if lab["vm"]:
            print(f"  vm: {lab['vm_address']} in {lab['vm']} (on {lab['vm_host']})")
        elif lab["qemu"]:
            q = lab["qemu"]
            print(f"  vm (qemu pid {q['pid']}): {lab['vm_address']} on {lab['vm_host']}; shell: {q['ctl']}")
        for n in lab["missing"]:
            print(f"  missing: {n}")
    for n in out["orphans"]:
        print(f"orphan namespace (no state file): {n}  -- `roam lab down --all` removes it")
    return 0
