"""The fast paths of the merge engine give exactly the direct results.

- chunk-parallel CPU execution (threads pull chunks from a queue): bit-for-bit equal to one
  thread, for every task-vector operator, including top-k cuts that keep only some of the
  elements equal to the threshold (bf16-quantized deltas) and DELLA's odd row lengths;
- positional random draws and per-chunk tie budgets equal the sequential streams;
- genome-independent statistics reused across candidates (sorted |delta| for top-k at any
  density, SLERP norms) give bit-for-bit the direct path, in the operators and through the
  materializer over real checkpoints;
- ``import evomerge`` and the local executor's modules do not need Ray, vLLM, fastapi or
  uvicorn.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_expert, make_tiny_llama

from evomerge.checkpoint import CheckpointReader, clear_reader_cache
from evomerge.materialize import Materializer
from evomerge.ops import OpContext, get_op
from evomerge.ops import sparsify as sp
from evomerge.ops.parallel import merge_threads, run_chunks
from evomerge.ops.precompute import SourceStats
from evomerge.plan import MergePlan, TensorRef, TensorStep, step_seed

ROOT = Path(__file__).resolve().parents[2]

OPS = {
    "task_arithmetic": {"weight": [1.0, 0.5, -0.3]},
    "ties": {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.9]},
    "ties+rescale": {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.9], "rescale": True},
    "dare_ties": {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.9]},
    "dare_linear": {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.9]},
    "breadcrumbs": {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.9], "gamma": 0.05},
    "breadcrumbs_ties": {"weight": [1.0, -0.5, 0.7], "density": [0.5, 0.3, 0.9],
                         "gamma": 0.05},
    "della": {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.7], "epsilon": 0.1},
}


class _Step:
    def __init__(self, params, n):
        self.params, self.inputs, self.output = params, [None] * n, "t"


def _inputs(shape, quantize, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    xs = [base + torch.randn(shape, generator=g) * 0.002 for _ in range(3)]
    if quantize:  # bf16 sources: many deltas equal the top-k threshold
        base, xs = base.bfloat16().float(), [x.bfloat16().float() for x in xs]
    return base, xs


def _run(op, base, xs, threads=None, stats=None, keys=("x0", "x1", "x2")):
    name = op.split("+")[0]
    spec = get_op(name)
    params = spec.resolve_params(_Step(OPS[op], len(xs)))
    gen = torch.Generator().manual_seed(step_seed(3, "t"))
    ctx = OpContext("t", gen, torch.device("cpu"))
    if stats is not None:
        ctx.stats, ctx.input_keys, ctx.base_key = stats, list(keys), "base"
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return spec.fn([x.clone() for x in xs], base.clone(), params, ctx)
    finally:
        torch.set_num_threads(prev)


CASES = [((1 << 19,), False), ((1 << 19,), True), ((700, 1301), True), ((1500, 1100), False)]


@pytest.mark.parametrize("shape,quantize", CASES)
@pytest.mark.parametrize("op", list(OPS))
def test_two_threads_equal_one_bit_for_bit(op, shape, quantize, monkeypatch):
    monkeypatch.delenv("EVOMERGE_MERGE_THREADS", raising=False)
    base, xs = _inputs(shape, quantize)
    one = _run(op, base, xs, threads=1)
    two = _run(op, base, xs, threads=2)
    assert torch.equal(one, two)
    assert not torch.equal(one, base)


def test_quantized_cases_exercise_partial_ties():
    """The bf16 case really has a threshold with only some ties kept (the sequential mode)."""
    base, xs = _inputs((1 << 19,), True)
    a = (xs[0] - base).abs().reshape(-1)
    n = a.numel()
    k = sp.magnitude_k(n, 0.5)
    (stat,) = sp.order_statistics(n, [n - k + 1], lambda s, e: a[s:e], lambda i: a[i])
    cut = sp.RankCut(n, k, stat, zero_ties_free=True)
    assert cut.sequential
    bounds = list(sp.chunk_bounds(n, 1 << 15))
    counts = [int((a[s:e] == cut.thr).sum()) for s, e in bounds]
    chunk_cuts = cut.for_chunks(counts)
    seq = cut.copy()
    # chunks in reverse order with their own budgets == the sequential stream
    par = {s: chunk_cuts[i].keep(a[s:e]) for i, (s, e) in reversed(list(enumerate(bounds)))}
    for s, e in bounds:
        assert torch.equal(par[s], seq.keep(a[s:e]))
    assert int(torch.cat([par[s] for s, _ in bounds]).sum()) == k


@pytest.mark.parametrize("seed", [1, 2**61 + 7])
def test_stored_high_bits_of_draws_keep_exactly_what_the_draws_keep(seed):
    """A worker keeps DARE streams' high 16 bits (precompute.DrawHighs); the keep masks it
    gives then equal fresh draws' at any density, those whose limit equals some draws'
    high bits (the draws compared whole, both halves of a word included) and 0 / 1 among
    them, and chunks not stored yet are drawn (and stored)."""
    from evomerge.ops.precompute import SourceStats

    n = 400_003
    bounds = [(s, min(n, s + 65_537)) for s in range(0, n, 65_537)]
    raw = sp.UniformField(seed)._raw_at(0, n)
    store = SourceStats().draw_highs(seed, n)
    assert SourceStats(budget_bytes=2 * n - 1).draw_highs(seed, n) is None  # over budget
    ties = [float((int(raw[i]) + k) / 2**32) for i in (3, 4, 1000, n - 1) for k in (-1, 0, 1)]
    for d in [0.4, 1e-9, 0.0, 1.0, 0.99999, *ties]:
        for s, e in bounds[:3] if d == 0.4 else bounds:  # the first density stores 3 chunks
            want = sp.UniformField(seed).keep_at(s, e, d)
            got = sp.UniformField(seed, highs=store).keep_at(s, e, d)
            assert got.dtype == torch.uint8 and torch.equal(got, want), (d, s)
    assert store.filled == set(bounds)
    assert np.array_equal(store.highs, (raw >> 16).astype(np.uint16))


def test_true_positions_of_a_sparse_mask_are_flatnonzero():
    from evomerge.ops.random_drop import _true_positions

    rng = np.random.default_rng(1)
    for n in (0, 1, 5, 1000, 100_000):
        for p in (0.0, 1e-4, 0.01, 0.5, 1.0):
            m = rng.random(n) < p
            for few in (1, 3, 64):  # past ``few`` of them, flatnonzero finds the rest
                assert _true_positions(m, few) == np.flatnonzero(m).tolist(), (n, p, few)


def test_positional_draws_equal_the_stream():
    f_seq, f_pos = sp.UniformField(1234), sp.UniformField(1234)
    bounds = [(0, 5), (5, 6), (6, 1001), (1001, 4000), (4000, 4001)]
    seq = [f_seq.keep(e - s, 0.4) for s, e in bounds]
    for (s, e), ref in reversed(list(zip(bounds, seq))):
        assert torch.equal(f_pos.keep_at(s, e, 0.4), ref)
    u_seq = sp.UniformField(9).uniform(4001)
    u_pos = torch.cat([sp.UniformField(9).uniform_at(s, e) for s, e in bounds])
    assert torch.equal(u_seq, u_pos)


def test_run_chunks_keeps_order_and_thread_choice(monkeypatch):
    bounds = list(sp.chunk_bounds(1000, 7))
    assert run_chunks(lambda s, e: (s, e), bounds, threads=2) == bounds
    monkeypatch.setenv("EVOMERGE_MERGE_THREADS", "1")
    assert merge_threads() == 1
    monkeypatch.setenv("EVOMERGE_MERGE_THREADS", "64")
    assert merge_threads() <= max(1, len(os.sched_getaffinity(0)))



@pytest.mark.skipif(not Path("/proc/loadavg").is_file(), reason="needs /proc/loadavg")
def test_thread_cap_follows_cpus_other_processes_hold(monkeypatch):
    from evomerge.ops.parallel import available_cpus, idle_cpus, threads_for_load

    cpus = available_cpus()
    original = torch.get_num_threads()
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    try:
        import time
        time.sleep(0.3)  # the neighbours are runnable now
        assert idle_cpus() == 1  # every CPU is held by a spinning neighbour
        torch.set_num_threads(max(2, cpus))
        prev = torch.get_num_threads()
        with threads_for_load("cpu"):
            assert torch.get_num_threads() == 1
            assert merge_threads() == 1
        assert torch.get_num_threads() == prev  # restored
        monkeypatch.setenv("EVOMERGE_MERGE_ADAPT", "0")
        assert idle_cpus() is None
        with threads_for_load("cpu"):
            assert torch.get_num_threads() == prev
    finally:
        torch.set_num_threads(original)
        for p in spin:
            p.kill()
            p.wait()

@pytest.mark.parametrize("shape,quantize", CASES)
@pytest.mark.parametrize("op", ["ties", "ties+rescale", "breadcrumbs", "breadcrumbs_ties"])
def test_precomputed_stats_equal_direct_path(op, shape, quantize):
    base, xs = _inputs(shape, quantize, seed=5)
    direct = _run(op, base, xs, threads=1)
    stats = SourceStats(budget_bytes=1 << 30)
    first = _run(op, base, xs, stats=stats)
    assert stats.summary()["tensors"] == 3 and stats.misses == 3
    again = _run(op, base, xs, stats=stats)  # the cached candidate
    assert stats.hits >= 3
    assert torch.equal(direct, first) and torch.equal(direct, again)


def test_precomputed_stats_at_other_densities_and_over_budget():
    base, xs = _inputs((900, 1000), True, seed=6)
    stats = SourceStats(budget_bytes=1 << 30)
    tight = SourceStats(budget_bytes=(900 * 1000 * 4) + 10)  # room for one input only
    for dens in ([0.1, 0.95, 0.5], [0.01, 0.2, 0.999], [0.7, 0.7, 0.7]):
        OPS["_d"] = {"weight": [1.0, 0.6, 0.8], "density": dens}
        try:
            spec = get_op("ties")
            params = spec.resolve_params(_Step(OPS["_d"], 3))
            outs = []
            for st in (None, stats, tight):
                ctx = OpContext("t", None, torch.device("cpu"))
                if st is not None:
                    ctx.stats, ctx.input_keys, ctx.base_key = st, ["a", "b", "c"], "base"
                outs.append(spec.fn(xs, base, params, ctx))
        finally:
            del OPS["_d"]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert tight.summary()["tensors"] == 1 and tight.used_bytes <= tight.budget_bytes


def test_slerp_reuses_norms_exactly():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 200, generator=g), torch.randn(300, 200, generator=g)
    spec = get_op("slerp")
    stats = SourceStats(budget_bytes=0)
    for t in (0.2, 0.7):
        params = spec.resolve_params(_Step({"t": t}, 2))
        direct = spec.fn([a, b], None, params, OpContext("t"))
        ctx = OpContext("t", stats=stats, input_keys=["a", "b"])
        assert torch.equal(spec.fn([a, b], None, params, ctx), direct)
    assert len(stats._slerp) == 1


def test_materializer_precompute_equals_streaming(tmp_path):
    clear_reader_cache()
    base = make_tiny_llama(tmp_path / "base", seed=0, dtype=torch.bfloat16)
    experts = [make_tiny_expert(base, tmp_path / f"e{i}", seed=i + 1, scale=0.05)
               for i in range(2)]
    names = CheckpointReader(base).names
    sources = {"base": str(base), "e0": str(experts[0]), "e1": str(experts[1])}

    def plan(method, params):
        steps = [TensorStep(n, method, [TensorRef("e0", n), TensorRef("e1", n)],
                            base=TensorRef("base", n), params=params) for n in names]
        return MergePlan(sources=sources, steps=steps, base="base", seed=1)

    fast = Materializer("cpu", cache_sources=True, precompute=True)
    plain = Materializer("cpu")
    for method, params in [("ties", {"weight": [1.0, 0.5], "density": [0.3, 0.8]}),
                           ("ties", {"weight": [0.2, 1.1], "density": [0.9, 0.05]}),
                           ("breadcrumbs_ties", {"weight": [1.0, 0.7], "density": [0.5, 0.4]}),
                           ("dare_ties", {"weight": [1.0, 0.7], "density": [0.5, 0.4]})]:
        p = plan(method, params)
        got, ref = dict(fast.iter_tensors(p)), dict(plain.iter_tensors(p))
        assert all(torch.equal(got[n], ref[n]) for n in ref), method
    assert fast.stats.hits > 0 and fast.stats.used_bytes > 0
    clear_reader_cache()


_BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {"ray", "vllm", "fastapi", "uvicorn"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {name}")
            return None
    sys.meta_path.insert(0, Block())
""")


