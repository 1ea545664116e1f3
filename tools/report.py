"""How `roam replay` shows a report: a text table, JSON, and an HTML timeline (inline SVG)."""
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
    return "\n".join(lines) + "\n"


def as_json(rep: Report) -> str:
    return json.dumps(rep.as_dict(), indent=2) + "\n"


# ------------------------------------------------------------------ HTML timeline
_COLORS = {"up": "#2e9d5b", "broken": "#d64541", "never": "#9aa0a6", "mig": "#f3c969"}
_ROW = 26
_LABEL = 170
_VERDICT = 220
_PLOT = 640


def _span(rep: Report) -> float:
    end = rep.duration
    for r in rep.runs:
        for x in r.results.values():
            if x.broken_at is not None:
                end = max(end, x.broken_at)
    return end * 1.02 + 1


def _mode_svg(rep: Report, run: ModeRun, t_end: float) -> str:
    height = 34 + _ROW * len(rep.connections) + 24
    width = _LABEL + _PLOT + _VERDICT
    X = lambda t: _LABEL + _PLOT * max(0.0, min(t, t_end)) / t_end  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12" role="img" aria-label="timeline for mode {html.escape(run.mode)}">']
    top, bottom = 24, 34 + _ROW * len(rep.connections)
    for at, to, down, site in rep.migrations:
        x0, x1 = X(at), max(X(at + down), X(at) + 2)
        out.append(f'<rect x="{x0:.1f}" y="{top}" width="{x1 - x0:.1f}" height="{bottom - top}" fill="{_COLORS["mig"]}" '
                   f'opacity="0.8"><title>move to {html.escape(to)} (site {html.escape(site)}) at {at:g} s, '
                   f'down {down * 1000:.0f} ms</title></rect>')
        out.append(f'<text x="{x0:.1f}" y="{top - 6}" fill="#6b5200">&#8594; {html.escape(to)}</text>')
    step = _nice_step(t_end)
    t = 0.0
    while t <= t_end:
        out.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{top}" y2="{bottom}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{X(t):.1f}" y="{bottom + 14}" text-anchor="middle" fill="#666">{t:g} s</text>')
        t += step
    for i, c in enumerate(rep.connections):
        y = 34 + _ROW * i
        mid = y + _ROW / 2 - 4
        label = f"{c.id} ({c.protocol} {'out' if c.direction == 'outbound' else 'in'})"
        out.append(f'<text x="4" y="{mid + 4:.1f}">{html.escape(label)}</text>')
        out.append(f'<line x1="{X(c.start):.1f}" x2="{X(t_end):.1f}" y1="{mid:.1f}" y2="{mid:.1f}" stroke="#ddd" '
                   'stroke-width="2"/>')
        if run.error is not None:
            continue
        res: ConnResult = run.results[c.id]
        for a, b in res.runs:
            x0 = X(a)
            out.append(f'<rect x="{x0:.1f}" y="{mid - 6:.1f}" width="{max(X(b) - x0, 2):.1f}" height="12" '
                       f'fill="{_COLORS["up"]}"><title>{html.escape(c.id)}: answers flowing {a:.2f}-{b:.2f} s'
                       '</title></rect>')
        if res.broken_at is not None:
            bx = X(res.broken_at)
            why = res.cause.text if res.cause else "?"
            color = _COLORS["broken"] if res.established else _COLORS["never"]
            out.append(f'<g stroke="{color}" stroke-width="3"><title>{html.escape(c.id)}: '
                       f'{"broken" if res.established else "never established"} at {res.broken_at:.2f} s: '
                       f'{html.escape(why)} ({html.escape(res.broken_side or "")} side)</title>'
                       f'<line x1="{bx - 5:.1f}" y1="{mid - 5:.1f}" x2="{bx + 5:.1f}" y2="{mid + 5:.1f}"/>'
                       f'<line x1="{bx - 5:.1f}" y1="{mid + 5:.1f}" x2="{bx + 5:.1f}" y2="{mid - 5:.1f}"/></g>')
        color = _COLORS["up"] if res.outcome == Outcome.SURVIVED else (
            _COLORS["broken"] if res.established else _COLORS["never"])
        out.append(f'<text x="{_LABEL + _PLOT + 10}" y="{mid + 4:.1f}" fill="{color}" font-weight="bold">'
                   f'{html.escape(cell(run, c.id))}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _nice_step(span: float) -> float:
    for s in (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600):
        if span / s <= 12:
            return float(s)
    return span / 10


def html_timeline(rep: Report) -> str:
    t_end = _span(rep)
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>roam replay: {html.escape(rep.scenario)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;color:#222}h2{margin:1.2em 0 .2em;font-size:1.1em}"
        ".legend span{display:inline-block;margin-right:1.4em}.sw{display:inline-block;width:14px;height:10px;"
        "margin-right:4px;vertical-align:middle}.err{color:#d64541}</style></head><body>",
        f"<h1>Which connections survive? &mdash; {html.escape(rep.scenario)}</h1>",
        f"<p>{len(rep.connections)} connection(s), {len(rep.migrations)} migration(s), "
        f"{rep.duration:g} s of traffic, backend {html.escape(rep.backend)}. One chart per attachment mode; "
        "one row per connection. Hover for details.</p>",
        '<p class="legend">'
        f'<span><i class="sw" style="background:{_COLORS["up"]}"></i>answers flowing</span>'
        f'<span><i class="sw" style="background:{_COLORS["mig"]}"></i>migration downtime</span>'
        f'<span><b style="color:{_COLORS["broken"]}">&#10005;</b> connection broken</span>'
        f'<span><b style="color:{_COLORS["never"]}">&#10005;</b> never established</span></p>',
    ]
    for run in rep.runs:
        summary = ""
        if run.error is None and run.results:
            n = sum(1 for x in run.results.values() if x.outcome == Outcome.SURVIVED)
            summary = f" &mdash; {n}/{len(run.results)} survived"
        parts.append(f"<h2>{html.escape(run.mode)}{summary}</h2>")
        if run.error is not None:
            parts.append(f'<p class="err">{html.escape(run.error)}</p>')
        for w in run.warnings:
            parts.append(f'<p class="err">{html.escape(w)}</p>')
        parts.append(_mode_svg(rep, run, t_end))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
