"""`roam conntrack CAPTURE.pcap [--json]`: track a capture, print the table like `conntrack -L`."""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from conntrack import ConnTable, ParseError, Timeouts
from conntrack.pcap import CaptureError, read_pcap, record_packet

from .conntrack_view import as_dict, line


def register(sub, help_text: str) -> None:
    p = sub.add_parser(
        "conntrack", help=help_text,
        description="Track every IP packet of a pcap capture (Ethernet with VLAN tags, raw IP, Linux "
        "cooked or loopback link types) through roam's connection tracker, with the capture's own "
        "timestamps as the clock, and print the table left at the last packet in the layout of "
        "`conntrack -L -o extended` (timeouts are seconds left at that moment). Packets that do "
        "not parse are counted by reason on stderr; a damaged capture is an error naming the record.",
        epilog="example: roam conntrack examples/captures/lab-mixed.pcap --json",
    )
    p.add_argument("capture", metavar="CAPTURE.pcap", help="a pcap file (not pcapng); '-' reads standard input")
    p.add_argument("--json", action="store_true", help="print a JSON array, one object per entry")
    p.add_argument("--capacity", type=int, default=262144, help="table capacity (default %(default)s)")
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
            changes[name.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"roam conntrack: --timeout wants NAME=SECONDS, got {pair!r}") from None
    try:
        return Timeouts().with_(**changes)
    except ValueError as exc:
        raise SystemExit(f"roam conntrack: {exc}") from None


def run(args: argparse.Namespace) -> int:
    table = ConnTable(_timeouts(args.timeout), capacity=args.capacity)
    table.emit_events = False
    bad: Counter[str] = Counter()
    now = 0.0
    records = 0
    try:
        f = sys.stdin.buffer if args.capture == "-" else open(args.capture, "rb")
    except OSError as exc:
        print(f"roam conntrack: cannot open {args.capture}: {exc.strerror}", file=sys.stderr)
        return 1
    with f:
        try:
            for rec in read_pcap(f):
                records += 1
                now = max(now, rec.time)
                deadline = table.next_deadline()
                if deadline is not None and deadline <= now:
                    table.expire(now)
                try:
                    pkt = record_packet(rec)
                except CaptureError:
                    raise
                except ParseError as exc:
                    bad[exc.reason.name.lower()] += 1
                    continue
                if pkt is not None:
                    table.track(pkt, now)
        except CaptureError as exc:
            print(f"roam conntrack: {args.capture}: {exc}", file=sys.stderr)
            return 1
    table.expire(now)
    conns = list(table)  # in order of creation
    if args.json:
        json.dump([as_dict(c, now) for c in conns], sys.stdout, indent=2)
        print()
    else:
        for c in conns:
            print(line(c, now))
    stats = table.stats()
    note = f"roam conntrack: {len(conns)} flow entries have been shown ({records} records"
    if stats.invalid:
        note += f", {stats.invalid} invalid for the tracker"
    if bad:
        note += ", not parsed: " + ", ".join(f"{n} {r}" for r, n in bad.most_common())
    print(note + ").", file=sys.stderr)
    return 0
