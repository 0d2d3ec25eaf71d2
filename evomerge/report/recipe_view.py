"""The best recipe as pictures: per-layer heat maps where the recipe has layers, a table where
it does not. Works from the recipe dict alone (as logged), for every space type:

* parameter / m2n2 (``models[*].parameters``): one heat map per parameter (weight, density,
  ...), rows = models, columns = layer groups (a scalar parameter is one column);
* layer_swap / dfs (``slices``): rows = output layers, columns = source models, cell = the
  source's weight in that layer (1 for a plain copy; a DFS path shows which model each step
  takes, and its scale);
* lora_pool / blackbox (``alpha`` / ``beta`` per adapter) and output_mixture (``weights``):
  one row per control, columns = adapters / experts;
* anything else: the genome as one row, and a table of the recipe's scalar fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

import numpy as np

from .svg import heatmap

MAX_ROWS = 200  # a table of scalar leaves stops here


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _values(v: Any) -> list[float] | None:
    if _num(v):
        return [float(v)]
    if isinstance(v, list) and v and all(_num(x) for x in v):
        return [float(x) for x in v]
    return None


def _param_maps(models: Sequence[Any]) -> list[str]:
    """Rows: ``model`` (or ``model · filter`` for mergekit-style filtered values)."""
    params: dict[str, dict[str, list[float]]] = {}
    for m in models:
        if not isinstance(m, Mapping):
            continue
        name = str(m.get("model", "?"))
        for p, v in (m.get("parameters") or {}).items():
            vals = _values(v)
            if vals is not None:
                params.setdefault(p, {})[name] = vals
            elif isinstance(v, list) and all(isinstance(x, Mapping) for x in v):
                for item in v:
                    vals = _values(item.get("value"))
                    if vals is not None:
                        params.setdefault(p, {})[f"{name} · {item.get('filter', 'rest')}"] = vals
    out = []
    for p, by_row in params.items():
        width = max(len(v) for v in by_row.values())
        mat = np.full((len(by_row), width), np.nan)
        for i, v in enumerate(by_row.values()):
            mat[i] = v if len(v) == width else (v * width if len(v) == 1 else v + [np.nan] * (width - len(v)))
        cols = [f"group {j}" for j in range(width)] if width > 1 else ["all layers"]
        out.append(heatmap(mat, list(by_row), cols, f"{p} per layer group (rows: model · tensor filter)"))
    return out


def _slice_map(slices: Sequence[Any]) -> str | None:
    cells: list[dict[str, float]] = []
    for s in slices:
        srcs = (s or {}).get("sources") or []
        for_layer: list[dict[str, float]] = []
        n = 1
        for src in srcs:
            lr = src.get("layer_range") or [0, 1]
            n = max(1, int(lr[1]) - int(lr[0]))
            w = (src.get("parameters") or {}).get("weight", 1.0)
            label = f"{src.get('model', '?')}"
            for_layer.append({label: float(w) if _num(w) else 1.0})
        merged: dict[str, float] = {}
        for d in for_layer:
            merged.update(d)
        cells += [merged] * n
    if not cells:
        return None
    models = sorted({m for c in cells for m in c})
    mat = np.array([[c.get(m, 0.0) for m in models] for c in cells])
    return heatmap(mat.T, models, [str(i) for i in range(len(cells))],
                   "source model of each output layer (weight)", cell=16)


def _control_maps(recipe: Mapping[str, Any]) -> str | None:
    rows = {k: recipe[k] for k in ("alpha", "beta", "weights") if isinstance(recipe.get(k), Mapping)}
    if not rows:
        return None
    cols = list(dict.fromkeys(c for v in rows.values() for c in v))
    mat = np.array([[float(v.get(c, np.nan)) for c in cols] for v in rows.values()])
    return heatmap(mat, list(rows), cols, "control per adapter / expert")


def _leaves(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, Mapping):
        return [x for k, v in obj.items() for x in _leaves(v, f"{prefix}{k}.")]
    if isinstance(obj, list) and not all(_num(x) for x in obj):
        return [x for i, v in enumerate(obj) for x in _leaves(v, f"{prefix}{i}.")]
    text = ", ".join(f"{x:.4g}" for x in obj) if isinstance(obj, list) else (
        f"{obj:.4g}" if _num(obj) else str(obj))
    return [(prefix.rstrip("."), text)]


def recipe_table(recipe: Any) -> str:
    """The recipe's leaves as an HTML table (first ``MAX_ROWS``)."""
    leaves = _leaves(recipe)
    body = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v[:300])}</td></tr>" for k, v in leaves[:MAX_ROWS])
    more = f"<p>... {len(leaves) - MAX_ROWS} more fields</p>" if len(leaves) > MAX_ROWS else ""
    return f'<table class="recipe"><tr><th>field</th><th>value</th></tr>{body}</table>{more}'


def recipe_figures(recipe: Any, genome: Sequence[float] | None) -> list[str]:
    """SVG heat maps (and, always last, the table) for one recipe."""
    figs: list[str] = []
    if isinstance(recipe, Mapping):
        if isinstance(recipe.get("models"), list):
            figs += _param_maps(recipe["models"])
        if isinstance(recipe.get("slices"), list):
            fig = _slice_map(recipe["slices"])
            if fig:
                figs.append(fig)
        fig = _control_maps(recipe)
        if fig:
            figs.append(fig)
    if not figs and genome:
        g = np.asarray(genome, float).reshape(1, -1)
        figs.append(heatmap(g, ["genome"], [str(i) for i in range(g.shape[1])], "genome", cell=16))
    return figs
