"""One self-contained HTML file for a run: inline CSS and inline SVG, no script, no external
URL, every text escaped. Built from :class:`~evomerge.report.data.ReportData` only."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.objectives import Objectives
from ..engine.store import atomic_write_text
from ..errors import ConfigError, RunError
from . import svg
from .data import ReportData, dumps, finite, generations, load_report_data
from .front import front_of_records
from .recipe_view import recipe_figures, recipe_table

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;max-width:1300px;color:#222}
h1{font-size:22px}h2{font-size:17px;border-bottom:1px solid #ccc;margin-top:28px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}
.figs{display:flex;flex-wrap:wrap;gap:12px}.note{color:#666;font-size:12px}
svg .t{font-size:10px;fill:#333}svg .l{font-size:11px;fill:#000}
pre{background:#f7f7f7;padding:8px;max-height:320px;overflow:auto;font-size:11px}
table.recipe td{text-align:left;font-family:monospace;font-size:11px}
"""


def _f(v: Any, d: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{d}f}"


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{escape(title)}</h2>{body}</section>'


def _table_rows(data: ReportData) -> str:
    head = "".join(f"<th>{escape(t)}</th>" for t in data.tasks)
    rows = []
    for r in data.rows:
        cells = "".join(f"<td>{_f(r.scores.get(t))}</td>" for t in data.tasks)
        rows.append(f"<tr><td>{escape(r.label)}</td><td>{_f(r.fitness)}</td><td>{_f(r.se)}</td>"
                    f"<td>{escape(r.split)}</td>{cells}<td>{escape(r.note)}</td></tr>")
    out = (f'<table class="baselines"><tr><th>model</th><th>fitness</th><th>SE</th><th>split</th>{head}'
           f"<th>note</th></tr>{''.join(rows)}</table>"
           '<p class="note">SE: standard error of the weighted fitness over the examples of the search '
           "split (\u2013 where per-example scores were not logged).</p>")
    if data.final_rows:
        fr = "".join(f"<tr><td>{escape(str(r['label']))}{' (final)' if r['final'] else ''}</td>"
                     f"<td>{escape(str(r['split']))}</td><td>{_f(r['fitness'])}</td><td>{_f(r['se'])}</td>"
                     f"<td>{r['n'] if r['n'] is not None else '–'}</td></tr>" for r in data.final_rows)
        out += ('<h3>Validation selection (final.json)</h3><table class="final"><tr><th>model</th><th>split</th>'
                f"<th>fitness</th><th>SE</th><th>n</th></tr>{fr}</table>")
    return out


def _curves(data: ReportData) -> str:
    recs = data.records
    ok = [(i, r) for i, r in enumerate(recs) if not r.get("failed") and r.get("scores")]
    figs = []
    x = np.array([i for i, _ in ok], float)
    fit = np.array([float(r["fitness"]) for _, r in ok], float)
    if len(ok):
        figs.append(svg.line_chart({"candidate": (x, fit), "best so far": (x, np.maximum.accumulate(fit))},
                                   "fitness per evaluation (search split)", "evaluation", "fitness"))
        series = {}
        for t in data.tasks:
            y = np.array([float(r["scores"].get(t, np.nan)) for _, r in ok])
            series[t] = (x, np.fmax.accumulate(y))
        figs.append(svg.line_chart(series, "best so far per task (search split)", "evaluation", "score", how="max"))
    if not figs:
        return '<p>No successful evaluation yet.</p>'
    return f'<div class="figs">{"".join(figs)}</div>'


def _front(data: ReportData) -> str:
    if not data.tasks:
        return "<p>No successful evaluation yet.</p>"
    try:
        objectives = Objectives.build(data.config.get("objectives") or [], data.tasks, data.task_weights)
    except ConfigError:
        objectives = Objectives.build([], data.tasks, data.task_weights)
    front = front_of_records(data.records, objectives)
    if not len(front.all_points):
        return "<p>No complete successful evaluation.</p>"
    names = objectives.names
    table = "".join(f"<tr><td>{m['id']}</td>" + "".join(f"<td>{_f(v)}</td>" for v in p) + "</tr>"
                    for m, p in zip(front.members[:50], front.points[:50]))
    note = (f'<p class="note">{len(front.members)} front members of {len(front.all_points)} eligible '
            f"evaluations (failed and racing-cut candidates excluded); split: {front.split}.</p>")
    if objectives.m == 1:
        fig = ""
    elif objectives.m == 2:
        marks = {}
        for r in data.rows:
            if r.label.startswith("baseline") and r.fitness is not None and all(t in r.scores for t in data.tasks):
                marks[r.label.split(": ", 1)[-1]] = tuple(objectives.values(r.scores))
        fig = svg.scatter(front.all_points, front.points, f"Pareto front ({front.split} split)",
                          names[0], names[1], marks=marks)
    else:
        pairs = [svg.scatter(front.all_points[:, [a, b]], front.points[:, [a, b]], f"{names[a]} vs {names[b]}",
                             names[a], names[b], w=300, h=250, join=False)
                 for a in range(objectives.m) for b in range(a + 1, objectives.m)][:6]
        fig = svg.parallel_coordinates(front.all_points, front.points, names,
                                       f"Pareto front, parallel coordinates ({front.split} split)") + "".join(pairs)
    head = "".join(f"<th>{escape(n)}</th>" for n in names)
    return (f'<div class="figs front-plot">{fig}</div>{note}<table class="front"><tr><th>id</th>{head}</tr>'
            f"{table}</table>")


