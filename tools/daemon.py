"""What makes `roam nat` and `roam tunnel proxy|host` behave like daemons: logging and sd_notify.

Logging.  Text by default; ``--log-format json`` writes one JSON object a line (time, level,
logger, message, and whatever ``extra=`` fields a call passed).  Under systemd's journal
(``JOURNAL_STREAM`` names our stderr) a line carries no timestamp of its own -- the journal
stamps it -- and starts with the syslog priority prefix (``<6>``) so ``journalctl -p`` sees
our levels.

sd_notify.  systemd's ``Type=notify`` protocol is one datagram on the AF_UNIX socket named
by ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace); a dozen lines, so
written here rather than pulled in.  Without the variable it does nothing, so the same
command runs by hand, under the lab and under systemd.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import socket
import sys

log = logging.getLogger("roam")

#: Attributes every LogRecord has: anything else on a record came from ``extra=`` and goes into JSON.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
#: syslog priorities (sd-daemon(3) prefixes) of the logging levels
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def add_options(parser: argparse.ArgumentParser) -> None:
    """``--log-format`` and ``--metrics`` of a daemon's parser; its default log level becomes INFO
    (its start line and session events are what an operator reads in the journal)."""
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text (default) or json: one object a line with time, level, logger, message "
                        "and any extra fields. Under systemd's journal no timestamp of our own either way")
    parser.add_argument("--metrics", metavar="ADDR:PORT", default=None, type=metrics_address,
                        help="serve Prometheus metrics (the counters `status` shows) over HTTP on ADDR:PORT "
                        "([ADDR]:PORT for IPv6), path /metrics")
    parser.set_defaults(log_base=logging.INFO)


def metrics_address(text: str) -> str:
    """argparse type: ``IP:PORT`` or ``[IPv6]:PORT``, checked when parsed, so that a typo is the option's error
    before a daemon makes its TAP or rules (whether the address can be listened on is known only then)."""
    from tunnel.io.transport import parse_endpoint

    try:
        parse_endpoint(text)
    except (ValueError, OSError):
        raise argparse.ArgumentTypeError(f"not ADDR:PORT (an IP address and a port, [ADDR]:PORT for IPv6): "
                                         f"{text!r}") from None
    return text


def under_journal(stream=None) -> bool:
    """Whether ``stream`` (stderr) is connected to the journal: ``JOURNAL_STREAM`` is "DEV:INODE" of the
    stream systemd connected, which a redirect in ExecStart= or a child with other stderr does not match."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _priority(levelno: int) -> int:
    return next((p for lvl, p in _PRIORITY if levelno >= lvl), 7)


class TextFormatter(logging.Formatter):
    def __init__(self, journal: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s" if journal
                         else "%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"<{_priority(record.levelno)}>{text}" if self.journal else text


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback goes into ``exception``)."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        obj: dict = {}
        if not self.journal:
            obj["time"] = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc) \
                .isoformat(timespec="milliseconds")
        obj.update(level=record.levelname, logger=record.name, message=record.getMessage())
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                obj[key] = value
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        text = json.dumps(obj, default=str, ensure_ascii=False)
        return f"<{_priority(record.levelno)}>{text}" if self.journal else text


class _Handler(logging.StreamHandler):
    """Ours: replaced by a later :func:`setup_logging` (a foreign handler is left alone)."""


def setup_logging(level: int, fmt: str = "text", stream=None) -> None:
    """The root logger: one handler on ``stream`` (stderr), in ``fmt``, journal-aware.  As
    ``logging.basicConfig``, it leaves a root logger that has someone else's handlers alone (a test
    runner capturing logs); a handler of an earlier call is replaced."""
    root = logging.getLogger()
    if any(not isinstance(h, _Handler) for h in root.handlers):
        return
    stream = stream or sys.stderr
    journal = under_journal(stream)
    handler = _Handler(stream)
    handler.setFormatter(JsonFormatter(journal) if fmt == "json" else TextFormatter(journal))
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


def notify(*fields: str) -> bool:
    """Send ``fields`` ("READY=1", "STATUS=...") to systemd, one datagram; False when there is no
    ``NOTIFY_SOCKET`` or it cannot be reached (logged: a daemon never dies of it)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or addr[0] not in "/@":
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(fields).encode(), addr)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def ready(status: str) -> None:
    """Rules or devices are in place: systemd may start what comes after us."""
    notify("READY=1", f"STATUS={status}")


def stopping(status: str = "stopping") -> None:
    notify("STOPPING=1", f"STATUS={status}")
