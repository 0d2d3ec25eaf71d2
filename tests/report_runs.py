"""Synthetic run directories in the on-disk format of engine/store.py, one per space type,
for the HTML report tests and benchmarks/report_big_log.py (no model is run)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

MODELS = {"base": "/m/base", "math": "/m/math", "code": "/m/code", "chat": "/m/chat"}


def recipe_for(space: str, g: np.ndarray) -> dict[str, Any]:
    """A recipe shaped like the one the space's decode() logs."""
    if space == "parameter":  # mergekit-style filtered values, as spaces/parameter.py writes
        return {"merge_method": "task_arithmetic", "base_model": "base",
                "models": [{"model": m, "parameters": {"weight": [
                    {"filter": "model.norm.weight", "value": round(float(g[k]), 4)},
                    {"filter": "attn", "value": [round(float(x), 4) for x in g[k::3][:4]]},
                    {"value": [round(float(x), 4) for x in g[k + 1::3][:4]]}]}}
                    for k, m in enumerate(["math", "code", "chat"])]}
    if space == "m2n2":
        return {"merge_method": "ties", "base_model": "base",
                "models": [{"model": m, "parameters": {"weight": [round(float(x), 4) for x in g[k::3][:4]],
                                                       "density": round(float(g[k]), 4)}}
                           for k, m in enumerate(["math", "code", "chat"])]}
    if space in ("layer_swap", "dfs"):
        names = ["math", "code", "chat"]
        return {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": names[int(abs(x) * 10) % 3], "layer_range": [i, i + 1]}]}
            for i, x in enumerate(g[:8])], "non_layer": {"model": "base"}}
    if space in ("lora_pool", "blackbox"):
        ad = ["a0", "a1", "a2"]
        return {"merge_method": "evo_lora", "adapters": ad,
                "alpha": {a: float(x) for a, x in zip(ad, g)}, "beta": {a: float(x) for a, x in zip(ad, g[3:])}}
    if space == "output_mixture":
        w = np.abs(g[:3]) / np.abs(g[:3]).sum()
        return {"merge_method": "output_mixture", "weights": {k: float(x) for k, x in zip(["math", "code", "chat"], w)},
                "combine": "logprob"}
    return {"merge_method": "custom", "value": float(g[0])}


def make_run(path: Path, space: str = "parameter", n: int = 40, tasks: int = 2, popsize: int = 8,
             failed_every: int = 0, cut_every: int = 0, per_example: int = 20, seed: int = 0,
             objectives: list[dict[str, Any]] | None = None, baselines: bool = True) -> Path:
    """Write a run directory with ``n`` evaluation records (every ``failed_every``-th failed,
    every ``cut_every``-th cut by racing) and, with ``baselines``, two baselines."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    names = [f"task_{chr(97 + i)}" for i in range(tasks)]
    cfg = {"name": path.name, "models": MODELS, "base_model": "base", "space": {"type": space},
           "optimizer": {"name": "cma", "popsize": popsize}, "budget": n,
           "tasks": [{"path": f"/tasks/{t}.yaml", "weight": 1.0} for t in names]}
    if objectives:
        cfg["objectives"] = objectives
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path / "meta.json").write_text(json.dumps({"format": 1, "fingerprint": "x" * 16, "created": time.time(),
                                                "evomerge_version": "test"}))
    t0 = time.time()
    lines = []
    for i in range(n):
        g = rng.uniform(0, 1, 12)
        per = {t: rng.binomial(1, min(0.95, 0.3 + 0.5 * i / max(n, 1) * (k + 1) / tasks), per_example).tolist()
               for k, t in enumerate(names)}
        means = {t: float(np.mean(v)) for t, v in per.items()}
        rec: dict[str, Any] = {"id": i, "genome": g.tolist(), "info": {}, "recipe": recipe_for(space, g),
                               "plan_hash": f"h{i}", "fitness": float(np.mean(list(means.values()))),
                               "scores": means, "per_example": per, "failed": False, "error": None,
                               "cached": False, "seconds": float(rng.uniform(0.5, 2)),
                               "worker": f"w{i % 2}", "time": t0 + i}
        if failed_every and i % failed_every == failed_every - 1:
            rec.update(fitness=-1.0e9, scores={}, per_example=None, failed=True, error="CUDA out of memory")
        elif cut_every and i % cut_every == cut_every - 1:
            rec.update(per_example=None, racing_cut=True, examples_evaluated=5, examples_total=per_example)
        lines.append(json.dumps(rec, separators=(",", ":")))
    (path / "evals.jsonl").write_text("\n".join(lines) + "\n")
    if baselines:
        bl = []
        for j, label in enumerate(["base", "math"]):
            per = {t: rng.binomial(1, 0.4, per_example).tolist() for t in names}
            means = {t: float(np.mean(v)) for t, v in per.items()}
            bl.append(json.dumps({"id": -(j + 1), "baseline": label, "kind": "source", "genome": None,
                                  "recipe": {}, "plan_hash": f"b{j}", "fitness": float(np.mean(list(means.values()))),
                                  "scores": means, "per_example": per, "failed": False, "error": None,
                                  "cached": False, "seconds": 1.0, "worker": "w0", "time": t0}))
        bl.append(json.dumps({"id": -3, "baseline": "broken", "kind": "source", "genome": None, "recipe": {},
                              "plan_hash": "b3", "fitness": -1.0e9, "scores": {}, "per_example": None,
                              "failed": True, "error": "<script>alert(1)</script>", "cached": False,
                              "seconds": 0.0, "worker": "compile", "time": t0}))
        (path / "baselines.jsonl").write_text("\n".join(bl) + "\n")
    return path
