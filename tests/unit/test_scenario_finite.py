"""Scenario files cannot hang the tool: every number finite and in range, every error a ScenarioError with a line.

The bundled scenarios are mutated (values replaced by NaN, infinities, 1e400, huge or negative numbers and
wrong types; lines dropped; the text cut anywhere): loading each gives a scenario whose every number is
finite, or a ScenarioError naming a line of the file, never another exception and never a hang.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import signal
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sim import Scenario, ScenarioError, parse_scenario

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLED = sorted(glob.glob(os.path.join(ROOT, "examples", "scenarios", "*.toml")))
TEXTS = {os.path.basename(p): open(p, encoding="utf-8").read() for p in BUNDLED}
BASIC = TEXTS["basic.toml"]
_ASSIGN = re.compile(r"^(\s*[A-Za-z0-9_.\-\"]+\s*=\s*)(.*)$")

BAD_VALUES = ["nan", "+nan", "-nan", "inf", "+inf", "-inf", "1e400", "-1e400", "1e300", "-1e300",
              "99999999999999999999999999", "-99999999999999999999999999", "9223372036854775807", "-1", "-0.001",
              "0", "0.0", "1.5", "true", '"text"', '""', "[]", "[1, 2]", '["nan"]', "{}", "{a = 1}",
              "1979-05-27T07:32:00Z", "[nan]", "[inf, -inf]"]


class Hang(Exception):
    pass


@contextmanager
def deadline(seconds: float):
    """Fail rather than hang: a SIGALRM after ``seconds`` (unit tests run in the main thread)."""
    def fire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _numbers(value, path="scenario"):
    """Every number in a loaded scenario, with where it sits."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _numbers(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, (tuple, list)):
        for i, x in enumerate(value):
            yield from _numbers(x, f"{path}[{i}]")


def _line_starting(text: str, start: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith(start))


def check(text: str) -> ScenarioError | Scenario:
    """The property: a scenario with finite numbers, or a ScenarioError naming a line of the text."""
    try:
        with deadline(5.0):
            sc = parse_scenario(text, "mutant.toml")
    except ScenarioError as err:
        assert 1 <= err.line <= max(len(text.splitlines()), 1), (err.line, str(err))
        assert str(err).startswith(f"mutant.toml:{err.line}: ")
        return err
    for where, v in _numbers(sc):
        assert math.isfinite(v), (where, v)
    assert sc.duration > 0 and all(c.interval > 0 and c.start < sc.duration for c in sc.connections)
    assert all(sc.timeout_of(c) <= 86400 for c in sc.connections)
    return sc


@st.composite
def mutants(draw) -> str:
    text = TEXTS[draw(st.sampled_from(sorted(TEXTS)))]
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        if not lines:
            break
        kind = draw(st.sampled_from(["value", "value", "value", "drop", "cut", "duplicate"]))
        n = draw(st.integers(0, len(lines) - 1))
        if kind == "value":
            assigns = [i for i, ln in enumerate(lines) if _ASSIGN.match(ln)]
            i = draw(st.sampled_from(assigns)) if assigns else n
            m = _ASSIGN.match(lines[i])
            if m:
                lines[i] = m.group(1) + draw(st.sampled_from(BAD_VALUES) | st.floats().map(repr)
                                             | st.integers().map(str))
        elif kind == "drop":
            del lines[n]
        elif kind == "duplicate":
            lines.insert(n, lines[n])
        else:
            joined = "\n".join(lines)
            lines = joined[:draw(st.integers(0, len(joined)))].splitlines()
    return "\n".join(lines) + draw(st.sampled_from(["\n", ""]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutants())
def test_mutated_scenarios_give_a_scenario_or_an_error_with_a_line(text):
    check(text)


@pytest.mark.parametrize("table,key,line_of", [
    ("scenario", "duration", "duration = 40.0"), ("scenario", "tcp_timeout", "tcp_timeout = 20.0"),
    ("scenario", "udp_timeout", "udp_timeout = 20.0"), ("connection", "start", "start = 1.0"),
    ("site", "latency_ms", "latency_ms = 8"), ("migration", "downtime_ms", "downtime_ms = 800"),
    ("migration", "at", "at = 15.0"),
])
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e400"])
def test_nan_and_infinity_are_refused_with_the_line(table, key, line_of, bad):
    text = BASIC.replace(line_of, f"{key} = {bad}", 1)
    err = check(text)
    assert isinstance(err, ScenarioError)
    assert f"'{key}' must be a finite number, got" in err.message
    assert err.line == _line_starting(text, f"{key} = {bad}")


@pytest.mark.parametrize("key", ["request", "response", "interval", "timeout"])
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_connection_numbers_that_used_to_crash_or_hang_are_errors(key, bad):
    # request = nan was a traceback (int(nan)); interval = nan and timeout = inf hung `roam replay`
    text = BASIC.replace('id = "https"\n', f'id = "https"\n{key} = {bad}\n', 1)
    err = check(text)
    assert isinstance(err, ScenarioError) and "must be a finite number" in err.message
    assert err.line == _line_starting(text, f"{key} = {bad}")


@pytest.mark.parametrize("key,value,words", [
    ("timeout", "1e9", "'timeout' must be > 0 and <= 86400, got 1e+09"),
    ("timeout", "0", "'timeout' must be > 0 and <= 86400, got 0"),
    ("interval", "1e5", "'interval' must be >= 0.001 and <= 3600, got 100000"),
    ("request", "99999999999999999999999999", "'request' must be >= 1 and <= 1400, got a huge integer"),
    ("start", "-1", "'start' must be >= 0 and <= 86400, got -1"),
])
def test_out_of_range_numbers_say_the_range(key, value, words):
    text = BASIC.replace('id = "https"\n', f'id = "https"\n{key} = {value}\n', 1)
    if key == "start":
        text = BASIC.replace("start = 1.0", f"start = {value}", 1)
    err = check(text)
    assert isinstance(err, ScenarioError) and words in err.message


def test_toml_error_at_the_end_of_the_document_names_the_last_line():
    text = BASIC + "\n[[peer]]\nname = "
    err = check(text)
    assert isinstance(err, ScenarioError) and err.message.startswith("TOML syntax")
    assert "end of the file" in err.message and err.line == len(text.splitlines())


def test_toml_error_keeps_tomllib_line_and_column():
    text = BASIC.replace("port = 443", "port = = 443")
    err = check(text)
    assert err.line == text.splitlines().index("port = = 443") + 1 and "(column " in err.message


def test_a_missing_table_is_reported_at_the_end_of_the_file():
    text = re.sub(r"\[vm\]\n(.+\n)+", "", BASIC)
    err = check(text)
    assert "needs a [vm] table" in err.message and err.line == len(text.splitlines())


@pytest.mark.parametrize("written,needle", [
    ('scenario.duration = nan', "scenario.duration = nan"),  # a dotted key: its own line
    ('vm = {name = "vm1", host = "office-1", mac = "zz"}', "vm = {"),  # an inline table: its line
])
def test_dotted_keys_and_inline_tables_are_located(written, needle):
    table = written.split(".")[0].split(" ")[0]
    text = written + "\n" + re.sub(rf"\[{table}\]\n(.+\n)+", "", BASIC)
    err = check(text)
    assert isinstance(err, ScenarioError) and not err.message.startswith("TOML syntax"), err
    assert err.line == 1


def test_the_bundled_scenarios_still_load():
    for name, text in TEXTS.items():
        assert isinstance(check(text), Scenario), name
