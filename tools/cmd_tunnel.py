"""`roam tunnel`: the layer-2 tunnel home — genkey, proxy, host, status, attach|detach|macs.

    roam tunnel genkey --out KEYFILE
    roam tunnel proxy --listen IP:PORT --bridge BR --key-file KEYFILE [--transport udp|tcp]
    roam tunnel host --proxy IP:PORT --tap NAME [--bridge BR] [--mac MAC]... --key-file KEYFILE [--transport udp|tcp]
    roam tunnel status
    roam tunnel attach|detach --mac MAC     (tools/tunnel_control.py: a running host agent's control socket)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import stat
import sys
import time

from . import daemon
from .cli import at_least_one, seconds_from, within
from .tunnel_control import DEFAULT_STATUS_DIR, add_agent_options, add_control_commands, agent_kwargs
from .tunnel_options import (
    MTU_MAX, MTU_MIN, PATH_MTU_MAX, PATH_MTU_MIN, checked, endpoint, ifname, unicast_mac,
)

#: The shortest timer an option may set: shorter ones only keep the loop busy.
MIN_SECONDS = 0.01
_MTU_HELP = (f"MTU of the TAP device, {MTU_MIN}..{MTU_MAX} (default 1500). Each frame costs 32 bytes of tunnel "
             "overhead plus UDP/IPv4 28 (IPv6 48); over UDP a message larger than --path-mtu allows leaves as "
             "tunnel segments that each fit (never as IP fragments).")


def register(subparsers, help_text: str) -> None:
    p = subparsers.add_parser(
        "tunnel", help=help_text,
        description="The layer-2 tunnel home (the VNET model): a VM's Ethernet frames are carried over UDP "
        "or TCP, authenticated and encrypted (AES-256-GCM or ChaCha20-Poly1305, negotiated) under keys derived "
        "from a pre-shared key, from the host "
        "it runs on to a proxy on its home LAN, so it keeps its home MAC and IP wherever it moves.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  roam tunnel genkey --out tunnel.key\n"
        "  roam tunnel proxy --listen 192.0.2.1:4789 --bridge br-home --key-file tunnel.key\n"
        "  roam tunnel host --proxy 192.0.2.1:4789 --tap vmtap0 --bridge br-vm --key-file tunnel.key\n"
        "  roam tunnel detach --mac 02:00:00:00:00:01   # an orchestration hook on the host a VM left\n"
        "  roam tunnel status",
    )
    sub = p.add_subparsers(dest="tunnel_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    g = sub.add_parser("genkey", help="make a new random pre-shared key (base64) for --key-file",
                       description="Make a new random 32-byte key, base64: written to --out FILE (created "
                       "mode 600, never over an existing file), or printed on stdout (a regular file it is "
                       "redirected to is made mode 600). Give the same file to the proxy and every host end.")
    g.add_argument("--out", metavar="FILE", help="write the key to FILE, created with mode 600")
    g.set_defaults(func=cmd_genkey)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--key-file", metavar="FILE",
                       help="pre-shared key file written by `roam tunnel genkey`, required unless --plaintext; "
                       "refused when group or others may read it. SIGHUP reads it again (key rotation; "
                       "sessions kept)")
        q.add_argument("--insecure-key-perms", action="store_true",
                       help="accept a key file that group or others may read (not recommended)")
        q.add_argument("--transport", choices=("udp", "tcp"), default="udp",
                       help="udp (default) or tcp with length framing, for sites that only let TCP out")
        q.add_argument("--mtu", type=within(MTU_MIN, MTU_MAX), default=1500, metavar="BYTES", help=_MTU_HELP)
        q.add_argument("--status-dir", default=DEFAULT_STATUS_DIR, metavar="DIR",
                       help=f"where the running end publishes its status for `roam tunnel status` "
                       f"(default {DEFAULT_STATUS_DIR})")
        q.add_argument("--plaintext", action="store_true",
                       help="BENCHMARKS ONLY: no encryption, no authentication (prints a warning)")
        q.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                       help="carry TCP GSO super-frames (up to ~64 KiB, the VM's own TSO output) with their "
                       "virtio-net header instead of 1500-byte frames: on by default, negotiated per session "
                       "(on when both ends can; a TAP without virtio-net headers, or an end given --no-offload, "
                       "makes it off); `roam tunnel status` shows what was negotiated")
        q.add_argument("--cipher", choices=("auto", "aes-256-gcm", "chacha20-poly1305"), default="auto",
                       help="the session keys' AEAD: AES-256-GCM when both ends ask for it, else "
                       "ChaCha20-Poly1305; auto (default) asks for AES-256-GCM where this CPU has AES "
                       "instructions (there it seals 64 KiB about 3x faster); the handshakes and the pre-shared "
                       "key stay ChaCha20-Poly1305's; `roam tunnel status` shows what was negotiated")
        q.add_argument("--path-mtu", type=within(PATH_MTU_MIN, PATH_MTU_MAX), default=1500, metavar="BYTES",
                       help=f"--transport udp: the underlay's MTU, {PATH_MTU_MIN}..{PATH_MTU_MAX} (default 1500; "
                       "a host end also takes its "
                       "route's MTU if smaller): larger messages are cut into tunnel segments that fit it, "
                       "sent with UDP GSO and received with UDP GRO")
        daemon.add_options(q)

    pr = sub.add_parser("proxy", help="run the proxy end on the home LAN",
                        description="Run the proxy end: make a TAP device, enslave it to the existing "
                        "home-LAN bridge BR, and carry frames between it and the host ends that attach. "
                        "Learns MACs, floods broadcast, serves several host ends and VMs, and announces a "
                        "VM's addresses (gratuitous ARP / unsolicited NA, on the LAN and to the other host ends) "
                        "every time its MAC moves to another host end, and when that host end's address changes.")
    pr.add_argument("--listen", required=True, type=endpoint, metavar="IP:PORT", help="address to listen on")
    pr.add_argument("--bridge", required=True, type=ifname, metavar="BR", help="existing home-LAN bridge to join")
    pr.add_argument("--tap", default=None, type=ifname, metavar="NAME",
                    help="name of the TAP to make (default roamp<PORT>)")
    pr.add_argument("--session-timeout", type=seconds_from(MIN_SECONDS), default=60.0, metavar="SECONDS",
                    help="close a session after this many seconds without authentic traffic (default 60)")
    pr.add_argument("--mac-age", type=seconds_from(MIN_SECONDS), default=300.0, metavar="SECONDS",
                    help="MAC table ageing in seconds (default 300)")
    pr.add_argument("--max-sessions", type=at_least_one, default=256, metavar="N",
                    help="host ends served at once (default 256); beyond it a new one is refused, counted")
    pr.add_argument("--mac-capacity", type=at_least_one, default=4096, metavar="N",
                    help="VM MACs known at once (default 4096); beyond it the least recently used is dropped")
    pr.add_argument("--max-tcp-connections", type=at_least_one, default=512, metavar="N",
                    help="--transport tcp: connections held at once; beyond it the oldest one not yet "
                    "authenticated is closed, or the new one refused (default 512)")
    pr.add_argument("--tcp-auth-timeout", type=seconds_from(MIN_SECONDS), default=10.0, metavar="SECONDS",
                    help="--transport tcp: close a connection that sent no authentic message within this "
                    "many seconds (default 10)")
    common(pr)
    pr.set_defaults(func=checked(pr, cmd_proxy))

    h = sub.add_parser("host", help="run the host agent: one per host, for every VM on its bridge",
                       description="Run the host agent, one per hypervisor host: make TAP NAME (enslaved to BR "
                       "when given) and carry the frames of every VM on that bridge to the proxy. It runs "
                       "before any VM comes and after the last leaves: a VM is learned from its first frame "
                       "(or `roam tunnel attach`), forgotten when its TAP leaves the bridge (or `roam tunnel "
                       "detach`); a claim never pulls a VM's traffic from the host where it is speaking. "
                       "Sends keepalives and re-attaches at once when this host's address changes.")
    h.add_argument("--proxy", required=True, type=endpoint, metavar="IP:PORT", help="the proxy's address")
    h.add_argument("--tap", required=True, type=ifname, metavar="NAME", help="name of the TAP to make")
    h.add_argument("--bridge", type=ifname, metavar="BR", help="existing bridge to enslave the TAP to")
    h.add_argument("--mac", action="append", default=[], type=unicast_mac, metavar="MAC",
                   help="a VM's unicast MAC this host end serves (a claim, repeatable; not needed: VMs are "
                   "learned from their frames)")
    h.add_argument("--no-learn", action="store_true", help="do not learn more VM MACs from frames")
    h.add_argument("--keepalive", type=seconds_from(MIN_SECONDS), default=5.0, metavar="SECONDS",
                   help="keepalive interval in seconds (default 5)")
    h.add_argument("--dead-after", type=seconds_from(MIN_SECONDS), default=15.0, metavar="SECONDS",
                   help="re-attach under a new session after this many silent seconds, more than --keepalive "
                   "(default 15)")
    common(h)
    add_agent_options(h)
    h.set_defaults(func=checked(h, cmd_host))

    s = sub.add_parser("status", help="show running tunnel ends: sessions, endpoints, last seen, counters",
                       description="Show the sessions, endpoints, last-seen times and counters of every "
                       "tunnel end running with the same --status-dir; a status file that cannot be read is "
                       "named on stderr and skipped. Exit status: 0 when at least one end runs; 1 when none does "
                       "(no status file, or every end the files describe is GONE: its process no longer runs).")
    s.add_argument("--status-dir", default=DEFAULT_STATUS_DIR, metavar="DIR",
                   help=f"the --status-dir the ends were started with (default {DEFAULT_STATUS_DIR})")
    s.add_argument("--json", action="store_true", help="print the raw status as JSON")
    s.set_defaults(func=cmd_status)
    add_control_commands(sub)


def cmd_genkey(args) -> int:
    from tunnel.crypto import generate_key_text
    text = generate_key_text() + "\n"
    if args.out:
        try:
            fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            print(f"roam tunnel genkey: cannot create {args.out}: {exc}", file=sys.stderr)
            return 1
        try:
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(text)
        except OSError as exc:  # a full disk: no half-written key left behind
            with contextlib.suppress(OSError):
                os.unlink(args.out)
            print(f"roam tunnel genkey: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        return 0
    try:  # `genkey > FILE` under the usual umask made a 0644 key: narrow a regular file of ours
        st = os.fstat(sys.stdout.fileno())
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.fchmod(sys.stdout.fileno(), 0o600)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        _write_stdout(text)
    except OSError as exc:  # `genkey > /dev/full`, a closed stdout...
        print(f"roam tunnel genkey: cannot write the key to standard output: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _write_stdout(text: str) -> None:
    """``text`` on stdout, straight to its descriptor when it has one: a write that fails leaves nothing
    buffered for Python to fail on again (and print a traceback of) at exit."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):  # replaced by a stream without one (tests)
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    sys.stdout.flush()
    data = text.encode()
    while data:
        data = data[os.write(fd, data):]


