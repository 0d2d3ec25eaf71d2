"""Merge throughput: evomerge's task-vector merges vs a plain copy vs mergekit, quiet and busy.

Builds random Llama-shaped checkpoints on disk (a base and three fine-tunes = base + small
noise, bf16), then, in one run, for each load condition (quiet; and with ``--busy N``, N
CPU-bound neighbour processes spinning during the timings) and each thread count:

1. copy: reads every input tensor of the merge from the same safetensors files and copies
   it once (``clone`` on CPU, host-to-device on CUDA): the memory-bandwidth floor;
2. evomerge in memory (every output tensor computed, nothing written): task arithmetic
   (the compute floor of reading the same sources), TIES, DARE-TIES and breadcrumbs at
   density 0.5, with seconds, GB/s of input bytes and the ratios TIES / task arithmetic;
3. mergekit (``--mergekit-bin``, ``$EVOMERGE_MERGEKIT_BIN`` or ``mergekit-yaml`` on PATH):
   the same TIES, DARE-TIES and breadcrumbs recipes (``--mergekit-methods``) run by
   ``mergekit-yaml`` to disk, against evomerge to disk and in memory.

Then, on a quiet machine, in fresh processes: the peak RSS of an in-memory merge into a
resident model (target <= 1.1 x (sources + output)) and of a streamed export (target <= one
model + one shard), and with ``--candidates K`` the per-candidate cost of a search worker
(sources cached, genome-independent statistics reused) vs a cold merge. On CUDA
(``--device cuda``) ``--resident`` times merges of sources already on the device against a
device-to-device copy of the same bytes (target >= 50%).

Targets (issue 14): TIES, DARE-TIES and breadcrumbs >= 5x mergekit quiet and busy; 2 threads >= 1.6x 1 thread quiet and
never slower busy; TIES within 3x of task arithmetic.

    .venv/bin/python benchmarks/merge_throughput.py --small --busy 2          # a few minutes
    .venv/bin/python benchmarks/merge_throughput.py --hidden 2048 --layers 8 \
        --intermediate 5632 --vocab 32000 --heads 16 --kv-heads 4 --busy 2     # 0.49 B shape

The models live in ``--workdir`` (a temporary directory by default) and are deleted at the
end unless ``--keep``. ``--json PATH`` also writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "benchmarks"):  # the package, and random_llama beside this script
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from random_llama import FINETUNES, SHAPES, build_models, tensor_shapes  # noqa: E402

from evomerge.checkpoint import clear_reader_cache, open_checkpoint  # noqa: E402
from evomerge.materialize import Materializer  # noqa: E402
from evomerge.recipe import compile_recipe, recipe_to_mergekit_yaml  # noqa: E402


# -- load --------------------------------------------------------------------------------
@contextlib.contextmanager
def neighbours(n: int):
    """``n`` CPU-bound processes spinning for the duration (other jobs on a shared machine)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        if procs:
            time.sleep(1.0)  # let the scheduler see them
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def loadavg() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- measurements ---------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _refs(step):
    return list(step.inputs) + ([step.base] if step.base is not None else [])


def copy_pass(plan, device: torch.device) -> tuple[float, int]:
    """Read every input of every step and copy it once: (seconds, bytes read)."""
    readers = {k: open_checkpoint(p) for k, p in plan.sources.items()}
    nbytes = 0
    _sync(device)
    t0 = time.perf_counter()
    for step in plan.steps:
        for ref in _refs(step):
            t = readers[ref.model].get(ref.tensor)
            out = t.clone() if device.type == "cpu" else t.to(device, non_blocking=False)
            nbytes += t.numel() * t.element_size()
            del out, t
    _sync(device)
    return time.perf_counter() - t0, nbytes


def merge_pass(plan, device: torch.device, mat: Materializer | None = None) -> tuple[float, int]:
    """Materialize every output tensor in memory (nothing written): (seconds, bytes read)."""
    mat = mat or Materializer(device=device)
    read0 = mat.bytes_read
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    for _, t in mat.iter_tensors(plan):
        n += 1
        del t
    _sync(device)
    assert n == len(plan.steps)
    return time.perf_counter() - t0, mat.bytes_read - read0


