"""`evomerge demo`: the main job on the embedded default, end to end.

1. build (or reuse) the full model zoo;
2. run the search preset ``search_spaces/zoo_demo.yaml`` on the zoo experts;
   (the run evaluates the baselines first: each expert, uniform task arithmetic, TIES at
   its default density, the initial point);
3. the run chooses its final model on the validation split (top-k by search fitness, the
   baselines and the CMA-ES mean) and scores the final and the baselines on HELD-OUT
   examples the search never saw (every task, the combined fitness, the cross task);
4. export the final as a Hugging Face checkpoint and print the table: every score with its
   split and standard error.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config import RunConfig, load_config
from .evaluator import EvalSpec, Evaluator
from .models import resolve_models

PRESET = Path(__file__).resolve().parents[2] / "search_spaces" / "zoo_demo.yaml"


def baseline_recipes(cfg: RunConfig, models: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each expert alone, and the merges a user would try without any search (the run's
    search space names them: :meth:`SearchSpace.baselines`)."""
    from ..spaces import make_space

    space = make_space(cfg.space, models, cfg.base_model, seed=cfg.seed, dtype=cfg.dtype)
    return {b.label: b.recipe for b in space.baselines(["experts", "task_arithmetic", "ties"])}


def heldout_table(cfg: RunConfig, recipes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Score each recipe on the held-out split of the run's tasks and report tasks."""
    from ..recipe import compile_recipe
    from .tasks_info import TaskInfo

    models = resolve_models(cfg.models)
    info = TaskInfo.load(cfg.tasks)
    report = [t.model_dump() for t in cfg.report_tasks]
    plans = {label: compile_recipe(recipe) for label, recipe in recipes.items()}
    backend = cfg.backend.model_dump()
    depth = max((p.config_overrides.get("num_hidden_layers", 0) for p in plans.values()), default=0)
    if depth:  # layer paths (DFS) may be deeper than the resident model: give it the slots
        backend["options"] = {"max_layers": depth, **(backend.get("options") or {})}
    ev = Evaluator(EvalSpec(
        model_dir=models[cfg.base_model or next(iter(models))],
        tasks=[t.model_dump() for t in cfg.tasks] + report,
        backend=backend, split="heldout", num_threads=cfg.executor.num_threads,
    ))
    rows = []
    try:
        for label, plan in plans.items():
            out = ev.evaluate(plan)
            if out.failed:
                rows.append({"model": label, "error": out.error})
                continue
            means = {t: sum(v) / len(v) for t, v in out.scores.items()}
            rows.append({
                "model": label,
                "tasks": {t: means[t] for t in info.names},
                "combined": info.combine(means),
                "report": {t: means[t] for t in means if t not in info.names},
                "examples": sum(len(out.scores[t]) for t in info.names),
                "se": {t: _se(v) for t, v in out.scores.items()},
                "combined_se": _combined_se(info, out.scores),
            })
    finally:
        ev.close()
    return rows


def _se(values: list[float]) -> float:
    """Standard error of a mean of per-example scores."""
    n = len(values)
    if n < 2:
        return float("nan")
    m = sum(values) / n
    return (sum((v - m) ** 2 for v in values) / (n - 1) / n) ** 0.5


def _combined_se(info: Any, scores: dict[str, list[float]]) -> float:
    """Standard error of the weighted mean of task means (tasks independent)."""
    total = sum(info.weights.values())
    return sum((info.weights[t] / total * _se(scores[t])) ** 2 for t in info.names) ** 0.5


def run_demo(runs_dir: str | Path = "runs", name: str = "zoo-demo", fresh: bool = False,
             budget: int | None = None, progress: bool = True, preset: Path | None = None,
             build_zoo: Any = None) -> dict[str, Any]:
    """Run (or reuse) the demo. Run again in the same folder, it reuses the finished search
    and refreshes the export. ``build_zoo`` (tests): a stand-in for the full zoo build."""
    from .export import export_final
    from .runner import run_search, with_overrides
    from .selection import load_final, select_final
    from .store import RunStore, check_run_name

    if build_zoo is None:
        from ..zoo.build import build_zoo
    t0 = time.perf_counter()
    if fresh:
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(runs_dir) / check_run_name(name)
    cfg = with_overrides(load_config(preset or PRESET), name=name, budget=budget)
    manifest = _build_zoo_with_progress(build_zoo, progress)
    zoo_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    best = run_search(cfg, run_dir, progress=progress)  # baselines, search, selection
    search_s = time.perf_counter() - t1
    if best is None:
        raise RuntimeError("the demo search produced no successful candidate")
    final = load_final(run_dir) or select_final(run_dir)
    exported = export_final(run_dir, run_dir / "export", overwrite=True)
    result = {
        "zoo": str(manifest.root),
        "zoo_cache_hit": bool(manifest.cache_hit),
        "run_dir": str(run_dir),
        "export": str(exported),
        "rows": final["rows"],
        "final": final["final"],
        "chosen_by": final["chosen_by"],
        "best_search_fitness": best["fitness"],
        "best_id": best["id"],
        "budget": cfg.budget,
        "seconds": {"zoo": zoo_s, "search_and_selection": search_s,
                    "total": time.perf_counter() - t0},
    }
    RunStore(run_dir).write_json("demo_table.json", result)
    return result


def _build_zoo_with_progress(build_zoo, progress: bool):
    if not progress:
        return build_zoo("full")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]zoo: {task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn()) as bar:
        task = bar.add_task("checking cache", total=None)

        def cb(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total)

        return build_zoo("full", progress=cb)


def format_table(result: dict[str, Any]) -> Any:
    """The baseline/final table: search, validation and held-out scores (± standard error)
    of every model the run compared, per-task and report-task columns on held-out."""
    from .selection import rows_table

    return rows_table(result["rows"], tasks=True, title=(
        "accuracy (%, ± standard error): search = what the optimizer saw; validation = chose "
        "the final; held-out = examples the search never scored (reported only)"))


def margins(result: dict[str, Any]) -> dict[str, float]:
    """Held-out combined accuracy (points) of the final (the validation-selected evolved
    merge), the best expert and the best untuned merge, the margins, and their SEs."""
    def heldout(r: dict[str, Any]) -> tuple[float, float]:
        h = r["splits"].get("heldout") or {}
        if h.get("fitness") is None:
            return float("nan"), float("nan")
        return h["fitness"] * 100, h["se"] * 100

    nan = (float("nan"), float("nan"))
    rows = result["rows"]
    fin = next((heldout(r) for r in rows if r.get("final")), nan)
    experts = [heldout(r) for r in rows if r["role"] == "baseline" and r["label"].startswith("expert ")]
    untuned = [heldout(r) for r in rows if r["role"] == "baseline" and not r["label"].startswith("expert ")]
    be = max(experts, default=nan)
    bu = max(untuned, default=nan)
    return {
        "evolved": fin[0], "evolved_se": fin[1],
        "best_expert": be[0], "best_expert_se": be[1],
        "best_untuned": bu[0], "best_untuned_se": bu[1],
        "vs_best_expert": fin[0] - be[0],
        "vs_best_untuned": fin[0] - bu[0],
    }
