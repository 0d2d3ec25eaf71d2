"""The merge engine on CUDA (skipped without a CUDA device; `pytest -m cuda` selects these).

- exact selection: thresholds found on CUDA equal the CPU ones bit for bit;
- deterministic operators on CUDA agree with CPU to float32 rounding, with the same kept
  entries; random ones are reproducible per seed;
- the fused (torch.compile) elementwise pass equals the eager CUDA chunk loop to float32
  rounding, and bit for bit run uncompiled;
- the materializer writes a CUDA-resident model in place.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_expert, make_tiny_llama

from evomerge.checkpoint import CheckpointReader, clear_reader_cache
from evomerge.materialize import Materializer
from evomerge.ops import OpContext, get_op
from evomerge.ops import sparsify as sp
from evomerge.plan import MergePlan, TensorRef, TensorStep, step_seed

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DET = {
    "task_arithmetic": {"weight": [1.0, 0.5, -0.3]},
    "ties": {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.9]},
    "breadcrumbs": {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.9], "gamma": 0.05},
    "breadcrumbs_ties": {"weight": [1.0, -0.5, 0.7], "density": [0.5, 0.3, 0.9],
                         "gamma": 0.05},
}


class _Step:
    def __init__(self, params, n):
        self.params, self.inputs, self.output = params, [None] * n, "t"


def _inputs(shape, quantize=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    xs = [base + torch.randn(shape, generator=g) * 0.002 for _ in range(3)]
    if quantize:
        base, xs = base.bfloat16().float(), [x.bfloat16().float() for x in xs]
    return base, xs


def _run(op, params, base, xs, device):
    spec = get_op(op)
    p = spec.resolve_params(_Step(params, len(xs)))
    gen = torch.Generator(device=device).manual_seed(step_seed(3, "t"))
    with torch.no_grad():
        return spec.fn([x.to(device) for x in xs], base.to(device), p,
                       OpContext("t", gen, torch.device(device)))


@pytest.mark.parametrize("quantize", [False, True])
def test_selection_on_cuda_is_exact(quantize):
    base, xs = _inputs((1 << 20,), quantize)
    a = (xs[0] - base).abs()
    for r in (1, 1000, 1 << 19, 1 << 20):
        assert sp.kth_smallest(a.cuda(), r) == sp.kth_smallest(a, r)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("op", list(DET))
def test_deterministic_ops_on_cuda_match_cpu(op, quantize, monkeypatch):
    monkeypatch.setenv("EVOMERGE_FUSED", "0")
    base, xs = _inputs((1500, 1100), quantize)
    cpu = _run(op, DET[op], base, xs, "cpu")
    gpu = _run(op, DET[op], base, xs, "cuda").cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-7)
    assert torch.equal(gpu == base, cpu == base)  # the same entries kept


@pytest.mark.parametrize("op", ["dare_ties", "dare_linear", "della"])
def test_random_ops_on_cuda_are_reproducible(op, monkeypatch):
    monkeypatch.setenv("EVOMERGE_FUSED", "0")
    params = {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.7]}
    if op == "della":
        params["epsilon"] = 0.1
    base, xs = _inputs((700, 900))
    one, two = _run(op, params, base, xs, "cuda"), _run(op, params, base, xs, "cuda")
    assert torch.equal(one, two) and not torch.equal(one, base.cuda())


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("op", list(DET) + ["dare_ties"])
def test_fused_pass_on_cuda_equals_eager(op, quantize, monkeypatch):
    params = DET.get(op) or {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.9]}
    base, xs = _inputs((2048, 1536), quantize, seed=4)
    monkeypatch.setenv("EVOMERGE_FUSED", "0")
    eager = _run(op, params, base, xs, "cuda")
    monkeypatch.setenv("EVOMERGE_FUSED", "eager")
    assert torch.equal(_run(op, params, base, xs, "cuda"), eager)
    monkeypatch.setenv("EVOMERGE_FUSED", "1")
    fused = _run(op, params, base, xs, "cuda")
    from evomerge.ops import fused as fz

    assert not fz.compile_failed("cuda"), "torch.compile failed; the eager fallback ran"
    torch.testing.assert_close(fused, eager, rtol=1e-6, atol=1e-8)
    print(f"{op} quantize={quantize}: fused == eager bit for bit: {torch.equal(fused, eager)}, "
          f"max |diff| {float((fused - eager).abs().max()):.3g}")


def test_materialize_into_cuda_model(tmp_path):
    clear_reader_cache()
    base = make_tiny_llama(tmp_path / "base", seed=0)
    ex = [make_tiny_expert(base, tmp_path / f"e{i}", seed=i + 1, scale=0.05) for i in range(2)]
    names = CheckpointReader(base).names
    steps = [TensorStep(n, "ties", [TensorRef("e0", n), TensorRef("e1", n)],
                        base=TensorRef("base", n),
                        params={"weight": [1.0, 0.6], "density": [0.4, 0.7]}) for n in names]
    plan = MergePlan(sources={"base": str(base), "e0": str(ex[0]), "e1": str(ex[1])},
                     steps=steps, base="base")
    ref = dict(Materializer("cpu").iter_tensors(plan))
    target = {n: torch.zeros_like(t, device="cuda") for n, t in ref.items()}
    stats = Materializer("cuda", cache_sources=True, precompute=True).materialize_into(plan, target)
    assert stats["tensors"] == len(names)
    for n, t in ref.items():
        torch.testing.assert_close(target[n].cpu(), t, rtol=1e-5, atol=1e-7)
    clear_reader_cache()
