"""tools.daemon: sd_notify over a real AF_UNIX datagram socket, and the log formats (text, JSON, journal)."""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tools import daemon

ROOT = Path(__file__).resolve().parents[2]


def _receive(sock: socket.socket) -> str:
    sock.settimeout(5)
    return sock.recv(4096).decode()


def test_notify_to_a_path_socket(tmp_path, monkeypatch):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        daemon.ready("serving 192.0.2.1:4789")
        assert _receive(s) == "READY=1\nSTATUS=serving 192.0.2.1:4789"
        daemon.stopping()
        assert _receive(s).split("\n") == ["STOPPING=1", "STATUS=stopping"]


def test_notify_to_an_abstract_socket(monkeypatch):
    name = f"roam-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert daemon.notify("READY=1")
        assert _receive(s) == "READY=1"


def test_no_notify_socket_no_message_and_a_gone_one_is_no_crash(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert daemon.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING):
        assert daemon.notify("READY=1") is False
    assert "sd_notify" in caplog.text


def _log_through(tmp_path, fmt: str, journal: bool, monkeypatch) -> list[str]:
    """Log three records through setup_logging's handler into a file (JOURNAL_STREAM naming it or not)."""
    path = tmp_path / f"{fmt}-{journal}.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        with open(path, "w") as stream:
            st = os.fstat(stream.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}" if journal else f"{st.st_dev}:{st.st_ino + 1}")
            root.handlers = []
            daemon.setup_logging(logging.INFO, fmt, stream=stream)
            logging.getLogger("roam.test").info("proxy on %s", "192.0.2.1:4789", extra={"session": "0a0b0c0d"})
            logging.getLogger("roam.test").debug("not shown at INFO")
            try:
                raise ValueError("boom")
            except ValueError:
                logging.getLogger("roam.test").error("failed", exc_info=True)
    finally:
        root.handlers, root.level = saved
    return path.read_text().splitlines()


def test_json_one_object_a_line_with_extra_fields(tmp_path, monkeypatch):
    lines = _log_through(tmp_path, "json", False, monkeypatch)
    assert len(lines) == 2  # the traceback stays inside its object
    first, second = map(json.loads, lines)
    assert first["level"] == "INFO" and first["logger"] == "roam.test" and first["message"] == "proxy on 192.0.2.1:4789"
    assert first["session"] == "0a0b0c0d"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["time"])
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]


def test_text_has_a_timestamp_unless_stderr_is_the_journal(tmp_path, monkeypatch):
    plain = _log_through(tmp_path, "text", False, monkeypatch)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO roam.test: proxy on 192.0.2.1:4789$", plain[0])
    journal = _log_through(tmp_path, "text", True, monkeypatch)
    assert journal[0] == "<6>INFO roam.test: proxy on 192.0.2.1:4789"
    assert journal[1] == "<3>ERROR roam.test: failed"


def test_json_under_the_journal_has_its_priority_and_no_time(tmp_path, monkeypatch):
    lines = _log_through(tmp_path, "json", True, monkeypatch)
    assert lines[0].startswith("<6>{") and lines[1].startswith("<3>{")
    assert "time" not in json.loads(lines[0][3:])


def test_a_test_runners_handlers_are_left_alone():
    root = logging.getLogger()
    foreign = logging.NullHandler()
    saved = root.handlers[:], root.level
    try:
        root.handlers = [foreign]
        daemon.setup_logging(logging.DEBUG, "json")
        assert root.handlers == [foreign]
    finally:
        root.handlers, root.level = saved


def test_daemons_log_at_info_by_default_and_take_log_format():
    from tools import cli

    for argv, level in ((["nat", "--config", "c", "--external", "e"], logging.INFO),
                        (["nat", "--config", "c", "--external", "e", "-q"], logging.WARNING),
                        (["tunnel", "proxy", "--listen", "192.0.2.1:1", "--bridge", "b", "--log-format", "json"],
                         logging.INFO),
                        (["tunnel", "host", "--proxy", "192.0.2.1:1", "--tap", "t", "-v"], logging.DEBUG),
                        (["tunnel", "status"], logging.WARNING), (["nat", "status"], logging.WARNING)):
        assert cli.log_level(cli.parse_args(argv)[1]) == level, argv
    assert cli.parse_args(["tunnel", "proxy", "--listen", "192.0.2.1:1", "--bridge", "b",
                           "--log-format", "json"])[1].log_format == "json"


def test_bad_log_format_is_the_options_error():
    out = subprocess.run([sys.executable, "-m", "tools.cli", "nat", "--log-format", "xml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--log-format: invalid choice: 'xml'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("value", ["", "garbage", "1:2:3", "x:y"])
def test_journal_stream_that_does_not_name_stderr_is_not_the_journal(value, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", value)
    assert daemon.under_journal() is False
