"""Evaluations per second with 1, 2, ... Ray workers on the zoo, and the dispatch overhead.

    python benchmarks/ray_scaling.py [--workers 1,2] [--budget 40] [--variant full]

Each setting runs the same search (random search: steady-state, so no generation barrier)
on a fresh local Ray with N CPU workers (1 torch thread each). Throughput is measured from
the first to the last result (start-up excluded). Prints evaluations/s, the ratio to ideal
linear scaling (eps_N / (N * eps_1)), per-worker utilisation (busy / wall), and the
per-candidate dispatch overhead: driver wall time per candidate * N minus the mean
evaluation time inside the worker. The local in-process executor is the 1-worker baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.config import load_config  # noqa: E402
from evomerge.engine.runner import run_search  # noqa: E402
from evomerge.engine.store import RunStore  # noqa: E402


def measure(cfg, run_dir: Path) -> dict:
    run_search(cfg, run_dir, progress=False)
    recs = RunStore(run_dir).read_evals()
    t = np.array([r["time"] for r in recs])
    n = len(recs) - 1
    wall = t[-1] - t[0]
    ev = float(np.mean([r["seconds"] for r in recs if not r["cached"]]))
    stats = json.loads((run_dir / "executor_stats.json").read_text())
    workers = max(1, len(stats["workers"]))
    return {"eps": n / wall, "eval_s": ev, "overhead_ms": 1000 * (wall * workers / n - ev),
            "utilisation": [w["utilisation"] for w in stats["workers"].values()],
            "dispatch_ms": stats.get("dispatch_ms_mean")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--preset", default=str(ROOT / "search_spaces/zoo_demo.yaml"))
    args = ap.parse_args()
    base = load_config(args.preset)
    runs = Path(tempfile.mkdtemp(prefix="evomerge-ray-"))
    opt = base.optimizer.model_copy(update={"name": "random", "popsize": None})
    rows = {}
    local = base.model_copy(update={"name": "local", "budget": args.budget, "optimizer": opt,
                                    "executor": base.executor.model_copy(update={"name": "local", "num_threads": 1})})
    rows["local"] = measure(local, runs / "local")
    for n in [int(x) for x in args.workers.split(",")]:
        ex = base.executor.model_copy(update={"name": "ray", "workers": n, "num_threads": 1})
        cfg = base.model_copy(update={"name": f"ray{n}", "budget": args.budget, "optimizer": opt, "executor": ex})
        rows[f"ray x{n}"] = measure(cfg, runs / f"ray{n}")
    one = rows.get("ray x1", rows["local"])["eps"]
    print(f"{'executor':>10} {'eval/s':>8} {'ideal ratio':>12} {'eval s':>8} {'overhead ms':>12} {'dispatch ms':>12} utilisation")
    for name, r in rows.items():
        n = int(name.split("x")[1]) if "x" in name else 1
        ratio = r["eps"] / (n * one)
        disp = f"{r['dispatch_ms']:.2f}" if r["dispatch_ms"] is not None else "-"
        util = " ".join(f"{u * 100:.0f}%" for u in r["utilisation"])
        print(f"{name:>10} {r['eps']:8.2f} {ratio:12.2f} {r['eval_s']:8.3f} {r['overhead_ms']:12.1f} {disp:>12} {util}")


if __name__ == "__main__":
    main()
