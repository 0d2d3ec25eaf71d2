"""`evomerge demo`: the main job on the embedded default, end to end.

1. build (or reuse) the full model zoo;
2. run the search preset ``search_spaces/zoo_demo.yaml`` on the zoo experts;
3. score, on HELD-OUT examples the search never saw: each expert, the untuned merges
   (uniform task arithmetic, TIES at its default density), and the evolved best, on every
   task, the combined fitness, and the cross task;
4. export the best as a Hugging Face checkpoint and print the table.
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
    """Each expert alone, and the merges a user would try without any search."""
    experts = [k for k in models if k != cfg.base_model]
    head = {"sources": dict(models), "dtype": cfg.dtype} if cfg.dtype else {"sources": dict(models)}
    out: dict[str, dict[str, Any]] = {}
    for e in experts:
        out[f"expert {e}"] = {**head, "merge_method": "linear", "tokenizer_source": e,
                              "models": [{"model": e, "parameters": {"weight": 1.0}}]}
    merged = [{"model": e, "parameters": {"weight": 1.0}} for e in experts]
    out["task arithmetic (uniform, w=1)"] = {**head, "merge_method": "task_arithmetic",
                                             "base_model": cfg.base_model, "models": merged}
    out["TIES (density 0.5, w=1)"] = {
        **head, "merge_method": "ties", "base_model": cfg.base_model,
        "models": [{"model": e, "parameters": {"weight": 1.0, "density": 0.5}} for e in experts],
    }
    return out


def heldout_table(cfg: RunConfig, recipes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Score each recipe on the held-out split of the run's tasks and report tasks."""
    from ..recipe import compile_recipe
    from .tasks_info import TaskInfo

    models = resolve_models(cfg.models)
    info = TaskInfo.load(cfg.tasks)
    report = [t.model_dump() for t in cfg.report_tasks]
    ev = Evaluator(EvalSpec(
        model_dir=models[cfg.base_model or next(iter(models))],
        tasks=[t.model_dump() for t in cfg.tasks] + report,
        backend=cfg.backend.model_dump(), split="heldout", num_threads=cfg.executor.num_threads,
    ))
    rows = []
    try:
        for label, recipe in recipes.items():
            out = ev.evaluate(compile_recipe(recipe))
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
            })
    finally:
        ev.close()
    return rows


def run_demo(runs_dir: str | Path = "runs", name: str = "zoo-demo", fresh: bool = False,
             budget: int | None = None, progress: bool = True, preset: Path | None = None,
             build_zoo: Any = None) -> dict[str, Any]:
    """Run (or reuse) the demo. Run again in the same folder, it reuses the finished search
    and refreshes the export. ``build_zoo`` (tests): a stand-in for the full zoo build."""
    from .export import export_top
    from .runner import run_search, with_overrides
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
    best = run_search(cfg, run_dir, progress=progress)
    search_s = time.perf_counter() - t1
    if best is None:
        raise RuntimeError("the demo search produced no successful candidate")
    models = resolve_models(cfg.models)
    recipes = baseline_recipes(cfg, models)
    recipes["evolved (best of search)"] = best["recipe"]
    t2 = time.perf_counter()
    rows = heldout_table(cfg, recipes)
    table_s = time.perf_counter() - t2
    exported = export_top(run_dir, 1, run_dir / "export", overwrite=True)[0]
    result = {
        "zoo": str(manifest.root),
        "zoo_cache_hit": bool(manifest.cache_hit),
        "run_dir": str(run_dir),
        "export": str(exported),
        "rows": rows,
        "best_search_fitness": best["fitness"],
        "best_id": best["id"],
        "budget": cfg.budget,
        "seconds": {"zoo": zoo_s, "search": search_s, "heldout_table": table_s,
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
    from rich.table import Table

    rows = result["rows"]
    ok = [r for r in rows if "tasks" in r]
    tasks = list(ok[0]["tasks"]) if ok else []
    report = list(ok[0]["report"]) if ok else []
    t = Table(title="held-out accuracy (%): examples the search never scored")
    t.add_column("model")
    for name in tasks:
        t.add_column(name, justify="right")
    t.add_column("combined", justify="right", style="bold")
    for name in report:
        t.add_column(name, justify="right")
    for r in rows:
        if "error" in r:
            t.add_row(r["model"], *(["failed"] * (len(tasks) + 1 + len(report))))
            continue
        t.add_row(r["model"], *(f"{r['tasks'][k] * 100:.1f}" for k in tasks),
                  f"{r['combined'] * 100:.1f}", *(f"{r['report'][k] * 100:.1f}" for k in report))
    return t


def margins(result: dict[str, Any]) -> dict[str, float]:
    """Evolved minus best expert, and minus best untuned merge (combined, points)."""
    ok = {r["model"]: r["combined"] * 100 for r in result["rows"] if "combined" in r}
    evolved = ok.get("evolved (best of search)", float("nan"))
    experts = [v for k, v in ok.items() if k.startswith("expert ")]
    untuned = [v for k, v in ok.items() if not k.startswith(("expert ", "evolved"))]
    return {
        "evolved": evolved,
        "best_expert": max(experts) if experts else float("nan"),
        "best_untuned": max(untuned) if untuned else float("nan"),
        "vs_best_expert": evolved - max(experts) if experts else float("nan"),
        "vs_best_untuned": evolved - max(untuned) if untuned else float("nan"),
    }
