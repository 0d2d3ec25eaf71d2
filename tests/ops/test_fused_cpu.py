"""The compiled CPU kernel of the task-vector merges gives the same bits as eager.

``evomerge/ops/fused.py`` runs the elementwise part (and the counting pass of exact top-k
selection) through ``torch.compile`` on CPU for tensors of ``FUSED_CPU_MIN`` elements and
more, and eagerly below, with ``EVOMERGE_FUSED=0``, or when compiling fails. Which path runs
must never change a merge: these tests run each operator both ways on bf16 sources (many
deltas tie at the top-k threshold, so chunks with partial tie budgets are covered) and
compare bit for bit, and check that bf16 sources handed over as stored give the bits of the
widened float32 path rounded once.

Skipped where no C++ compiler is installed (inductor needs one); then only the eager path
exists and the other tests cover it.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from evomerge.ops import OpContext, fused, get_op
from evomerge.plan import step_seed

pytestmark = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                reason="torch.compile on CPU needs a C++ compiler")

N = fused.FUSED_CPU_MIN + 54_321  # compiled path; a short last chunk
OPS = {  # one flags combination each: every compile costs seconds
    "ties": {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.9]},
    "dare_linear": {"weight": [1.0, 0.5, -0.7], "density": [0.5, 0.3, 0.9]},
    "breadcrumbs_ties": {"weight": [1.0, -0.5, 0.7], "density": [0.5, 0.3, 0.9],
                         "gamma": 0.05},
}


class _Step:
    def __init__(self, params, n):
        self.params, self.inputs, self.output = params, [None] * n, "t"


def _sources(seed=5):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, generator=g) * 0.02
    xs = [base + torch.randn(N, generator=g) * 0.002 for _ in range(3)]
    return base.bfloat16(), [x.bfloat16() for x in xs]


def _run(op, base, xs, out_dtype=None):
    spec = get_op(op)
    params = spec.resolve_params(_Step(OPS[op], len(xs)))
    gen = torch.Generator().manual_seed(step_seed(3, "t"))
    ctx = OpContext("t", gen, torch.device("cpu"), out_dtype=out_dtype)
    with torch.no_grad():
        return spec.fn(xs, base, params, ctx)


@pytest.mark.parametrize("op", list(OPS))
def test_compiled_kernel_equals_eager_bit_for_bit(op, monkeypatch):
    base, xs = _sources()
    wide_base, wide_xs = base.float(), [x.float() for x in xs]
    monkeypatch.setenv("EVOMERGE_FUSED", "0")
    eager32 = _run(op, wide_base, wide_xs)  # the widened float32 path, as before
    eager16 = _run(op, base, xs, out_dtype=torch.bfloat16)
    monkeypatch.setenv("EVOMERGE_FUSED", "1")
    assert fused.fused_mode(torch.device("cpu"), N) == "compiled"
    compiled16 = _run(op, base, xs, out_dtype=torch.bfloat16)
    compiled32 = _run(op, wide_base, wide_xs)
    if fused.compile_failed("cpu"):
        pytest.fail("torch.compile failed on CPU; the eager fallback ran")
    assert eager32.dtype == torch.float32 and compiled16.dtype == torch.bfloat16
    assert torch.equal(compiled32, eager32)
    assert torch.equal(eager16, eager32.bfloat16())  # narrow inputs, rounded once
    assert torch.equal(compiled16, eager16)
    assert not torch.equal(eager32, wide_base)  # the merge did something


def test_small_tensors_stay_eager_until_a_kernel_is_compiled(monkeypatch):
    monkeypatch.setattr(fused, "_COMPILED_ON", set())
    cpu = torch.device("cpu")
    assert fused.fused_mode(cpu, fused.FUSED_CPU_MIN - 1) == "eager"
    fused._COMPILED_ON.add("cpu")  # a large tensor paid for the compile: small ones use it
    assert fused.fused_mode(cpu, fused.FUSED_CPU_MIN - 1) == "compiled"
    assert fused.fused_mode(cpu, fused.FUSED_WARM_MIN - 1) == "eager"


def test_a_thread_that_compiles_gets_the_kernels_settings(monkeypatch):
    """torch keeps compiler settings per thread, and kernels compile in whichever thread
    first runs them (pool threads, the resident writer's warm-up thread): every compile
    applies the settings in its own thread (FP contraction off, a recompile limit above
    dynamo's 8, which a variant past the 8th hit and sent the whole process to eager)."""
    import threading

    import torch._dynamo
    import torch._inductor.config as inductor_config

    seen = {}

    def call():
        b = torch.zeros(fused.FUSED_CPU_MIN)
        o = torch.empty_like(b)
        x = torch.ones_like(b)
        scal = fused.scalars([fused.ChunkCut()], [1.0], [1.0], 1.0, torch.float32, b.device)
        fused.run_kernel_into("compiled", o, b, [x], [None], scal, fused.KernelFlags())
        return o

    call()  # the compiled function exists (made in this thread)
    monkeypatch.setattr(fused, "_WARM", set())  # the next call of its shape may compile

    def worker():
        seen["out"] = call()
        seen["limit"] = torch._dynamo.config.recompile_limit
        seen["contract"] = inductor_config.cpp.enable_floating_point_contract_flag

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not fused.compile_failed("cpu")
    assert seen["limit"] >= 256 and seen["contract"] == "off"
    assert torch.equal(seen["out"], torch.ones(fused.FUSED_CPU_MIN))


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_count_many_gives_each_input_its_own_values_counts(mode):
    """The counting pass of exact selection for several inputs of one base: per input, per
    value, how many ``|x - b|`` are below and equal to it, whatever number of values each
    input asks for (breadcrumbs asks two per input, fewer where the sample settled one)."""
    base, xs = _sources(seed=9)
    n = 70_001
    b, xs = base[:n], [x[:n] for x in xs]
    deltas = [(x.float() - b.float()).abs() for x in xs]
    # values that occur (ties: bf16 differences are discrete) and one that does not
    values = [[float(deltas[0][17]), float(deltas[0][4])], [float(deltas[1][3])],
              [1e-3, float(deltas[2][99])]]
    got = fused.run_count_many(mode, b, xs, values, torch.float32)
    want = [[(int((d < v).sum()), int((d == v).sum())) for v in vals]
            for d, vals in zip(deltas, values)]
    assert got == want
    assert any(eq > 1 for row in want for _, eq in row)  # ties were counted


def test_count_many_compiles_one_graph_per_input_count_not_per_layout():
    """Which inputs ask for one value and which for two varies tensor by tensor; a graph per
    such layout compiled seconds each mid-merge. The values are padded to a common count:
    every layout of three inputs with up to two values runs one graph."""
    base, xs = _sources(seed=11)
    b, xs = base[: fused.FUSED_CPU_MIN], [x[: fused.FUSED_CPU_MIN] for x in xs]
    fused.run_count_many("compiled", b, xs, [[0.001, 0.002]] * 3, torch.float32)
    keys = set(fused._WARM)
    for values in ([[0.001], [0.001, 0.002], [0.003]], [[0.001, 0.002], [0.001], [0.002]],
                   [[0.004], [0.005], [0.003, 0.001]]):
        fused.run_count_many("compiled", b, xs, values, torch.float32)
    assert fused._WARM == keys
    assert not fused.compile_failed("cpu")
