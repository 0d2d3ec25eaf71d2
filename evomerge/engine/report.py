"""`evomerge status`: what a run has done so far, and a plot of fitness over evaluations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .store import RunStore


def format_fitness(value: float) -> str:
    """Scores in [0, 1] as percentages ("83.5"); other fitness values (negated losses of
    black-box runs, penalties) as they are ("-1.1412")."""
    v = float(value)
    return f"{v * 100:.1f}" if -1e-9 <= v <= 1 + 1e-9 else f"{v:+.4f}"

def summarize(run_dir: str | Path) -> dict[str, Any]:
    store = RunStore.open(run_dir)
    cfg = store.config()
    records = store.read_evals()
    ckpt = store.load_checkpoint() or {}
    ok = [r for r in records if not r.get("failed")]
    evaluated = [r for r in ok if not r.get("cached")]
    gens = {r.get("info", {}).get("generation") for r in records} - {None}
    best = max(ok, key=lambda r: r["fitness"]) if ok else None
    stats_path = store.dir / "executor_stats.json"
    span = (records[-1]["time"] - records[0]["time"]) if len(records) > 1 else 0.0
    return {
        "run": cfg.name,
        "dir": str(store.dir),
        "budget": cfg.budget,
        "evaluations": len(records),
        "evaluated": len(evaluated),
        "cached": sum(1 for r in records if r.get("cached")),
        "failed": sum(1 for r in records if r.get("failed")),
        "pending": len(ckpt.get("pending", [])),
        "generations": len(gens) if gens else None,
        "best": None if best is None else {
            "id": best["id"], "fitness": best["fitness"], "scores": best["scores"],
            **_with_se(best, cfg),
        },
        "best_baseline": _best_baseline(store, cfg),
        "final": _final(store),
        "seconds_per_evaluation": float(np.mean([r["seconds"] for r in evaluated])) if evaluated else None,
        "merge_seconds": _mean(evaluated, "merge_seconds"),
        "eval_seconds": _mean(evaluated, "eval_seconds"),
        # medians too: a worker's first candidate fills its caches and a busy machine
        # stretches some evaluations, both of which pull the means
        "merge_seconds_median": _mean(evaluated, "merge_seconds", np.median),
        "eval_seconds_median": _mean(evaluated, "eval_seconds", np.median),
        # the workers' one-time merge setup (resident task vectors, sorted magnitudes, kernel
        # compiles), summed, and the mean merge without it: the per-candidate cost
        "merge_setup_seconds": _total(evaluated, "setup_seconds"),
        "merge_seconds_without_setup": _mean(
            [{"m": r["merge_seconds"] - (r.get("setup_seconds") or 0.0)} for r in evaluated
             if r.get("merge_seconds") is not None], "m"),
        "evaluations_per_second": (len(records) - 1) / span if span > 0 else None,
        "complete": len(records) >= cfg.budget,
        "racing": _racing(records),
        "executor": _read_json(stats_path),
    }


def plot_fitness(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store = RunStore.open(run_dir)
    records = [r for r in store.read_evals() if not r.get("failed")]
    if not records:
        return None
    x = np.arange(1, len(records) + 1)
    y = np.array([r["fitness"] for r in records]) * 100
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.scatter(x, y, s=8, alpha=0.5, label="candidate")
    ax.plot(x, np.maximum.accumulate(y), color="C3", label="best so far")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("combined fitness (%)")
    ax.set_title(f"{store.config().name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    out = Path(out) if out else store.dir / "fitness.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _with_se(rec: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """``se`` of the combined search fitness and ``split: "search"``, from per-example scores."""
    from ..fitness.stderr import combined_se

    per = rec.get("per_example")
    weights = {}
    if per:
        from .tasks_info import TaskInfo

        try:
            weights = TaskInfo.load(cfg.tasks, validation_fraction=None).weights
        except Exception:  # noqa: BLE001 - task files moved: report without SE
            weights = {}
    if not per or not all(t in per for t in weights) or not weights:
        return {"se": None, "split": "search"}
    return {"se": combined_se({t: per[t] for t in weights}, weights)["se"], "split": "search"}


def _best_baseline(store: RunStore, cfg: Any) -> dict[str, Any] | None:
    from .baselines import LOG, best_baseline

    b = best_baseline(store.read_jsonl(LOG))
    if b is None:
        return None
    return {"label": b["baseline"], "fitness": b["fitness"], "scores": b["scores"], **_with_se(b, cfg)}


def _final(store: RunStore) -> dict[str, Any] | None:
    from .selection import FINAL

    final = store.read_json(FINAL)
    if final is None:
        return None
    row = next(r for r in final["rows"] if r.get("final"))
    return {"label": row["label"], "chosen_by": final["chosen_by"],
            "splits": {k: None if v is None else {"fitness": v["fitness"], "se": v["se"], "n": v["n"]}
                       for k, v in row["splits"].items()}}


def _mean(records: list[dict[str, Any]], key: str, how: Any = np.mean) -> float | None:
    """Mean (or ``how``) of ``key`` over the records that have it (older logs lack the
    merge/eval split)."""
    vals = [r[key] for r in records if r.get(key) is not None]
    return float(how(vals)) if vals else None


def _total(records: list[dict[str, Any]], key: str) -> float | None:
    """Sum of ``key`` over the records that have it, or None when none has it."""
    vals = [r[key] for r in records if r.get(key) is not None]
    return float(sum(vals)) if vals else None


def _racing(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    raced = [r for r in records if r.get("examples_total")]
    if not raced:
        return None
    total = sum(r["examples_total"] for r in raced)
    done = sum(r["examples_evaluated"] for r in raced)
    return {"cut": sum(1 for r in raced if r.get("racing_cut")), "examples_saved": total - done,
            "fraction_saved": (total - done) / total if total else 0.0}


def _read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text()) if path.exists() else None
