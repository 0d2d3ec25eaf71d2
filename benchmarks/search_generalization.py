"""Does the search generalize? Search vs validation vs held-out scores, several seeds.

    python benchmarks/search_generalization.py [--setup zoo] [--seeds 3] [--budget 150]
                                               [--objective exact] [--json out.json]

For each seed, one run of the setup's search (baselines first, then the search, then the
validation selection: engine/selection.py), and for four models the combined score on the
search, validation and held-out splits, each with its standard error:

  (a) max-search  the candidate with the highest search fitness (what a naive run reports);
  (b) final       the validation-selected final model (what evomerge now reports);
  (c) cma-mean    the optimizer's estimate of the optimum (CMA-ES distribution mean);
  (d) baseline    the best untuned baseline, chosen by validation like the final.

Held-out scores of (a) and (c) are computed here for the report only (the run itself scores
held-out data for the final and the baselines only); nothing is chosen on held-out data.
The summary gives, per model, the mean over seeds and how often (b) beat (d) on held-out.

Extension points (for other setups and objectives, e.g. the SmolLM2 demo):
- ``SETUPS[name](seed, budget) -> RunConfig``: a setup builds the run config of one seed;
  ``--setup NAME`` picks it (``--real`` is ``--setup real``, registered by the real demo).
- ``OBJECTIVES[name](cfg) -> RunConfig``: rewrites a config for a fitness objective
  (``exact`` = the tasks as they are); ``--objective NAME`` picks it.
- :func:`generalization_rows` computes the four rows for any finished run directory.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.config import RunConfig, load_config  # noqa: E402
from evomerge.engine.runner import run_search  # noqa: E402
from evomerge.engine.selection import (  # noqa: E402
    SPLIT_ORDER,
    Rescorer,
    load_final,
    summarize_scores,
)
from evomerge.engine.store import RunStore  # noqa: E402
from evomerge.fitness.stderr import combined_se, format_score  # noqa: E402

MODELS = ("max-search", "final", "cma-mean", "baseline")
# "report": the run's report tasks on held-out data (real setup: exact match, whatever the
# search objective, so objectives compare on one metric)
COLUMNS = (*SPLIT_ORDER, "report")


def zoo_setup(seed: int, budget: int | None) -> RunConfig:
    """The zoo demo's search (search_spaces/zoo_demo.yaml) with another seed."""
    cfg = load_config(ROOT / "search_spaces" / "zoo_demo.yaml")
    opt = cfg.optimizer.model_copy(update={"seed": seed})
    return cfg.model_copy(update={"name": f"gen-zoo-s{seed}", "seed": seed, "optimizer": opt,
                                  **({"budget": budget} if budget else {})})


def real_setup(seed: int, budget: int | None) -> RunConfig:
    """`evomerge demo --real`'s search (SmolLM2 experts; built on first use) with another seed."""
    from evomerge.engine.demo_real import real_setup as setup

    return setup(seed, budget)


def _objective(name: str) -> Callable[[RunConfig], RunConfig]:
    def rewrite(cfg: RunConfig) -> RunConfig:
        from evomerge.engine.demo_real import with_objective

        return with_objective(cfg, name)

    return rewrite


SETUPS: dict[str, Callable[[int, int | None], RunConfig]] = {"zoo": zoo_setup, "real": real_setup}
# loglik: the gold answer's probability (teacher-forced); mix: half exact match, half loglik
OBJECTIVES: dict[str, Callable[[RunConfig], RunConfig]] = {
    "exact": lambda cfg: cfg, "loglik": _objective("loglik"), "mix": _objective("mix")}


