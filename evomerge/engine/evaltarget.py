"""`evomerge eval TARGET`: score a model, a recipe or a run's candidates on one split.

TARGET is one of:

- a model directory (an HF checkpoint: ``config.json``): scored as it is;
- a recipe YAML (evomerge or mergekit): compiled and merged in memory, then scored;
- a run directory ``RUN`` (its final model when it has been through selection, else its
  best candidate by search fitness), ``RUN:final``, ``RUN:top-K`` (the K best distinct plans
  by search fitness) or ``RUN:baselines``.

Tasks: ``--tasks`` (task YAMLs) or, for a run, the run's own tasks (and its report tasks on
the held-out split). A task without a validation file gets the same deterministic carve-out
a run makes (``validation_fraction``, default the run default), so ``--split search`` and
``--split validation`` mean what they mean in a run. Run scores are cached in the run's
``rescore.jsonl``. Rows have the format of :func:`evomerge.engine.selection.select_final`'s.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..config import SelectionConfig
from ..errors import ConfigError
from ..fitness.stderr import combined_se
from .selection import Rescorer, load_final, summarize_scores
from .store import RunStore

DEFAULT_FRACTION = SelectionConfig().validation_fraction
_RUN_SUFFIX = re.compile(r"^(final|baselines|top-?(\d+))$")


def _split_run_target(target: str) -> tuple[Path, str] | None:
    """(run dir, selector) when ``target`` names a run, else None."""
    path, sel = Path(target), "default"
    if ":" in target and not Path(target).exists():
        head, _, tail = target.rpartition(":")
        path, sel = Path(head), tail
        if not _RUN_SUFFIX.match(sel):
            raise ConfigError(f"eval target {target!r}: unknown selector {sel!r} "
                              "(use RUN, RUN:final, RUN:top-K or RUN:baselines)")
    if RunStore(path).exists():
        return path, sel
    if sel != "default":
        raise ConfigError(f"eval target {target!r}: {path} is not a run directory "
                          "(no config.json/meta.json)")
    return None


def eval_target(target: str, split: str = "validation", tasks: list[str] | None = None,
                backend: dict[str, Any] | None = None,
                validation_fraction: float | None = DEFAULT_FRACTION) -> list[dict[str, Any]]:
    """Score TARGET on ``split``; returns one row per model (label, role, splits, report)."""
    run = _split_run_target(target)
    if run is not None:
        return _eval_run(run[0], run[1], split, tasks, backend, validation_fraction)
    p = Path(target).expanduser()
    if not p.exists():
        raise ConfigError(f"eval target not found: {target}")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"eval target {target}: a directory that is neither a run "
                          "(config.yaml + meta.json) nor a model (config.json)")
    if not tasks:
        raise ConfigError(f"eval target {target}: --tasks is required for a model directory "
                          "or a recipe (only a run knows its tasks)")
    if p.is_dir():
        return [_score_models([(p.name, "model", None)], str(p.resolve()), split, tasks,
                              backend, validation_fraction)[0]]
    from ..recipe import compile_recipe, read_recipe_file
    from ..zoo.refs import register_zoo_refs

    register_zoo_refs()  # a recipe file may name zoo: models
    raw = read_recipe_file(p)
    if not any(k in raw for k in ("merge_method", "method", "slices", "models")):
        raise ConfigError(f"eval target {target}: a YAML file that is not a merge recipe "
                          "(no merge_method/models/slices)")
    plan = compile_recipe(p)
    rec = plan.meta.get("recipe") or {}
    sources = rec.get("sources") or {}
    resident = sources.get(rec.get("base_model")) or next(iter(sources.values()), None)
    if resident is None:
        raise ConfigError(f"eval target {target}: the recipe names no source model")
    return _score_models([(p.name, "recipe", plan)], resident, split, tasks, backend,
                         validation_fraction)


def _score_models(items: list[tuple[str, str, Any]], resident: str, split: str,
                  tasks: list[str], backend: dict[str, Any] | None,
                  fraction: float | None) -> list[dict[str, Any]]:
    from ..fitness import load_tasks
    from .evaluator import EvalSpec, Evaluator

    entries = [{"path": str(Path(t).expanduser().resolve()), "weight": 1.0,
                "validation_fraction": fraction or None} for t in tasks]
    loaded = load_tasks(entries)  # one-line errors for bad task files, before any model loads
    for t in loaded:
        t.examples(split)  # a missing split is a one-line TaskError
    weights = {t.name: t.weight for t in loaded}
    b = {"name": "hf", "batch_size": 128, **(backend or {})}
    ev = Evaluator(EvalSpec(model_dir=resident, tasks=entries, backend=b))
    rows = []
    try:
        for label, role, plan in items:
            if plan is not None:
                ev.backend.load_plan(plan, ev.materializer)
            raw = ev.backend.evaluate(ev.tasks, split=split)
            per = {k: [float(x) for x in v] for k, v in raw.items()}
            rows.append({"label": label, "role": role, "splits": {split: combined_se(per, weights)},
                         "report": {}, "errors": {}})
    finally:
        ev.close()
    return rows


def _eval_run(run_dir: Path, sel: str, split: str, tasks: list[str] | None,
              backend: dict[str, Any] | None, fraction: float | None) -> list[dict[str, Any]]:
    from .baselines import LOG
    from .export import top_records

    store = RunStore.open(run_dir)
    cfg = store.config()
    records = [r for r in store.read_evals() if r.get("per_example") and not r.get("racing_cut")]
    items: list[tuple[str, str, str, dict[str, Any]]] = []  # label, role, plan hash, recipe
    final = load_final(run_dir)
    if sel == "baselines":
        for r in store.read_jsonl(LOG):
            if not r.get("failed"):
                items.append((r["baseline"], "baseline", r["plan_hash"], r["recipe"]))
    elif sel == "final" or (sel == "default" and final is not None):
        if final is None:
            raise ConfigError(f"eval target {run_dir}:final: the run has no final model yet "
                              f"(run `evomerge select {run_dir}`)")
        f = final["final"]
        items.append((f"{f['label']} [final]", f["role"], f["plan_hash"], final["recipe"]))
    else:
        m = _RUN_SUFFIX.match(sel)
        k = int(m.group(2)) if m and m.group(2) else 1
        for rank, r in enumerate(top_records(records, k), 1):
            items.append((f"candidate {r['id']} (search #{rank})", "candidate",
                          r["plan_hash"], r["recipe"]))
    if not items:
        raise ConfigError(f"eval target {run_dir}:{sel}: the run has nothing to evaluate there")
    if tasks:  # other tasks than the run's: score the recipes afresh
        from ..recipe import compile_recipe

        models = [(label, role, compile_recipe(recipe)) for label, role, _, recipe in items]
        from .models import resolve_models

        srcs = resolve_models(cfg.models)
        resident = srcs[cfg.base_model or next(iter(srcs))]
        return _score_models(models, resident, split, tasks, backend or cfg.backend.model_dump(),
                             fraction)
    rs = Rescorer(store, cfg)
    weights = rs.info.weights
    rows = []
    try:
        for label, role, h, recipe in items:
            rec = rs.score(h, recipe, split)
            per = rec["per_example"] or {}
            row = {"label": label, "role": role, "plan_hash": h, "report": {}, "errors": {},
                   "splits": {split: summarize_scores({t: v for t, v in per.items() if t in weights},
                                                      weights)}}
            if split == "heldout":
                row["report"] = combined_se({t: v for t, v in per.items() if t not in weights}, {})["tasks"]
            if rec["error"]:
                row["errors"][split] = rec["error"]
            rows.append(row)
    finally:
        rs.close()
    return rows

