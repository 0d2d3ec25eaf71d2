"""Everything the HTML report shows, read from the run directory alone into plain data.

Only files are read (config.yaml, meta.json, evals.jsonl, baselines.jsonl, final.json,
best.json); no live object of a run is needed, so old runs, runs still going, and runs with
failed, cached or racing-cut candidates all have reports. Every figure says its split: the
evaluation log is the *search* split; final.json carries validation / held-out rows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..engine.store import RunStore
from ..errors import RunError
from ..fitness.stderr import combined_se


@dataclass
class Row:
    """One line of the best-and-baselines table (search split unless ``split`` says)."""

    label: str
    fitness: float | None
    se: float | None
    scores: dict[str, float]
    split: str = "search"
    note: str = ""


@dataclass
class ReportData:
    """A run, flattened for the report (plain values only)."""

    run_dir: str
    name: str
    config: dict[str, Any]
    meta: dict[str, Any]
    tasks: list[str]
    task_weights: dict[str, float]
    records: list[dict[str, Any]]  # evals.jsonl, per_example dropped
    rows: list[Row]
    final_rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    counts: dict[str, int] = field(default_factory=dict)
    workers: dict[str, dict[str, float]] = field(default_factory=dict)
    popsize: int = 1


def _se(rec: Mapping[str, Any], weights: Mapping[str, float]) -> float | None:
    per = rec.get("per_example")
    if not per or not weights or not all(t in per for t in weights):
        return None
    try:
        return float(combined_se({t: per[t] for t in weights}, weights)["se"])
    except (ValueError, TypeError, ZeroDivisionError):
        return None


def load_report_data(run_dir: str | Path) -> ReportData:
    """Read the run at ``run_dir`` into :class:`ReportData`.

    Raises:
        RunError: no run there, or one of its files is corrupt.
    """
    store = RunStore.open(run_dir)
    meta = store.meta()
    try:
        config = yaml.safe_load((store.dir / "config.yaml").read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise RunError(f"{store.dir / 'config.yaml'}: not a readable YAML config ({err})") from None
    if not isinstance(config, dict):
        raise RunError(f"{store.dir / 'config.yaml'}: not a run config")
    raw = store.read_evals()
    baselines = store.read_jsonl("baselines.jsonl")
    tasks: list[str] = []
    for r in [*raw, *baselines]:
        if r.get("scores"):
            tasks = list(r["scores"])
            break
    cfg_tasks = config.get("tasks") or []
    weights = {t: float((ref or {}).get("weight", 1.0)) if isinstance(ref, dict) else 1.0
               for t, ref in zip(tasks, cfg_tasks)} or {t: 1.0 for t in tasks}
    if len(weights) < len(tasks):
        weights = {t: weights.get(t, 1.0) for t in tasks}

    ok = [r for r in raw if not r.get("failed") and not r.get("racing_cut") and r.get("scores")]
    rows: list[Row] = []
    best = max(ok, key=lambda r: (r["fitness"], -r["id"])) if ok else None
    if best is not None:
        rows.append(Row(f"best (candidate {best['id']})", float(best["fitness"]), _se(best, weights),
                        dict(best["scores"])))
    for b in baselines:
        if b.get("failed"):
            rows.append(Row(f"baseline: {b.get('baseline')}", None, None, {}, note=str(b.get("error") or "failed")))
        else:
            rows.append(Row(f"baseline: {b.get('baseline')}", float(b["fitness"]), _se(b, weights),
                            dict(b.get("scores") or {})))
    final = store.read_json("final.json")
    final_rows: list[dict[str, Any]] = []
    if isinstance(final, dict):
        for r in final.get("rows") or []:
            for split, v in (r.get("splits") or {}).items():
                if isinstance(v, dict):
                    final_rows.append({"label": r.get("label"), "final": bool(r.get("final")), "split": split,
                                       "fitness": v.get("fitness"), "se": v.get("se"), "n": v.get("n")})

    records = [{k: v for k, v in r.items() if k != "per_example"} for r in raw]
    counts = {"evaluations": len(raw), "ok": len(ok),
              "failed": sum(1 for r in raw if r.get("failed")),
              "racing_cut": sum(1 for r in raw if r.get("racing_cut")),
              "cached": sum(1 for r in raw if r.get("cached")),
              "baselines": len(baselines)}
    workers: dict[str, dict[str, float]] = {}
    for r in raw:
        w = workers.setdefault(str(r.get("worker") or "?"), {"n": 0, "seconds": 0.0})
        w["n"] += 1
        w["seconds"] += float(r.get("seconds") or 0.0)
    opt = config.get("optimizer") or {}
    popsize = int(opt.get("popsize") or 0) or _guess_popsize(len(raw))
    best_json = store.read_json("best.json")
    return ReportData(str(store.dir), str(config.get("name") or store.dir.name), config, meta, tasks,
                      weights, records, rows, final_rows,
                      best_json if isinstance(best_json, dict) else best, counts, workers, popsize)


def _guess_popsize(n: int) -> int:
    return max(1, min(16, n // 20 or 1))


def generations(records: Sequence[Mapping[str, Any]], popsize: int) -> list[list[Mapping[str, Any]]]:
    """Records grouped by generation: the optimizer's ``info.generation`` where every record
    has one (CMA-ES and friends; restarts keep counting), else consecutive blocks of
    ``popsize`` records in log order."""
    gens = [(r.get("info") or {}).get("generation") if isinstance(r.get("info"), Mapping) else None
            for r in records]
    restarts = [(r.get("info") or {}).get("restart", 0) if isinstance(r.get("info"), Mapping) else 0
                for r in records]
    if records and all(isinstance(g, int) for g in gens):
        keys: dict[tuple[Any, int], list[Mapping[str, Any]]] = {}
        for r, g, rs in zip(records, gens, restarts):
            keys.setdefault((rs, g), []).append(r)
        return list(keys.values())
    step = max(1, popsize)
    return [list(records[i:i + step]) for i in range(0, len(records), step)]


def finite(values: Sequence[Any]) -> np.ndarray:
    """Float array of the finite values (failed candidates carry a sentinel fitness)."""
    arr = np.array([float(v) for v in values if v is not None], dtype=float)
    return arr[np.isfinite(arr) & (arr > -1e8)]


def dumps(obj: Any) -> str:
    """Compact JSON for the report's metadata section."""
    return json.dumps(obj, indent=1, sort_keys=False, default=str)
