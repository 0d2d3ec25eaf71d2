"""The resident write path (evomerge/resident.py, evomerge/ops/resident.py) against the plain one.

A worker that writes candidate after candidate into one resident model keeps task vectors
resident and skips tensors that already hold their step's result. Every test here runs a
sequence of real candidates through both paths and compares the weights bit for bit.
"""

from __future__ import annotations

import math
import os
import shutil
import threading

import pytest
import torch
from tiny_models import make_tiny_expert, make_tiny_llama, make_tiny_lora

from evomerge.checkpoint import CheckpointReader, clear_reader_cache
from evomerge.materialize import Materializer
from evomerge.ops import OpContext
from evomerge.ops.resident import (
    RESIDENT_CHUNK,
    ResidentDeltas,
    TAJob,
    run_task_arithmetic,
    task_arithmetic_alpha,
)
from evomerge.ops.task_vector_merge import generalized_task_arithmetic
from evomerge.plan import MergePlan, TensorRef, TensorStep

EXPERTS = ("b", "c", "lora")


@pytest.fixture(autouse=True)
def _fresh_readers():
    clear_reader_cache()
    yield
    clear_reader_cache()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base whose embedding spans two CPU chunks, two dense experts and a LoRA expert
    (its embeddings, norms and most projections equal the base: zero task vectors)."""
    root = tmp_path_factory.mktemp("resident")
    base = make_tiny_llama(root / "a", seed=0, hidden=64, vocab=2101)
    return {
        "a": base,
        "b": make_tiny_expert(base, root / "b", seed=1, scale=0.05),
        "c": make_tiny_expert(base, root / "c", seed=2, scale=0.05),
        "lora": make_tiny_lora(base, root / "lora", seed=3, target_modules=("q_proj", "v_proj")),
    }


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def make_plan(zoo, weights: dict, op: str = "task_arithmetic", dtype: str = "float32",
              **params) -> MergePlan:
    """One step per base tensor; ``weights[layer index or None]`` = per-expert weights."""
    names = CheckpointReader(zoo["a"]).names
    steps = [TensorStep(n, op, [TensorRef(k, n) for k in EXPERTS], base=TensorRef("a", n),
                        params={"weight": list(weights[layer_of(n)]), **params}) for n in names]
    return MergePlan(sources={k: str(zoo[k]) for k in ("a", *EXPERTS)}, steps=steps, base="a",
                     dtype=dtype)


def target_of(zoo, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zoo["a"]).eval().to(dtype)
    return model, dict(model.state_dict(keep_vars=True))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def assert_same_bits(got, want):
    for name in want:
        assert torch.equal(bits(got[name]), bits(want[name])), name


def candidates(zoo):
    """A search-like sequence: new weights, a candidate changing only layer 1, a repeat,
    TIES and linear merges in between, and back to task arithmetic."""
    w0 = {None: [1.0, 0.5, 0.7], 0: [0.3, 1.2, 0.9], 1: [1.5, 0.1, 0.4]}
    w1 = {**w0, 1: [0.2, 1.9, -0.3]}  # only layer 1 changes
    w2 = {None: [0.0, 2.0, 1.0], 0: [1.0, 1.0, 1.0], 1: [0.6, 0.0, 1.1]}
    return [
        make_plan(zoo, w0),
        make_plan(zoo, w1),
        make_plan(zoo, w1),
        make_plan(zoo, w2, normalize=True, **{"lambda": 0.8}),
        make_plan(zoo, w2, op="ties", density=0.5),
        make_plan(zoo, {k: [abs(x) + 0.1 for x in v] for k, v in w0.items()}, op="linear"),
        make_plan(zoo, w0),
    ]


def test_sequence_of_candidates_is_bit_for_bit_the_plain_path(zoo):
    _, fast_t = target_of(zoo)
    _, plain_t = target_of(zoo)
    fast = Materializer("cpu", cache_sources=True, precompute=True, resident=True)
    plain = Materializer("cpu", cache_sources=True, precompute=True)
    plans = candidates(zoo)
    stats = []
    for plan in plans:
        stats.append(fast.materialize_into(plan, fast_t))
        plain.materialize_into(plan, plain_t)
        assert_same_bits(fast_t, plain_t)
    first, only_layer1, repeat = stats[0], stats[1], stats[2]
    assert first["skipped"] == 0 and first["fused"] > 0
    # the dense experts change every tensor, so nothing is "the base" here: layer 0 and the
    # non-layer tensors are skipped because their genes did not change
    assert only_layer1["skipped"] == len(plans[1].steps) - sum(
        1 for n in plans[1].output_names if layer_of(n) == 1)
    assert repeat["skipped"] == repeat["tensors"] and repeat["bytes"] == 0
    assert stats[-1]["skipped"] == 0  # TIES and linear wrote every tensor in between


def test_dare_from_stored_draws_is_bit_for_bit_a_cold_merge(zoo):
    """A worker keeps the high bits of its DARE draws (precompute.DrawHighs): candidates at
    new densities and repeats give a cold merge's bits (fresh draws, no worker state)."""
    w = {None: [1.0, 0.5, 0.7], 0: [0.3, 1.2, 0.9], 1: [1.5, 0.1, 0.4]}
    _, fast_t = target_of(zoo)
    fast = Materializer("cpu", cache_sources=True, precompute=True, resident=True)
    for density in (0.5, 0.23, 0.5, 0.9):
        plan = make_plan(zoo, w, op="dare_ties", density=density)
        fast.materialize_into(plan, fast_t)
        _, cold_t = target_of(zoo)
        Materializer("cpu").materialize_into(plan, cold_t)
        assert_same_bits(fast_t, cold_t)
    assert fast.stats.summary()["mib"] > 0  # the draws' high bits are kept


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_narrow_target_runs_from_resident_task_vectors_bit_for_bit(zoo, dtype):
    """A bf16 / fp16 evaluation model: the resident path computes in float32 and rounds
    once on the write, the plain path's bits, for task arithmetic, TIES and breadcrumbs."""
    name = str(dtype).removeprefix("torch.")
    _, fast_t = target_of(zoo, dtype)
    _, plain_t = target_of(zoo, dtype)
    fast = Materializer("cpu", cache_sources=True, precompute=True, resident=True)
    plain = Materializer("cpu", cache_sources=True, precompute=True)
    w = {None: [1.0, 0.5, 0.7], 0: [0.3, 1.2, 0.9], 1: [1.5, 0.1, -0.4]}
    plans = [make_plan(zoo, w, dtype=name),
             make_plan(zoo, w, op="ties", dtype=name, density=[0.5, 0.3, 0.9]),
             make_plan(zoo, w, op="breadcrumbs_ties", dtype=name, density=[0.6, 0.5, 0.7],
                       gamma=0.02),
             make_plan(zoo, w, dtype=name, normalize=True, **{"lambda": 0.8})]
    for plan in plans:
        got = fast.materialize_into(plan, fast_t)
        plain.materialize_into(plan, plain_t)
        assert got["fused"] > 0  # from the resident task vectors, not the plain loop
        assert_same_bits(fast_t, plain_t)
        assert all(t.dtype == dtype for t in fast_t.values())
    # a target of another dtype than the plan's output takes the plain path, same bits
    _, f32_t = target_of(zoo)
    _, f32_plain = target_of(zoo)
    got = fast.materialize_into(plans[1], f32_t)
    plain.materialize_into(plans[1], f32_plain)
    assert got["fused"] == 0
    assert_same_bits(f32_t, f32_plain)