def generalization_rows(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The four models of a finished, selected run with search/validation/held-out scores
    (``{fitness, se, n, tasks}`` per split). Missing held-out scores are computed (and
    cached in the run's rescore.jsonl)."""
    final = load_final(run_dir)
    if final is None:
        raise SystemExit(f"{run_dir}: run has no final.json (run `evomerge select {run_dir}`)")
    rows = final["rows"]
    pick: dict[str, dict[str, Any] | None] = {
        "max-search": next((r for r in rows if r.get("search_rank") == 1), None),
        "final": next(r for r in rows if r.get("final")),
        "cma-mean": next((r for r in rows if r["role"] == "estimate"), None),
    }
    base = [r for r in rows if r["role"] == "baseline" and (r["splits"].get("validation") or {}).get("fitness") is not None]
    pick["baseline"] = max(base, key=lambda r: r["splits"]["validation"]["fitness"]) if base else None
    store = RunStore.open(run_dir)
    rs = Rescorer(store)
    recipes = _recipes(store, final)
    out: dict[str, dict[str, Any]] = {}
    try:
        for name, r in pick.items():
            if r is None:
                continue
            splits = dict(r["splits"])
            if r["plan_hash"] in recipes and (splits.get("heldout") is None or rs.cfg.report_tasks):
                per = rs.score(r["plan_hash"], recipes[r["plan_hash"]], "heldout")["per_example"] or {}
                splits["heldout"] = summarize_scores({t: v for t, v in per.items() if t in rs.info.weights},
                                                     rs.info.weights)
                rep = {t: v for t, v in per.items() if t not in rs.info.weights}
                if rep:  # report tasks, held-out, equal weights (real setup: exact match)
                    splits["report"] = combined_se(rep, {t: 1.0 for t in rep})
            out[name] = {"label": r["label"], "splits": splits}
    finally:
        rs.close()
    return out


def _recipes(store: RunStore, final: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """plan hash -> recipe for every model the selection compared."""
    from evomerge.engine.selection import optimizer_estimate

    out = {r["plan_hash"]: r["recipe"] for r in store.read_evals() if r.get("plan_hash")}
    out.update({r["plan_hash"]: r["recipe"] for r in store.read_jsonl("baselines.jsonl") if r.get("plan_hash")})
    cfg = store.config()
    rs = Rescorer(store, cfg)
    est = optimizer_estimate(cfg, store, rs.space)
    if est is not None:
        out[est["plan_hash"]] = est["recipe"]
    out[final["final"]["plan_hash"]] = final["recipe"]
    return out


def _cell(split: dict[str, Any] | None) -> str:
    if not split or split.get("fitness") is None:
        return "-"
    return format_score(split["fitness"], split["se"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", default="zoo", help=f"one of: {', '.join(SETUPS)}")
    ap.add_argument("--real", action="store_true", help="the real-LLM setup (= --setup real)")
    ap.add_argument("--objective", default="exact", help=f"one of: {', '.join(OBJECTIVES)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=None, help="evaluations per run (default: the setup's)")
    ap.add_argument("--runs-dir", default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    setup = "real" if args.real else args.setup
    if setup not in SETUPS:
        raise SystemExit(f"error: setup {setup!r} is not available here (known: {', '.join(SETUPS)})")
    if args.objective not in OBJECTIVES:
        raise SystemExit(f"error: objective {args.objective!r} is not available here "
                         f"(known: {', '.join(OBJECTIVES)})")
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="evomerge-gen-"))
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"setup {setup}, objective {args.objective}, seeds {args.seeds}; machine: {load}", flush=True)
    per_seed: list[dict[str, Any]] = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cfg = OBJECTIVES[args.objective](SETUPS[setup](seed, args.budget))
        cfg = cfg.model_copy(update={"name": f"{cfg.name}-{args.objective}"})
        t0 = time.perf_counter()
        run_search(cfg, runs / cfg.name, progress=False)
        rows = generalization_rows(runs / cfg.name)
        secs = time.perf_counter() - t0
        per_seed.append({"seed": seed, "seconds": secs, "run_dir": str(runs / cfg.name), "rows": rows})
        print(f"\nseed {seed} ({secs:.0f} s, budget {cfg.budget}), combined score % ± SE", flush=True)
        print(f"{'model':>11}  {'label':<40} " + " ".join(f"{s:>13}" for s in COLUMNS))
        for name in MODELS:
            if name in rows:
                r = rows[name]
                print(f"{name:>11}  {r['label'][:40]:<40} "
                      + " ".join(f"{_cell(r['splits'].get(s)):>13}" for s in COLUMNS), flush=True)
    print(f"\nmean over {len(per_seed)} seeds (SE of the mean over seeds, in parentheses)")
    print(f"{'model':>11} " + " ".join(f"{s:>15}" for s in COLUMNS))
    summary: dict[str, dict[str, Any]] = {}
    for name in MODELS:
        cells, summary[name] = [], {}
        for s in COLUMNS:
            vals = [p["rows"][name]["splits"][s]["fitness"] * 100 for p in per_seed
                    if name in p["rows"] and (p["rows"][name]["splits"].get(s) or {}).get("fitness") is not None]
            if not vals:
                cells.append(f"{'-':>15}")
                continue
            m = sum(vals) / len(vals)
            sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
            summary[name][s] = {"mean": m, "se_over_seeds": sd / math.sqrt(len(vals)), "n": len(vals)}
            cells.append(f"{m:7.1f} ({sd / math.sqrt(len(vals)):4.1f})")
        print(f"{name:>11} " + " ".join(cells))

    def heldout(p: dict[str, Any], name: str, col: str) -> float | None:
        v = (p["rows"].get(name, {}).get("splits", {}).get(col) or {}).get("fitness")
        return None if v is None else v * 100

    for col in ("heldout", "report"):
        for name in ("final", "max-search", "cma-mean"):
            diffs = [heldout(p, name, col) - heldout(p, "baseline", col) for p in per_seed
                     if heldout(p, name, col) is not None and heldout(p, "baseline", col) is not None]
            if diffs:
                wins = sum(d > 0 for d in diffs)
                print(f"{col}, {name} minus best baseline: " + ", ".join(f"{d:+.1f}" for d in diffs)
                      + f"  (beats it in {wins}/{len(diffs)} seeds)")
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": setup, "objective": args.objective,
                                               "machine": load, "seeds": per_seed,
                                               "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