def _recipe(data: ReportData) -> str:
    best = data.best
    if not best or not best.get("recipe"):
        return "<p>No best recipe yet.</p>"
    figs = recipe_figures(best["recipe"], best.get("genome"))
    return (f"<p>Candidate {best.get('id')} (fitness {_f(best.get('fitness'))}, search split).</p>"
            f'<div class="figs">{"".join(figs)}</div><details><summary>recipe fields</summary>'
            f"{recipe_table(best['recipe'])}</details>")


def _spread(data: ReportData) -> str:
    gens = [finite([r.get("fitness") for r in g if not r.get("failed")])
            for g in generations(data.records, data.popsize)]
    if not any(len(g) for g in gens):
        return "<p>No successful evaluation yet.</p>"
    return (svg.spread_chart(gens, f"fitness spread per generation ({len(gens)} generations, search split)", "fitness")
            + '<p class="note">Bands: min\u2013max and inter-quartile range; line: median. '
            "Racing-cut candidates count with their partial estimate; failed ones are left out.</p>")


def _meta(data: ReportData) -> str:
    c, cfg = data.counts, data.config
    secs = [float(r.get("seconds") or 0.0) for r in data.records if r.get("worker") != "cache"]
    times = [float(r["time"]) for r in data.records if r.get("time")]
    wall = (max(times) - min(times)) if len(times) > 1 else 0.0
    work = "".join(f"<tr><td>{escape(w)}</td><td>{int(v['n'])}</td><td>{_f(v['seconds'], 1)}</td>"
                   f"<td>{_f(100 * v['seconds'] / wall, 0) if wall > 0 else '–'}</td></tr>"
                   for w, v in sorted(data.workers.items()))
    facts = [("run", data.name), ("directory", data.run_dir),
             ("space", dumps(cfg.get("space"))), ("optimizer", dumps(cfg.get("optimizer"))),
             ("budget", str(cfg.get("budget"))), ("evaluations", str(c.get("evaluations"))),
             ("failed / racing-cut / cached", f"{c.get('failed')} / {c.get('racing_cut')} / {c.get('cached')}"),
             ("baselines", str(c.get("baselines"))),
             ("time per candidate (s, mean, evaluated ones)", _f(float(np.mean(secs)) if secs else None, 2)),
             ("wall time of the log (s)", _f(wall, 1)),
             ("evomerge version", str(data.meta.get("evomerge_version")))]
    rows = "".join(f"<tr><td>{escape(k)}</td><td style='text-align:left'><pre>{escape(v)}</pre></td></tr>"
                   if "\n" in v else f"<tr><td>{escape(k)}</td><td style='text-align:left'>{escape(v)}</td></tr>"
                   for k, v in facts)
    sources = "".join(f"<tr><td>{escape(str(k))}</td><td style='text-align:left'>{escape(str(v))}</td></tr>"
                      for k, v in (cfg.get("models") or {}).items())
    return (f'<table class="meta">{rows}</table><h3>Sources</h3><table>{sources}</table>'
            f"<h3>Worker utilisation</h3><table><tr><th>worker</th><th>evaluations</th><th>busy s</th>"
            f"<th>busy % of wall</th></tr>{work}</table>"
            f"<details><summary>config.yaml</summary><pre>{escape(dumps(cfg))}</pre></details>")


def render(data: ReportData) -> str:
    """The whole report page for ``data``."""
    parts = [
        _section("summary", "Best and baselines", _table_rows(data)),
        _section("curves", "Fitness curves", _curves(data)),
        _section("front", "Pareto front", _front(data)),
        _section("recipe", "Best recipe", _recipe(data)),
        _section("spread", "Population spread", _spread(data)),
        _section("meta", "Run metadata", _meta(data)),
    ]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>evomerge report: '
            f"{escape(data.name)}</title><style>{CSS}</style></head><body><h1>evomerge run report: "
            f"{escape(data.name)}</h1>{''.join(parts)}</body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render the run at ``run_dir`` into ``out`` (default ``RUN/report.html``), atomically.

    Raises:
        RunError: no run at ``run_dir`` or ``out`` cannot be written.
    """
    data = load_report_data(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    try:
        atomic_write_text(path, render(data))
    except OSError as err:
        raise RunError(f"cannot write report {path}: {err.strerror or err}") from None
    return path
