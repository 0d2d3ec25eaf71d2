"""Search quality on the zoo: optimizers at equal evaluation budgets, several seeds.

    python benchmarks/search_quality.py [--budget 100] [--seeds 3] [--optimizers cma,ng:NGOpt,random,m2n2]

Each optimizer searches the demo's space (task arithmetic, per-layer-group weights per
expert; M2N2 uses its own coefficient-table space, the same sources) on the search split.
Prints, per optimizer, the best combined fitness after k evaluations (mean ± std over
seeds), then the held-out table of the demo (experts, untuned merges, each optimizer's best).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.config import load_config  # noqa: E402
from evomerge.engine.demo import baseline_recipes, heldout_table  # noqa: E402
from evomerge.engine.models import resolve_models  # noqa: E402
from evomerge.engine.runner import run_search  # noqa: E402
from evomerge.engine.store import RunStore  # noqa: E402


def config_for(optimizer: str, seed: int, budget: int, preset: Path):
    cfg = load_config(preset)
    opt = {"name": optimizer, "seed": seed}
    space = cfg.space
    if optimizer == "m2n2":
        space = space.model_copy(update={"type": "m2n2"})
    if optimizer != "cma":
        opt["popsize"] = None
    return cfg.model_copy(update={
        "name": f"sq-{optimizer.replace(':', '_')}-s{seed}",
        "budget": budget, "seed": seed, "space": space,
        "optimizer": cfg.optimizer.model_copy(update=opt),
    })


def curve(records: list[dict], marks: list[int]) -> list[float]:
    fit = np.array([r["fitness"] if not r["failed"] else -np.inf for r in records])
    best = np.maximum.accumulate(fit)
    return [float(best[min(m, len(best)) - 1]) * 100 for m in marks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--optimizers", default="cma,ng:NGOpt,random,m2n2")
    ap.add_argument("--preset", default=str(ROOT / "search_spaces/zoo_demo.yaml"))
    ap.add_argument("--runs-dir", default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    preset = Path(args.preset)
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="evomerge-sq-"))
    marks = sorted({m for m in (10, 25, 50, 100, 150, 200, 300, args.budget) if m <= args.budget})
    results: dict[str, dict] = {}
    for opt in args.optimizers.split(","):
        curves, bests, secs = [], [], []
        for seed in range(args.seeds):
            cfg = config_for(opt, seed, args.budget, preset)
            t0 = time.perf_counter()
            run_search(cfg, runs / cfg.name, progress=False)
            secs.append(time.perf_counter() - t0)
            recs = RunStore(runs / cfg.name).read_evals()
            curves.append(curve(recs, marks))
            best = max((r for r in recs if not r["failed"]), key=lambda r: r["fitness"])
            bests.append(best)
            print(f"{opt:>12} seed {seed}: best {best['fitness'] * 100:.1f} in {secs[-1]:.0f} s", flush=True)
        c = np.array(curves)
        results[opt] = {"marks": marks, "mean": c.mean(0).tolist(), "std": c.std(0).tolist(),
                        "seconds": float(np.mean(secs)), "best": max(bests, key=lambda r: r["fitness"])}
    print(f"\nbest combined fitness (search split, %) after k evaluations, mean ± std over {args.seeds} seeds")
    print(f"{'optimizer':>12} " + " ".join(f"{'k=' + str(m):>12}" for m in marks) + f" {'s/run':>7}")
    for opt, r in results.items():
        cells = " ".join(f"{m:6.1f} ± {s:4.1f}" for m, s in zip(r["mean"], r["std"]))
        print(f"{opt:>12} {cells} {r['seconds']:7.0f}")
    # held-out table: experts, untuned merges, each optimizer's best recipe
    cfg = load_config(preset)
    recipes = baseline_recipes(cfg, resolve_models(cfg.models))
    for opt, r in results.items():
        recipes[f"evolved: {opt}"] = r["best"]["recipe"]
    rows = heldout_table(cfg, recipes)
    print("\nheld-out accuracy (%), examples never searched")
    names = list(next(r for r in rows if "tasks" in r)["tasks"])
    rep = list(next(r for r in rows if "tasks" in r)["report"])
    print(f"{'model':>32} " + " ".join(f"{n:>9}" for n in names) + f" {'combined':>9} " + " ".join(f"{n:>9}" for n in rep))
    for row in rows:
        if "tasks" not in row:
            print(f"{row['model']:>32} failed: {row['error']}")
            continue
        print(f"{row['model']:>32} " + " ".join(f"{row['tasks'][n] * 100:9.1f}" for n in names)
              + f" {row['combined'] * 100:9.1f} " + " ".join(f"{row['report'][n] * 100:9.1f}" for n in rep))
    if args.json:
        Path(args.json).write_text(json.dumps({"curves": {k: {kk: vv for kk, vv in v.items() if kk != "best"}
                                                          for k, v in results.items()}, "heldout": rows}, indent=1))


if __name__ == "__main__":
    main()