class KeyFileRefused(Exception):
    """The key file cannot be used (the message says why; it never holds key material)."""


def load_cipher(key_file: str, insecure_perms: bool = False):
    """The cipher of a key file, refusing one that group or others may read unless told."""
    from tunnel.crypto import AeadCipher, KeyFileError, load_key
    try:
        st = os.stat(key_file)
        if st.st_mode & 0o077 and not insecure_perms:
            raise KeyFileRefused(f"{key_file} is mode {stat.S_IMODE(st.st_mode):o}: group or others may read it "
                            "(chmod 600 it, or pass --insecure-key-perms)")
        key = load_key(key_file)
    except (OSError, KeyFileError) as exc:
        raise KeyFileRefused(f"cannot read key file {key_file}: {exc}") from None
    return AeadCipher(key)


def _cipher(args):
    from tunnel.crypto import PlainCipher
    if args.plaintext:
        print("roam tunnel: WARNING: --plaintext: frames are neither encrypted nor authenticated. "
              "For benchmarks only.", file=sys.stderr)
        return PlainCipher()
    if not args.key_file:
        print("roam tunnel: --key-file is required (make one with `roam tunnel genkey --out KEYFILE`)",
              file=sys.stderr)
        return None
    try:
        cipher = load_cipher(args.key_file, args.insecure_key_perms)
    except KeyFileRefused as exc:
        print(f"roam tunnel: {exc}", file=sys.stderr)
        return None
    logging.getLogger("roam.tunnel").info("key fingerprint %s", cipher.fingerprint)
    return cipher