def test_import_and_local_executor_need_no_ray_vllm_or_servers():
    code = _BLOCK + textwrap.dedent("""
        import evomerge, evomerge.cli, evomerge.materialize, evomerge.ops.builtin
        import evomerge.engine.executor, evomerge.engine.search, evomerge.engine.runner
        import evomerge.engine.evaluator, evomerge.fitness.backends.hf
        from evomerge.engine.executor import LocalExecutor
        from evomerge.fitness.backends import make_backend
        print("ok", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok []"


def test_quantized_stats_keep_exactly_k():
    base, xs = _inputs((1 << 17,), True, seed=2)
    stats = SourceStats(budget_bytes=1 << 30)
    fn = stats.magnitude_stats_fn("k", "base", xs[0], base)
    a = (xs[0] - base).abs().reshape(-1).numpy()
    for r in (1, 1000, 65536, a.size):
        (st,) = fn([r])
        assert st.value == float(np.partition(a, r - 1)[r - 1])
        assert st.n_less == int((a < st.value).sum()) and st.n_equal == int((a == st.value).sum())


def test_idle_cpus_ignores_a_momentary_neighbour_but_not_a_lasting_one(monkeypatch):
    """One reading of /proc/loadavg is a snapshot: a task runnable for a moment must not cap
    a merge on a quiet machine, while one that stays runnable (readings over the whole
    window) must."""
    from evomerge.ops import parallel

    clock = [1000.0]
    readings = iter([2, 1, 2, 1, 1, 1])
    monkeypatch.setattr(parallel, "_idle_now", lambda: next(readings))
    monkeypatch.setattr(parallel.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(parallel, "_READINGS", parallel.deque())
    monkeypatch.delenv("EVOMERGE_MERGE_ADAPT", raising=False)
    step = parallel.IDLE_WINDOW_S / 4
    seen = []
    for _ in range(6):
        seen.append(parallel.idle_cpus())
        clock[0] += step
    # every 1 has an idle reading (2) less than a window before it: blips, no cap
    assert seen == [2] * 6
    clock[0] += parallel.IDLE_WINDOW_S  # now a whole window holds only busy readings
    monkeypatch.setattr(parallel, "_idle_now", lambda: 1)
    assert parallel.idle_cpus() == 1
    monkeypatch.setenv("EVOMERGE_MERGE_ADAPT", "0")
    assert parallel.idle_cpus() is None


def test_precomputed_stats_count_ties_per_chunk():
    """With the merge's chunk bounds, a precomputed statistic says how many values equal to
    it each chunk holds (a tied top-k cut then needs no counting pass): the counts equal a
    direct count on every chunk, for equal chunks with a short last one."""
    from evomerge.ops.sparsify import chunk_bounds

    base, xs = _inputs((1 << 17,), True, seed=3)
    a = (xs[1] - base).abs().reshape(-1).numpy()
    bounds = list(chunk_bounds(a.size, 12_288))  # a multiple of the stats' block
    stats = SourceStats(budget_bytes=1 << 30)
    fn = stats.magnitude_stats_fn("k", "base", xs[1], base, bounds)
    ordered = np.sort(a)
    for r in (1, 777, 50_000, 100_003, a.size):
        (st,) = fn([r])
        assert st.value == float(ordered[r - 1])
        assert st.n_less == int((a < st.value).sum()) and st.n_equal == int((a == st.value).sum())
        if st.value == 0:  # a zero threshold never needs tie budgets: not counted
            assert st.chunk_equal is None
        else:
            assert st.chunk_equal == tuple(int((a[s:e] == st.value).sum()) for s, e in bounds)
    assert fn([1])[0].value == 0 and fn([a.size])[0].chunk_equal is not None
    assert max(fn([50_000])[0].chunk_equal) > 1  # quantized deltas: real ties
    # bounds that are not equal chunks (or not a multiple of the block), or no room for the
    # block ids: no per-chunk counts
    assert stats.magnitude_stats_fn("k2", "base", xs[1], base, [(0, 5), (5, a.size)])([9])[0].chunk_equal is None
    assert stats.magnitude_stats_fn("k2", "base", xs[1], base,
                                    list(chunk_bounds(a.size, 10_000)))([9])[0].chunk_equal is None
    tight = SourceStats(budget_bytes=a.size * 4 + 100)
    (st,) = tight.magnitude_stats_fn("k", "base", xs[1], base, bounds)([50_000])
    assert st.chunk_equal is None and st.n_equal == int((a == st.value).sum())



def test_run_inline_runs_items_here_and_leaves_torch_threads_alone():
    """A background thread (a worker's kernel warm-up) runs its work items itself: never
    queued behind the merge's items in the shared pool, and torch's thread count (which
    the merge's own blocks set and restore) untouched."""
    import threading

    from evomerge.ops.parallel import run_inline, run_items

    calls = []

    def work():
        with run_inline():
            calls.append(run_items(lambda x: (x, threading.current_thread().name,
                                              torch.get_num_threads()), [1, 2, 3]))

    prev = torch.get_num_threads()
    t = threading.Thread(target=work, name="bg")
    t.start()
    t.join()
    assert [x for x, _, _ in calls[0]] == [1, 2, 3]
    assert {name for _, name, _ in calls[0]} == {"bg"}
    assert {n for _, _, n in calls[0]} == {prev} and torch.get_num_threads() == prev