def test_ties_runs_from_resident_task_vectors_and_reports_its_setup(zoo):
    """TIES (and breadcrumbs) candidates run from the resident task vectors, every tensor's
    chunks in one batch: the same bits as the plain path, with the first candidate's
    one-time work (task vectors, sorted magnitudes) reported as setup and no later
    candidate repeating it."""
    _, fast_t = target_of(zoo)
    _, plain_t = target_of(zoo)
    fast = Materializer("cpu", cache_sources=True, precompute=True, resident=True)
    plain = Materializer("cpu", cache_sources=True, precompute=True)
    w = {None: [1.0, 0.5, 0.7], 0: [0.3, 1.2, 0.9], 1: [1.5, 0.1, 0.4]}
    plans = [make_plan(zoo, w, op="ties", density=[0.5, 0.3, 0.9]),
             make_plan(zoo, w, op="ties", density=[0.2, 0.95, 0.6]),
             make_plan(zoo, {k: v[::-1] for k, v in w.items()}, op="ties", density=0.4),
             make_plan(zoo, w, op="breadcrumbs_ties", density=[0.6, 0.5, 0.7], gamma=0.02)]
    stats, sorts = [], []
    for plan in plans:
        stats.append(fast.materialize_into(plan, fast_t))
        sorts.append(fast.stats.misses)
        plain.materialize_into(plan, plain_t)
        assert_same_bits(fast_t, plain_t)
    assert all(s["fused"] > 0 for s in stats)
    assert sorts[0] > 0 and sorts[-1] == sorts[0]  # every magnitude sorted once, up front
    assert stats[0]["setup_seconds"] > 0
    assert stats[1]["setup_seconds"] == 0 and stats[2]["setup_seconds"] == 0
    assert fast.resident.summary()["setup_seconds"] == pytest.approx(
        stats[0]["setup_seconds"] + stats[3]["setup_seconds"])
    assert fast.stats.summary()["tensors"] > 0  # the magnitudes were sorted once


