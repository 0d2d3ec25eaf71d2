"""Multi-objective search on the zoo: hypervolume at equal budgets, CMA-ES vs NSGA-II vs MAP.

    python benchmarks/pareto.py [--budget 48] [--seeds 3] [--quick] [--tasks DIR] [--json PATH]

The zoo's three cipher tasks are three objectives (one per task, each scaled 0..100). Each
method searches the same space (task arithmetic over the zoo's experts, per layer group) on
the *search* split, with the same evaluation budget, for each seed:

- ``cma``: weighted-sum CMA-ES (fitness = mean of the tasks); its front is the non-dominated
  set of every candidate it evaluated.
- ``nsga2``: NSGA-II on the three objectives.
- ``map``: MAP (quadratic surrogate per task): an initial design, then surrogate-front points
  evaluated to confirm; its budget is design + confirmations (both counted and printed).

Hypervolume uses a FIXED reference point, 0 on every objective (objectives in 0..100), never
tuned. Printed: per method, evaluations, hypervolume mean ± SE over seeds, front size, wall
seconds per run (search split); then the hypervolume of each front's members re-scored on the
HELD-OUT split; then MAP's surrogate-predicted vs measured objectives on its confirmed points;
then what MAP spent (evaluations, seconds) to reach NSGA-II's final hypervolume, or that it
did not. ``--quick`` uses the tiny test zoo and a tiny budget (a smoke run, figures meaningless).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.config import parse_config  # noqa: E402
from evomerge.engine.demo import heldout_table  # noqa: E402
from evomerge.engine.objectives import Objectives  # noqa: E402
from evomerge.engine.runner import run_search  # noqa: E402
from evomerge.engine.store import RunStore, atomic_write_text  # noqa: E402
from evomerge.errors import EvomergeError  # noqa: E402
from evomerge.pareto import hypervolume  # noqa: E402
from evomerge.report.front import front_of_records  # noqa: E402

METHODS = ("cma", "nsga2", "map")
SCALE = 100.0  # objectives are reported (and hypervolume is measured) in 0..100


def task_files(tasks_dir: Path | None) -> list[Path]:
    """The task configs: the zoo's cipher_a|b|c, or the cipher_*.yaml (else every *.yaml) in
    ``tasks_dir``.

    Raises:
        SystemExit: the directory does not exist or holds fewer than two task files.
    """
    d = tasks_dir or ROOT / "fitness/zoo"
    if not d.is_dir():
        raise SystemExit(f"error: --tasks {d}: not a directory")
    files = sorted(d.glob("cipher_*.yaml")) or sorted(d.glob("*.yaml"))
    if len(files) < 2:
        raise SystemExit(f"error: --tasks {d}: needs at least two task .yaml files, found {len(files)}")
    return files


def run_config(zoo: Any, tasks: list[Path], method: str, seed: int, budget: int,
               layer_groups: int, popsize: int) -> dict[str, Any]:
    """The run config of one method and seed (all methods share space, tasks and budget)."""
    experts = [m for m in zoo.experts if m.name.startswith("expert")] or list(zoo.experts)
    opt: dict[str, Any] = {"name": method, "seed": seed, "popsize": popsize}
    return {
        "name": f"pareto-{method}-s{seed}",
        "models": {"base": str(zoo.base.path), **{m.name: str(m.path) for m in experts}},
        "base_model": "base",
        "space": {"type": "parameter", "method": "task_arithmetic", "layer_groups": layer_groups,
                  "params": {"weight": {"low": 0.0, "high": 2.0, "init": 1.0}}},
        "optimizer": opt,
        "budget": budget,
        "seed": seed,
        "tasks": [{"path": str(p), "weight": 1.0} for p in tasks],
        "backend": {"batch_size": 256, "options": {}},
        "executor": {"name": "local", "num_threads": 1},
    }


def hv_curve(records: list[dict], objectives: Objectives) -> list[float]:
    """Hypervolume (0..100 scale, reference 0) of the front of the first k records, k = 1..n."""
    out = []
    for k in range(1, len(records) + 1):
        f = front_of_records(records[:k], objectives)
        out.append(hypervolume(f.points * SCALE, np.zeros(objectives.m)) if len(f.members) else 0.0)
    return out


def one_run(cfg_dict: dict[str, Any], runs: Path) -> dict[str, Any]:
    """Run one search; return its front, hypervolume curve, time and MAP confirmations."""
    cfg = parse_config(cfg_dict)
    t0 = time.perf_counter()
    run_search(cfg, runs / cfg.name, progress=False)
    wall = time.perf_counter() - t0
    recs = RunStore(runs / cfg.name).read_evals()
    obj = Objectives.of_run(cfg, recs)
    front = front_of_records(recs, obj)
    curve = hv_curve(recs, obj)
    conf = []
    for r in recs:
        pred = (r.get("info") or {}).get("predicted")
        if pred is not None and not r.get("failed") and r.get("scores"):
            conf.append({"id": r["id"], "predicted": [p * SCALE for p in pred],
                         "measured": (obj.values(r["scores"]) * SCALE).tolist()})
    return {
        "cfg": cfg, "objectives": obj.names, "split": front.split, "evaluations": len(recs),
        "hv": curve[-1] if curve else 0.0, "curve": curve, "front_size": len(front.members),
        "front": [{"id": m["id"], "recipe": m["recipe"]} for m in front.members],
        "wall": wall, "eval_seconds": [float(r.get("seconds") or 0.0) for r in recs],
        "confirmed": conf, "dim": len(recs[0]["genome"]) if recs else 0,
    }


def heldout_hv(run: dict[str, Any]) -> float:
    """Hypervolume of the front members' objective vectors re-scored on the held-out split."""
    recipes = {f"id{m['id']}": m["recipe"] for m in run["front"]}
    rows = heldout_table(run["cfg"], recipes)
    pts = [[row["tasks"][t] * SCALE for t in run["objectives"]] for row in rows if "tasks" in row]
    return hypervolume(np.array(pts).reshape(-1, len(run["objectives"])), np.zeros(len(run["objectives"])))


