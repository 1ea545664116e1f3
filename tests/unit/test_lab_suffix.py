"""A lab's namespace suffix: never one a live lab of this process or a namespace on the machine has
(16 random bits alone met a twin in a CI campaign: "cannot create namespace ...: File exists")."""
import pytest

from tools.lab import netlab


def test_a_drawn_suffix_that_is_taken_is_drawn_again(monkeypatch):
    draws = iter(["beef", "beef", "cafe"])
    monkeypatch.setattr(netlab.secrets, "token_hex", lambda n: next(draws))
    monkeypatch.setattr(netlab, "list_lab_namespaces", lambda prefix=None: [])
    first = netlab.Lab("roamtest")  # no namespace is made: nothing to remove
    try:
        assert first.suffix.endswith("xbeef")
        second = netlab.Lab("roamtest")
        assert second.suffix.endswith("xcafe")
        second.close()
    finally:
        first.close()


def test_a_namespace_left_on_the_machine_takes_its_suffix(monkeypatch):
    draws = iter(["0001", "0002"])
    monkeypatch.setattr(netlab.secrets, "token_hex", lambda n: next(draws))
    pid = netlab.os.getpid()
    monkeypatch.setattr(netlab, "list_lab_namespaces", lambda prefix=None: [f"roam-vm-p{pid}x0001"])
    lab = netlab.Lab("roamtest")
    try:
        assert lab.suffix == f"p{pid}x0002"
    finally:
        lab.close()


def test_no_free_suffix_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(netlab.secrets, "token_hex", lambda n: "dead")
    pid = netlab.os.getpid()
    monkeypatch.setattr(netlab, "list_lab_namespaces", lambda prefix=None: [f"roam-vm-p{pid}xdead"])
    with pytest.raises(netlab.LabError, match="no free lab suffix"):
        netlab.Lab("roamtest")
