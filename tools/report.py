"""How `roam replay` shows a report: a text table, JSON, and an HTML timeline (inline SVG).

The timeline is one view per connection with a lane per mode, so the modes are compared
at a glance; every stall (a gap between two runs of answers) is drawn and labelled with
its length on the gap, the verdict beside each lane is the table's cell.  A few lines of
inline JavaScript zoom all views together; nothing is fetched (it works offline).
"""
from __future__ import annotations

import html
import json

from sim.results import ConnResult, ModeRun, Outcome, Report


# ------------------------------------------------------------------ text table
def cell(r: ModeRun, cid: str) -> str:
    if r.error is not None:
        return "error (see below)"
    res = r.results[cid]
    if res.outcome == Outcome.SURVIVED:
        return f"survived, {res.interruption_ms:.0f} ms" if res.interruption_ms else "survived"
    why = res.cause.text if res.cause is not None else "?"
    return f"broken: {why}" if res.established else f"never up: {why}"


def table(rep: Report) -> str:
    lines = [f"scenario {rep.scenario} ({rep.backend}): {len(rep.connections)} connection(s), "
             f"{len(rep.migrations)} migration(s), {rep.duration:g} s of traffic"]
    for at, to, down, site in rep.migrations:
        lines.append(f"  at {at:g} s: move to {to} (site {site}), downtime {down * 1000:.0f} ms")
    lines.append("")
    head = ["connection", "proto", "dir", "peer:port"] + [r.mode for r in rep.runs]
    rows = []
    for c in rep.connections:
        rows.append([c.id, c.protocol, "out" if c.direction == "outbound" else "in", f"{c.peer}:{c.port}"]
                    + [cell(r, c.id) for r in rep.runs])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    lines.append(fmt(head))
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt(row) for row in rows]
    lines.append("")
    for r in rep.runs:
        if r.error is None and r.results:
            n = sum(1 for x in r.results.values() if x.outcome == Outcome.SURVIVED)
            what = "simulated" if rep.backend == "sim" else "seen"
            lines.append(f"{r.mode}: {n}/{len(r.results)} survived ({r.packets} packets {what})")
    lines.append("survived = established, never broken, and answered after the last move (clients go on past "
                 "the duration until then); N ms = the longest stall across the moves (last answer before a move "
                 "to the first after it).")
    notes = [f"{r.mode}: {r.error}" for r in rep.runs if r.error] + [w for r in rep.runs for w in r.warnings]
    if notes:
        lines.append("")
        lines += [f"note: {n}" for n in notes]
    return "\n".join(lines) + "\n" + moves_text(rep)


def moves_text(rep: Report) -> str:
    """The qemu backend's own figures per mode and move (``ModeRun.moves``), for the table's foot."""
    lines = []
    for r in rep.runs:
        for i, m in enumerate(r.moves, 1):
            lines.append(f"  {r.mode:<10} move {i}: QEMU total {m.total_ms:.0f} ms, "
                         f"QEMU downtime {m.downtime_ms:.0f} ms, guest paused {(m.resumed - m.paused) * 1000:.0f} ms, "
                         f"{m.ram_bytes / 2**20:.1f} MiB sent")
    return ("QEMU live migrations:\n" + "\n".join(lines) + "\n") if lines else ""


def moves_dict(rep: Report) -> dict:
    """The same for the JSON report."""
    return {r.mode: [{"total_ms": m.total_ms, "qemu_downtime_ms": m.downtime_ms, "setup_ms": m.setup_ms,
                      "paused_ms": round((m.resumed - m.paused) * 1000, 1), "ram_bytes": m.ram_bytes}
                     for m in r.moves] for r in rep.runs}


def as_json(rep: Report) -> str:
    doc = rep.as_dict()
    if any(r.moves for r in rep.runs):
        doc["qemu_migrations"] = moves_dict(rep)
    return json.dumps(doc, indent=2) + "\n"


# ------------------------------------------------------------------ HTML timeline
_COLORS = {"up": "#2e9d5b", "broken": "#d64541", "never": "#9aa0a6", "mig": "#f3c969", "stall": "#fbe1de",
           "stall_text": "#a8261f"}
_LANE = 34  # one mode's lane
_TOP = 26  # room for the migration labels
_AXIS = 22
_LABEL = 92  # mode names
_PLOT = 720
_VERDICT = 210
_CHAR = 6.2  # px per character of an 11 px label (the page re-measures after zooming)