def mean_se(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, float)
    return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan"))


def reach(map_run: dict[str, Any], target: float) -> tuple[int, float] | None:
    """First k at which MAP's front reaches ``target`` hypervolume: (k, seconds spent)."""
    for k, hv in enumerate(map_run["curve"], 1):
        if hv >= target - 1e-9:
            return k, float(sum(map_run["eval_seconds"][:k]))
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=48, help="evaluations per run, every method")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny test zoo, budget 8, 2 seeds, 1 layer group")
    ap.add_argument("--tasks", default=None, help="directory of task .yaml files (default: the zoo's ciphers)")
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--layer-groups", type=int, default=2)
    ap.add_argument("--runs-dir", default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.budget, args.seeds, args.popsize, args.layer_groups = 8, 2, 4, 1
    if args.budget < 4 or args.seeds < 1 or args.popsize < 2:
        print("error: need --budget >= 4, --seeds >= 1, --popsize >= 2", file=sys.stderr)
        return 2
    try:
        return _bench(args)
    except EvomergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _bench(args: argparse.Namespace) -> int:
    from evomerge.zoo.build import build_zoo

    tasks = task_files(Path(args.tasks) if args.tasks else None)
    zoo = build_zoo("test" if args.quick else "full")
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="evomerge-pareto-"))
    print(f"zoo: {'test' if args.quick else 'full'} ({zoo.base.path.parent}); tasks: "
          f"{', '.join(p.stem for p in tasks)}; budget {args.budget}; seeds {args.seeds}; runs in {runs}", flush=True)
    m = len(tasks)
    box = SCALE ** m
    res: dict[str, list[dict[str, Any]]] = {k: [] for k in METHODS}
    for method in METHODS:
        for seed in range(args.seeds):
            r = one_run(run_config(zoo, tasks, method, seed, args.budget, args.layer_groups, args.popsize), runs)
            res[method].append(r)
            print(f"{method:>6} seed {seed}: {r['evaluations']} evals, hv {100 * r['hv'] / box:.2f}% of box ({r['split']} split), "
                  f"front {r['front_size']}, {r['wall']:.1f} s", flush=True)
    split = res["cma"][0]["split"]
    print(f"\nhypervolume, {split} split: {m} objectives ({', '.join(res['cma'][0]['objectives'])}), "
          f"each 0..100; fixed reference point (0,...,0); shown as % of the box [0,100]^{m} "
          f"(= {box:.0f}); mean ± SE over {args.seeds} seeds")
    print(f"{'method':>8} {'evals':>6} {'hv % of box':>17} {'front':>6} {'s/run':>7}")
    summary: dict[str, Any] = {}
    for method, rs in res.items():
        hv, se = mean_se([r["hv"] for r in rs])
        ev = float(np.mean([r["evaluations"] for r in rs]))
        fs = float(np.mean([r["front_size"] for r in rs]))
        wall = float(np.mean([r["wall"] for r in rs]))
        summary[method] = {"evaluations": ev, "hv_mean": hv, "hv_se": se, "front_size": fs,
                           "seconds_per_run": wall, "hv_per_seed": [r["hv"] for r in rs],
                           "split": rs[0]["split"]}
        print(f"{method:>8} {ev:6.0f} {100 * hv / box:8.2f} ± {100 * se / box:6.2f} {fs:6.1f} {wall:7.1f}")
    mp = res["map"][0]
    n_conf = float(np.mean([len(r["confirmed"]) for r in res["map"]]))
    n_design = float(np.mean([r["evaluations"] - len(r["confirmed"]) for r in res["map"]]))
    dim = mp["dim"]
    print(f"MAP spent {n_design:.0f} initial-design + {n_conf:.0f} confirmation evaluations per run (mean); "
          f"genome {dim} coefficients, so each task's quadratic has {(dim + 1) * (dim + 2) // 2} terms")

    print("\nhypervolume (% of box, reference 0) of each run's search-split front members "
          "re-scored on the HELD-OUT split")
    print(f"{'method':>8} {'heldout hv %':>17}")
    for method, rs in res.items():
        hvs = [heldout_hv(r) for r in rs]
        hv, se = mean_se(hvs)
        summary[method].update(heldout_hv_mean=hv, heldout_hv_se=se, heldout_hv_per_seed=hvs)
        print(f"{method:>8} {100 * hv / box:8.2f} ± {100 * se / box:6.2f}")

    print(f"\nMAP: surrogate-predicted vs measured objectives on its confirmed points ({mp['split']} split, 0..100)")
    conf = [c for r in res["map"] for c in r["confirmed"]]
    if conf:
        pred = np.array([c["predicted"] for c in conf])
        meas = np.array([c["measured"] for c in conf])
        mae = np.abs(pred - meas).mean(axis=0)
        summary["map"]["confirm_mae"] = dict(zip(mp["objectives"], mae.tolist()))
        print(f"{len(conf)} confirmed points over {args.seeds} seeds; mean abs error per task: "
              + ", ".join(f"{n} {v:.1f}" for n, v in zip(mp["objectives"], mae)))
        print(f"{'seed':>4} {'id':>4} " + " ".join(f"{n + ' pred/meas':>22}" for n in mp["objectives"]))
        for s, r in enumerate(res["map"]):
            for c in r["confirmed"]:
                print(f"{s:4d} {c['id']:4d} " + " ".join(f"{p:10.1f} / {q:9.1f}" for p, q in zip(c["predicted"], c["measured"])))
    else:
        print("no confirmed points (the budget ended within the initial design)")

    print("\nMAP cost to reach NSGA-II's final hypervolume (per seed, search split)")
    cost = []
    for s, (mr, nr) in enumerate(zip(res["map"], res["nsga2"])):
        got = reach(mr, nr["hv"])
        nsec = float(sum(nr["eval_seconds"]))
        row = {"seed": s, "nsga2_hv": nr["hv"], "nsga2_evals": nr["evaluations"], "nsga2_seconds": nsec,
               "map_evals": got[0] if got else None, "map_seconds": got[1] if got else None}
        cost.append(row)
        if got:
            print(f"seed {s}: NSGA-II hv {100 * nr['hv'] / box:.2f}% in {nr['evaluations']} evals / {nsec:.1f} s; "
                  f"MAP reached it after {got[0]} evals / {got[1]:.1f} s (evaluation seconds)")
        else:
            print(f"seed {s}: NSGA-II hv {100 * nr['hv'] / box:.2f}% in {nr['evaluations']} evals / {nsec:.1f} s; "
                  f"MAP did not reach it within {mr['evaluations']} evals (its hv {100 * mr['hv'] / box:.2f}%)")
    if args.json:
        out = {"budget": args.budget, "seeds": args.seeds, "quick": args.quick, "reference": [0.0] * m,
               "scale": SCALE, "box_volume": box, "layer_groups": args.layer_groups, "popsize": args.popsize,
               "genome_dim": dim, "tasks": [p.stem for p in tasks], "summary": summary, "map_cost": cost,
               "map_design_evals": n_design, "map_confirm_evals": n_conf,
               "confirmed": {s: r["confirmed"] for s, r in enumerate(res["map"])}}
        atomic_write_text(Path(args.json), json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
