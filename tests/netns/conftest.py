"""Real-kernel tests: every test here runs in namespaces made by tools.lab.netlab.

The ``lab`` fixture is the only way a test gets namespaces, so cleanup happens
in one place whether the test passes, fails or errors.  Tests in this directory
are marked ``netns`` automatically (``-m "not netns"`` deselects them all).
"""
from __future__ import annotations

import pytest

from tools.lab import netlab

_probe_result: list[str | None] = []


def _why_not() -> str | None:
    # Probe once per session: making a throwaway namespace pair is the only
    # honest test of "can this machine do namespaces" (root alone is not enough
    # inside some containers).
    if not _probe_result:
        _probe_result.append(netlab.probe())
    return _probe_result[0]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/netns/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.netns)


@pytest.fixture(scope="session", autouse=True)
def _remove_stale_namespaces():
    """Remove namespaces of earlier runs that were killed before cleaning up."""
    import os

    if os.geteuid() == 0:
        netlab.cleanup_stale("roam")
    yield


@pytest.fixture
def lab():
    why = _why_not()
    if why:
        pytest.skip(f"real-kernel test skipped: {why}")
    with netlab.Lab("roam") as lab:
        yield lab