def _span(rep: Report) -> float:
    end = rep.duration
    for r in rep.runs:
        for x in r.results.values():
            end = max(end, x.broken_at or 0.0, max((b for _, b in x.runs), default=0.0))
    return end * 1.02 + 1


def _nice_step(span: float) -> float:
    for s in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600,
              43200, 86400):
        if span / s <= 12:
            return float(s)
    return span / 10


def stalls(res: ConnResult) -> list[tuple[float, float]]:
    """The gaps between a connection's runs of answers: each one a stall the timeline labels."""
    return [(a[1], b[0]) for a, b in zip(res.runs, res.runs[1:])]


def stall_text(a: float, b: float) -> str:
    return f"{(b - a) * 1000:.0f} ms"  # as the table prints an interruption: the same two answers


def _place(labels: list[tuple[float, float, float]]) -> list[str]:
    """Where each stall label goes ("in" the gap when it fits, else "above", then "below", else "hidden"),
    labels being (x of the gap's middle, gap width, label width), left to right.  The page's script
    applies the same rule after each zoom."""
    out, ends = [], {"above": -1e9, "below": -1e9}
    for mid, gap, w in labels:
        left = mid - w / 2
        if gap >= w + 6:
            out.append("in")
        elif left >= ends["above"] + 4:
            out.append("above")
        elif left >= ends["below"] + 4:
            out.append("below")
        else:
            out.append("hidden")
            continue
        if out[-1] != "in":
            ends[out[-1]] = mid + w / 2
    return out


_LABEL_Y = {"in": 4, "above": -10, "below": 19}