def test_zero_task_vectors_are_written_once(zoo):
    """Only the LoRA expert: every tensor it does not touch is the base, whatever the
    weights, and is not written again by later candidates."""
    names = CheckpointReader(zoo["a"]).names
    lora_targets = [n for n in names if "q_proj" in n or "v_proj" in n]

    def plan(w):
        steps = [TensorStep(n, "task_arithmetic", [TensorRef("lora", n)], base=TensorRef("a", n),
                            params={"weight": [w]}) for n in names]
        return MergePlan(sources={"a": str(zoo["a"]), "lora": str(zoo["lora"])}, steps=steps,
                         base="a", dtype="float32")

    _, fast_t = target_of(zoo)
    _, plain_t = target_of(zoo)
    fast = Materializer("cpu", cache_sources=True, resident=True)
    plain = Materializer("cpu", cache_sources=True)
    for i, w in enumerate((0.5, 1.7, -0.4)):
        s = fast.materialize_into(plan(w), fast_t)
        plain.materialize_into(plan(w), plain_t)
        assert_same_bits(fast_t, plain_t)
        assert s["skipped"] == (0 if i == 0 else len(names) - len(lora_targets))
    summary = fast.resident.summary()
    assert summary["zero"] == len(names) - len(lora_targets)
    assert summary["tensors"] == len(lora_targets)


def test_a_tensor_written_behind_the_writers_back_is_rewritten(zoo):
    _, fast_t = target_of(zoo)
    _, plain_t = target_of(zoo)
    fast = Materializer("cpu", cache_sources=True, resident=True)
    plan = candidates(zoo)[0]
    fast.materialize_into(plan, fast_t)
    Materializer("cpu").materialize_into(plan, plain_t)
    with torch.no_grad():  # e.g. another tool writes the model: torch bumps the version
        fast_t["model.norm.weight"].add_(1.0)
        fast_t["model.layers.0.mlp.up_proj.weight"].zero_()
    s = fast.materialize_into(plan, fast_t)
    assert s["skipped"] == s["tensors"] - 2
    assert_same_bits(fast_t, plain_t)


def test_memory_budget_is_respected_and_results_unchanged(zoo):
    one = CheckpointReader(zoo["a"]).info("model.layers.0.mlp.up_proj.weight").numel * 4
    _, fast_t = target_of(zoo)
    _, plain_t = target_of(zoo)
    fast = Materializer("cpu", cache_sources=True, resident=True, resident_budget_bytes=3 * one)
    plain = Materializer("cpu", cache_sources=True)
    for plan in candidates(zoo)[:4]:
        fast.materialize_into(plan, fast_t)
        plain.materialize_into(plan, plain_t)
        assert_same_bits(fast_t, plain_t)
    s = fast.resident.summary()
    assert 0 < s["mib"] * 2**20 <= 3 * one
    assert s["over_budget"] > 0  # the rest subtracted on the fly


