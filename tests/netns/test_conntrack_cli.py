"""`roam conntrack` against the real `conntrack -L` (conntrack-tools) on the kernel's table.

The topology and traffic helpers are tests/netns/test_kernel_conntrack.py's: a router
namespace forwards between a client and a server, tracks with one ``-m conntrack`` rule,
and tcpdump captures on its client side.  Traffic, chosen so that both trackers must end
in the same table (none of the documented differences of that test: no fragments, no
out-of-window or ignored segments, and each replied UDP flow answered again after more
than 2 s so that Linux too has marked it ASSURED):

* TCP with FIN teardown, IPv4 and IPv6          -> TIME_WAIT
* TCP torn down by RST                           -> CLOSE
* TCP left open                                  -> ESTABLISHED
* UDP replied, twice, 2.2 s apart                -> ASSURED
* UDP to a closed port (ICMP error, RELATED)     -> [UNREPLIED]
* ICMP echo, IPv4 and IPv6
* an unreplied UDP datagram carrying the end-of-capture marker

Then, inside the router namespace, the real ``conntrack -L`` and ``conntrack -L -o
extended``, and ``roam conntrack CAPTURE`` and ``roam conntrack CAPTURE -o extended``
run as a user would (same timeouts: the kernel's sysctls and ``--timeout``).  Lines are
matched by their original tuple and compared field for field, in order, except what a
capture cannot know (EXCEPTIONS below).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tools.lab import netlab

from .test_kernel_conntrack import (
    C4, C6, CLASSES, S4, S6, build, start_capture, tcp_fin, tcp_rst, udp_exchange, udp_refused, wait_for_marker,
)

pytestmark = pytest.mark.netns

#: Fields a capture cannot know, by what they start with; everything else must be equal.
EXCEPTIONS = {
    # the remaining timeout: ours is the whole seconds left at the capture's last packet,
    # the kernel's at the moment it is listed (checked to be within a few seconds below)
    "timeout": "the remaining timeout",
    # the entry's reference count, a kernel-internal number (ours prints the usual 1)
    "use=": "the reference count",
    # printed by conntrack only when set, never by a capture: zone=/zone-orig=/zone-reply=
    # (non-zero zones), secctx=, helper=, labels=, delta-time= (nf_conntrack_timestamp);
    # listed so a kernel line that has them still compares.  Not asked for, so not
    # printed by either: the entry's id (`-o id`; its "id=" would clash with ICMP's id=)
    "zone": "the conntrack zone", "secctx=": "the security context",
    "helper=": "the helper", "labels=": "the labels", "delta-time=": "the entry's age",
}
SLACK = 15  # seconds between the capture's last packet and the listing, at most


def tcp_open(lab, c, s, held: list):
    ls = lab.socket(s, socket.AF_INET, socket.SOCK_STREAM)
    held.append(ls)
    ls.settimeout(5)
    ls.bind((S4, 0))
    ls.listen(1)
    cl = lab.socket(c, socket.AF_INET, socket.SOCK_STREAM)
    held.append(cl)
    cl.settimeout(5)
    cl.bind((C4, 0))
    cl.connect(ls.getsockname())
    sv, _ = ls.accept()
    held.append(sv)
    sv.settimeout(5)
    cl.sendall(b"hello")
    assert sv.recv(10) == b"hello"
    sv.sendall(b"world")
    assert cl.recv(10) == b"world"


def udp_assured(lab, c, s):
    """Replied, then replied again more than 2 s later: ASSURED for Linux as for us."""
    with lab.socket(c, socket.AF_INET, socket.SOCK_DGRAM) as a, lab.socket(s, socket.AF_INET, socket.SOCK_DGRAM) as b:
        a.settimeout(5)
        b.settimeout(5)
        a.bind((C4, 0))
        b.bind((S4, 0))
        for _ in range(2):
            a.sendto(b"question", b.getsockname())
            data, peer = b.recvfrom(100)
            assert data == b"question"
            b.sendto(b"answer", peer)
            assert a.recvfrom(100)[0] == b"answer"
            time.sleep(2.2)


def _key(line: str) -> tuple:
    """The original tuple of a conntrack line: the first src/dst/sport/dport/type/id and the protocol."""
    fields = line.split()
    first = {}
    for f in fields:
        name, eq, value = f.partition("=")
        if eq and name in ("src", "dst", "sport", "dport", "type", "code", "id") and name not in first:
            first[name] = value
    proto = next(f for f in fields if f in ("tcp", "udp", "icmp", "icmpv6"))
    return (proto, *sorted(first.items()))


def _compared(line: str, extended: bool) -> tuple[list[str], int]:
    """The fields that must be equal, and the timeout (the field after the protocol number)."""
    fields = line.split()
    at = 4 if extended else 2  # [l3name l3num] l4name l4num TIMEOUT
    timeout = int(fields[at])
    kept = [f for i, f in enumerate(fields) if i != at and not any(
        f.startswith(p) for p in EXCEPTIONS if p != "timeout")]
    return kept, timeout


def _layout(line: str, extended: bool) -> str:
    """The spacing of the head, which split() hides: '%-8s %u ' per name and number."""
    m = re.match(r"((?:ipv[46] +\d+ )?)(\w+ +\d+ )", line)
    return (m.group(1) if extended else "") + m.group(2)


@pytest.fixture(scope="module")
def listings(tmp_path_factory):
    why = netlab.probe()
    if why:
        pytest.skip(f"real-kernel test skipped: {why}")
    for tool in ("tcpdump", "conntrack", "iptables-legacy", "ip6tables-legacy"):
        if shutil.which(tool) is None:
            pytest.skip(f"real-kernel test skipped: {tool} not installed (apt-get install conntrack tcpdump iptables)")
    path = str(tmp_path_factory.mktemp("ctcli") / "router.pcap")
    held: list[socket.socket] = []
    kernel = {}
    try:
        with netlab.Lab("roam") as lab:
            c, r, s = build(lab)
            cap = start_capture(lab, r, path)
            tcp_fin(lab, c, s, socket.AF_INET, C4, S4)
            tcp_fin(lab, c, s, socket.AF_INET6, C6, S6)
            tcp_rst(lab, c, s)
            tcp_open(lab, c, s, held)
            udp_assured(lab, c, s)
            udp_refused(lab, c, s)
            assert lab.ping(c, S4, count=2, ident=0x4B11) == 2
            assert lab.ping(c, S6, count=2, ident=0x6B11) == 2
            udp_exchange(lab, c, C4, s, S4, reply=False)  # the marker, last
            wait_for_marker(path, cap)
            lab.stop(cap)
            for name, extra in (("plain", []), ("extended", ["-o", "extended"])):
                cp = lab.run(r, ["conntrack", "-L", *extra])
                kernel[name] = (cp.stdout, cp.stderr)
    finally:
        for sock in held:
            sock.close()
    timeouts = [f"--timeout={k}={v}" for k, v in CLASSES.items()]
    ours = {}
    for name, extra in (("plain", []), ("extended", ["-o", "extended"])):
        cp = subprocess.run([sys.executable, "-m", "tools.cli", "conntrack", path, *timeouts, *extra],
                            capture_output=True, text=True, timeout=60,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        assert cp.returncode == 0, cp.stderr
        ours[name] = (cp.stdout, cp.stderr)
    return kernel, ours


@pytest.mark.parametrize("layout", ["plain", "extended"])
def test_same_lines_field_for_field(listings, layout):
    kernel, ours = listings
    extended = layout == "extended"
    k_lines = {_key(ln): ln for ln in kernel[layout][0].splitlines() if ln.strip()}
    o_lines = {_key(ln): ln for ln in ours[layout][0].splitlines() if ln.strip()}
    assert len(k_lines) == 9, kernel[layout][0]
    assert set(k_lines) == set(o_lines), (kernel[layout][0], ours[layout][0])
    for key, k in k_lines.items():
        o = o_lines[key]
        k_fields, k_timeout = _compared(k, extended)
        o_fields, o_timeout = _compared(o, extended)
        assert o_fields == k_fields, f"\nkernel: {k}\nours:   {o}"
        assert _layout(o, extended) == _layout(k, extended), f"\nkernel: {k}\nours:   {o}"
        assert 0 <= o_timeout - k_timeout <= SLACK, f"\nkernel: {k}\nours:   {o}"


def test_the_compared_fields_cover_the_line(listings):
    """Nothing but the listed exceptions is left out: the kernel's lines have no other field."""
    kernel, _ = listings
    for line in kernel["extended"][0].splitlines():
        kept, _ = _compared(line, True)
        assert len(line.split()) - len(kept) == 1 + sum(1 for f in line.split() if f.startswith("use="))
    families = {ln.split()[0] + " " + ln.split()[1] for ln in kernel["extended"][0].splitlines()}
    assert families == {"ipv4 2", "ipv6 10"}


def test_both_count_the_same(listings):
    kernel, ours = listings
    n = len(kernel["plain"][0].splitlines())
    assert f"{n} flow entries have been shown" in kernel["plain"][1]
    assert f"{n} flow entries have been shown" in ours["plain"][1]
