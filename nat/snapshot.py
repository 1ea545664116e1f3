"""Persistence: the NAT's mappings and flows as versioned JSON, and the file they live in.

``take`` and ``restore`` turn an engine's state into plain data and back (times relative
to ``now``, so a snapshot restores into any clock); ``save`` writes it atomically (temp
file, fsync, rename) and ``load`` reads it.  A restart, or a carried VM's new host,
goes on with the same external ports.  NAT66 flows and mappings ride along (their own
``external_ip6``, checked and rebound apart from the IPv4 one).
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
from typing import TYPE_CHECKING

from conntrack.table import Conn

from .mapping import Binding, MapEntry

if TYPE_CHECKING:
    from .engine import NatEngine

VERSION = 1
KIND = "roam-nat-snapshot"


def take(engine: "NatEngine", now: float) -> dict:
    """The engine's live mappings and flows as JSON-ready data."""
    entries: dict[int, int] = {}
    maps: list[dict] = []
    conns: list[dict] = []
    for c in engine.table:
        b: Binding | None = c.extra
        if b is None or c.deadline <= now:
            continue
        att = []
        for e, rip, rport in b.attached:
            if id(e) not in entries:
                entries[id(e)] = len(maps)
                m = e.mapping
                maps.append({"proto": m.proto, "internal_ip": _ip(m.internal_ip), "internal_port": m.internal_port,
                             "external_port": m.external_port, "static": m.static})
            att.append([entries[id(e)], _ip(rip), rport])
        conns.append({"original": c.original.hex(), "reply": c.reply.hex(), "proto": c.proto,
                      "state": c.state, "status": c.status, "ttl": round(c.deadline - now, 3),
                      "fwd": _tup(b.fwd), "rev": _tup(b.rev), "internal": b.internal, "attached": att})
    ext, ext6 = engine.external_ip, engine.external_ip6
    return {"version": VERSION, "kind": KIND, "external_ip": _ip(ext) if ext else None,
            "external_ip6": _ip(ext6) if ext6 else None, "mappings": maps, "flows": conns}


def restore(engine: "NatEngine", snap: dict, now: float, rebind: bool = False) -> int:
    """Load a snapshot into a fresh engine; returns the flows restored.

    Nothing is restored if the snapshot was taken on another external address: those
    mappings are dead (as after an address change) -- unless ``rebind``, which moves
    every mapping and flow to this engine's external address, ports unchanged (what
    carrying a NAT's state to another host would need; peers still see a new address).
    A damaged snapshot is a ValueError (KeyError, TypeError for missing or odd fields).
    """
    if not isinstance(snap, dict) or snap.get("kind") != KIND:
        raise ValueError("not a roam NAT snapshot")
    if snap.get("version") != VERSION:
        raise ValueError(f"snapshot version {snap.get('version')!r}, this roam reads {VERSION}")
    usable = set()  # the families whose mappings are on this engine's address (after any rebind)
    for family, key, ext in ((4, "external_ip", engine.external_ip), (6, "external_ip6", engine.external_ip6)):
        if ext is None or snap.get(key) is None:
            continue
        if snap[key] != _ip(ext):
            if not rebind:
                continue
            snap = _rebound(snap, _packed(snap[key]), ext, key)
        usable.add(family)
    if not usable:
        return 0
    entries: list[MapEntry | None] = []
    for m in snap["mappings"]:
        iip = _packed(m["internal_ip"])
        family = 4 if len(iip) == 4 else 6
        maps = engine.mapping_table if family == 4 else engine.mapping_table6
        entries.append(maps.claim(int(m["proto"]), iip, int(m["internal_port"]), int(m["external_port"]),
                                  bool(m.get("static"))) if family in usable else None)
    n = 0
    t = engine.table
    for f in snap["flows"]:
        att = [(entries[i], _packed(ip), int(p)) for i, ip, p in f["attached"]]
        okey, rkey = bytes.fromhex(f["original"]), bytes.fromhex(f["reply"])
        if (any(e is None for e, _, _ in att) or t.lookup(okey) is not None or t.lookup(rkey) is not None
                or len(t) >= t.capacity):
            continue
        c = Conn(okey, rkey, int(f["proto"]), int(f["state"]), now)
        c.status = int(f["status"])
        c.deadline = now + max(0.0, float(f["ttl"]))
        c.extra = Binding(_untup(f["fwd"]), _untup(f["rev"]), int(f["internal"]), att)
        c.extra.prepare(c)
        t.adopt(c)
        for e, rip, rport in att:
            e.attach(rip, rport)
        n += 1
    for e in entries:
        if e is not None:
            engine.table_of(e).release_if_unused(e)
    return n


def _rebound(snap: dict, old: bytes, new: bytes, which: str = "external_ip") -> dict:
    """The snapshot as if taken on external address ``new`` (every ``old`` becomes ``new``;
    ``which``: the snapshot's field naming it, one per family)."""
    n = len(old)

    def key(hexkey: str) -> str:
        b = bytes.fromhex(hexkey)
        if len(b) != 1 + 2 * n + 4:
            return hexkey  # the other family's flow
        src, dst = b[1:1 + n], b[1 + n:1 + 2 * n]
        return (b[:1] + (new if src == old else src) + (new if dst == old else dst) + b[1 + 2 * n:]).hex()

    def tup(t: list) -> list:
        o, n = _ip(old), _ip(new)
        return [n if t[0] == o else t[0], n if t[1] == o else t[1], t[2], t[3]]

    flows = [dict(f, original=key(f["original"]), reply=key(f["reply"]), fwd=tup(f["fwd"]), rev=tup(f["rev"]))
             for f in snap["flows"]]
    return dict(snap, **{which: _ip(new)}, flows=flows)


def _ip(b: bytes) -> str:
    # inet_ntop, not ipaddress: a snapshot of a busy NAT writes hundreds of thousands of them
    return socket.inet_ntop(socket.AF_INET6 if len(b) == 16 else socket.AF_INET, b)


def _packed(s: str) -> bytes:
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in s else socket.AF_INET, s)
    except (OSError, TypeError):
        raise ValueError(f"{s!r} is not an IP address") from None


def _tup(t: tuple) -> list:
    return [_ip(t[0]), _ip(t[1]), t[2], t[3]]


def _untup(v: list) -> tuple:
    return (_packed(v[0]), _packed(v[1]), int(v[2]), int(v[3]))


# ----------------------------------------------------------------------------- on disk
def save(path: str, snap: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".nat-snapshot-", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # dumps, not dump: only a one-shot encode takes the C encoder (json.dump iterates in
            # Python, measured 5x slower: a big table's snapshot held the GIL from the packets)
            f.write(json.dumps(snap, separators=(",", ":")))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load(path: str) -> dict | None:
    """The snapshot at ``path``, or None if there is none. Damaged JSON is a ValueError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