def test_changed_source_invalidates_the_cache(tmp_path, zoo):
    base = zoo["a"]
    expert = make_tiny_expert(base, tmp_path / "e", seed=5, scale=0.05)
    names = CheckpointReader(base).names
    plan = MergePlan(sources={"a": str(base), "e": str(expert)}, base="a", dtype="float32",
                     steps=[TensorStep(n, "task_arithmetic", [TensorRef("e", n)],
                                       base=TensorRef("a", n), params={"weight": [0.8]})
                            for n in names])
    _, fast_t = target_of(zoo)
    fast = Materializer("cpu", cache_sources=True, resident=True)
    fast.materialize_into(plan, fast_t)
    make_tiny_expert(base, expert, seed=6, scale=0.05)  # rebuilt in place: new files
    st = os.stat(expert / "model.safetensors")
    os.utime(expert / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s = fast.materialize_into(plan, fast_t)
    assert s["skipped"] == 0
    _, plain_t = target_of(zoo)
    Materializer("cpu").materialize_into(plan, plain_t)
    assert_same_bits(fast_t, plain_t)


@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 0.7), (True, -2.0)])
def test_fused_task_arithmetic_matches_the_direct_kernel(normalize, lam):
    """Tensors over several chunks with a ragged tail, signed zeros in the base, a zero
    task vector, a zero and a negative weight: every bit equal to the GTA kernel's."""
    n = 2 * RESIDENT_CHUNK + 13
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g)
    base[:50] = -0.0
    base[50:100] = 0.0
    xs = [base.clone(), base + 0.01 * torch.randn(n, generator=g),
          base + 0.02 * torch.randn(n, generator=g), torch.randn(n, generator=g)]
    xs[1][50:60] = -0.0  # -0 over a +0 base: a task vector entry of -0
    for weights in ([1.0, 0.5, 0.7, 0.2], [0.0, -1.5, 0.3, 1.0], [2.0, 0.0, 0.0, 0.0]):
        params = {"weight": weights, "lambda": lam, "normalize": normalize}
        want = generalized_task_arithmetic(xs, base, params, OpContext("t"), sparsification=None,
                                           consensus=False)
        deltas = ResidentDeltas()
        inputs = []
        for i, (x, w) in enumerate(zip(xs, weights)):
            if w == 0.0:
                continue
            d, kept = deltas.delta(f"x{i}", "base", lambda x=x: x, base)
            assert kept
            inputs.append(("zero", None, w) if not isinstance(d, torch.Tensor) else ("delta", d, w))
        assert (inputs[0][0] == "zero") == (weights[0] != 0.0)  # x0 equals the base
        out = torch.empty(n)
        run_task_arithmetic([TAJob(out, base, inputs, task_arithmetic_alpha(weights, lam, normalize))])
        assert torch.equal(bits(out), bits(want))


def test_delta_budget_refuses_what_does_not_fit():
    base = torch.zeros(1000)
    deltas = ResidentDeltas(budget_bytes=4000)
    d1, kept1 = deltas.delta("x1", "b", lambda: torch.ones(1000), base)
    d2, kept2 = deltas.delta("x2", "b", lambda: torch.full((1000,), 2.0), base)
    assert kept1 and not kept2 and deltas.refused("x2", "b")
    assert deltas.used_bytes == 4000 and torch.equal(d2, torch.full((1000,), 2.0))
    assert deltas.known("x1", "b") is d1
    assert math.isclose(deltas.summary()["mib"], 4000 / 2**20)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_the_first_candidate_finds_its_kernels_compiled_during_the_sorts(zoo, monkeypatch):
    """The one-time sorts of a TIES worker overlap the compile of the kernels its steps run
    (a thread started by ``prepare``): by the first chunk of every step, its graph is warm.
    Same bits as the plain path."""
    from evomerge.ops import fused
    from evomerge.ops import task_vector_merge as tvm
    from evomerge.resident import warm_kernels

    monkeypatch.setattr(fused, "_WARM", set())  # as in a fresh worker
    w = {None: [1.0, 0.5, 0.7], 0: [0.3, 1.2, 0.9], 1: [1.5, 0.1, -0.4]}
    plan = make_plan(zoo, w, op="ties", density=[0.5, 0.3, 0.9])
    _, fast_t = target_of(zoo)
    _, plain_t = target_of(zoo)
    warm = warm_kernels(Materializer("cpu"), plan, fast_t)
    assert warm is not None and len(warm.jobs) == 2  # layer 1 has a negative weight
    warm.join()
    Materializer("cpu", cache_sources=True, precompute=True).materialize_into(plan, plain_t)
    monkeypatch.setattr(fused, "_WARM", set())  # the plain path's graphs are others anyway
    cold = []
    real = tvm.run_kernel_into

    def spy(mode, o, b, xs, masks, scal, flags):
        key = fused._shape_key("gta_into", (o, b, xs, masks, scal, flags))
        warming = threading.current_thread().name == "evomerge-warm-kernels"
        # the resident writer's steps (from task vectors; steps with some zero task
        # vectors take the plain loop, which compiles as it always did)
        if mode == "compiled" and flags.given and o.storage_offset() == 0 and not warming:
            cold.append(key not in fused._WARM)
        return real(mode, o, b, xs, masks, scal, flags)

    monkeypatch.setattr(tvm, "run_kernel_into", spy)
    fast = Materializer("cpu", cache_sources=True, precompute=True, resident=True)
    got = fast.materialize_into(plan, fast_t)
    assert_same_bits(fast_t, plain_t)
    assert got["fused"] > 0 and got["setup_seconds"] > 0
    assert cold and not any(cold)  # every such step's first chunk ran a warm graph
