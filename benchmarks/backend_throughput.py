"""Fitness backend throughput on the model zoo: candidates per minute, weight swaps, racing.

What it measures, on the ``full`` zoo when it is built (``evomerge zoo build``), else on the
``test`` zoo (built in seconds into a temporary folder; tiny models, so the figures show
overheads rather than model compute):

1. HF backend: random task-arithmetic merges of the base and the full experts, each
   written into the resident model in place (``Materializer.materialize_into``) and scored
   on the zoo tasks; candidates per minute, and the split between swap and scoring.
2. Weight swap: ``materialize_into`` of a merge vs a plain ``copy_`` of the same bytes into
   the same tensors vs "a new engine" (write the merge to disk and build a fresh
   ``HFBackend`` from it, the checkpoint round trip the in-place swap avoids).
3. API backend through ``evomerge serve`` (a real HTTP server on 127.0.0.1, in a thread of
   this process): the base model scored through /v1/completions, one prompt per request
   and batched prompts per request, vs the HF backend in process.
4. Racing: the same candidates scored in full and raced against the best so far
   (``evaluate_racing``); example evaluations saved, wall time, and whether the best
   candidate is the same. On the ``test`` zoo every candidate scores ~0 and nothing can be
   cut, so a synthetic replay (Bernoulli per-example scores) is reported beside it.
5. vLLM (run it with the vLLM venv: ``.venv-vllm/bin/python benchmarks/backend_throughput.py``):
   the same candidates through the vLLM backend (swapped into one live engine), candidates
   per minute vs HF and whether every fitness equals HF's; weight swap vs a plain copy of
   the same bytes vs a new engine per candidate. Skipped when vLLM is not installed.

    .venv/bin/python benchmarks/backend_throughput.py                 # full zoo if built
    .venv/bin/python benchmarks/backend_throughput.py --zoo test --candidates 8
    .venv/bin/python benchmarks/backend_throughput.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from evomerge.checkpoint import open_checkpoint  # noqa: E402
from evomerge.fitness import combined_fitness, load_task, make_backend  # noqa: E402
from evomerge.fitness.racing import RaceLedger, evaluate_racing  # noqa: E402
from evomerge.materialize import Materializer  # noqa: E402
from evomerge.plan import MergePlan, TensorRef, TensorStep  # noqa: E402


# -- setup ----------------------------------------------------------------------------------
def get_zoo(which: str):
    from evomerge.zoo.build import ZooError, build_zoo, load_zoo

    if which in ("auto", "full"):
        try:
            return load_zoo("full")
        except ZooError as err:
            if which == "full":
                raise
            print(f"(full zoo not built: {err}; using the test zoo)")
    t0 = time.perf_counter()
    zoo = build_zoo("test")  # cached under the default zoo root, like `evomerge zoo build`
    print(f"(test zoo ready in {time.perf_counter() - t0:.1f} s)")
    return zoo


def random_plans(zoo, n: int, seed: int) -> list[MergePlan]:
    """Task arithmetic of the full experts over the base, weights ~ U(0, 1.5) per expert."""
    rng = np.random.default_rng(seed)
    experts = {m.name: str(m.path) for m in zoo.experts}
    sources = {"base": str(zoo.base.path), **experts}
    names = open_checkpoint(zoo.base.path).names
    plans = []
    for _ in range(n):
        w = [float(x) for x in rng.uniform(0.0, 1.5, size=len(experts))]
        steps = [
            TensorStep(name, "task_arithmetic", [TensorRef(e, name) for e in experts],
                       base=TensorRef("base", name), params={"weight": w})
            for name in names
        ]
        plans.append(MergePlan(sources=sources, steps=steps, base="base"))
    return plans


def identity_plan(zoo) -> MergePlan:
    """The base model itself, as a plan (every tensor passed through)."""
    names = open_checkpoint(zoo.base.path).names
    steps = [TensorStep(n, "passthrough", [TensorRef("base", n)]) for n in names]
    return MergePlan(sources={"base": str(zoo.base.path)}, steps=steps, base="base")


def likelihood_variant(task, out_dir: Path):
    """The same examples scored by ``neg_perplexity`` of the target (continuous scores in
    [0, 1] that differ between candidates even when no answer is exactly right)."""
    from evomerge.fitness import load_task

    spec = task.spec.model_dump(exclude_none=True)
    spec.update(name=f"{task.name}_ppl", scoring="neg_perplexity", data=str(task.path.parent / task.spec.data))
    spec.pop("heldout_data", None)
    path = out_dir / f"{task.name}_ppl.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return load_task(path)


def load_zoo_tasks(zoo, names: list[str]):
    return [load_task(zoo.task_yaml(n)) for n in names]


def fmt(x: float, unit: str = "") -> str:
    return f"{x:,.3f}{unit}" if x < 10 else f"{x:,.1f}{unit}"


# -- 1. candidates per minute (any backend that takes plans) ---------------------------------
def bench_backend(backend, plans, tasks, materializer) -> dict[str, Any]:
    """Swap + score each plan; the first candidate is a warm-up and not counted."""
    swaps, evals, fits = [], [], []
    for i, plan in enumerate(plans):
        t0 = time.perf_counter()
        backend.load_plan(plan, materializer)
        t1 = time.perf_counter()
        scores = backend.evaluate(tasks)
        t2 = time.perf_counter()
        fits.append(combined_fitness(scores, {t.name: t.weight for t in tasks}))
        if i > 0 or len(plans) == 1:
            swaps.append(t1 - t0)
            evals.append(t2 - t1)
    per = statistics.mean(s + e for s, e in zip(swaps, evals))
    return {
        "candidates": len(swaps),
        "swap_s": statistics.mean(swaps),
        "score_s": statistics.mean(evals),
        "candidate_s": per,
        "candidates_per_min": 60.0 / per,
        "fitness": fits,
    }


# -- 2. weight swap vs copy vs new engine -----------------------------------------------------
def bench_swap(backend, plans, materializer, tmp: Path, repeats: int = 5) -> dict[str, Any]:
    target = backend.target_tensors()
    unique = {}
    for t in target.values():
        unique.setdefault((t.untyped_storage().data_ptr(), t.storage_offset()), t)
    dsts = list(unique.values())
    srcs = [t.detach().clone() for t in dsts]
    nbytes = sum(t.numel() * t.element_size() for t in dsts)
    sync = torch.cuda.synchronize if any(t.is_cuda for t in dsts) else (lambda: None)

    copies = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            for d, s in zip(dsts, srcs):
                d.copy_(s)
        sync()
        copies.append(time.perf_counter() - t0)
    swaps = []
    for plan in (plans * repeats)[: max(repeats, len(plans))]:
        t0 = time.perf_counter()
        materializer.materialize_into(plan, target)
        sync()
        swaps.append(time.perf_counter() - t0)
    # the round trip an in-place swap avoids: write the merge, start a fresh backend on it
    out = tmp / "roundtrip"
    t0 = time.perf_counter()
    Materializer(device=materializer.device).materialize_to_disk(plans[0], out, overwrite=True)
    t1 = time.perf_counter()
    fresh = make_backend("hf", model_dir=str(out))
    t2 = time.perf_counter()
    fresh.close()
    shutil.rmtree(out, ignore_errors=True)
    copy_s, swap_s = min(copies), statistics.median(swaps)
    return {
        "bytes": nbytes,
        "copy_s": copy_s,
        "copy_GBps": nbytes / copy_s / 1e9,
        "swap_s": swap_s,
        "swap_over_copy": swap_s / copy_s,
        "write_s": t1 - t0,
        "new_engine_s": t2 - t1,
        "roundtrip_over_swap": (t2 - t0) / swap_s,
    }


# -- 3. API backend through evomerge serve ------------------------------------------------------
def bench_api(model_dir: str, tasks, repeats: int, settings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from evomerge.serve import make_server, start_in_thread

    server = make_server(model_dir, port=0, batch_size=64)
    start_in_thread(server)
    rows = []
    try:
        for opts in settings:
            api = make_backend("api", base_url=server.url, **opts)
            api.evaluate(tasks)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                api.evaluate(tasks)
                times.append(time.perf_counter() - t0)
            per = statistics.mean(times)
            rows.append({**opts, "candidate_s": per, "candidates_per_min": 60.0 / per,
                         "requests": api.stats["requests"], "retries": api.stats["retries"]})
            api.close()
    finally:
        server.stop()
    return rows


# -- 4. racing ----------------------------------------------------------------------------------
def bench_racing(backend, plans, tasks, materializer, confidence: float, fraction: float,
                 bound: str = "hoeffding") -> dict[str, Any]:
    weights = {t.name: t.weight for t in tasks}
    full_fits, full_time = [], 0.0
    for plan in plans:
        t0 = time.perf_counter()
        backend.load_plan(plan, materializer)
        full_fits.append(combined_fitness(backend.evaluate(tasks), weights))
        full_time += time.perf_counter() - t0
    ledger, best, best_i, race_time = RaceLedger(), None, None, 0.0
    for i, plan in enumerate(plans):
        t0 = time.perf_counter()
        backend.load_plan(plan, materializer)
        r = evaluate_racing(backend, tasks, best, confidence=confidence, first_fraction=fraction, bound=bound)
        race_time += time.perf_counter() - t0
        ledger.record(r)
        if r.complete and (best is None or r.fitness > best):
            best, best_i = r.fitness, i
    return {
        **ledger.summary(),
        "full_best": max(full_fits),
        "full_best_index": int(np.argmax(full_fits)),
        "race_best": best,
        "race_best_index": best_i,
        "same_best": best_i == int(np.argmax(full_fits)),
        "full_s": full_time,
        "race_s": race_time,
    }


def synthetic_racing(n_candidates: int, confidence: float, fraction: float, seed: int = 0,
                     bound: str = "hoeffding") -> dict[str, Any]:
    """Racing replayed on Bernoulli per-example scores (2 tasks x 240 examples), skill levels
    ~ N(0.45, 0.15): what racing saves when candidates differ, as in a real search."""
    from evomerge.fitness import Example
    from evomerge.fitness.backends.base import Backend
    from evomerge.fitness.tasks import Task, TaskSpec

    class Table(Backend):
        def __init__(self, table):
            super().__init__("")
            self.table = table

        def target_tensors(self):
            return {}

        def evaluate(self, tasks, split="search"):
            return {t.name: self.table[t.name][[int(e.prompt) for e in t.examples(split)]] for t in tasks}

    tasks = [Task(TaskSpec(name=n, data="-"), Path("-"), {"search": [Example(str(i), "") for i in range(240)]})
             for n in ("a", "b")]
    rng = np.random.default_rng(seed)
    levels = np.clip(rng.normal(0.45, 0.15, n_candidates), 0.01, 0.99)
    tables = [{t.name: (rng.random(240) < p).astype(float) for t in tasks} for p in levels]
    fulls = [combined_fitness(tb, {"a": 1.0, "b": 1.0}) for tb in tables]
    ledger, best, best_i = RaceLedger(), None, None
    for i, tb in enumerate(tables):
        r = evaluate_racing(Table(tb), tasks, best, confidence=confidence, first_fraction=fraction, bound=bound)
        ledger.record(r)
        if r.complete and (best is None or r.fitness > best):
            best, best_i = r.fitness, i
    return {**ledger.summary(), "same_best": best_i == int(np.argmax(fulls))}


# -- 5. vLLM ------------------------------------------------------------------------------------
# ==== vLLM section: numbers added by the vLLM backend work (same measurements as the HF rows:
# ==== bench_backend for candidates/minute, weight swap vs copy vs new engine). ===============
def bench_vllm(zoo, plans, tasks, tmp: Path, hf_fitness: list[float] | None = None,
               repeats: int = 5) -> dict[str, Any] | None:
    """The vLLM backend (vLLM's default multiprocessing engine, float32 like the HF rows):

    - candidates/minute: each plan swapped into the live engine (``collective_rpc`` to the
      worker, which materializes the plan and reloads through vLLM's ``reload_weights``,
      then ``reset_prefix_cache``) and scored, as ``bench_backend`` does for HF;
    - swap vs a plain ``copy_`` of the same bytes (the checkpoint's tensors, on the device
      vLLM runs on) vs a new engine (write the merge to disk + start a fresh ``vllm.LLM`` on
      it: what a per-candidate restart would cost);
    - whether the fitness of every candidate equals the HF backend's.
    """
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        print("vLLM: not installed, skipped")
        return None
    from evomerge.errors import BackendError, ConfigError

    opts = {"kv_cache_space": 1, "block_size": 32}
    t0 = time.perf_counter()
    try:
        backend = make_backend("vllm", model_dir=str(zoo.base.path), batch_size=256, **opts)
    except ConfigError as err:
        print(f"vLLM: installed, but no vllm backend is registered yet ({err}); skipped")
        return None
    except BackendError as err:  # e.g. the test zoo's 8-wide heads: CPU attention needs >= 32
        print(f"vLLM: cannot serve this zoo's model here ({err}); skipped")
        return None
    start_s = time.perf_counter() - t0
    mat = Materializer(cache_sources=True)
    try:
        r = bench_backend(backend, plans, tasks, mat)
        swaps = []
        for plan in (plans * repeats)[: max(repeats, len(plans))]:
            backend.load_plan(plan, mat)
            swaps.append(dict(backend.last_swap))
    finally:
        t1 = time.perf_counter()
        backend.close()
        close_s = time.perf_counter() - t1

    # a plain copy of the same bytes: every checkpoint tensor, preallocated, on vLLM's device
    reader = open_checkpoint(zoo.base.path)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    srcs = [reader.get(n, device=dev).to(torch.float32) for n in reader.names]
    dsts = [torch.empty_like(t) for t in srcs]
    nbytes = sum(t.numel() * t.element_size() for t in srcs)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    copies = []
    for _ in range(repeats):
        t2 = time.perf_counter()
        with torch.no_grad():
            for d, s in zip(dsts, srcs):
                d.copy_(s)
        sync()
        copies.append(time.perf_counter() - t2)
    del srcs, dsts

    # a new engine per candidate: write the merge, start vLLM on it, score, stop
    out = tmp / "vllm-roundtrip"
    t3 = time.perf_counter()
    Materializer().materialize_to_disk(plans[0], out, overwrite=True)
    t4 = time.perf_counter()
    fresh = make_backend("vllm", model_dir=str(out), batch_size=256, **opts)
    t5 = time.perf_counter()
    fresh_fit = combined_fitness(fresh.evaluate(tasks), {t.name: t.weight for t in tasks})
    t6 = time.perf_counter()
    fresh.close()
    t7 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)

    swap_s = statistics.median(s["seconds"] for s in swaps)
    copy_s = min(copies)
    new_engine_s = (t5 - t3) + (t7 - t6)  # write + start + stop (scoring excluded)
    res = {
        **r,
        "engine_start_s": start_s,
        "engine_close_s": close_s,
        "bytes": nbytes,
        "swap_median_s": swap_s,
        "swap_check_s": statistics.median(s["check_s"] for s in swaps),
        "swap_worker_s": statistics.median(s["worker_s"] for s in swaps),
        "copy_s": copy_s,
        "swap_over_copy": swap_s / copy_s,
        "write_s": t4 - t3,
        "new_engine_start_s": t5 - t4,
        "new_engine_stop_s": t7 - t6,
        "new_engine_s": new_engine_s,
        "new_engine_over_swap": new_engine_s / swap_s,
        "new_engine_fitness_equal": abs(fresh_fit - r["fitness"][0]) < 1e-12,
    }
    if hf_fitness is not None:
        res["fitness_equal_to_hf"] = sum(abs(a - b) < 1e-12 for a, b in zip(r["fitness"], hf_fitness))
        res["fitness_max_abs_diff_vs_hf"] = max(abs(a - b) for a, b in zip(r["fitness"], hf_fitness))
    return res


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", choices=["auto", "full", "test"], default="auto")
    ap.add_argument("--tasks", default="combined", help="comma-separated zoo task names")
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--api-repeats", type=int, default=2)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--first-fraction", type=float, default=0.25)
    ap.add_argument("--bound", choices=["hoeffding", "bernstein"], default="hoeffding")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"torch_threads": args.threads,
                               "device": "cuda" if torch.cuda.is_available() else "cpu"}

    with tempfile.TemporaryDirectory(prefix="evomerge-bench-") as tmpd:
        tmp = Path(tmpd)
        zoo = get_zoo(args.zoo)
        tasks = load_zoo_tasks(zoo, [s.strip() for s in args.tasks.split(",") if s.strip()])
        n_examples = sum(len(t.examples()) for t in tasks)
        plans = random_plans(zoo, args.candidates, args.seed)
        results.update(zoo=zoo.variant, tasks=[t.name for t in tasks], examples=n_examples)
        print(f"zoo {zoo.variant} ({zoo.root}); tasks {', '.join(t.name for t in tasks)}: "
              f"{n_examples} examples per candidate; {len(plans)} candidates; device {results['device']}")

        mat = Materializer(cache_sources=True)
        hf = make_backend("hf", model_dir=str(zoo.base.path), batch_size=256)
        try:
            r = bench_backend(hf, plans, tasks, mat)
            results["hf"] = r
            print(f"\n[1] HF backend: {fmt(r['candidates_per_min'])} candidates/min "
                  f"({fmt(r['candidate_s'] * 1000, ' ms')} each: swap {fmt(r['swap_s'] * 1000, ' ms')}, "
                  f"score {fmt(r['score_s'] * 1000, ' ms')}); fitness range "
                  f"{min(r['fitness']):.3f}..{max(r['fitness']):.3f}")

            s = bench_swap(hf, plans, mat, tmp)
            results["swap"] = s
            print(f"[2] weight swap ({s['bytes'] / 1e6:.2f} MB): materialize_into {fmt(s['swap_s'] * 1000, ' ms')}"
                  f" vs plain copy {fmt(s['copy_s'] * 1000, ' ms')} ({s['copy_GBps']:.2f} GB/s) = "
                  f"{s['swap_over_copy']:.1f}x; new engine: write {fmt(s['write_s'] * 1000, ' ms')} + "
                  f"load {fmt(s['new_engine_s'] * 1000, ' ms')} = {s['roundtrip_over_swap']:.1f}x the swap")

            rows = bench_api(str(zoo.base.path), tasks, args.api_repeats, [
                {"prompts_per_request": 1, "concurrency": 4},
                {"prompts_per_request": 16, "concurrency": 2},
                {"prompts_per_request": 64, "concurrency": 2},
            ])
            hf.load_plan(identity_plan(zoo), mat)  # the same fixed model, scored in process
            hf.evaluate(tasks)
            t_hf = []
            for _ in range(args.api_repeats):
                t1 = time.perf_counter()
                hf.evaluate(tasks)
                t_hf.append(time.perf_counter() - t1)
            results["api"] = rows
            results["hf_fixed_model_candidate_s"] = statistics.mean(t_hf)
            print(f"[3] API backend via evomerge serve (fixed base model; HF in process: "
                  f"{fmt(60 / statistics.mean(t_hf))} candidates/min):")
            for row in rows:
                print(f"    prompts/request {row['prompts_per_request']:>3}, concurrency {row['concurrency']}: "
                      f"{fmt(row['candidates_per_min'])} candidates/min ({fmt(row['candidate_s'] * 1000, ' ms')} each, "
                      f"{row['requests']} requests, {row['retries']} retries)")

            print(f"[4] racing ({args.bound} bound, confidence {args.confidence}, first slice "
                  f"{args.first_fraction:.0%}):")
            racing_sets = {"zoo tasks": tasks, "neg_perplexity of the same examples": [likelihood_variant(tasks[0], tmp)]}
            results["racing"] = {}
            for label, race_tasks in racing_sets.items():
                rr = bench_racing(hf, plans, race_tasks, mat, args.confidence, args.first_fraction, args.bound)
                results["racing"][label] = rr
                print(f"    {label}: {rr['cut']}/{rr['candidates']} cut, {rr['saved']}/{rr['full_cost']} example "
                      f"evaluations saved ({rr['fraction_saved']:.1%}); wall {fmt(rr['race_s'])} s vs full "
                      f"{fmt(rr['full_s'])} s; best {'same' if rr['same_best'] else 'DIFFERENT'} "
                      f"({rr['race_best']:.4f} vs {rr['full_best']:.4f})")
        finally:
            hf.close()
        sr = synthetic_racing(200, args.confidence, args.first_fraction, args.seed, args.bound)
        results["racing_synthetic"] = sr
        print(f"    synthetic replay (200 candidates, 2 x 240 Bernoulli examples): {sr['cut']} cut, "
              f"{sr['fraction_saved']:.1%} of example evaluations saved; best "
              f"{'same' if sr['same_best'] else 'DIFFERENT'} as full evaluation")

        print("\n[5] vLLM")
        hf_fit = results["hf"]["fitness"]
        results["vllm"] = bench_vllm(zoo, plans, tasks, tmp, hf_fit)
        if results["vllm"] is not None:
            v, h = results["vllm"], results["hf"]
            print(f"    vLLM backend: {fmt(v['candidates_per_min'])} candidates/min vs HF "
                  f"{fmt(h['candidates_per_min'])} ({fmt(v['candidate_s'] * 1000, ' ms')} each: swap "
                  f"{fmt(v['swap_s'] * 1000, ' ms')}, score {fmt(v['score_s'] * 1000, ' ms')}); engine "
                  f"start {fmt(v['engine_start_s'], ' s')}, stop {fmt(v['engine_close_s'], ' s')}")
            print(f"    fitness equal to HF for {v['fitness_equal_to_hf']}/{len(hf_fit)} candidates "
                  f"(max |diff| {v['fitness_max_abs_diff_vs_hf']:.2g})")
            print(f"    weight swap ({v['bytes'] / 1e6:.2f} MB): {fmt(v['swap_median_s'] * 1000, ' ms')} "
                  f"(plan check {fmt(v['swap_check_s'] * 1000, ' ms')}, worker "
                  f"{fmt(v['swap_worker_s'] * 1000, ' ms')}) vs plain copy "
                  f"{fmt(v['copy_s'] * 1000, ' ms')} = {v['swap_over_copy']:.1f}x; new engine: write "
                  f"{fmt(v['write_s'] * 1000, ' ms')} + start {fmt(v['new_engine_start_s'], ' s')} + stop "
                  f"{fmt(v['new_engine_stop_s'], ' s')} = {v['new_engine_over_swap']:.0f}x the swap "
                  f"(same fitness: {v['new_engine_fitness_equal']})")

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
