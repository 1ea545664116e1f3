"""Real-guest tests: QEMU guests in namespaces made by tools.lab.netlab, live-migrated by QEMU.

Those that boot guests (the ``vmlab`` fixture) are marked ``vm`` (and ``netns``: they need root and namespaces too); ``-m "not vm"``
deselects them.  They skip, with the reason, only where no guest can run: not root,
no namespaces, no /dev/net/tun, or QEMU and the guest's packages cannot be installed.
The ``vmlab`` fixture is the one way a test gets a lab and guests: its teardown quits
every QEMU (killing any that will not go) and removes the namespaces, also on failure.
"""
from __future__ import annotations

import os

import pytest

from tools.lab import netlab

_why: list[str | None] = []
_image: list = []


def pytest_collection_modifyitems(config, items):
    for item in items:  # only tests that boot guests: the QMP client's own tests need nothing
        if "tests/vm/" in str(item.fspath).replace("\\", "/") and "vmlab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vm)
            item.add_marker(pytest.mark.netns)


def _why_not() -> str | None:
    if not _why:
        _why.append(_probe())
    return _why[0]


def _probe() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing: no TAP devices here"
    from tools.lab.guest import GuestError, build, ensure_host_packages
    from tools.lab.qemu import qemu_missing

    try:
        ensure_host_packages()
    except GuestError as exc:
        return f"QEMU and the guest's packages cannot be installed: {exc}"
    why = qemu_missing() or netlab.probe()
    if why:
        return why
    # the image is built once per session (cached across sessions by its inputs); a failure here is a
    # real failure of the build, not a reason to skip: it is raised in the fixture
    try:
        _image.append(build())
    except GuestError as exc:
        _image.append(exc)
    return None


class VmLab:
    """A lab and the guests booted in it (closed before the lab's namespaces go)."""

    def __init__(self, lab: netlab.Lab, image) -> None:
        self.lab, self.image = lab, image
        self.guests: list = []

    def guest(self, spec):
        from tools.lab.qemu import Guest

        g = Guest(self.lab, spec)
        self.guests.append(g)
        return g


@pytest.fixture
def vmlab():
    why = _why_not()
    if why:
        pytest.skip(f"qemu test skipped: {why}")
    image = _image[0]
    if isinstance(image, Exception):
        raise image
    with netlab.Lab("roam") as lab:
        vl = VmLab(lab, image)
        try:
            yield vl
        finally:
            for g in vl.guests:
                g.close()
