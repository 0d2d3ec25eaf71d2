"""Hand-written inline SVG charts (no JavaScript, no external files).

Every chart is one ``<svg>`` string. Big inputs are downsampled so a 20,000-evaluation run
stays small: curves keep at most ``MAX_POINTS`` points (per-bin maxima for "best so far",
bin means otherwise) and scatters at most ``MAX_SCATTER`` background points (front points are
always drawn).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

import numpy as np

MAX_POINTS = 300
MAX_SCATTER = 1500
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]


def _fmt(v: float) -> str:
    return f"{v:.1f}"


def _tick(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _range(a: np.ndarray) -> tuple[float, float]:
    if a.size == 0:
        return 0.0, 1.0
    lo, hi = float(np.min(a)), float(np.max(a))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


class _Frame:
    def __init__(self, w: int, h: int, xr: tuple[float, float], yr: tuple[float, float], m: int = 44):
        self.w, self.h, self.xr, self.yr, self.m = w, h, xr, yr, m

    def x(self, v: float) -> float:
        return self.m + (v - self.xr[0]) / (self.xr[1] - self.xr[0]) * (self.w - self.m - 24)

    def y(self, v: float) -> float:
        return self.h - self.m + 14 - (v - self.yr[0]) / (self.yr[1] - self.yr[0]) * (self.h - self.m - 4)

    def axes(self, xlabel: str, ylabel: str) -> list[str]:
        out = [f'<rect x="{self.m}" y="4" width="{self.w - self.m - 24}" height="{self.h - self.m + 10}" '
               'fill="none" stroke="#999"/>']
        for k in range(5):
            xv = self.xr[0] + (self.xr[1] - self.xr[0]) * k / 4
            yv = self.yr[0] + (self.yr[1] - self.yr[0]) * k / 4
            out.append(f'<text x="{_fmt(self.x(xv))}" y="{self.h - 14}" class="t" text-anchor="middle">{_tick(xv)}</text>')
            out.append(f'<text x="{self.m - 3}" y="{_fmt(self.y(yv) + 3)}" class="t" text-anchor="end">{_tick(yv)}</text>')
        out.append(f'<text x="{(self.w + self.m) / 2:.0f}" y="{self.h - 2}" class="l" text-anchor="middle">{escape(xlabel)}</text>')
        out.append(f'<text x="10" y="{(self.h - self.m) / 2 + 4:.0f}" class="l" text-anchor="middle" '
                   f'transform="rotate(-90 10 {(self.h - self.m) / 2 + 4:.0f})">{escape(ylabel)}</text>')
        return out


def _open(w: int, h: int, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
            f'role="img"><title>{escape(title)}</title>')


def downsample(x: np.ndarray, y: np.ndarray, n: int = MAX_POINTS, how: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """At most ``n`` points: bins of equal size reduced by ``how`` ("mean" or "max")."""
    if len(x) <= n:
        return x, y
    edges = np.linspace(0, len(x), n + 1).astype(int)
    red = np.max if how == "max" else np.mean
    xs = np.array([x[a:b][-1] for a, b in zip(edges[:-1], edges[1:]) if b > a])
    ys = np.array([red(y[a:b]) for a, b in zip(edges[:-1], edges[1:]) if b > a])
    return xs, ys


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str,
               ylabel: str, w: int = 620, h: int = 260, how: str = "mean") -> str:
    """Lines, one per named series of ``(x, y)``; NaNs are skipped."""
    clean = {}
    for name, (xs, ys) in series.items():
        xa, ya = np.asarray(xs, float), np.asarray(ys, float)
        keep = np.isfinite(ya)
        clean[name] = downsample(xa[keep], ya[keep], how=how)
    allx = np.concatenate([v[0] for v in clean.values()] or [np.zeros(0)])
    ally = np.concatenate([v[1] for v in clean.values()] or [np.zeros(0)])
    f = _Frame(w, h, _range(allx), _range(ally))
    out = [_open(w, h, title), *f.axes(xlabel, ylabel)]
    for k, (name, (xa, ya)) in enumerate(clean.items()):
        c = COLORS[k % len(COLORS)]
        pts = " ".join(f"{_fmt(f.x(a))},{_fmt(f.y(b))}" for a, b in zip(xa, ya))
        if pts:
            out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{pts}"/>')
        out.append(f'<text x="{f.m + 6}" y="{16 + 12 * k}" class="t" fill="{c}">{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def scatter(points: np.ndarray, front: np.ndarray, title: str, xlabel: str, ylabel: str,
            w: int = 420, h: int = 320, marks: dict[str, tuple[float, float]] | None = None,
            join: bool = True) -> str:
    """All points grey, front points red (joined when ``join``: a 2-objective front; a
    projection of a higher-dimensional front is not a staircase); ``marks`` are labelled extra
    points (baselines)."""
    pts = np.asarray(points, float).reshape(-1, 2)
    fr = np.asarray(front, float).reshape(-1, 2)
    extra = np.array(list((marks or {}).values()), float).reshape(-1, 2)
    if len(pts) > MAX_SCATTER:
        pts = pts[np.random.default_rng(0).choice(len(pts), MAX_SCATTER, replace=False)]
    both = np.concatenate([pts, fr, extra])
    f = _Frame(w, h, _range(both[:, 0]), _range(both[:, 1]))
    out = [_open(w, h, title), *f.axes(xlabel, ylabel)]
    out += [f'<circle cx="{_fmt(f.x(a))}" cy="{_fmt(f.y(b))}" r="2" fill="#aaa"/>' for a, b in pts]
    order = fr[np.argsort(fr[:, 0])] if len(fr) else fr
    if join and len(order) > 1:
        out.append('<polyline fill="none" stroke="#d62728" stroke-dasharray="3 2" points="'
                   + " ".join(f"{_fmt(f.x(a))},{_fmt(f.y(b))}" for a, b in order) + '"/>')
    out += [f'<circle class="front" cx="{_fmt(f.x(a))}" cy="{_fmt(f.y(b))}" r="3.5" fill="#d62728"/>' for a, b in fr]
    for name, (a, b) in (marks or {}).items():
        out.append(f'<rect x="{_fmt(f.x(a) - 3)}" y="{_fmt(f.y(b) - 3)}" width="6" height="6" fill="#1f77b4"/>'
                   f'<text x="{_fmt(f.x(a) + 5)}" y="{_fmt(f.y(b) - 4)}" class="t">{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def parallel_coordinates(points: np.ndarray, front: np.ndarray, names: Sequence[str], title: str,
                         w: int = 620, h: int = 280) -> str:
    """One vertical axis per objective; background lines grey, front lines red."""
    pts = np.asarray(points, float).reshape(-1, len(names))
    fr = np.asarray(front, float).reshape(-1, len(names))
    if len(pts) > MAX_SCATTER // 3:
        pts = pts[np.random.default_rng(0).choice(len(pts), MAX_SCATTER // 3, replace=False)]
    both = np.concatenate([pts, fr])
    lo, hi = both.min(axis=0), both.max(axis=0)
    span = np.where(hi - lo < 1e-12, 1.0, hi - lo)
    xs = [40 + (w - 80) * k / max(1, len(names) - 1) for k in range(len(names))]
    out = [_open(w, h, title)]

    def poly(row: np.ndarray, style: str) -> str:
        ys = h - 40 - (row - lo) / span * (h - 70)
        return f'<polyline fill="none" {style} points="' + " ".join(f"{_fmt(a)},{_fmt(b)}" for a, b in zip(xs, ys)) + '"/>'

    out += [poly(r, 'stroke="#bbb" stroke-width="0.7"') for r in pts]
    out += [poly(r, 'class="front" stroke="#d62728" stroke-width="1.6"') for r in fr]
    for k, (x, n) in enumerate(zip(xs, names)):
        out.append(f'<line x1="{_fmt(x)}" y1="30" x2="{_fmt(x)}" y2="{h - 40}" stroke="#333"/>'
                   f'<text x="{_fmt(x)}" y="{h - 24}" class="l" text-anchor="middle">{escape(n)}</text>'
                   f'<text x="{_fmt(x)}" y="24" class="t" text-anchor="middle">{_tick(hi[k])}</text>'
                   f'<text x="{_fmt(x)}" y="{h - 8}" class="t" text-anchor="middle">{_tick(lo[k])}</text>')
    out.append("</svg>")
    return "".join(out)


def _color(v: float) -> str:
    """White -> blue ramp for v in [0, 1]."""
    v = min(1.0, max(0.0, v))
    r, g, b = int(247 - 200 * v), int(251 - 150 * v), int(255 - 75 * v)
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, cell: int = 22) -> str:
    """Cells coloured by value (range of the matrix), value printed in each cell when it fits."""
    m = np.asarray(matrix, float)
    lo, hi = (float(np.nanmin(m)), float(np.nanmax(m))) if m.size else (0.0, 1.0)
    span = hi - lo if hi - lo > 1e-12 else 1.0
    left = 12 + 7 * max((len(r) for r in rows), default=1)
    top = 52
    cw = max(cell, 8 + 6 * max((len(c) for c in cols), default=1)) if len(cols) <= 12 else cell
    w, h = max(220, 7 * len(title) + 10, left + cw * len(cols) + 10), top + cell * len(rows) + 24
    out = [_open(w, h, title), f'<text x="4" y="14" class="l">{escape(title)}</text>']
    for j, c in enumerate(cols):
        out.append(f'<text x="{left + cw * j + cw / 2:.0f}" y="{top - 6}" class="t" text-anchor="middle">{escape(c)}</text>')
    for i, r in enumerate(rows):
        out.append(f'<text x="{left - 4}" y="{top + cell * i + cell / 2 + 4:.0f}" class="t" text-anchor="end">{escape(r)}</text>')
        for j in range(len(cols)):
            v = m[i, j]
            fill = "#eee" if not np.isfinite(v) else _color((v - lo) / span)
            out.append(f'<rect x="{left + cw * j}" y="{top + cell * i}" width="{cw - 1}" height="{cell - 1}" fill="{fill}">'
                       f'<title>{escape(r)} / {escape(c)}: {v:.4g}</title></rect>')
            if cw >= 30 and np.isfinite(v):
                dark = (v - lo) / span > 0.6
                out.append(f'<text x="{left + cw * j + cw / 2:.0f}" y="{top + cell * i + cell / 2 + 4:.0f}" class="t" '
                           f'text-anchor="middle" fill="{"#fff" if dark else "#000"}">{v:.2g}</text>')
    out.append(f'<text x="{left}" y="{h - 6}" class="t">range {lo:.4g} .. {hi:.4g}</text></svg>')
    return "".join(out)


def spread_chart(gens: Sequence[np.ndarray], title: str, ylabel: str, w: int = 620, h: int = 260) -> str:
    """Per generation: min-max band (light), inter-quartile band (dark), median line."""
    stats = [(k, np.min(g), np.percentile(g, 25), np.median(g), np.percentile(g, 75), np.max(g))
             for k, g in enumerate(gens) if len(g)]
    if len(stats) > MAX_POINTS:  # bin generations
        edges = np.linspace(0, len(stats), MAX_POINTS + 1).astype(int)
        stats = [tuple(np.mean([s[i] for s in stats[a:b]]) for i in range(6))
                 for a, b in zip(edges[:-1], edges[1:]) if b > a]
    s = np.array(stats, float).reshape(-1, 6)
    f = _Frame(w, h, _range(s[:, 0]), _range(s[:, 1:].ravel()))
    out = [_open(w, h, title), *f.axes("generation", ylabel)]
    if len(s):
        def band(lo: int, hi: int, fill: str) -> str:
            top = [f"{_fmt(f.x(r[0]))},{_fmt(f.y(r[hi]))}" for r in s]
            bot = [f"{_fmt(f.x(r[0]))},{_fmt(f.y(r[lo]))}" for r in s[::-1]]
            return f'<polygon fill="{fill}" stroke="none" points="{" ".join(top + bot)}"/>'

        out += [band(1, 5, "#dbe9f6"), band(2, 4, "#9ecae1")]
        out.append('<polyline fill="none" stroke="#08519c" stroke-width="1.5" points="'
                   + " ".join(f"{_fmt(f.x(r[0]))},{_fmt(f.y(r[3]))}" for r in s) + '"/>')
    out.append("</svg>")
    return "".join(out)
