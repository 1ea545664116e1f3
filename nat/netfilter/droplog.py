"""``roam nat --drop-log FILE``: one JSON line per dropped packet, for the lab's judge."""
from __future__ import annotations

import json
import socket
import struct


def drop_line(t: float, reason: str, data: bytes) -> str | None:
    """The drop's time (monotonic), reason, protocol, addresses and ports (0 without ports) of an
    IPv4 or IPv6 packet (IPv6: the first header's next header, no extension header looked
    through); None for what is too short to tell."""
    version = data[0] >> 4 if data else 0
    if version == 6 and len(data) >= 40:
        l4, proto, fam, at, n = 40, data[6], socket.AF_INET6, 8, 16
    elif version == 4 and len(data) >= 20:
        l4, proto, fam, at, n = (data[0] & 15) * 4, data[9], socket.AF_INET, 12, 4
    else:
        return None
    ports = struct.unpack_from("!HH", data, l4) if len(data) >= l4 + 4 and proto in (6, 17) else (0, 0)
    return json.dumps({"t": t, "reason": reason, "proto": proto,
                       "src": socket.inet_ntop(fam, data[at:at + n]), "sport": ports[0],
                       "dst": socket.inet_ntop(fam, data[at + n:at + 2 * n]), "dport": ports[1]}) + "\n"
