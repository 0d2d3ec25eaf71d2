"""One zoo search end to end on CUDA with the local executor (for benchmarks/gpu_check.sh).

Builds the zoo (``--variant``; built on the GPU when there is one), runs a TIES search over
its experts with the local executor and the HF backend on CUDA, and prints the run summary:
fitness on the search split (with its standard error over examples), seconds per
candidate split into merge and evaluation.

    python benchmarks/gpu_zoo_search.py --root /tmp/zoo --runs /tmp/runs --budget 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="full", choices=["full", "test"])
    ap.add_argument("--root", required=True)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import torch

    from evomerge.config import parse_config
    from evomerge.engine.report import summarize
    from evomerge.engine.runner import run_search
    from evomerge.engine.store import RunStore
    from evomerge.zoo.build import build_zoo

    t0 = time.perf_counter()
    zoo = build_zoo(args.variant, root=args.root)
    print(f"zoo {args.variant} built in {time.perf_counter() - t0:.1f} s "
          f"(cuda available: {torch.cuda.is_available()})", flush=True)
    experts = zoo.experts[:2]
    tasks = [n for n in zoo.task_names if n.startswith("cipher_")][:2] or zoo.task_names[:2]
    cfg = {
        "name": f"gpu-zoo-{args.variant}",
        "models": {"base": str(zoo.base.path), **{m.name: str(m.path) for m in experts}},
        "base_model": "base",
        "space": {"type": "parameter", "method": "ties", "layer_groups": 2,
                  "params": {"weight": {"low": 0.0, "high": 1.5, "init": 1.0},
                             "density": {"low": 0.1, "high": 1.0, "init": 0.5}}},
        "optimizer": {"name": "cma", "popsize": 4},
        "budget": args.budget,
        "tasks": [{"path": str(zoo.tasks_dir / f"{t}.yaml"), "weight": 1.0} for t in tasks],
        "backend": {"batch_size": 256, "device": args.device, "options": {}},
        "executor": {"name": "local"},
    }
    run_dir = Path(args.runs) / cfg["name"]
    t0 = time.perf_counter()
    best = run_search(parse_config(cfg), run_dir, progress=False)
    wall = time.perf_counter() - t0
    s = summarize(run_dir)
    per_ex = np.concatenate([np.asarray(v, dtype=float) for v in best["per_example"].values()])
    se = float(per_ex.std(ddof=1) / np.sqrt(len(per_ex))) if len(per_ex) > 1 else float("nan")
    recs = RunStore(run_dir).read_evals()
    merges = [r["merge_seconds"] for r in recs if r.get("merge_seconds") is not None]
    print(json.dumps({"wall_s": wall, "evaluations": s["evaluations"],
                      "best_fitness_search_split": best["fitness"], "best_se": se,
                      "scores": best["scores"], "seconds_per_evaluation": s["seconds_per_evaluation"],
                      "merge_s_mean": s["merge_seconds"], "eval_s_mean": s["eval_seconds"],
                      "merge_s_first": merges[0] if merges else None,
                      "merge_s_later_mean": float(np.mean(merges[1:])) if len(merges) > 1 else None}))
    print(f"search split: best fitness {best['fitness'] * 100:.1f} +/- {se * 100:.1f} (s.e. over "
          f"{len(per_ex)} examples); per candidate merge {s['merge_seconds']:.3f} s / eval "
          f"{s['eval_seconds']:.3f} s; {s['evaluations']} evaluations in {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
