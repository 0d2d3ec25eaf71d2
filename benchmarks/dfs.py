"""Data-flow space (DFS) on the zoo: DFS, PS, PS then DFS, vs experts and untuned merges.

    python benchmarks/dfs.py [--budget 100] [--runs-dir DIR] [--json FILE]

1. PS: the demo's parameter-space search (task arithmetic, search_spaces/zoo_demo.yaml).
2. DFS: search_spaces/zoo_dfs.yaml (the layer path through the three experts).
3. PS+DFS: search_spaces/zoo_ps_dfs.yaml with the PS run's exported best as source ``ps``.
Every search uses the search split only; the table scores the held-out split (never
searched) with the standard error of each mean, and the report task ``cross`` (never
searched either). Then the cost of evaluating one DFS candidate three ways:

- slots: the resident model keeps ``max_path_length`` layer slots; a candidate writes its
  layers' weights in place and the active stack is cut to its path (what the engine does);
- zeroed: all slots stay active, the unused ones are copies with o_proj/down_proj scaled by
  0 (an exact identity in a pre-norm block), so every candidate runs the full depth;
- rebuild: write the candidate to disk and load a fresh model for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.config import load_config  # noqa: E402
from evomerge.engine.demo import baseline_recipes, heldout_table  # noqa: E402
from evomerge.engine.export import export_top  # noqa: E402
from evomerge.engine.models import resolve_models  # noqa: E402
from evomerge.engine.runner import run_search  # noqa: E402
from evomerge.engine.store import RunStore  # noqa: E402
from evomerge.spaces import make_space  # noqa: E402
from evomerge.spaces.dfs import dfs_recipe  # noqa: E402

PRESETS = ROOT / "search_spaces"


def run(cfg, runs: Path, label: str) -> dict:
    t0 = time.perf_counter()
    run_search(cfg, runs / cfg.name, progress=False)
    wall = time.perf_counter() - t0
    recs = [r for r in RunStore(runs / cfg.name).read_evals()]
    ok = [r for r in recs if not r["failed"]]
    best = max(ok, key=lambda r: r["fitness"])
    evaluated = [r for r in ok if not r["cached"]]
    layers = [len(r["recipe"]["slices"]) for r in ok if "slices" in r["recipe"]]
    out = {"label": label, "best": best, "evals": len(recs), "failed": len(recs) - len(ok),
           "wall_s": wall, "s_per_eval": float(np.mean([r["seconds"] for r in evaluated])),
           "cached": len(ok) - len(evaluated),
           "mean_path": float(np.mean(layers)) if layers else None}
    print(f"{label}: best search fitness {best['fitness'] * 100:.1f} after {len(recs)} evals "
          f"({out['failed']} failed, {out['cached']} cached), {out['s_per_eval']:.2f} s/eval, "
          f"{wall:.0f} s", flush=True)
    return out


def eval_modes(cfg, n: int = 6) -> dict:
    """Seconds per DFS candidate: resident slots vs zeroed padding vs a rebuild per candidate."""
    import torch

    from evomerge.fitness import load_tasks
    from evomerge.fitness.backends import make_backend
    from evomerge.materialize import Materializer
    from evomerge.recipe import compile_recipe

    models = resolve_models(cfg.models)
    space = make_space(cfg.space, models, cfg.base_model, seed=cfg.seed)
    P = space.max_path
    tasks = load_tasks([t.model_dump() for t in cfg.tasks])
    rng = np.random.default_rng(0)
    T = len(space.slots)
    genomes = []
    for k in np.linspace(2, P, n).round().astype(int):  # paths of 2..P layers
        g = rng.random(space.dim)
        g[:T] = 0.25
        g[rng.choice(T, size=k, replace=False)] = 0.75
        genomes.append(g)
    paths = [space.path(g) for g in genomes]
    first = next(iter(models))
    mat = Materializer("cpu", cache_sources=True)
    be = make_backend("hf", model_dir=models[first], max_layers=P, batch_size=256)
    be.load_plan(space.plan(space.initial()), mat)  # warm-up: source cache, tokenizer cache
    be.evaluate(tasks)
    res: dict[str, list[float]] = {"slots": [], "zeroed": [], "rebuild": []}
    scores: dict[str, list] = {"slots": [], "zeroed": [], "rebuild": []}
    for path, scales in paths:
        t0 = time.perf_counter()
        be.load_plan(compile_recipe(dfs_recipe(models, path, scales, space.non_layer,
                                               space.projections)), mat)
        s = be.evaluate(tasks)
        res["slots"].append(time.perf_counter() - t0)
        scores["slots"].append({k: float(np.mean(v)) for k, v in s.items()})
        # zeroed: pad to P layers with copies of the last layer whose output projections are 0
        rec = dfs_recipe(models, path, scales, space.non_layer, space.projections, pad_to=P)
        t0 = time.perf_counter()
        be.load_plan(compile_recipe(rec), mat)
        s = be.evaluate(tasks)
        res["zeroed"].append(time.perf_counter() - t0)
        scores["zeroed"].append({k: float(np.mean(v)) for k, v in s.items()})
    be.close()
    with tempfile.TemporaryDirectory() as tmp:
        for k, (path, scales) in enumerate(paths):
            t0 = time.perf_counter()
            plan = compile_recipe(dfs_recipe(models, path, scales, space.non_layer,
                                             space.projections))
            d = Materializer("cpu").materialize_to_disk(plan, Path(tmp) / f"c{k}")
            fresh = make_backend("hf", model_dir=str(d), batch_size=256)
            s = fresh.evaluate(tasks)
            fresh.close()
            res["rebuild"].append(time.perf_counter() - t0)
            scores["rebuild"].append({k2: float(np.mean(v)) for k2, v in s.items()})
    torch.set_num_threads(1)
    same = scores["slots"] == scores["zeroed"] == scores["rebuild"]
    return {"seconds": {k: float(np.mean(v)) for k, v in res.items()},
            "path_lengths": [len(p) for p, _ in paths], "max_path": P, "scores_identical": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=100, help="evaluations per search")
    ap.add_argument("--dfs-optimizer", default=None, help="override the DFS presets' optimizer")
    ap.add_argument("--runs-dir", default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="evomerge-dfs-"))
    print(f"runs in {runs}; load average {os.getloadavg()[0]:.1f} (2 cores, shared)", flush=True)

    def preset(file: str, **update):
        cfg = load_config(PRESETS / file)
        upd = {"budget": args.budget, **update}
        if args.dfs_optimizer and cfg.space.type == "dfs":
            upd["optimizer"] = cfg.optimizer.model_copy(update={"name": args.dfs_optimizer})
        return cfg.model_copy(update=upd)

    ps_cfg = preset("zoo_demo.yaml", name="bench-ps")
    ps = run(ps_cfg, runs, "PS (task arithmetic, CMA-ES)")
    (ps_dir,) = export_top(runs / ps_cfg.name, 1, runs / "ps-export")
    dfs = run(preset("zoo_dfs.yaml", name="bench-dfs"), runs, "DFS (experts)")
    chain_cfg = preset("zoo_ps_dfs.yaml", name="bench-ps-dfs")
    chain_cfg = chain_cfg.model_copy(update={"models": {**chain_cfg.models, "ps": str(ps_dir)}})
    chain = run(chain_cfg, runs, "PS+DFS (experts + PS merge)")

    models = resolve_models(ps_cfg.models)
    recipes = baseline_recipes(ps_cfg, models)
    experts = {k: models[k] for k in ("expert_a", "expert_b", "expert_c")}
    proj = ("self_attn.o_proj.", "mlp.down_proj.")
    stack = [(k, j) for k in experts for j in range(2)]
    recipes["untuned DFS: stack a,b,c (6 layers, scale 1)"] = dfs_recipe(
        experts, stack, [1.0] * len(stack), "expert_a", proj)
    for r in (ps, dfs, chain):
        recipes[f"evolved {r['label']}"] = r["best"]["recipe"]
    rows = heldout_table(ps_cfg, recipes)
    print("\nheld-out accuracy (%) ± SE, examples never searched; cross = report task")
    names = list(next(r for r in rows if "tasks" in r)["tasks"])
    print(f"{'model':>48} " + " ".join(f"{n:>13}" for n in names)
          + f" {'combined':>13} {'cross':>13} {'layers':>6}")
    for row, recipe in zip(rows, recipes.values()):
        if "tasks" not in row:
            print(f"{row['model']:>48} failed: {row['error']}")
            continue
        depth = len(recipe["slices"]) if "slices" in recipe else 2
        cells = " ".join(f"{row['tasks'][n] * 100:6.1f} ± {row['se'][n] * 100:4.1f}" for n in names)
        cross = row["se"].get("cross", float("nan"))
        print(f"{row['model']:>48} {cells} {row['combined'] * 100:6.1f} ± "
              f"{row['combined_se'] * 100:4.1f} {row['report'].get('cross', float('nan')) * 100:6.1f}"
              f" ± {cross * 100:4.1f} {depth:>6}")
    print("\nsearch cost (search split)")
    for r in (ps, dfs, chain):
        mp = f"{r['mean_path']:.2f}" if r["mean_path"] is not None else "2 (fixed)"
        print(f"{r['label']:>34}: {r['s_per_eval']:.2f} s/candidate, mean path {mp} layers, "
              f"best path {len(r['best']['recipe'].get('slices') or []) or 2} layers, "
              f"{r['wall_s']:.0f} s for {r['evals']} evals")
    modes = eval_modes(load_config(PRESETS / "zoo_dfs.yaml"))
    print(f"\nDFS candidate evaluation, mean s/candidate over paths {modes['path_lengths']} "
          f"(max {modes['max_path']}): " + ", ".join(f"{k} {v:.2f}" for k, v in modes['seconds'].items())
          + f"; scores identical across modes: {modes['scores_identical']}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "runs": {r["label"]: {k: v for k, v in r.items() if k != "best"} | {
                "best_fitness": r["best"]["fitness"],
                "best_path": len(r["best"]["recipe"].get("slices") or [])} for r in (ps, dfs, chain)},
            "heldout": rows, "eval_modes": modes}, indent=1))


if __name__ == "__main__":
    main()
