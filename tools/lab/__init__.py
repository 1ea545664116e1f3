"""The namespace lab's replay backend (``roam replay --backend netns``), one module per idea:

* :mod:`tools.lab.endpoint` -- the socket program run inside each namespace (standard
  library and ``sim.schedule`` only);
* :mod:`tools.lab.attach` -- how each mode plugs the VM in (bridge, routed link,
  ``roam nat``, ``roam tunnel``);
* :mod:`tools.lab.netns` -- building the lab, playing the scenario, collecting the logs
  (``run_netns``, ``run_mode_netns``);
* :mod:`tools.lab.logs` -- the endpoints' logs as observations for the one judge
  (``sim.judge``);
* :mod:`tools.lab.guest` -- the QEMU guest image, built from Debian packages and cached;
* :mod:`tools.lab.qmp` -- a stdlib QMP client (one per monitor socket);
* :mod:`tools.lab.qemu` -- a guest booted in a host namespace and live-migrated by QEMU.

Nothing is imported here: the endpoint starts as ``python -m tools.lab.endpoint`` in
every namespace and should not pay for the driver's imports.
"""