def disk_pass(plan, device: torch.device, out: Path) -> float:
    t0 = time.perf_counter()
    Materializer(device=device).materialize_to_disk(plan, out, shard_size="2GB", overwrite=True)
    return time.perf_counter() - t0


def mergekit_pass(mk_bin: str, recipe: dict, out: Path, device: torch.device, root: Path) -> float:
    cfg = root / f"mergekit_{recipe['merge_method']}.yaml"
    cfg.write_text(recipe_to_mergekit_yaml(recipe))
    cmd = [mk_bin, str(cfg), str(out), "--random-seed", "0", "--allow-crimes"]
    if device.type == "cuda":
        cmd.append("--cuda")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return seconds


METHODS = ("task_arithmetic", "ties", "dare_ties", "breadcrumbs")
MERGEKIT_METHODS = ("ties", "dare_ties", "breadcrumbs")  # the sparsifying merges issue 14 targets


def mergekit_compare(method: str, plan, dirs, device, root: Path, mk_bin: str, no_disk: bool,
                     in_memory_s: float, res: dict) -> None:
    """mergekit-yaml against evomerge on one recipe, both to disk (and evomerge in memory).

    Fills ``res[f"{method}_disk"]`` and ``res["mergekit"][method]`` (seconds)."""
    if not no_disk:
        res[f"{method}_disk"] = disk_pass(plan, device, root / "evomerge_out")
        shutil.rmtree(root / "evomerge_out", ignore_errors=True)
        print(f"{method + ' -> disk':24s} {res[f'{method}_disk']:8.2f} s  (evomerge, same recipe)")
    try:
        mk_s = mergekit_pass(mk_bin, _recipe(method, dirs), root / "mergekit_out", device, root)
    except RuntimeError as e:
        print(f"mergekit {method}: {e}")
        return
    finally:
        shutil.rmtree(root / "mergekit_out", ignore_errors=True)
    res.setdefault("mergekit", {})[method] = mk_s
    print(f"{'mergekit-yaml ' + method:24s} {mk_s:8.2f} s  (to disk, incl. start-up)")
    print(f"  mergekit / evomerge {method}: {mk_s / in_memory_s:.1f}x in memory"
          + ("" if no_disk else f", {mk_s / res[f'{method}_disk']:.1f}x both to disk")
          + "  (target >= 5x)")


def _recipe(method: str, dirs: dict[str, Path], weights=(1.0, 1.0, 1.0),
            densities=(0.5, 0.5, 0.5)) -> dict:
    models = []
    for n, w, d in zip(FINETUNES, weights, densities):
        p = {"weight": w}
        if method != "task_arithmetic":
            p["density"] = d
        models.append({"model": n, "parameters": p})
    return {
        "merge_method": method,
        "sources": {k: str(v) for k, v in dirs.items()},
        "base_model": "base",
        "models": models,
        "dtype": "bfloat16",
        "seed": 0,
    }


