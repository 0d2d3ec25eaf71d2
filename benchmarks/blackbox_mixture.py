"""Output-level merging of API-only models on the model zoo: mixtures vs single endpoints.

Three ``evomerge serve`` processes on 127.0.0.1 serve the zoo's three full experts (each an
expert of one letter slice of the cipher task); from here on they are only endpoints
(text + logprobs). Compared, on the zoo tasks ``combined`` (the three slices) and ``cross``
(strings mixing slices), scored on the held-out split:

- each single endpoint;
- the per-task choice of endpoint ("router" baseline: for every task, the endpoint best on
  that task's search split);
- the uniform mixture (linear and log-linear);
- the evolved mixture: ``run_search`` with the ``output_mixture`` space, the ``mixture``
  backend and CMA-ES over the weights, on the search split (the first ``search_examples``
  items of each task, to keep an evaluation to seconds), one run per seed.

Evaluations used and seconds are reported per method. The servers run with
``--logprobs-eos`` (the exact p(EOS) at the end of answers) and the default 5 top logprobs.

    .venv/bin/python benchmarks/blackbox_mixture.py                  # full zoo (built once)
    .venv/bin/python benchmarks/blackbox_mixture.py --seeds 0 --budget 12 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("combined", "cross")


def _start_servers(experts: dict[str, Path], threads: int = 1) -> list[tuple[str, subprocess.Popen, str]]:
    """One ``evomerge serve`` process per expert on a free port; returns (name, process, url)."""
    out = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        for name, path in experts.items():
            proc = subprocess.Popen(
                [sys.executable, "-m", "evomerge.cli", "serve", str(path), "--port", "0", "--model-name", name,
                 "--threads", str(threads), "--batch-size", "64", "--logprobs-eos", "--quiet"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            out.append((name, proc, ""))
        started = []
        for name, proc, _ in out:
            line = proc.stdout.readline()
            if " at " not in line:
                raise RuntimeError(f"evomerge serve {name} did not start: {line!r} {proc.stderr.read()[-500:]}")
            started.append((name, proc, line.split(" at ", 1)[1].split()[0]))
        return started
    except BaseException:
        for _n, proc, _u in out:
            proc.terminate()
        raise


def _task_files(tasks_dir: Path, tmp: Path, search_examples: int | None) -> dict[str, Path]:
    """Copies of the zoo task YAMLs (absolute data paths; search split capped)."""
    import yaml

    files = {}
    for name in TASKS:
        spec = yaml.safe_load((tasks_dir / f"{name}.yaml").read_text())
        spec["data"] = str((tasks_dir / spec["data"]).resolve())
        spec["heldout_data"] = str((tasks_dir / spec["heldout_data"]).resolve())
        spec["num_examples"] = search_examples
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        files[name] = tmp / f"{name}.yaml"
    return files


def run_mixture_benchmark(zoo_variant: str = "full", seeds: list[int] | None = None, budget: int = 30,
                          search_examples: int | None = 60, progress: bool = True) -> dict[str, Any]:
    """Run the comparison; returns the table as a dict (see the module docstring)."""
    import torch
    from evomerge.blackbox.mixture import Endpoint, EndpointPool, MixtureDecoder

    from evomerge.config import parse_config
    from evomerge.engine.runner import run_search
    from evomerge.engine.store import RunStore
    from evomerge.fitness import load_task
    from evomerge.fitness.scoring import evaluate_task
    from evomerge.zoo.build import build_zoo, load_zoo

    torch.set_num_threads(1)
    seeds = [0, 1] if seeds is None else list(seeds)
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-mixture-bench-"))
    zoo = load_zoo(zoo_variant) if zoo_variant == "full" else build_zoo(zoo_variant, root=tmp / "zoo")
    experts = dict(zoo.expert_paths)
    names = list(experts)
    task_files = _task_files(Path(zoo.tasks_dir), tmp, search_examples)
    search_tasks = {n: load_task(p) for n, p in task_files.items()}  # search split capped
    heldout_tasks = {n: load_task(Path(zoo.tasks_dir) / f"{n}.yaml") for n in TASKS}  # every held-out item
    servers = _start_servers(experts)
    urls = {n: u for n, _p, u in servers}
    pool = EndpointPool([Endpoint(n, urls[n]) for n in names], concurrency=8, prompts_per_request=256)
    rows: list[dict[str, Any]] = []

    def score(weights, combine="linear", split="heldout") -> tuple[dict[str, float], float]:
        dec = MixtureDecoder(pool, list(weights), combine, 5)
        t0 = time.perf_counter()
        tasks = search_tasks if split == "search" else heldout_tasks
        out = {n: float(np.mean(evaluate_task(t, split, dec.generate, dec.loglikelihood))) for n, t in tasks.items()}
        return out, time.perf_counter() - t0

    def log(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    try:
        singles: dict[str, dict[str, dict[str, float]]] = {}
        for i, n in enumerate(names):
            w = [1.0 if j == i else 0.0 for j in range(len(names))]
            s_search, t_search = score(w, split="search")
            s_held, t_held = score(w)
            singles[n] = {"search": s_search, "heldout": s_held}
            rows.append({"method": f"single {n}", "weights": w, "search": s_search, "heldout": s_held,
                         "evaluations": 1, "seconds": t_search + t_held})
            log(f"single {n}: {s_held}")
        choice = {t: max(names, key=lambda n: singles[n]["search"][t]) for t in TASKS}
        rows.append({"method": "router (best endpoint per task)", "choice": choice,
                     "search": {t: singles[choice[t]]["search"][t] for t in TASKS},
                     "heldout": {t: singles[choice[t]]["heldout"][t] for t in TASKS},
                     "evaluations": len(names), "seconds": sum(r["seconds"] for r in rows)})
        for combine in ("linear", "log_linear"):
            w = [1.0 / len(names)] * len(names)
            s_search, t_search = score(w, combine, split="search")
            s_held, t_held = score(w, combine)
            rows.append({"method": f"uniform {combine}", "weights": w, "search": s_search, "heldout": s_held,
                         "evaluations": 1, "seconds": t_search + t_held})
            log(f"uniform {combine}: {s_held}")
        for seed in seeds:
            cfg = parse_config({
                "name": f"mixture-seed{seed}",
                "models": {n: f"api:{urls[n]}" for n in names},
                "space": {"type": "output_mixture", "options": {"combine": "linear"}},
                "optimizer": {"name": "cma", "popsize": 6},
                "tasks": [{"path": str(task_files[t])} for t in TASKS],
                "backend": {"name": "mixture", "options": {"concurrency": 8, "prompts_per_request": 256}},
                "budget": budget,
                "seed": seed,
            }, "benchmark")
            run_dir = tmp / f"run-seed{seed}"
            t0 = time.perf_counter()
            best = run_search(cfg, run_dir, progress=False)
            t_search = time.perf_counter() - t0
            records = RunStore.open(run_dir).read_evals()
            evaluated = sum(1 for r in records if not r.get("cached"))
            assert best is not None, "no successful evaluation"
            weights = [best["recipe"]["weights"][n] for n in names]
            s_held, t_held = score(weights)
            rows.append({"method": f"evolved linear (cma, seed {seed})", "weights": weights,
                         "search": best["scores"], "heldout": s_held, "evaluations": evaluated,
                         "seconds": t_search + t_held})
            log(f"evolved seed {seed}: {weights} {s_held}")
        for r in rows:
            r["heldout_mean"] = float(np.mean([r["heldout"][t] for t in TASKS]))
            r["search_mean"] = float(np.mean([r["search"][t] for t in TASKS]))
        return {"zoo": zoo_variant, "experts": names, "tasks": list(TASKS), "budget": budget, "seeds": seeds,
                "search_examples": search_examples,
                "heldout_examples": {t: len(heldout_tasks[t].examples("heldout")) for t in TASKS},
                "requests": pool.stats["requests"], "rows": rows}
    finally:
        pool.close()
        for _n, proc, _u in servers:
            proc.terminate()
        for _n, proc, _u in servers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def format_table(result: dict[str, Any]) -> str:
    lines = [f"output-level mixture on the {result['zoo']} zoo (held-out: "
             + ", ".join(f"{t} {n}" for t, n in result["heldout_examples"].items()) + " items; search "
             f"{result['search_examples']} per task)",
             "| method | weights | combined | cross | mean | search mean | evaluations | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        w = r.get("weights")
        shown = "/".join(f"{x:.2f}" for x in w) if w else ", ".join(f"{t}:{n}" for t, n in r["choice"].items())
        h = r["heldout"]
        lines.append(f"| {r['method']} | {shown} | {100 * h['combined']:.1f} | {100 * h['cross']:.1f} | "
                     f"{100 * r['heldout_mean']:.1f} | {100 * r['search_mean']:.1f} | {r['evaluations']} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default="full", choices=["full", "test"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--budget", type=int, default=30)
    ap.add_argument("--search-examples", type=int, default=60)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    result = run_mixture_benchmark(args.zoo, args.seeds, args.budget, args.search_examples)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