def _view(rep: Report, c, i: int, t_end: float) -> str:
    """One connection: a lane per mode on one time axis."""
    lanes = rep.runs
    height = _TOP + _LANE * len(lanes) + _AXIS
    width = _LABEL + _PLOT + _VERDICT
    X = lambda t: _LABEL + _PLOT * max(0.0, min(t, t_end)) / t_end  # noqa: E731
    top, bottom = _TOP, _TOP + _LANE * len(lanes)
    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="view" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12" role="img" '
           f'data-left="{_LABEL}" data-plot="{_PLOT}" data-end="{t_end:.6f}" data-top="{top}" data-bottom="{bottom}" '
           f'aria-label="timeline of connection {e(c.id)}, one lane per mode">',
           f'<defs><clipPath id="plot-{i}"><rect x="{_LABEL}" y="0" width="{_PLOT}" height="{height}"/></clipPath>'
           '</defs>', '<g class="ticks">']
    step = _nice_step(t_end)
    for k in range(int(t_end / step) + 1):
        t = k * step
        out.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{top}" y2="{bottom}" stroke="#e6e6e6"/>'
                   f'<text x="{X(t):.1f}" y="{bottom + 15}" text-anchor="middle" fill="#666">{t:g} s</text>')
    out.append(f'</g><g clip-path="url(#plot-{i})">')
    for at, to, down, site in rep.migrations:
        out.append(f'<rect class="mig" data-a="{at}" data-b="{at + down}" data-min="2" x="{X(at):.1f}" y="{top}" '
                   f'width="{max(X(at + down) - X(at), 2):.1f}" height="{bottom - top}" fill="{_COLORS["mig"]}" '
                   f'opacity="0.8"><title>move to {e(to)} (site {e(site)}) at {at:g} s, down {down * 1000:.0f} ms'
                   f'</title></rect><text data-t="{at}" x="{X(at):.1f}" y="{top - 8}" fill="#6b5200">'
                   f'\u2192 {e(to)}</text>')
    tail = []
    for k, run in enumerate(lanes):
        mid = top + _LANE * k + _LANE / 2 + 3
        tail.append(f'<text x="6" y="{mid + 4:.1f}" font-weight="bold">{e(run.mode)}</text>')
        if run.error is not None:
            tail.append(f'<text x="{_LABEL + _PLOT + 10}" y="{mid + 4:.1f}" fill="{_COLORS["broken"]}">'
                        f'{e(cell(run, c.id))}</text>')
            continue
        res: ConnResult = run.results[c.id]
        end = res.broken_at if res.broken_at is not None else max((b for _, b in res.runs), default=t_end)
        dash = "" if res.established else ' stroke-dasharray="4 3"'
        out.append(f'<g class="lane" data-mid="{mid:.1f}"><line data-a="{c.start}" data-b="{end}" '
                   f'x1="{X(c.start):.1f}" x2="{X(end):.1f}" y1="{mid:.1f}" y2="{mid:.1f}" stroke="#cfcfcf" '
                   f'stroke-width="2"{dash}/>')
        for a, b in res.runs:
            out.append(f'<rect class="run" data-a="{a}" data-b="{b}" data-min="2" x="{X(a):.1f}" y="{mid - 6:.1f}" '
                       f'width="{max(X(b) - X(a), 2):.1f}" height="12" fill="{_COLORS["up"]}"><title>{e(c.id)} '
                       f'({e(run.mode)}): answers flowing {a:.2f}-{b:.2f} s</title></rect>')
        gaps = stalls(res)
        where = _place([((X(a) + X(b)) / 2, X(b) - X(a), _CHAR * len(stall_text(a, b))) for a, b in gaps])
        for (a, b), place in zip(gaps, where):
            text = stall_text(a, b)
            tip = f"{e(c.id)} ({e(run.mode)}): no answer for {text}, {a:.2f}-{b:.2f} s"
            out.append(f'<rect class="stall" data-a="{a}" data-b="{b}" data-min="1" x="{X(a):.1f}" '
                       f'y="{mid - 6:.1f}" width="{max(X(b) - X(a), 1):.1f}" height="12" fill="{_COLORS["stall"]}" '
                       f'stroke="{_COLORS["broken"]}" stroke-width="1"><title>{tip}</title></rect>'
                       f'<text class="stall-label" data-t="{(a + b) / 2}" x="{(X(a) + X(b)) / 2:.1f}" '
                       f'y="{mid + _LABEL_Y.get(place, 0):.1f}" text-anchor="middle" font-size="11" '
                       f'font-weight="bold" fill="{_COLORS["stall_text"]}"'
                       f'{" visibility=" + chr(34) + "hidden" + chr(34) if place == "hidden" else ""}>'
                       f'{text}<title>{tip}</title></text>')
        if res.broken_at is not None:
            why = res.cause.text if res.cause else "?"
            color = _COLORS["broken"] if res.established else _COLORS["never"]
            out.append(f'<g data-t="{res.broken_at}" transform="translate({X(res.broken_at):.1f},0)" '
                       f'stroke="{color}" stroke-width="3"><title>{e(c.id)} ({e(run.mode)}): '
                       f'{"broken" if res.established else "never established"} at {res.broken_at:.2f} s: '
                       f'{e(why)} ({e(res.broken_side or "")} side)</title>'
                       f'<line x1="-5" y1="{mid - 5:.1f}" x2="5" y2="{mid + 5:.1f}"/>'
                       f'<line x1="-5" y1="{mid + 5:.1f}" x2="5" y2="{mid - 5:.1f}"/></g>')
        out.append("</g>")
        color = _COLORS["up"] if res.outcome == Outcome.SURVIVED else (
            _COLORS["broken"] if res.established else _COLORS["never"])
        tail.append(f'<text x="{_LABEL + _PLOT + 10}" y="{mid + 4:.1f}" fill="{color}" font-weight="bold">'
                    f'{e(cell(run, c.id))}</text>')
    out.append("</g>")
    out += tail
    out.append(f'<line x1="{_LABEL}" x2="{_LABEL + _PLOT}" y1="{bottom}" y2="{bottom}" stroke="#999"/>')
    out.append("</svg>")
    return "\n".join(out)


