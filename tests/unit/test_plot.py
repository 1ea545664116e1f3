"""The --plot timeline: one view per connection with a lane per mode, every stall drawn and labelled with its
length on the gap, the verdicts the table prints; rendered in headless Chromium, not only parsed."""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib

import pytest
from hypothesis import given, strategies as st

from sim import Outcome, parse_scenario, replay
from sim.judge import LATE, timeline_runs
from sim.judge import Move
from tools.report import _place, cell, html_timeline, stall_text, stalls

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASIC = os.path.join(ROOT, "examples", "scenarios", "basic.toml")
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def rep():
    return replay(parse_scenario(open(BASIC).read(), BASIC))


@pytest.fixture(scope="module")
def page(rep):
    return html_timeline(rep)


def _views(page: str) -> list[ET.Element]:
    return [ET.fromstring(s) for s in re.findall(r"<svg.*?</svg>", page, re.S)]


def _texts(view: ET.Element, cls: str | None = None) -> list[str]:
    return ["".join(t.itertext()).strip() if cls is None else (t.text or "")
            for t in view.iter(f"{SVG}text") if cls is None or t.get("class") == cls]


def test_one_view_per_connection_with_a_lane_per_mode_and_the_tables_verdicts(rep, page):
    views = _views(page)
    assert len(views) == len(rep.connections) == page.count("<svg")
    for view, c in zip(views, rep.connections):
        assert "connection " + c.id in view.get("aria-label")
        texts = _texts(view)
        for run in rep.runs:
            assert run.mode in texts  # the lane's name
            assert cell(run, c.id) in texts  # the verdict as the text table prints it
    assert "move to dc-1" in page


def test_nothing_is_fetched(page):
    assert "src=" not in page and "<link" not in page and "@import" not in page and "url(http" not in page
    urls = re.findall(r"https?://[^\"' ]+", page)
    assert urls == ["http://www.w3.org/2000/svg"] * (page.count("<svg") + 1)  # the namespace: each view's, the script's


def test_every_stall_is_drawn_and_labelled_with_its_length(rep, page):
    views = dict(zip((c.id for c in rep.connections), _views(page)))
    for run in rep.runs:
        for cid, res in run.results.items():
            gaps = stalls(res)
            drawn = {(float(r.get("data-a")), float(r.get("data-b"))) for r in views[cid].iter(f"{SVG}rect")
                     if r.get("class") == "stall"}
            assert set(gaps) <= drawn
            labels = _texts(views[cid], "stall-label")
            for a, b in gaps:
                assert stall_text(a, b) in labels
            if res.outcome == Outcome.SURVIVED and res.interruption_ms:
                # the stall the verdict names is one the timeline draws, with the same number
                assert f"{res.interruption_ms:.0f} ms" in [stall_text(a, b) for a, b in gaps], (run.mode, cid)
    tunnel = next(r for r in rep.runs if r.mode == "tunnel")
    ssh = _ms(tunnel, "ssh-in")  # the stall the old timeline merged away (a retransmission timer, not slack)
    assert cell(tunnel, "ssh-in") == f"survived, {ssh}"
    assert stalls(tunnel.results["ssh-in"]) and ssh in _texts(views["ssh-in"], "stall-label")


def _ms(run, cid: str) -> str:
    """A survived cell's interruption as the table and the stall label print it."""
    return f"{run.results[cid].interruption_ms:.0f} ms"


def test_runs_split_at_a_late_answer_and_at_every_move():
    steady = [1.0, 2.0, 3.0, 4.0]
    assert timeline_runs(steady, (), 1.0) == ((1.0, 4.0),)
    assert timeline_runs([1.0, 2.0, 3.3, 4.3], (), 1.0) == ((1.0, 2.0), (3.3, 4.3))  # 1.3 intervals: a stall
    assert timeline_runs([1.0, 2.0, 3.2, 4.2], (), 1.0) == ((1.0, 4.2),)  # 1.2: on time enough
    assert timeline_runs(steady, (Move(2.5, 0.1),), 1.0) == ((1.0, 2.0), (3.0, 4.0))  # a move's gap, however short


@given(st.lists(st.floats(0, 100), max_size=40), st.lists(st.floats(0, 100), max_size=3),
       st.floats(0.01, 10))