# -- memory (fresh processes) ---------------------------------------------------------------
class PeakAnon:
    """Samples the process's anonymous RSS (private memory; file pages of memory-mapped
    sources are reclaimable and counted separately by ru_maxrss)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.now())


def _vm_hwm() -> int:
    """Peak resident set of this process image (VmHWM: reset by exec, unlike ru_maxrss,
    which a child inherits from the parent it was forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_child(mode: str, root: Path) -> dict:
    dirs = {n: root / n for n in ("base", *FINETUNES)}
    plan = compile_recipe(_recipe("ties", dirs))
    src_bytes = sum(f.stat().st_size for d in dirs.values() for f in d.glob("*.safetensors"))
    out_bytes = src_bytes // len(dirs)
    start_anon = PeakAnon.now()
    start_max = _vm_hwm()
    if mode == "inmem":
        readers = {k: open_checkpoint(p) for k, p in plan.sources.items()}
        target = {}
        for step in plan.steps:
            ref = step.inputs[0]
            target[step.output] = torch.zeros(readers[ref.model].shape(ref.tensor),
                                              dtype=torch.bfloat16)
        with PeakAnon() as pa:
            Materializer("cpu").materialize_into(plan, target)
        bound = 1.1 * (src_bytes + out_bytes)
    else:
        with PeakAnon() as pa:
            Materializer("cpu").materialize_to_disk(plan, root / "rss_export", shard_size="1GB",
                                                    overwrite=True)
        shutil.rmtree(root / "rss_export", ignore_errors=True)
        bound = out_bytes + 2**30
    return {"mode": mode, "ru_maxrss": _vm_hwm(),
            "start_rss": start_max, "start_anon": start_anon, "peak_anon": pa.peak,
            "sources": src_bytes, "output": out_bytes, "bound": bound}


def rss_report(root: Path) -> list[dict]:
    rows = []
    for mode in ("inmem", "export"):
        proc = subprocess.run([sys.executable, __file__, "--rss-child", mode, "--workdir", str(root),
                               "--keep"], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"rss {mode}: failed: {proc.stderr.strip()[-500:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        gb = 1e9
        what = ("in-memory merge (sources + output)" if mode == "inmem"
                else "streamed export (one model + one 1 GB shard)")
        print(f"peak RSS {what}: {r['ru_maxrss'] / gb:.2f} GB (process start {r['start_rss'] / gb:.2f}),"
              f" private (anon) {r['peak_anon'] / gb:.2f} GB; sources {r['sources'] / gb:.2f} GB,"
              f" output {r['output'] / gb:.2f} GB; bound {r['bound'] / gb:.2f} GB: "
              f"{'OK' if r['ru_maxrss'] <= r['bound'] else 'OVER'} (total), "
              f"{'OK' if r['peak_anon'] <= r['bound'] else 'OVER'} (private)")
        rows.append(r)
    return rows


# -- per-candidate cost of a search worker --------------------------------------------------
def candidates_report(dirs: dict[str, Path], k: int, method: str = "ties") -> dict:
    """K candidates with random weights / densities into one resident target, as a search
    worker does: a cold materializer per candidate vs one worker materializer (sources
    cached, statistics precomputed and reused)."""
    rng = random.Random(0)
    recipes = [_recipe(method, dirs, [rng.uniform(0.3, 1.2) for _ in FINETUNES],
                       [rng.uniform(0.1, 0.9) for _ in FINETUNES]) for _ in range(k)]
    plans = [compile_recipe(r) for r in recipes]
    readers = {kk: open_checkpoint(p) for kk, p in plans[0].sources.items()}
    target = {s.output: torch.zeros(readers[s.inputs[0].model].shape(s.inputs[0].tensor),
                                    dtype=torch.bfloat16) for s in plans[0].steps}
    cold = []
    for p in plans[:2]:
        t0 = time.perf_counter()
        Materializer("cpu").materialize_into(p, target)
        cold.append(time.perf_counter() - t0)
    worker = Materializer("cpu", cache_sources=True, precompute=True)
    warm = []
    for p in plans:
        t0 = time.perf_counter()
        worker.materialize_into(p, target)
        warm.append(time.perf_counter() - t0)
    later = warm[1:] or warm
    res = {"method": method, "cold_s": min(cold), "first_worker_s": warm[0],
           "worker_mean_s": sum(later) / len(later), "stats": worker.stats.summary()}
    print(f"per candidate ({method}, {k} random genomes): cold merge {res['cold_s']:.2f} s; "
          f"search worker first {warm[0]:.2f} s (sources read + statistics), then "
          f"{res['worker_mean_s']:.2f} s each ({res['cold_s'] / res['worker_mean_s']:.1f}x); "
          f"statistics {res['stats']['mib']:.0f} MiB of a {res['stats']['budget_mib']:.0f} MiB budget")
    worker.clear_cache()
    return res


# -- CUDA: resident sources -----------------------------------------------------------------
def resident_report(plans: dict, device: torch.device) -> dict:
    """Merges of sources already on the device vs a device-to-device copy of the same bytes."""
    out = {}
    mat = Materializer(device=device, cache_sources=True)
    merge_pass(plans["task_arithmetic"], device, mat)  # fills the device cache
    cached = list(mat._cache.values())
    nbytes = sum(t.numel() * t.element_size() for t in cached)
    _sync(device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for t in cached:
            t.clone()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    copy_bw = nbytes / best / 1e9
    print(f"resident copy (device to device) {best:.3f} s, {nbytes / 1e9:.2f} GB, {copy_bw:.1f} GB/s")
    out["copy_gbps"] = copy_bw
    for m, plan in plans.items():
        merge_pass(plan, device, mat)  # warm-up (kernels, allocator)
        s = min(merge_pass(plan, device, mat)[0] for _ in range(2))
        bw = nbytes / s / 1e9
        print(f"resident {m:16s} {s:7.3f} s  {bw:7.1f} GB/s  {100 * bw / copy_bw:5.1f}% of copy "
              f"(target >= 50%)")
        out[m] = {"seconds": s, "gbps": bw, "fraction_of_copy": bw / copy_bw}
    mat.clear_cache()
    return out


# -- main ---------------------------------------------------------------------------------
def warm_up(plans, device, res: dict) -> None:
    """Merge one large tensor per method first: the compiled CPU kernel (ops/fused.py) is
    built on its first use in a process (seconds; inductor caches it on disk for later
    processes), which a search pays once per worker, not per candidate."""
    from evomerge.ops.fused import FUSED_CPU_MIN

    for m, plan in plans.items():
        big = [st for st in plan.steps if _numel(plan, st) >= FUSED_CPU_MIN][:1]
        if not big:
            continue
        one = copy.copy(plan)
        one.steps = big
        t0 = time.perf_counter()
        merge_pass(one, device)
        res[f"first_use_{m}"] = time.perf_counter() - t0
        print(f"{'first use ' + m:24s} {res[f'first_use_{m}']:8.2f} s  (one tensor; compiles "
              f"the fused kernel if not cached on disk)")


def _numel(plan, step) -> int:
    ref = step.inputs[0]
    shape = open_checkpoint(plan.sources[ref.model]).shape(ref.tensor)
    n = 1
    for d in shape:
        n *= d
    return n


def timings(plans, device, threads_list, dirs, root, mk_bin, no_disk, label,
            repeat: int = 2, mk_methods: tuple[str, ...] = ("ties",)) -> dict:
    """Every figure of one machine state; merge times are the best of ``repeat`` passes."""
    res: dict = {"load": loadavg()}
    print(f"--- {label}: {res['load']}")
    copy_pass(plans["ties"], device)  # warm the page cache (and CUDA context)
    copy_s, copy_b = min(copy_pass(plans["ties"], device) for _ in range(2))
    copy_bw = copy_b / copy_s / 1e9
    res["copy"] = {"seconds": copy_s, "gbps": copy_bw}
    print(f"{'copy':24s} {copy_s:8.2f} s  {copy_b / 1e9:7.2f} GB read  {copy_bw:7.2f} GB/s")
    warm_up(plans, device, res)
    for th in threads_list if device.type == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(th)
        for m, plan in plans.items():
            runs = [merge_pass(plan, device) for _ in range(max(1, repeat))]
            s, b = min(runs)
            res[f"{m}@{th}"] = s
            res[f"{m}@{th}_runs"] = [r[0] for r in runs]
            print(f"{m + f' ({th} thr)':24s} {s:8.2f} s  {b / 1e9:7.2f} GB read  "
                  f"{b / s / 1e9:7.2f} GB/s  {100 * b / s / 1e9 / copy_bw:5.1f}% of copy"
                  f"  (runs: {' '.join(f'{r[0]:.2f}' for r in runs)})")
        print(f"  TIES / task arithmetic ({th} thr): "
              f"{res[f'ties@{th}'] / res[f'task_arithmetic@{th}']:.2f}x (target <= 3x)")
    if device.type == "cpu" and len(threads_list) > 1:
        a, b = threads_list[0], threads_list[-1]
        print(f"  TIES {a} thr / {b} thr: {res[f'ties@{a}'] / res[f'ties@{b}']:.2f}x speed-up")
    torch.set_num_threads(threads_list[-1])
    if mk_bin:
        for m in mk_methods:
            mergekit_compare(m, plans[m], dirs, device, root, mk_bin, no_disk,
                             res[f"{m}@{threads_list[-1]}"], res)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="small preset (~78M params)")
    for k in ("hidden", "layers", "intermediate", "vocab", "heads", "kv_heads"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    ap.add_argument("--workdir", default=None, help="where the random models go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the models (reuse them with --workdir)")
    ap.add_argument("--mergekit-bin", default=None,
                    help="mergekit-yaml executable (default: $EVOMERGE_MERGEKIT_BIN or PATH)")
    ap.add_argument("--no-mergekit", action="store_true", help="skip the mergekit comparison")
    ap.add_argument("--mergekit-methods", default=None,
                    help="methods also run by mergekit-yaml (default: those of "
                         f"{','.join(MERGEKIT_METHODS)} in --methods; each ~2-4 min at 0.49 B)")
    ap.add_argument("--no-disk", action="store_true", help="skip the to-disk evomerge run")
    ap.add_argument("--threads", default="1,2", help="CPU thread counts to time, e.g. 1,2")
    ap.add_argument("--busy", type=int, default=0,
                    help="also time with N CPU-bound neighbour processes running")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=2,
                    help="merge passes per method and thread count; the best is reported")
    ap.add_argument("--busy-only", action="store_true",
                    help="with --busy: skip the quiet timings")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS measurements")
    ap.add_argument("--candidates", type=int, default=0,
                    help="time K search candidates (per-candidate cost with reused statistics)")
    ap.add_argument("--resident", action="store_true", help="CUDA: merge sources already on the device")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.rss_child:
        torch.set_num_threads(int(args.threads.split(",")[-1]))
        print(json.dumps(rss_child(args.rss_child, Path(args.workdir))))
        return 0
    shape = dict(SHAPES["small" if args.small else "default"])
    for k in shape:
        v = getattr(args, k)
        if v is not None:
            shape[k] = v
    threads_list = [int(x) for x in args.threads.split(",") if x.strip()]
    methods = [m for m in args.methods.split(",") if m.strip()]
    mk_methods = (tuple(m for m in MERGEKIT_METHODS if m in methods)
                  if args.mergekit_methods is None
                  else tuple(m for m in args.mergekit_methods.split(",") if m.strip()))
    unknown = [m for m in mk_methods if m not in methods]
    if unknown:
        print(f"--mergekit-methods: {', '.join(unknown)} not among --methods ({args.methods})", file=sys.stderr)
        return 2
    device = (torch.device("cuda" if torch.cuda.is_available() else "cpu")
              if args.device == "auto" else torch.device(args.device))
    params = sum(int(torch.Size(s).numel()) for _, s in tensor_shapes(**shape))
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="evomerge_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"shape {shape}: {params / 1e9:.3f} B params, {params * 2 / 1e9:.2f} GB per model (bf16); "
          f"device {device}; CPUs available {len(os.sched_getaffinity(0))}; models in {root}")
    figures: dict = {"shape": shape, "params": params, "device": str(device)}
    try:
        if all((root / n / "model.safetensors.index.json").is_file() for n in ("base", *FINETUNES)):
            dirs = {n: root / n for n in ("base", *FINETUNES)}
            print("reusing models")
        else:
            t0 = time.perf_counter()
            dirs = build_models(root, shape)
            print(f"built 4 models in {time.perf_counter() - t0:.1f} s")
        clear_reader_cache()
        plans = {m: compile_recipe(_recipe(m, dirs)) for m in methods}
        mk_bin = None
        if not args.no_mergekit:
            mk_bin = (args.mergekit_bin or os.environ.get("EVOMERGE_MERGEKIT_BIN")
                      or shutil.which("mergekit-yaml"))
            if mk_bin is None:
                print("mergekit: skipped (mergekit-yaml not found; set EVOMERGE_MERGEKIT_BIN)")
        if device.type == "cuda" and args.resident:
            figures["resident"] = resident_report(plans, device)
        if not (args.busy and args.busy_only):
            figures["quiet"] = timings(plans, device, threads_list, dirs, root, mk_bin,
                                       args.no_disk, "quiet (no neighbours started by this benchmark)",
                                       args.repeat, mk_methods)
        if args.busy:
            with neighbours(args.busy):
                figures["busy"] = timings(plans, device, threads_list, dirs, root, mk_bin,
                                          args.no_disk, f"busy: {args.busy} CPU-bound neighbours",
                                          args.repeat, mk_methods)
        if args.busy and "quiet" in figures:
            q, b = figures["quiet"], figures["busy"]
            for th in threads_list if device.type == "cpu" else []:
                print(f"TIES busy / quiet ({th} thr): {b[f'ties@{th}'] / q[f'ties@{th}']:.2f}x slower")
        if args.candidates and device.type == "cpu":
            figures["candidates"] = candidates_report(dirs, args.candidates)
        if not args.no_rss and device.type == "cpu":
            figures["rss"] = rss_report(root)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
    finally:
        clear_reader_cache()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