# Zoom every view together: the buttons, a drag across a plot (that span), a double click (the whole run),
# the slider (pan), and ``#t=A-B`` in the address (open on that window).  Positions come from each
# element's data-a/data-b/data-t times; stall labels are placed again by the rule of _place.
_SCRIPT = r"""
(function () {
  const views = Array.from(document.querySelectorAll("svg.view"));
  if (!views.length) return;
  const NS = "http://www.w3.org/2000/svg", v0 = views[0].dataset;
  const L = +v0.left, P = +v0.plot, END = +v0.end, MIN = Math.max(END / 2000, 0.02);
  const pan = document.getElementById("pan"), shown = document.getElementById("shown");
  let t0 = 0, t1 = END;
  const X = t => L + P * (Math.max(t0, Math.min(t, t1)) - t0) / (t1 - t0);
  const STEPS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200,
                 21600, 43200, 86400];
  const Y = {in: 4, above: -10, below: 19};
  function ticks(v) {
    const g = v.querySelector("g.ticks"), top = +v.dataset.top, bottom = +v.dataset.bottom;
    const step = STEPS.find(s => (t1 - t0) / s <= 12) || (t1 - t0) / 10;
    g.replaceChildren();
    for (let t = Math.ceil(t0 / step) * step; t <= t1 + 1e-9; t += step) {
      const x = X(t), line = document.createElementNS(NS, "line"), text = document.createElementNS(NS, "text");
      const set = (e, attrs) => Object.entries(attrs).forEach(([k, a]) => e.setAttribute(k, a));
      set(line, {x1: x, x2: x, y1: top, y2: bottom, stroke: "#e6e6e6"});
      set(text, {x: x, y: bottom + 15, "text-anchor": "middle", fill: "#666"});
      text.textContent = +t.toFixed(3) + " s";
      g.append(line, text);
    }
  }
  function labels(lane) {
    const mid = +lane.dataset.mid, ends = {above: -1e9, below: -1e9};
    const items = Array.from(lane.querySelectorAll("text.stall-label")).map(e => {
      const gap = e.previousElementSibling, a = +gap.dataset.a, b = +gap.dataset.b;
      return {e, a, b, mid: (X(a) + X(b)) / 2, gap: X(b) - X(a), w: e.getComputedTextLength()};
    }).sort((p, q) => p.mid - q.mid);
    for (const it of items) {
      const left = it.mid - it.w / 2;
      let at = "hidden";
      if (it.b < t0 || it.a > t1) at = "hidden";
      else if (it.gap >= it.w + 6) at = "in";
      else if (left >= ends.above + 4) at = "above";
      else if (left >= ends.below + 4) at = "below";
      if (at === "above" || at === "below") ends[at] = it.mid + it.w / 2;
      it.e.setAttribute("visibility", at === "hidden" ? "hidden" : "visible");
      it.e.setAttribute("x", it.mid);
      it.e.setAttribute("y", mid + (Y[at] || 0));
    }
  }
  function draw() {
    for (const v of views) {
      v.querySelectorAll("[data-a]").forEach(e => {
        const a = X(+e.dataset.a), b = X(+e.dataset.b);
        if (e.tagName === "line") { e.setAttribute("x1", a); e.setAttribute("x2", b); }
        else { e.setAttribute("x", a); e.setAttribute("width", Math.max(b - a, +(e.dataset.min || 0))); }
      });
      v.querySelectorAll("[data-t]").forEach(e => {  // a mark outside the window is not pinned to its edge
        const t = +e.dataset.t;
        if (e.tagName === "text") e.setAttribute("x", X(t));
        else e.setAttribute("transform", "translate(" + X(t) + ",0)");
        e.setAttribute("visibility", t < t0 || t > t1 ? "hidden" : "visible");
      });
      ticks(v);
      v.querySelectorAll("g.lane").forEach(labels);
    }
    const span = t1 - t0;
    pan.disabled = span >= END - 1e-9;
    pan.value = span >= END ? 0 : Math.round(1000 * t0 / (END - span));
    shown.textContent = (+t0.toFixed(2)) + "\u2013" + (+t1.toFixed(2)) + " s";
  }
  function show(a, b) {
    const span = Math.min(END, Math.max(MIN, b - a));
    a = Math.max(0, Math.min(a, END - span));
    t0 = a; t1 = a + span; draw();
  }
  const zoom = f => { const c = (t0 + t1) / 2, h = (t1 - t0) * f / 2; show(c - h, c + h); };
  document.getElementById("zoom-in").onclick = () => zoom(0.5);
  document.getElementById("zoom-out").onclick = () => zoom(2);
  document.getElementById("zoom-all").onclick = () => show(0, END);
  pan.oninput = () => { const span = t1 - t0, a = (END - span) * pan.value / 1000; show(a, a + span); };
  const T = (v, ev) => {  // the time under the mouse
    const r = v.getBoundingClientRect(), x = (ev.clientX - r.left) * (+v.getAttribute("width")) / r.width;
    return t0 + (t1 - t0) * (x - L) / P;
  };
  for (const v of views) {
    let from = null, box = null;
    v.addEventListener("mousedown", ev => {
      from = T(v, ev);
      box = document.createElementNS(NS, "rect");
      ["y", "height"].forEach((k, i) => box.setAttribute(k, i ? +v.dataset.bottom - +v.dataset.top : +v.dataset.top));
      box.setAttribute("fill", "rgba(60,110,220,0.15)"); v.append(box); ev.preventDefault();
    });
    v.addEventListener("mousemove", ev => {
      if (from === null) return;
      const a = X(Math.min(from, T(v, ev))), b = X(Math.max(from, T(v, ev)));
      box.setAttribute("x", a); box.setAttribute("width", b - a);
    });
    v.addEventListener("mouseup", ev => {
      if (from === null) return;
      const to = T(v, ev), a = Math.min(from, to), b = Math.max(from, to);
      box.remove(); from = null;
      if (Math.abs(X(b) - X(a)) > 5) show(a, b);
    });
    v.addEventListener("dblclick", () => show(0, END));
  }
  const want = /t=([0-9.]+)-([0-9.]+)/.exec(location.hash);  // timeline.html#t=12-20 opens on that window
  if (want) show(+want[1], +want[2]); else draw();
  document.body.dataset.zoom = "ready";
})();
"""


