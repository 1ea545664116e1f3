"""The plugin's status (the file `roam nat status` reads) as plain data."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plugin import Plugin


def status_data(p: "Plugin") -> dict:
    """The engine's status with the driver's around it: queue client, offload (its kernel-side
    translations added to the counters), a worker's share of the pools; under the plugin's lock."""
    eng = p.engine.status()
    off = p.offloader.status() if p.offloader is not None else None
    if off is not None:  # translated: by roam, or by the kernel for it
        c = eng["counters"]
        c["translated_out"] = c.get("translated_out", 0) + off["kernel_translated_out"]
        c["translated_in"] = c.get("translated_in", 0) + off["kernel_translated_in"]
    st = {"pid": os.getpid(), "queue": p.queue, "external_iface": p.external,
          "internal": list(p.cfg.internal), "written_at": p.wall(), "internal_errors": p.bugs,
          "snapshot": p.snapshot_path, "snapshots_asked": p.snapshots_asked, "engine": eng, "offload": off, "queued_packets": p.queued,
          "queue_client": {"gso": p.gso, "largest_packet": p.largest_packet,
                           "gso_packets": p.gso_packets, "checksums_filled": p.csum_filled},
          "mappings": p.engine.mapping_rows(200)}
    if p.worker is not None:
        st.update(worker=p.worker[0], ports=[list(p.cfg.port_range), list(p.cfg.low_port_range),
                                             list(p.cfg.icmp_id_range)], lane=list(p.cfg.port_lane or ()))
    return st