def _run(driver, args) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reads the key file again (rotation), as `roam nat` reloads."""
    if not args.plaintext:
        driver.key_loader = lambda: load_cipher(args.key_file, args.insecure_key_perms)
    handlers = {signal.SIGTERM: driver.request_stop, signal.SIGINT: driver.request_stop,
                signal.SIGHUP: driver.request_reload}
    old = {sig: signal.signal(sig, h) for sig, h in handlers.items()}
    try:
        driver.run()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    return 0


def _max_frame(args) -> int:
    from tunnel.wire import OFFLOAD_MAX_FRAME
    return OFFLOAD_MAX_FRAME if args.offload else args.mtu + 14 + 8


def _segment_size(args, fam: int, peer: tuple[str, int] | None = None) -> int:
    """Over UDP, the largest datagram the path takes (0 over TCP: the stream carries any message)."""
    from tunnel.io.transport import route_mtu, segment_size
    from tunnel.segment import MIN_SEGMENT_SIZE
    if args.transport != "udp":
        return 0
    mtu = args.path_mtu
    if peer is not None:
        mtu = min(mtu, route_mtu(fam, peer) or mtu)
    return max(MIN_SEGMENT_SIZE, segment_size(fam, mtu))


def _make_tap(name: str, args, what: str):
    """The TAP (with virtio-net headers unless --no-offload; without them if the kernel refuses)."""
    from tunnel.io.tap import Tap
    try:
        tap = Tap(name, args.mtu, args.bridge, offload=args.offload)
    except OSError as exc:
        print(f"roam tunnel {what}: cannot make the TAP: {exc}", file=sys.stderr)
        return None
    if args.offload and not tap.offload:
        logging.getLogger("roam.tunnel").warning("%s: TAP %s has no virtio-net headers: offload off", what, name)
    return tap


def _prepare(args, what: str, parse, tap_name, label: str = ""):
    """What both ends do before their engine: the key, the addresses the command line gives
    (``parse()``, its errors prefixed by ``label``), the TAP (named ``tap_name(parsed)``).
    ``(cipher, parsed, tap)``, or the exit status."""
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    from .privileges import CAP_NET_ADMIN, refusal

    why = refusal("a TAP device, a bridge port", CAP_NET_ADMIN)
    if why:
        print(f"roam tunnel {what}: {why}", file=sys.stderr)
        return 1
    cipher = _cipher(args)
    if cipher is None:
        return 2
    try:
        parsed = parse()
    except (ValueError, OSError) as exc:
        print(f"roam tunnel {what}: {label}{exc}", file=sys.stderr)
        return 2
    tap = _make_tap(tap_name(parsed), args, what)
    if tap is None:
        return 1
    args.offload = tap.offload
    return cipher, parsed, tap


def _serve(args, what: str, tap, make_driver, started: str, os_error: str = "") -> int:
    """Serve --metrics, make the driver (its errors closing the TAP, prefixed by ``os_error`` when the
    system's), say it ``started``, and run it until a signal stops it: sd_notify READY=1 once it runs
    (TAP, sockets and first messages in place), STOPPING=1 when it stops."""
    made: list = []
    server = None
    if args.metrics:
        from .metrics import MetricsError, TunnelCollector, serve

        try:
            server = serve(args.metrics, TunnelCollector(lambda: made[0].published if made else None, time.monotonic))
        except MetricsError as exc:
            tap.close()
            print(f"roam tunnel {what}: {exc}", file=sys.stderr)
            return 1
    try:
        try:
            driver = make_driver()
        except ValueError as exc:
            tap.close()
            print(f"roam tunnel {what}: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            tap.close()
            print(f"roam tunnel {what}: {os_error}{exc}", file=sys.stderr)
            return 1
        made.append(driver)
        driver.on_ready = lambda: daemon.ready(started)
        driver.on_stopping = lambda: daemon.stopping()
        logging.getLogger("roam.tunnel").info("%s", started)
        return _run(driver, args)
    finally:
        if server is not None:
            server.shutdown()


def cmd_proxy(args) -> int:
    from tunnel.io import ProxyDriver, parse_endpoint
    from tunnel.io.transport import family
    from tunnel.proxy import ProxyEnd
    ready = _prepare(args, "proxy", lambda: parse_endpoint(args.listen), lambda listen: args.tap or f"roamp{listen[1]}",
                     "--listen: ")
    if isinstance(ready, int):
        return ready
    cipher, listen, tap = ready
    engine = ProxyEnd(cipher, session_timeout=args.session_timeout, mac_age=args.mac_age,
                      max_sessions=args.max_sessions, mac_capacity=args.mac_capacity,
                      max_frame=_max_frame(args), offload=tap.offload,
                      segment_size=_segment_size(args, family(listen[0])), aes=_aes(args))
    return _serve(args, "proxy", tap, lambda: ProxyDriver(
        engine, tap, listen, args.transport, time.monotonic, args.status_dir,
        max_tcp_conns=args.max_tcp_connections, tcp_auth_timeout=args.tcp_auth_timeout),
        f"proxy on {args.listen} ({args.transport}), tap {tap.name} in bridge {args.bridge}",
        f"cannot listen on {args.listen}: ")


def cmd_host(args) -> int:
    from tunnel.host import HostEnd
    from tunnel.io import HostDriver, parse_endpoint
    from tunnel.io.transport import family
    from tunnel.wire import parse_mac
    ready = _prepare(args, "host", lambda: (parse_endpoint(args.proxy), [parse_mac(m) for m in args.mac]),
                     lambda _: args.tap)
    if isinstance(ready, int):
        return ready
    cipher, (proxy, macs), tap = ready
    engine = HostEnd(cipher, macs, learn_macs=not args.no_learn, keepalive=args.keepalive,
                     dead_after=args.dead_after, max_frame=_max_frame(args), offload=tap.offload,
                     segment_size=_segment_size(args, family(proxy[0]), proxy), aes=_aes(args))
    return _serve(args, "host", tap, lambda: HostDriver(engine, tap, proxy, args.transport, time.monotonic,
                                                        args.status_dir, **agent_kwargs(args)),
                  f"host end to {args.proxy} ({args.transport}), tap {tap.name}"
                  + (f" in bridge {args.bridge}" if args.bridge else ""))


def _aes(args) -> bool:
    """Whether this end asks for AES-256-GCM session keys (``--cipher``)."""
    from tunnel.crypto import aes_is_fast

    return args.cipher == "aes-256-gcm" or args.cipher == "auto" and aes_is_fast()


def cmd_status(args) -> int:
    """Print every end's status; a file that cannot be read or shown: one line on stderr, skipped.
    0 when an end runs; 1 when none does (no status file, or every end is GONE)."""
    problems: list[str] = []
    ends = read_status_dir(args.status_dir, problems)
    if args.json:
        shown = ends
        print(json.dumps(ends, indent=1))
    else:
        shown = []
        for st in ends:
            try:
                lines = _end_lines(st)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                problems.append(f"{os.path.join(args.status_dir, st['file'])}: skipped: not a status file this "
                                f"roam can show ({type(exc).__name__}: {exc})")
                continue
            shown.append(st)
            print("\n".join(lines))
    for p in problems:
        print(f"roam tunnel status: {p}", file=sys.stderr)
    if not shown:
        if not args.json:
            print(f"no tunnel ends running (status directory {args.status_dir})")
        return 1
    if not any(st["alive"] for st in shown):
        print(f"roam tunnel status: every tunnel end in {args.status_dir} is GONE (its process no longer runs): "
              f"{len(shown)} stale status file(s)", file=sys.stderr)
        return 1
    return 0


def _end_lines(st: dict) -> list[str]:
    """One end's status as lines; an odd shape (a list where a table should be...) raises."""
    alive = st["alive"]
    head = f"{st.get('role')} pid {st.get('pid')}{'' if alive else ' (NOT RUNNING: process gone, stale status)'}"
    where = st.get("listen") or f"proxy {st.get('proxy')} from {st.get('local')}"
    out = [f"{head}  {st.get('transport')} {where}  tap {st.get('tap')} mtu {st.get('tap_mtu')}  "
           f"{st.get('cipher')}  up {'?' if st.get('uptime') is None else st['uptime']}s"]
    if st.get("role") == "host":
        out.append(f"  session {st.get('session')} {_state(st.get('state'), alive)}  "
                   f"macs {', '.join(st.get('macs') or []) or '-'}  "
                   f"last heard {_ago(st.get('last_heard_ago'))}  {_offload(st)}")
    elif st.get("role") == "proxy":
        out.append(f"  {_offload(st)}")
    for s in st.get("sessions") or []:
        out.append(f"  session {s.get('session', '?')} {_state(s.get('state', '?'), alive)}  endpoint "
                   f"{s.get('endpoint', '?')}  last seen {_ago(s.get('last_heard_ago', '?'))}  "
                   f"macs {', '.join(s.get('named_macs') or []) or '-'}  offload {'on' if s.get('offload') else 'off'}"
                   f"  {s.get('cipher', '')}  {_fmt(s.get('counters') or {})}")
    if st.get("macs") and st.get("role") == "proxy":
        out.append("  mac table: " + ", ".join(f"{m} -> {p}" for m, p in st["macs"].items()))
    out.append(f"  counters: {_fmt(st.get('counters') or {})}")
    out.append(f"  drops: {_fmt(st.get('drops') or {}) or 'none'}")
    if st.get("driver"):
        out.append(f"  driver: {_fmt(st['driver'])}")
    return out


def read_status_dir(status_dir: str, problems: list[str] | None = None) -> list[dict]:
    """Status snapshots of the ends running with this status directory (stale ones marked).  What
    cannot be read (the directory, a file, a file that holds no JSON object) is skipped, one line
    each in ``problems``; a file gone meanwhile (its end stopped) silently."""
    out: list[dict] = []
    said = [] if problems is None else problems
    try:
        names = sorted(os.listdir(status_dir))
    except FileNotFoundError:
        return out
    except OSError as exc:
        said.append(f"--status-dir {status_dir}: {exc.strerror or exc}")
        return out
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(status_dir, name)
        try:
            with open(path) as f:
                st = json.load(f)
        except FileNotFoundError:
            continue
        except OSError as exc:
            said.append(f"{path}: skipped: cannot read it: {exc.strerror or exc}")
            continue
        except ValueError as exc:
            said.append(f"{path}: skipped: not JSON ({exc})")
            continue
        if not isinstance(st, dict):
            said.append(f"{path}: skipped: not a status file (a JSON {type(st).__name__}, not an object)")
            continue
        st["alive"] = _alive(st.get("pid"), st.get("pid_start"))
        st["file"] = name
        out.append(st)
    return out


def _alive(pid, started) -> bool:
    """Whether the process that wrote a status file still runs: its pid exists and, when the file
    says when it started, is that same process (not a later one given the pid again)."""
    from tunnel.io.loop import process_start
    try:
        pid = int(pid)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    except (TypeError, ValueError, OverflowError):
        return False  # no pid recorded: nothing says it runs
    return started is None or process_start(pid) in (None, started)


def _offload(st: dict) -> str:
    """What offload this end can do and (host end) what its session negotiated, and how UDP is cut."""
    seg = st.get("segment_size")
    cut = f", udp segments of {seg} bytes (lost super-frames {st.get('superframes_lost', 0)})" if seg else ""
    if st.get("role") == "proxy":
        return f"offload {'capable' if st.get('offload') else 'not capable'} (negotiated per session){cut}"
    if not st.get("offload_capable", st.get("offload")):
        return f"offload off (this end cannot: --no-offload or no virtio-net headers){cut}"
    if st.get("offload"):
        return f"offload on (negotiated){cut}"
    return f"offload {'off (the proxy cannot)' if st.get('state') == 'ATTACHED' else 'not negotiated yet'}{cut}"


def _state(state, alive: object) -> str:
    return str(state) if alive else f"GONE (was {state})"


def _ago(seconds) -> str:
    if seconds is None:
        return "never"
    return f"{seconds}s ago" if isinstance(seconds, (int, float)) else "?"


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(d.items()))
