"""A real STUN client (Debian's stun-client, RFC 3489 classic tests) through `roam nat`.

The STUN server (Debian's stun-server, `stund`) runs in the internet namespace on two
addresses; the client runs in the VM namespace behind the NAT plugin in the host
namespace.  The client's own verdict on the NAT's mapping and filtering is checked.
"""
from __future__ import annotations

import shutil
import subprocess


import pytest

from tests.netns.test_nat_plugin import EXT, Site

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(not (shutil.which("stun") and shutil.which("stund")),
                                 reason="needs Debian's stun-client and stun-server (apt-get install stun-client "
                                        "stun-server)")]


@pytest.fixture
def lab():
    from tests.netns.conftest import _why_not
    from tools.lab import netlab

    why = _why_not()
    if why:
        pytest.skip(f"real-kernel test skipped: {why}")
    with netlab.Lab("roam") as lab:
        yield lab


def _stun(site, filtering: str) -> str:
    with open(site.conf, "a") as f:
        f.write(f"[roam]\nfiltering = {filtering}\n")
    site.lab.addr(site.inet, "inet0", "203.0.113.3/24")
    srv = site.lab.popen(site.inet, ["stund", "-h", "203.0.113.2", "-a", "203.0.113.3"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    site.start()
    out = ""
    for _ in range(3):  # the server may still be binding its four sockets on the first try
        cp = site.lab.run(site.vm, ["stun", "203.0.113.2", "-v"], timeout=30, check=False)
        out = cp.stdout + cp.stderr
        if "Primary:" in out and "Blocked" not in out:
            break
    site.lab.stop(srv)
    return out


def test_stun_sees_endpoint_independent_mapping_and_filtering(lab, tmp_path):
    site = Site(lab, tmp_path)
    out = _stun(site, "endpoint-independent")
    assert "Independent Mapping" in out, out
    assert "Independent Filter" in out, out
    assert f"MappedAddress = {EXT}:" in out, out
    assert "will hairpin" in out, out  # RFC 4787 REQ-9, through the plugin's two-half hairpin rules


def test_stun_sees_port_dependent_filtering(lab, tmp_path):
    site = Site(lab, tmp_path)
    out = _stun(site, "address-and-port-dependent")
    assert "Independent Mapping" in out, out
    assert "Port Dependent Filter" in out, out