def test_runs_cover_every_answer_and_split_exactly_at_stalls(times, marks, interval):
    moves = [Move(m, 0.5) for m in marks]
    runs = timeline_runs(times, moves, interval)
    times = sorted(times)
    assert [a for a, _ in runs][:1] == times[:1] and [b for _, b in runs][-1:] == times[-1:]
    for (_, b), (a, _) in zip(runs, runs[1:]):
        assert a - b > LATE * interval or any(b < m <= a for m in marks)
    for x, y in zip(times, times[1:]):
        inside = any(a <= x and y <= b for a, b in runs)
        assert inside == (y - x <= LATE * interval and not any(x < m <= y for m in marks))


def test_labels_sit_in_the_gap_when_they_fit_else_above_below_or_hidden():
    # (middle of the gap, gap width, label width)
    assert _place([(100, 60, 40)]) == ["in"]
    assert _place([(100, 20, 40), (110, 20, 40), (120, 20, 40), (300, 20, 40)]) == \
        ["above", "below", "hidden", "above"]


# ------------------------------------------------------------------ in a real browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                    "(Debian: apt-get install chromium); the timeline is checked in a browser")


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, timeout=120, check=True)


def _pixels(png: bytes) -> tuple[int, int, int, list[bytes]]:
    """Width, height, bytes per pixel and the rows of an 8-bit RGB(A) PNG (what Chromium writes)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        data = png[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", data[:10])
        elif kind == b"IDAT":
            idat += data
    assert depth == 8 and ctype in (2, 6)
    bpp = 3 if ctype == 2 else 4
    raw, stride, rows, prev, i = zlib.decompress(idat), w * bpp, [], bytearray(w * bpp), 0
    for _ in range(h):
        f, line = raw[i], bytearray(raw[i + 1:i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], (prev[x - bpp] if x >= bpp else 0)
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows


@needs_chromium
def test_the_rendered_timeline_is_not_blank_and_shows_the_bars(tmp_path, page):
    html_file = tmp_path / "timeline.html"
    html_file.write_text(page, encoding="utf-8")
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, "--window-size=900,600", f"--screenshot={shot}", html_file.as_uri())
    w, h, bpp, rows = _pixels(shot.read_bytes())
    assert (w, h) == (900, 600)
    pixels = [row[x:x + 3] for row in rows[::3] for x in range(0, w * bpp, 3 * bpp)]
    inked = sum(1 for p in pixels if p != b"\xff\xff\xff")
    assert inked > 0.03 * len(pixels)  # text, bars and bands, not an empty page
    near = lambda p, rgb: all(abs(a - b) <= 12 for a, b in zip(p, rgb))  # noqa: E731
    assert any(near(p, (0x2E, 0x9D, 0x5B)) for p in pixels)  # the green of answers flowing
    assert any(near(p, (0xF3, 0xC9, 0x69)) for p in pixels)  # the migration band


@needs_chromium
def test_the_browsers_dom_holds_every_stall_label_and_the_zoom_works(tmp_path, rep, page):
    html_file = tmp_path / "timeline.html"
    html_file.write_text(page, encoding="utf-8")
    dom = _chromium(tmp_path, "--dump-dom", html_file.as_uri()).stdout.decode()
    assert 'data-zoom="ready"' in dom  # the script ran to its end without an error
    labels = re.findall(r'<text class="stall-label"[^>]*visibility="visible"[^>]*>([^<]+)<title>', dom)
    tunnel = next(r for r in rep.runs if r.mode == "tunnel")
    ssh = _ms(tunnel, "ssh-in")
    assert ssh in labels and _ms(tunnel, "https") in labels
    zoomed = _chromium(tmp_path, "--dump-dom", html_file.as_uri() + "#t=12-20").stdout.decode()
    assert "12–20 s" in zoomed and ">13 s<" in zoomed and ">35 s<" not in zoomed  # the axis follows the window
    # zoomed in, ssh-in's tunnel gap is wide enough to hold its label: the label moves onto the bar's line
    view = re.findall(r"<svg.*?</svg>", zoomed, re.S)[[c.id for c in rep.connections].index("ssh-in")]
    (y,) = re.findall(r'<text class="stall-label"[^>]*y="([0-9.]+)"[^>]*>' + ssh + '<title>', view)
    lane = re.findall(r'<g class="lane" data-mid="([0-9.]+)">', view)[-1]  # tunnel: the last lane
    assert float(y) == pytest.approx(float(lane) + 4)
