"""Model cards for merged models, built with ``huggingface_hub``'s ``ModelCard``/``ModelCardData``.

Front matter: ``library_name: transformers``; tags ``merge``, ``evomerge`` (and ``mergekit``
when a mergekit config is written next to the weights); ``base_model`` with the Hub ids of
the sources that came from the Hub (local directories have no id and are left out; never a
local path) and ``base_model_relation: merge``; and ``model-index`` with the validation and
held-out scores, each naming its split and standard error. Search-split scores are shown in
the body only: they are what the search maximized, so they are optimistic.

Body: method and sources, a score table (task, split, value, standard error), the recipe.

Score rows are ``(task, split, value, stderr)`` tuples or mappings with those keys (plus an
optional ``metric``); :func:`score_rows_of_record` reads them from a run's evaluation record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from .resolve import hub_ref_of_path
from .writer import MERGEKIT_FILE, RECIPE_FILE, plain_data

MODEL_INDEX_SPLITS = ("validation", "heldout", "held-out", "test")


def _row(r: Any) -> dict[str, Any]:
    if isinstance(r, Mapping):
        d = dict(r)
    else:
        task, split, value, stderr = r
        d = {"task": task, "split": split, "value": value, "stderr": stderr}
    d["value"] = float(d["value"])
    d["stderr"] = None if d.get("stderr") is None else float(d["stderr"])
    d.setdefault("metric", "score")
    return d


def score_rows_of_record(rec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Score rows of a run's evaluation record: search-split means with the standard error of
    the per-example scores, plus any ``validation`` / ``heldout`` scores the record carries
    (``{task: value}`` or ``{task: {mean|value, stderr|se}}``)."""
    rows = []
    per_ex = rec.get("per_example") or {}
    for task, v in (rec.get("scores") or {}).items():
        xs = per_ex.get(task) if isinstance(per_ex, Mapping) else None
        rows.append({"task": task, "split": "search", "value": float(v),
                     "stderr": stderr_text(xs) if xs else None, "metric": "score"})
    for split in ("validation", *MODEL_INDEX_SPLITS[1:]):
        block = rec.get(split)
        if not isinstance(block, Mapping):
            continue
        for task, v in block.items():
            if isinstance(v, Mapping):
                value = v.get("mean", v.get("value"))
                se = v.get("stderr", v.get("se"))
            else:
                value, se = v, None
            if isinstance(value, (int, float)):
                rows.append({"task": task, "split": split, "value": float(value),
                             "stderr": None if se is None else float(se), "metric": "score"})
    return rows


def stderr_text(xs: Iterable[float]) -> float | None:
    vals = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    n = len(vals)
    if n < 2:
        return None
    m = sum(vals) / n
    var = sum((x - m) ** 2 for x in vals) / (n - 1)
    return math.sqrt(var / n)


def hub_base_models(sources: Mapping[str, Any] | Iterable[Any]) -> list[str]:
    """Hub repo ids of the sources that are Hub snapshots (order kept, no duplicates)."""
    paths = sources.values() if isinstance(sources, Mapping) else sources
    out = []
    for p in paths:
        ref = hub_ref_of_path(str(p))
        if ref:
            repo = ref.split("@", 1)[0]
            if repo not in out:
                out.append(repo)
    return out


def build_model_card(card: Mapping[str, Any], recipe: Mapping[str, Any] | None,
                     config: Mapping[str, Any], *, mergekit: bool = False) -> str:
    """The README.md text. ``card`` keys: ``name``, ``description``, ``method``,
    ``base_model`` (a source path), ``sources`` (key -> path), ``scores`` ({task: value},
    search split), ``evaluations`` (score rows), ``tradeoff`` (a Pareto member's trade-off,
    see :mod:`evomerge.checkpoint.tradeoff`); other keys are listed under "Details"."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    card = dict(card)
    sources = card.pop("sources", None) or {}
    if not isinstance(sources, Mapping):
        sources = {str(i): s for i, s in enumerate(sources)}
    name = card.pop("name", None) or "Merged model"
    description = card.pop("description", None)
    method = card.pop("method", None) or (recipe or {}).get("merge_method") or (recipe or {}).get("method")
    base_model = card.pop("base_model", None)
    rows = [_row(r) for r in card.pop("evaluations", None) or []]
    tradeoff = card.pop("tradeoff", None)
    for task, value in (card.pop("scores", None) or {}).items():
        if not any(r["task"] == task and r["split"] == "search" for r in rows):
            rows.append(_row({"task": task, "split": "search", "value": value, "stderr": None}))

    eval_results = [
        EvalResult(
            task_type="text-generation", dataset_type=r["task"], dataset_name=r["task"],
            dataset_split=r["split"], metric_type=r["metric"], metric_value=r["value"],
            metric_name=f"{r['metric']} ({r['split']}"
                        + (f", standard error {r['stderr']:.4g})" if r["stderr"] is not None else ")"),
        )
        for r in rows if r["split"] in MODEL_INDEX_SPLITS
    ]
    tags = ["merge", "evomerge"] + (["mergekit"] if mergekit else [])
    hub_ids = hub_base_models([base_model, *sources.values()] if base_model else sources)
    data = ModelCardData(
        library_name="transformers", tags=tags, base_model=hub_ids or None,
        model_name=name if eval_results else None, eval_results=eval_results or None,
        base_model_relation="merge" if hub_ids else None,
    )

    lines = [f"# {name}", "",
             description or "This model is a merge of pre-trained language models made with evomerge.",
             "", "## Merge method", ""]
    lines.append(f"- method: `{method}`" if method else "- method: see the recipe below")
    if base_model:
        lines.append(f"- base model: `{_shown(base_model)}`")
    arch = config.get("architectures")
    if arch:
        lines.append(f"- architecture: {', '.join(map(str, arch))}")
    for key in ("num_hidden_layers", "n_layer"):
        if key in config:
            lines.append(f"- layers: {config[key]}")
            break
    lines.append("")
    if sources:
        lines += ["## Source models", ""]
        lines += [f"- `{k}`: `{_shown(v)}`" for k, v in sources.items()]
        lines.append("")
    if rows:
        lines += ["## Scores", "",
                  "Search-split scores are what the search maximized (optimistic); validation and "
                  "held-out scores are on examples the search never optimized.", "",
                  "| task | split | score | standard error |", "|---|---|---|---|"]
        for r in rows:
            se = f"{r['stderr']:.4g}" if r["stderr"] is not None else "n/a"
            lines.append(f"| {r['task']} | {r['split']} | {r['value']:.4g} | {se} |")
        lines.append("")
    if tradeoff:
        from .tradeoff import tradeoff_lines

        lines += tradeoff_lines(tradeoff)
    if card:
        lines += ["## Details", ""]
        lines += [f"- {k}: {json.dumps(plain_data(v))}" for k, v in card.items()]
        lines.append("")
    if recipe is not None:
        lines += ["## Recipe", "", f"Also saved as `{RECIPE_FILE}`"
                  + (f" (and for mergekit as `{MERGEKIT_FILE}`)." if mergekit else "."), "", "```yaml"]
        lines.append(yaml.safe_dump(plain_data(recipe), sort_keys=False).rstrip())
        lines += ["```", ""]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n"
    return str(ModelCard(text))  # parsed back strictly: invalid metadata raises here


def _shown(path: Any) -> str:
    """A Hub snapshot as ``org/name@commit``; anything else as given."""
    return hub_ref_of_path(str(path)) or str(path)
