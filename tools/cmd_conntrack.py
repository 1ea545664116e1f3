"""`roam conntrack CAPTURE`: track a capture, print the table (or its events) as conntrack-tools does.

The options are conntrack's own (`-L`, `-E`, `-C`, `-o extended`, `-p`, `--state`, `-s`,
`-d`, `-r`, `-q`, `--sport`, `--dport`, `-f`, `-m`), so a command line that works against
the kernel's table works against a capture.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import math
import socket
import sys
from collections import Counter
from dataclasses import dataclass, replace

from conntrack import ConnTable, FlowTuple, ParseError, Proto, TcpState, Timeouts
from conntrack.events import ConnEvent, EventKind, Why
from conntrack.pcap import CaptureError, open_capture, record_packet

from .conntrack_view import as_dict, event_line, line, proto_name
from .cli import add_command, at_least_one as _at_least_one

_OUTPUTS = ("extended", "timestamp")


def _proto(text: str) -> int:
    names = {v: k for k, v in ((p, proto_name(p)) for p in Proto) if v != "unknown"}
    if text.lower() in names:
        return names[text.lower()]
    try:
        number = int(text)
    except ValueError:
        try:
            number = socket.getprotobyname(text)
        except OSError:
            raise argparse.ArgumentTypeError(f"unknown protocol {text!r} (a name such as tcp, or 0-255)") from None
    if not 0 <= number <= 255:
        raise argparse.ArgumentTypeError(f"protocol number {number} is not 0-255")
    return number


def _network(text: str):
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address or ADDRESS/PREFIX") from None


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return int(text)


def _state(text: str) -> TcpState:
    try:
        state = TcpState[text.upper()]
    except KeyError:
        state = None
    if state is None or state >= TcpState.IGNORE:
        known = ", ".join(s.name for s in TcpState if s < TcpState.IGNORE)
        raise argparse.ArgumentTypeError(f"unknown TCP state {text!r} (one of {known})")
    return state


def _mark(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    try:
        v, m = int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MARK or MARK/MASK") from None
    if not (0 <= v <= 0xFFFFFFFF and 0 <= m <= 0xFFFFFFFF):
        raise argparse.ArgumentTypeError(f"{text!r}: a mark is 32 bits")
    return v, m


def _outputs(text: str) -> frozenset[str]:
    got = {part.strip().lower() for part in text.split(",") if part.strip()}
    bad = got - set(_OUTPUTS)
    if bad or not got:
        raise argparse.ArgumentTypeError(f"-o {text!r}: known here are {', '.join(_OUTPUTS)} "
                                         "(a capture has no ids, labels or zones; xml is not written)")
    return frozenset(got)


DESCRIPTION = """\
Track every IP packet of a capture (pcap or pcapng, gzip-compressed or not; Ethernet with VLAN tags, raw
IP, Linux cooked or loopback link types) through roam's connection tracker, with the capture's own
timestamps as the clock, and print what conntrack-tools would: the table left at the last packet in
`conntrack -L`'s layout (timeouts are the whole seconds left at that moment), or with -E every
NEW/UPDATE/DESTROY event as `conntrack -E -o timestamp` prints it, stamped with the capture's time.
Packets that do not parse are counted by reason on stderr; a damaged capture is an error naming the
record (pcap) or block (pcapng) and its byte offset.
"""
EXAMPLES = ("roam conntrack examples/captures/lab-mixed.pcap -p tcp --state ESTABLISHED",
            "roam conntrack capture.pcapng.gz -E -o extended", "roam conntrack capture.pcap -C -s 198.18.0.0/24")


def register(sub, help_text: str) -> None:
    p = add_command(sub, "conntrack", help_text, DESCRIPTION, EXAMPLES)
    p.add_argument("capture", metavar="CAPTURE", help="a pcap or pcapng file, gzip-compressed or not; "
                   "'-' reads standard input")
    what = p.add_mutually_exclusive_group()
    what.add_argument("-L", "--dump", action="store_true", help="list the table (the default)")
    what.add_argument("-E", "--event", action="store_true",
                      help="print the tracker's events over the capture instead, each with its packet's time")
    what.add_argument("-C", "--count", action="store_true", help="print only how many entries match")
    what.add_argument("--json", action="store_true", help="print a JSON array, one object per matching entry")
    p.add_argument("-o", "--output", type=_outputs, default=frozenset(), metavar="extended[,timestamp]",
                   help="extended: family name and number first (`conntrack -o extended`); timestamp: "
                   "accepted for -E, whose lines always carry the capture's time")
    f = p.add_argument_group("filters (as conntrack's; all given must match)")
    f.add_argument("-p", "--protonum", type=_proto, metavar="PROTO", help="layer-4 protocol: name or number")
    f.add_argument("--state", type=_state, metavar="STATE",
                   help="TCP state, e.g. ESTABLISHED (entries of other protocols never match)")
    f.add_argument("-f", "--family", choices=("ipv4", "ipv6"), help="layer-3 family")
    f.add_argument("-s", "--src", "--orig-src", type=_network, metavar="ADDR[/PREFIX]",
                   help="source address of the original direction")
    f.add_argument("-d", "--dst", "--orig-dst", type=_network, metavar="ADDR[/PREFIX]",
                   help="destination address of the original direction")
    f.add_argument("-r", "--reply-src", type=_network, metavar="ADDR[/PREFIX]",
                   help="source address of the reply direction")
    f.add_argument("-q", "--reply-dst", type=_network, metavar="ADDR[/PREFIX]",
                   help="destination address of the reply direction")
    f.add_argument("--sport", "--orig-port-src", type=_port, metavar="PORT", help="source port, original direction")
    f.add_argument("--dport", "--orig-port-dst", type=_port, metavar="PORT",
                   help="destination port, original direction")
    f.add_argument("-m", "--mark", type=_mark, metavar="MARK[/MASK]",
                   help="connection mark: a capture carries none, so every entry has mark 0; 0 (under the "
                   "mask) matches every entry and any other value none")
    p.add_argument("--capacity", type=_at_least_one, default=262144, metavar="N",
                   help="table capacity (default %(default)s)")
    p.add_argument("--timeout", action="append", default=[], metavar="NAME=SECONDS",
                   help="override a timeout, e.g. --timeout established=3600 --timeout udp=60 (repeatable)")
    p.set_defaults(func=run)


def _timeouts(pairs: list[str]) -> Timeouts:
    changes = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            seconds = float(value)
        except ValueError:
            raise SystemExit(f"roam conntrack: --timeout wants NAME=SECONDS, got {pair!r}") from None
        if not math.isfinite(seconds):
            raise SystemExit(f"roam conntrack: --timeout {pair!r}: seconds must be a finite number")
        changes[name.strip()] = seconds
    try:
        return Timeouts().with_(**changes)
    except ValueError as exc:
        raise SystemExit(f"roam conntrack: {exc}") from None


IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Filter:
    """conntrack's filters, over one entry's two tuples (all given must match)."""

    proto: int | None = None
    state: TcpState | None = None
    family: int | None = None
    src: IPNet | None = None
    dst: IPNet | None = None
    reply_src: IPNet | None = None
    reply_dst: IPNet | None = None
    sport: int | None = None
    dport: int | None = None
    mark: tuple[int, int] | None = None

    @classmethod
    def of(cls, a: argparse.Namespace) -> "Filter":
        family = {"ipv4": 4, "ipv6": 6}.get(a.family) if a.family else None
        return cls(a.protonum, a.state, family, a.src, a.dst, a.reply_src, a.reply_dst, a.sport, a.dport, a.mark)

    def __bool__(self) -> bool:
        return any(getattr(self, n) is not None for n in self.__slots__)

    def matches(self, o: FlowTuple, r: FlowTuple, state: TcpState | None) -> bool:
        if self.proto is not None and o.proto != self.proto:
            return False
        if self.state is not None and state != self.state:
            return False
        if self.family is not None and o.family != self.family:
            return False
        for net, raw in ((self.src, o.src), (self.dst, o.dst), (self.reply_src, r.src), (self.reply_dst, r.dst)):
            if net is not None and (net.version != (4 if len(raw) == 4 else 6)
                                    or ipaddress.ip_address(raw) not in net):
                return False
        ports = o.proto in (Proto.TCP, Proto.UDP, Proto.UDPLITE, Proto.SCTP, Proto.DCCP)
        if self.sport is not None and not (ports and o.sport == self.sport):
            return False
        if self.dport is not None and not (ports and o.dport == self.dport):
            return False
        if self.mark is not None and self.mark[0] & self.mark[1]:
            return False  # every entry's mark is 0
        return True


def _err(msg: str) -> int:
    print(f"roam conntrack: {msg}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    table = ConnTable(_timeouts(args.timeout), capacity=args.capacity)
    table.journal = frozenset(EventKind) if args.event else frozenset()
    want = Filter.of(args)
    extended = "extended" in args.output
    bad: Counter[str] = Counter()
    now = 0.0
    records = events = 0
    out = sys.stdout
    try:
        f = sys.stdin.buffer if args.capture == "-" else open(args.capture, "rb")
    except OSError as exc:
        return _err(f"cannot open {args.capture}: {exc.strerror}")

    def show(evs) -> int:
        shown = 0
        for e in evs:
            if not want or want.matches(e.original, e.reply, e.state):
                out.write(event_line(e, extended) + "\n")
                shown += 1
        return shown

    with f:
        try:
            for rec in open_capture(f):
                records += 1
                now = max(now, rec.time)
                deadline = table.next_deadline()
                if deadline is not None and deadline <= now:
                    table.expire(now)
                    if args.event:  # stamped when they timed out, in that order
                        events += show(sorted(map(_timed_out, table.pop_events()), key=lambda e: e.now))
                try:
                    pkt = record_packet(rec)
                except CaptureError:
                    raise
                except ParseError as exc:
                    bad[exc.reason.name.lower()] += 1
                    continue
                if pkt is not None:
                    table.track(pkt, now)
                    if args.event and table.has_events:
                        events += show(table.pop_events())
        except CaptureError as exc:
            return _err(f"{args.capture}: {exc}")
        except OSError as exc:
            return _err(f"cannot read {args.capture}: {exc.strerror}")
    if args.event:
        return _note(f"{events} flow events have been shown", records, table, bad)
    table.expire(now)
    conns = [c for c in table if not want or want.matches(*c.tuples(), c.tcp_state)]  # in order of creation
    if args.count:
        print(len(conns))
        return 0
    if args.json:
        json.dump([as_dict(c, now) for c in conns], out, indent=2)
        print()
    else:
        for c in conns:
            out.write(line(c, now, extended) + "\n")
    return _note(f"{len(conns)} flow entries have been shown", records, table, bad)


def _timed_out(e: ConnEvent) -> ConnEvent:
    """A timeout's DESTROY, stamped with the moment the entry timed out (the next packet,
    which made us look, may come much later)."""
    if e.why == Why.TIMEOUT and e.conn is not None:
        return replace(e, now=min(e.now, e.conn.deadline))
    return e


def _note(what: str, records: int, table: ConnTable, bad: Counter) -> int:
    note = f"roam conntrack: {what} ({records} records"
    invalid = table.stats().invalid
    if invalid:
        note += f", {invalid} invalid for the tracker"
    if bad:
        note += ", not parsed: " + ", ".join(f"{n} {r}" for r, n in bad.most_common())
    sys.stdout.flush()
    print(note + ").", file=sys.stderr)
    return 0