def html_timeline(rep: Report) -> str:
    t_end = _span(rep)
    e = html.escape
    summary = " &#183; ".join(
        f"<b>{e(r.mode)}</b> " + (f"{sum(1 for x in r.results.values() if x.outcome == Outcome.SURVIVED)}"
                                   f"/{len(r.results)} survived" if r.error is None else "error")
        for r in rep.runs)
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>roam replay: {e(rep.scenario)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;color:#222}h2{margin:1.1em 0 .2em;font-size:1.05em}"
        "h2 small{font-weight:normal;color:#666}.legend span{display:inline-block;margin-right:1.4em}"
        ".sw{display:inline-block;width:14px;height:10px;margin-right:4px;vertical-align:middle}"
        ".err{color:#d64541}.zoom{position:sticky;top:0;background:#fff;padding:.4em 0;z-index:1}"
        ".zoom button{margin-right:.3em}svg.view{cursor:crosshair;user-select:none;display:block}</style>"
        "</head><body>",
        f"<h1>Which connections survive? &#8212; {e(rep.scenario)}</h1>",
        f"<p>{len(rep.connections)} connection(s), {len(rep.migrations)} migration(s), {rep.duration:g} s of "
        f"traffic, backend {e(rep.backend)}. One view per connection, one lane per attachment mode; every stall "
        "is labelled with its length. Hover for details.</p>",
        f"<p>{summary}</p>",
        '<p class="legend">'
        f'<span><i class="sw" style="background:{_COLORS["up"]}"></i>answers flowing</span>'
        f'<span><i class="sw" style="background:{_COLORS["stall"]};border:1px solid {_COLORS["broken"]}"></i>'
        'stall (no answer), with its length</span>'
        f'<span><i class="sw" style="background:{_COLORS["mig"]}"></i>migration downtime</span>'
        f'<span><b style="color:{_COLORS["broken"]}">&#10005;</b> connection broken</span>'
        f'<span><b style="color:{_COLORS["never"]}">&#10005;</b> never established</span></p>',
        '<div class="zoom"><button id="zoom-in" type="button">zoom in</button>'
        '<button id="zoom-out" type="button">zoom out</button><button id="zoom-all" type="button">whole run</button>'
        ' <input id="pan" type="range" min="0" max="1000" value="0" disabled aria-label="pan"> '
        f'<span id="shown">0&#8211;{t_end:g} s</span> <small>(or drag across a view; double-click: whole run)'
        '</small></div>',
    ]
    notes = [f"{r.mode}: {r.error}" for r in rep.runs if r.error] + [w for r in rep.runs for w in r.warnings]
    parts += [f'<p class="err">{e(n)}</p>' for n in notes]
    for i, c in enumerate(rep.connections):
        parts.append(f"<h2>{e(c.id)} <small>{e(c.protocol)} {'out' if c.direction == 'outbound' else 'in'}, "
                     f"{e(c.peer)}:{c.port}, from {c.start:g} s</small></h2>")
        parts.append(_view(rep, c, i, t_end))
    parts.append(f"<script>{_SCRIPT}</script>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
