"""Merge operators: hand-computed results, invariants, mergekit-style references, and the
validation errors a user can cause."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evomerge.errors import PlanError
from evomerge.ops import OpContext, get_op, list_ops
from evomerge.ops import order_stats as ost
from evomerge.ops import sparsify as sp
from evomerge.ops.spherical import mergekit_slerp_coefficients, slerp_coefficients
from evomerge.ops.task_vectors import lines_scale
from evomerge.plan import MergePlan, TensorRef, TensorStep

torch.set_num_threads(1)


def step(op: str, n_inputs: int, with_base: bool = False, **params) -> TensorStep:
    return TensorStep(
        output="w",
        op=op,
        inputs=[TensorRef(f"m{i}", "w") for i in range(n_inputs)],
        base=TensorRef("base", "w") if with_base else None,
        params=params,
    )


def run(op: str, tensors, base=None, seed: int = 0, **params) -> torch.Tensor:
    """Validate a step like a plan would, then call the operator like the materializer."""
    tensors = [torch.as_tensor(t, dtype=torch.float32) for t in tensors]
    if base is not None:
        base = torch.as_tensor(base, dtype=torch.float32)
    s = step(op, len(tensors), base is not None, **params)
    spec = get_op(op)
    spec.validate(s)
    resolved = spec.resolve_params(s)
    ctx = OpContext(name="w", generator=torch.Generator().manual_seed(seed))
    return spec.fn(tensors, base, resolved, ctx)


def distinct(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Random values with pairwise distinct magnitudes (so top-k sets are unambiguous)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    mags = (torch.randperm(n, generator=g).float() + 1.0) / n
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return (mags * signs * scale).reshape(shape)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force streaming with many chunks and sampled selection on small tensors."""
    monkeypatch.setattr(sp, "CPU_CHUNK", 1000)
    monkeypatch.setattr(ost, "DIRECT_SELECT_MAX", 256)
    monkeypatch.setattr(ost, "SAMPLE_MIN", 512)
    monkeypatch.setattr(ost, "SAMPLE_MAX", 512)


# ------------------------------------------------------------------------------------------
# mergekit-style references (stack + argsort), written plainly
# ------------------------------------------------------------------------------------------
def ref_topk(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel())
    mask[torch.argsort(delta.abs().reshape(-1), descending=True)[:k]] = 1
    return delta * mask.reshape(delta.shape)


def ref_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    if density >= 1:
        return delta
    n = delta.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    order = torch.argsort(delta.abs().reshape(-1))
    mask = torch.zeros(n)
    mask[order[n_bot:n - n_top]] = 1
    return delta * mask.reshape(delta.shape)


def ref_gta(tensors, base, weights, deltas=None, consensus=False, normalize=False, lam=1.0):
    if deltas is None:
        deltas = [t - base for t in tensors]
    D = torch.stack(deltas)
    W = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * base.dim()))
    wd = D * W
    if consensus:
        majority = (wd.sum(0) >= 0).float() * 2 - 1
        mask = (wd.sign() == majority).float()
        mixed = (wd * mask).sum(0)
        div = (W * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = W.sum(0)
        div[div.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


# ------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------
def test_every_operator_is_registered():
    assert set(list_ops()) >= {
        "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
        "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock", "passthrough",
        "lines", "m2n2_crossover",
    }
    for name in list_ops():
        assert get_op(name).doc, f"{name} has no docstring"


# ------------------------------------------------------------------------------------------
# linear
# ------------------------------------------------------------------------------------------
def test_linear_hand_computed():
    a, b = [1.0, 2.0], [3.0, 4.0]
    out = run("linear", [a, b], weight=[1.0, 3.0])
    assert torch.allclose(out, torch.tensor([2.5, 3.5]))  # (1*a + 3*b) / 4
    out = run("linear", [a, b], weight=[1.0, 3.0], normalize=False)
    assert torch.allclose(out, torch.tensor([10.0, 14.0]))


def test_linear_identities():
    x = distinct((4, 5), 1)
    assert torch.equal(run("linear", [x], weight=0.3), x)
    assert torch.allclose(run("linear", [x, x, x], weight=[0.2, 0.5, 2.0]), x)
    # normalization: scaling every weight changes nothing
    y = distinct((4, 5), 2)
    assert torch.allclose(run("linear", [x, y], weight=[1, 2]), run("linear", [x, y], weight=[5, 10]))


# ------------------------------------------------------------------------------------------
# task arithmetic
# ------------------------------------------------------------------------------------------
def test_task_arithmetic_hand_computed():
    base = [0.0, 0.0, 1.0]
    x1, x2 = [1.0, 2.0, 1.0], [-1.0, 0.0, 3.0]
    # deltas [1,2,0], [-1,0,2]; 1*d1 + 0.5*d2 = [0.5, 2, 1]; lambda 2 -> [1, 4, 2]
    out = run("task_arithmetic", [x1, x2], base, weight=[1.0, 0.5], **{"lambda": 2.0})
    assert torch.allclose(out, torch.tensor([1.0, 4.0, 3.0]))
    out = run("task_arithmetic", [x1, x2], base, weight=[1.0, 0.5], normalize=True)
    assert torch.allclose(out, torch.tensor([0.5 / 1.5, 2 / 1.5, 1 + 1 / 1.5]))


def test_task_arithmetic_identities():
    base, x, y = distinct((6, 7), 1), distinct((6, 7), 2), distinct((6, 7), 3)
    assert torch.allclose(run("task_arithmetic", [x, y], base, weight=[0, 0]), base)
    assert torch.allclose(run("task_arithmetic", [x], base, weight=1.0), x)
    assert torch.allclose(run("task_arithmetic", [x, x], base, weight=[0.5, 0.5]), x)


# ------------------------------------------------------------------------------------------
# TIES
# ------------------------------------------------------------------------------------------
def test_ties_hand_computed_with_tie_at_threshold():
    base = torch.zeros(4)
    x1 = [3.0, -1.0, 2.0, -4.0]  # keeps 3 and -4
    x2 = [-2.0, 1.0, 1.0, 0.5]  # keeps -2 and the FIRST of the two 1s (exactly k = 2)
    out = run("ties", [x1, x2], base, weight=[1, 1], density=[0.5, 0.5])
    # sums [1, 1, 0, -4] -> signs + + + -; agreeing entries averaged
    assert torch.allclose(out, torch.tensor([3.0, 1.0, 0.0, -4.0]))


def test_ties_sign_election_uses_weighted_sum():
    base = torch.zeros(2)
    x1, x2 = [1.0, 1.0], [-3.0, -1.0]
    out = run("ties", [x1, x2], base, weight=[2.0, 1.0])
    # entry 0: 2*1 - 3 = -1 < 0 -> only x2 agrees: -3 / 1; entry 1: 2 - 1 > 0 -> 2*1 / 2
    assert torch.allclose(out, torch.tensor([-3.0, 1.0]))
    out = run("ties", [x1, x2], base, weight=[2.0, 1.0], normalize=False, **{"lambda": 0.5})
    assert torch.allclose(out, torch.tensor([-1.5, 1.0]))


def test_ties_density_one_is_sign_elected_mean():
    base = distinct((8, 9), 0)
    xs = [base + distinct((8, 9), s, 0.1) for s in (1, 2, 3)]
    out = run("ties", xs, base, weight=[1, 1, 1], density=1.0)
    d = torch.stack([x - base for x in xs])
    elected = torch.where(d.sum(0) >= 0, 1.0, -1.0)
    agree = (d.sign() == elected).float()
    expected = base + (d * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert torch.allclose(out, expected, atol=1e-6)


def test_ties_identities():
    base = distinct((5, 6), 0)
    x = base + distinct((5, 6), 1, 0.1)
    assert torch.allclose(run("ties", [x], base, density=1.0), x)
    assert torch.allclose(run("ties", [x, x, x], base, density=1.0), x)
    assert torch.allclose(run("ties", [x, x], base, weight=[0, 0], density=0.3), base)
    assert torch.allclose(run("ties", [x], base, density=0.0), base)


@pytest.mark.parametrize("shape", [(50,), (30, 40)])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_mergekit_reference(shape, normalize, small_chunks):
    base = distinct(shape, 10)
    xs = [base + distinct(shape, s, 0.1) for s in (11, 12, 13)]
    weights, dens = [1.0, 0.5, -0.7], [0.3, 0.55, 0.9]
    out = run("ties", xs, base, weight=weights, density=dens, normalize=normalize,
              **{"lambda": 1.3})
    deltas = [ref_topk(x - base, d) for x, d in zip(xs, dens)]
    expected = ref_gta(xs, base, weights, deltas, consensus=True, normalize=normalize, lam=1.3)
    assert torch.allclose(out, expected, atol=1e-5)


def test_ties_rescale_matches_l1_norm():
    base = torch.zeros(10)
    x = distinct((10,), 4)
    out = run("ties", [x], base, density=0.3, rescale=True)
    kept = ref_topk(x, 0.3)
    assert torch.allclose(out, kept * x.abs().sum() / kept.abs().sum(), atol=1e-6)


# ------------------------------------------------------------------------------------------
# exact selection
# ------------------------------------------------------------------------------------------
def test_kth_smallest_is_exact_with_heavy_ties(small_chunks):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 7, (5000,), generator=g).float()  # thousands of ties per value
    for r in (1, 2, 700, 2500, 4999, 5000):
        assert sp.kth_smallest(x, r) == torch.kthvalue(x, r).values.item()
    y = torch.randn(20000, generator=g)
    for r in (1, 37, 10000, 19999):
        assert sp.kth_smallest(y, r) == torch.kthvalue(y, r).values.item()


def test_topk_mask_keeps_exactly_k_with_ties(small_chunks):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 5, (3000,), generator=g).float()
    for k in (0, 1, 599, 1500, 2999, 3000):
        m = sp.topk_mask(x, k)
        assert int(m.sum()) == k
        if 0 < k < 3000:
            assert x[m].min() >= x[~m].max()
            # ties at the threshold are taken in flat index order
            thr = x[m].min()
            tied = (x == thr).nonzero().squeeze(1)
            kept_tied = m[tied]
            assert kept_tied[: int(kept_tied.sum())].all()


def test_selection_fallback_when_the_sample_bracket_misses(small_chunks, monkeypatch):
    monkeypatch.setattr(ost, "BRACKET", 0.0)  # a zero-width bracket almost always misses
    calls = []
    direct = ost._direct
    monkeypatch.setattr(ost, "_direct", lambda v, r: calls.append(r) or direct(v, r))
    y = torch.randn(4000, generator=torch.Generator().manual_seed(2))
    for r in (5, 1234, 3999):
        assert sp.kth_smallest(y, r) == torch.kthvalue(y, r).values.item()
    assert calls  # the exact fallback ran


def test_magnitude_and_outlier_masks_match_reference():
    x = distinct((40, 25), 5)
    assert torch.equal(sp.magnitude_mask(x, 0.37).float() * x, ref_topk(x, 0.37))
    assert torch.equal(sp.outlier_mask(x, 0.5, 0.05).float() * x, ref_outliers(x, 0.5, 0.05))
    assert int(sp.magnitude_mask(x, 0.29).sum()) == int(0.29 * 1000)  # mergekit's int()


def test_streamed_ties_equals_whole_tensor_masks(small_chunks):
    base = torch.zeros(6000)
    x = torch.randint(-3, 4, (6000,), generator=torch.Generator().manual_seed(3)).float()
    out = run("ties", [x], base, density=0.45)
    assert int((out != 0).sum()) == int((sp.magnitude_mask(x, 0.45).float() * x != 0).sum())
    assert torch.equal(out, sp.magnitude_mask(x, 0.45).float() * x)


# ------------------------------------------------------------------------------------------
# DARE
# ------------------------------------------------------------------------------------------
def test_dare_is_deterministic_per_seed_and_differs_across_seeds():
    base = torch.zeros(2000)
    xs = [distinct((2000,), 1), distinct((2000,), 2)]
    a = run("dare_ties", xs, base, seed=7, weight=[1, 1], density=[0.5, 0.5])
    b = run("dare_ties", xs, base, seed=7, weight=[1, 1], density=[0.5, 0.5])
    c = run("dare_ties", xs, base, seed=8, weight=[1, 1], density=[0.5, 0.5])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dare_drops_and_rescales():
    base = torch.ones(100_000)
    x = base + 1.0
    out = run("dare_linear", [x], base, density=0.3)
    delta = out - base
    kept = delta != 0
    assert torch.allclose(delta[kept], torch.full((int(kept.sum()),), 1 / 0.3))
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    no_rescale = run("dare_linear", [x], base, density=0.3, rescale=False) - base
    assert torch.equal(no_rescale != 0, kept) and torch.all(no_rescale[kept] == 1.0)


def test_dare_density_one_equals_task_arithmetic_and_ties():
    base = distinct((20, 30), 0)
    xs = [base + distinct((20, 30), s, 0.1) for s in (1, 2)]
    ta = run("task_arithmetic", xs, base, weight=[0.7, 0.4])
    assert torch.allclose(run("dare_linear", xs, base, weight=[0.7, 0.4], density=1.0), ta)
    ties = run("ties", xs, base, weight=[0.7, 0.4], density=1.0, normalize=False)
    assert torch.allclose(run("dare_ties", xs, base, weight=[0.7, 0.4], density=1.0), ties)


def test_dare_masks_are_nested_and_independent_of_other_inputs():
    base = torch.zeros(5000)
    ones = torch.ones(5000)
    lo = run("dare_linear", [ones], base, seed=3, density=0.3, rescale=False)
    hi = run("dare_linear", [ones], base, seed=3, density=0.6, rescale=False)
    assert torch.all(hi[lo != 0] == 1)  # a higher density keeps a superset
    # input 0's mask does not move when input 1's density or weight changes
    big = torch.full((5000,), 1000.0)
    a = run("dare_linear", [ones, big], base, seed=3, density=[0.5, 0.3], rescale=False)
    b = run("dare_linear", [ones, big], base, seed=3, density=[0.5, 0.8], rescale=False)
    c = run("dare_linear", [ones, big], base, seed=3, weight=[1, 0], density=[0.5, 0.8],
            rescale=False)
    assert torch.equal(a % 1000, b % 1000) and torch.equal(a % 1000, c)


def test_uniform_field_is_chunking_independent_and_matches_the_operator():
    whole = sp.UniformField(42).uniform(1001)
    field = sp.UniformField(42)
    parts = torch.cat([field.uniform(1), field.uniform(500), field.uniform(500)])
    assert torch.equal(whole, parts)
    assert 0.45 < float(whole.mean()) < 0.55
    # the operator's mask for input 0 is the field seeded from the step generator's 1st draw
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)))
    out = run("dare_linear", [torch.ones(3000)], torch.zeros(3000), seed=5, density=0.4)
    assert torch.equal(out != 0, sp.random_mask((3000,), 0.4, seed))


# ------------------------------------------------------------------------------------------
# breadcrumbs
# ------------------------------------------------------------------------------------------
def test_breadcrumbs_hand_computed():
    base = torch.zeros(10)
    x = torch.arange(1.0, 11.0)
    out = run("breadcrumbs", [x], base, density=0.5, gamma=0.1)
    # drop the top 1 (10) and the bottom 4 (1..4), keep 5..9
    assert torch.equal(out, torch.tensor([0, 0, 0, 0, 5, 6, 7, 8, 9, 0.0]))
    # gamma too large for the density: fewer outliers are dropped so 5 are kept
    out = run("breadcrumbs", [x], base, density=0.5, gamma=0.8)
    assert torch.equal(out, torch.tensor([1, 2, 3, 4, 5, 0, 0, 0, 0, 0.0]))
    # int(gamma n) == 0 drops no outlier (mergekit would keep nothing here)
    out = run("breadcrumbs", [x], base, density=0.3, gamma=0.01)
    assert torch.equal(out, torch.tensor([0, 0, 0, 0, 0, 0, 0, 8, 9, 10.0]))


def test_breadcrumbs_match_reference(small_chunks):
    base = distinct((40, 50), 20)
    xs = [base + distinct((40, 50), s, 0.1) for s in (21, 22)]
    w, dens, gam = [0.8, 1.2], [0.6, 0.4], [0.05, 0.1]
    deltas = [ref_outliers(x - base, d, g) for x, d, g in zip(xs, dens, gam)]
    out = run("breadcrumbs", xs, base, weight=w, density=dens, gamma=gam)
    assert torch.allclose(out, ref_gta(xs, base, w, deltas), atol=1e-5)
    out = run("breadcrumbs_ties", xs, base, weight=w, density=dens, gamma=gam)
    assert torch.allclose(out, ref_gta(xs, base, w, deltas, consensus=True), atol=1e-5)


# ------------------------------------------------------------------------------------------
# DELLA
# ------------------------------------------------------------------------------------------
def test_della_keep_probabilities_by_rank():
    x = torch.tensor([[0.1, -0.5, 0.3], [2.0, 1.0, -3.0]])
    p = sp.della_keep_probabilities(x, density=0.5, epsilon=0.1)
    assert torch.allclose(p, torch.tensor([[0.4, 0.6, 0.5], [0.5, 0.4, 0.6]]))
    assert torch.allclose(sp.della_keep_probabilities(torch.ones(3, 1), 0.5, 0.1),
                          torch.full((3, 1), 0.5))


def test_row_ranks_break_ties_by_index():
    x = torch.tensor([[0.3, 0.1, 0.3, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert torch.equal(sp.row_ranks(x), torch.tensor([[2.0, 1, 3, 0, 4], [0.0, 1, 2, 3, 4]]))
    y = distinct((30, 70), 3).abs()
    order = torch.argsort(y, dim=1)
    expected = torch.empty_like(y).scatter_(1, order, torch.arange(70.0).expand(30, 70))
    assert torch.equal(sp.row_ranks(y), expected)


def test_della_samples_by_rank_and_rescales():
    base = torch.zeros(200, 100)
    x = torch.arange(1.0, 101.0).repeat(200, 1)  # ranks 0..99 in every row
    out = run("della_linear", [x], base, density=0.5, epsilon=0.4)
    probs = sp.della_keep_probabilities(x, 0.5, 0.4)
    kept = out != 0
    assert torch.allclose(out[kept], (x / probs)[kept])  # each kept entry divided by its p
    freq = kept.float().mean(0)  # keep frequency rises with magnitude rank
    assert freq[:10].mean() < 0.25 and freq[-10:].mean() > 0.75
    again = run("della_linear", [x], base, density=0.5, epsilon=0.4)
    assert torch.equal(out, again)


def test_della_density_one_equals_ties_and_task_arithmetic():
    base = distinct((10, 12), 0)
    xs = [base + distinct((10, 12), s, 0.1) for s in (1, 2)]
    assert torch.allclose(run("della", xs, base, weight=[1, 0.5]),
                          run("ties", xs, base, weight=[1, 0.5]))
    assert torch.allclose(run("della_linear", xs, base, weight=[1, 0.5]),
                          run("task_arithmetic", xs, base, weight=[1, 0.5]))


def test_della_rejects_epsilon_outside_density_range():
    with pytest.raises(PlanError, match="epsilon=0.3 with density=0.2"):
        get_op("della").validate(step("della", 2, True, density=[0.5, 0.2], epsilon=0.3))


# ------------------------------------------------------------------------------------------
# SLERP
# ------------------------------------------------------------------------------------------
def ref_mergekit_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    v0, v1 = np.asarray(v0, dtype=np.float64), np.asarray(v1, dtype=np.float64)
    n0 = v0 / np.linalg.norm(v0) if np.linalg.norm(v0) > eps else v0
    n1 = v1 / np.linalg.norm(v1) if np.linalg.norm(v1) > eps else v1
    dot = np.sum(n0 * n1)
    if abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(dot)
    return np.sin(theta - theta * t) / np.sin(theta) * v0 + np.sin(theta * t) / np.sin(theta) * v1


def test_slerp_hand_computed_and_endpoints():
    a, b = [1.0, 0.0], [0.0, 1.0]
    out = run("slerp", [a, b], t=0.5)
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    assert torch.equal(run("slerp", [a, b], t=0.0), torch.tensor(a))
    assert torch.equal(run("slerp", [a, b], t=1.0), torch.tensor(b))
    # colinear vectors fall back to linear interpolation
    out = run("slerp", [[1.0, 2.0], [2.0, 4.0]], t=0.25)
    assert torch.allclose(out, torch.tensor([1.25, 2.5]))


def test_slerp_matches_mergekit_reference():
    a, b = distinct((12, 7), 1), distinct((12, 7), 2)
    for t in (0.1, 0.5, 0.8):
        out = run("slerp", [a, b], t=t)
        expected = ref_mergekit_slerp(t, a.numpy(), b.numpy())
        assert np.allclose(out.numpy(), expected, atol=1e-6)
    assert mergekit_slerp_coefficients(1.0, 1.0, 1.0, 0.3) == (0.7, 0.3)


# ------------------------------------------------------------------------------------------
# model_stock
# ------------------------------------------------------------------------------------------
def test_model_stock_hand_computed():
    base = torch.zeros(2)
    # orthogonal task vectors: cos 0 -> t 0 -> the base
    assert torch.allclose(run("model_stock", [[1.0, 0.0], [0.0, 1.0]], base), base)
    # cos = 1/sqrt(2): t = 2c / (1 + c); output t * mean
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    out = run("model_stock", [[1.0, 0.0], [1.0, 1.0]], base)
    assert torch.allclose(out, torch.tensor([t * 1.0, t * 0.5]))


def ref_model_stock(xs, base, filter_wise=False):
    """mergekit's model_stock, written plainly."""
    w0 = base if filter_wise else base.reshape(-1)
    ws = [x if filter_wise else x.reshape(-1) for x in xs]
    offs = [w - w0 for w in ws]
    cos = []
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            prod = torch.norm(offs[i], dim=-1) * torch.norm(offs[j], dim=-1)
            cos.append(((offs[i] * offs[j]).sum(-1) / prod.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    return (t * sum(ws) / n + (1 - t) * w0).reshape(base.shape)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit_reference(filter_wise, small_chunks):
    base = distinct((30, 40), 0)
    shared = distinct((30, 40), 9, 0.1)
    xs = [base + shared + distinct((30, 40), s, 0.05) for s in (1, 2, 3)]
    out = run("model_stock", xs, base, filter_wise=filter_wise)
    assert torch.allclose(out, ref_model_stock(xs, base, filter_wise), atol=1e-5)


def test_model_stock_identity_and_filter_wise():
    base = distinct((4, 6), 0)
    x = base + distinct((4, 6), 1, 0.1)
    assert torch.allclose(run("model_stock", [x, x, x], base), x, atol=1e-6)
    y = base + distinct((4, 6), 2, 0.1)
    fw = run("model_stock", [x, y], base, filter_wise=True)
    for i in range(4):  # one ratio per row equals the whole-tensor rule on that row
        row = run("model_stock", [x[i], y[i]], base[i])
        assert torch.allclose(fw[i], row, atol=1e-6)


# ------------------------------------------------------------------------------------------
# passthrough, LiNeS
# ------------------------------------------------------------------------------------------
def test_passthrough():
    x = distinct((3, 4), 0)
    assert torch.equal(run("passthrough", [x]), x)
    assert torch.allclose(run("passthrough", [x], scale=0.5), x * 0.5)


def test_lines_scale_grows_with_depth():
    assert lines_scale(0.2, 1.0, 0, 5) == pytest.approx(0.2)
    assert lines_scale(0.2, 1.0, 4, 5) == pytest.approx(1.0)
    assert lines_scale(0.2, 1.0, 2, 5) == pytest.approx(0.6)
    assert lines_scale(0.3, 1.0, 0, 1) == pytest.approx(0.3)
    base = torch.zeros(3)
    x1, x2 = [1.0, 2.0, 3.0], [1.0, 0.0, -1.0]
    out = run("lines", [x1, x2], base, weight=[1, 2], alpha=0.2, beta=1.0, layer=2,
              num_layers=5)
    assert torch.allclose(out, 0.6 * torch.tensor([3.0, 2.0, 1.0]))


def test_lines_validation():
    with pytest.raises(PlanError, match="layer=5 is out of range"):
        get_op("lines").validate(step("lines", 1, True, alpha=0, beta=1, layer=5, num_layers=5))
    with pytest.raises(PlanError, match="needs 'alpha'"):
        get_op("lines").validate(step("lines", 1, True, beta=1, layer=0, num_layers=5))
    with pytest.raises(PlanError, match="'beta' must be a finite number"):
        get_op("lines").validate(step("lines", 1, True, alpha=0, beta="x", layer=0,
                                      num_layers=5))


# ------------------------------------------------------------------------------------------
# M2N2 crossover
# ------------------------------------------------------------------------------------------
def np_slerp(w, x, y):
    """SLERP of M2N2's reference code (numpy port of natural_niches helper_fn.slerp)."""
    nx, ny = x / np.linalg.norm(x), y / np.linalg.norm(y)
    omega = np.arccos(np.clip(np.dot(nx, ny), -1, 1))
    so = np.sin(omega)
    if so <= 1e-6:
        return (1 - w) * x + w * y
    return np.sin((1 - w) * omega) / so * x + np.sin(w * omega) / so * y


def np_slerp_w_splitpoint(w, s, x, y):
    """M2N2's reference crossover: one angle over the whole vector, w before the split
    point and 1 - w after it (natural_niches helper_fn.slerp_w_splitpoint)."""
    val = np.where(np.arange(len(x)) < s, w, 1 - w)
    nx, ny = x / np.linalg.norm(x), y / np.linalg.norm(y)
    omega = np.arccos(np.clip(np.dot(nx, ny), -1, 1))
    so = np.sin(omega)
    if so <= 1e-6:
        return (1 - val) * x + val * y
    return np.sin((1 - val) * omega) / so * x + np.sin(val * omega) / so * y


def crossover(a, b, split, cb, ca):
    return run("m2n2_crossover", [a, b], split=split, coef_before=list(cb), coef_after=list(ca))


@pytest.mark.parametrize("split", [0, 1, 17, 59, 60])
def test_m2n2_crossover_matches_concat_of_part_slerps(split):
    rng = np.random.default_rng(split)
    a, b = rng.standard_normal(60), rng.standard_normal(60)
    w = 0.3
    expected = np.concatenate([
        np_slerp(w, a[:split], b[:split]) if split > 0 else np.zeros(0),
        np_slerp(1 - w, a[split:], b[split:]) if split < 60 else np.zeros(0),
    ])

    def coefs(x, y, t):
        if len(x) == 0:
            return (0.0, 0.0)
        return slerp_coefficients(float(x @ y), float(np.linalg.norm(x)),
                                  float(np.linalg.norm(y)), t)

    out = crossover(a, b, split, coefs(a[:split], b[:split], w), coefs(a[split:], b[split:], 1 - w))
    assert np.allclose(out.numpy(), expected, atol=1e-5)


def test_m2n2_crossover_matches_reference_code_on_a_tensor_grid():
    # a 2-D tensor is crossed over in its flattened order, with the whole-vector angle
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((6, 9)), rng.standard_normal((6, 9))
    w, split = 0.7, 23
    dot, na, nb = float(a.ravel() @ b.ravel()), np.linalg.norm(a), np.linalg.norm(b)
    out = crossover(a, b, split, slerp_coefficients(dot, na, nb, w),
                    slerp_coefficients(dot, na, nb, 1 - w))
    expected = np_slerp_w_splitpoint(w, split, a.ravel(), b.ravel()).reshape(6, 9)
    assert np.allclose(out.numpy(), expected, atol=1e-5)


def test_slerp_coefficients():
    assert slerp_coefficients(0.0, 1.0, 1.0, 0.0) == pytest.approx((1.0, 0.0))
    assert slerp_coefficients(0.0, 1.0, 1.0, 1.0) == pytest.approx((0.0, 1.0))
    assert slerp_coefficients(0.0, 2.0, 3.0, 0.5) == pytest.approx(
        (math.sqrt(0.5), math.sqrt(0.5)))
    assert slerp_coefficients(6.0, 2.0, 3.0, 0.25) == (0.75, 0.25)  # colinear: linear
    assert slerp_coefficients(0.0, 0.0, 3.0, 0.25) == (0.75, 0.25)  # zero vector: linear


def test_m2n2_crossover_split_out_of_range():
    with pytest.raises(PlanError, match="split=61 is beyond the tensor's 60 elements"):
        crossover(np.zeros(60), np.zeros(60), 61, (1, 0), (0, 1))
    with pytest.raises(PlanError, match="'coef_before' must be two finite numbers"):
        get_op("m2n2_crossover").validate(
            step("m2n2_crossover", 2, split=3, coef_before=[1.0], coef_after=[0.0, 1.0]))


# ------------------------------------------------------------------------------------------
# validation errors users can cause
# ------------------------------------------------------------------------------------------
def test_unknown_operator():
    with pytest.raises(PlanError, match="unknown merge operator 'tie'"):
        get_op("tie")


def test_wrong_number_of_per_model_values():
    with pytest.raises(PlanError, match="'density' has 2 values for 3 input models"):
        get_op("ties").validate(step("ties", 3, True, density=[0.5, 0.5]))


@pytest.mark.parametrize("op", ["ties", "dare_ties", "dare_linear", "breadcrumbs", "della"])
def test_density_out_of_range(op):
    with pytest.raises(PlanError, match=r"density=1.5 is out of range \[0.0, 1.0\]"):
        get_op(op).validate(step(op, 2, True, density=[0.5, 1.5]))


@pytest.mark.parametrize("op", ["task_arithmetic", "ties", "dare_ties", "model_stock", "lines"])
def test_missing_base(op):
    with pytest.raises(PlanError, match=f"operator '{op}' for tensor 'w' needs a base model"):
        get_op(op).validate(step(op, 2, False))


def test_other_parameter_errors():
    with pytest.raises(PlanError, match="takes 2 inputs, got 3"):
        get_op("slerp").validate(step("slerp", 3, t=0.5))
    with pytest.raises(PlanError, match=r"t=1.5 is out of range"):
        get_op("slerp").validate(step("slerp", 2, t=1.5))
    with pytest.raises(PlanError, match="needs 't'"):
        get_op("slerp").validate(step("slerp", 2))
    with pytest.raises(PlanError, match="'t' must be a number, got 'half'"):
        get_op("slerp").validate(step("slerp", 2, t="half"))
    with pytest.raises(PlanError, match="'weight' must be a finite number"):
        get_op("linear").validate(step("linear", 2, weight=[1.0, "heavy"]))
    with pytest.raises(PlanError, match="'normalize' must be true or false"):
        get_op("linear").validate(step("linear", 2, normalize="yes"))
    with pytest.raises(PlanError, match="sum to 0"):
        get_op("linear").validate(step("linear", 2, weight=[1.0, -1.0]))
    with pytest.raises(PlanError, match="unknown parameter"):
        get_op("linear").validate(step("linear", 2, densty=0.5))


def test_plan_validate_reports_operator_errors():
    plan = MergePlan(
        sources={"a": "/a", "b": "/b", "base": "/base"},
        base="base",
        steps=[TensorStep("w", "ties", [TensorRef("a", "w"), TensorRef("b", "w")],
                          TensorRef("base", "w"), {"density": [0.5, -0.1]})],
    )
    with pytest.raises(PlanError, match="density=-0.1 is out of range"):
        plan.validate()


def test_shape_mismatch_is_a_plan_error():
    with pytest.raises(PlanError, match="input shapes differ"):
        run("task_arithmetic", [torch.zeros(3), torch.zeros(4)], torch.zeros(3))


def test_order_statistics_many_matches_each_stream_alone(small_chunks):
    """Several streams selected together (one pool pass) give each stream's exact stats,
    per-chunk tie counts included, whatever the thread count."""
    g = torch.Generator().manual_seed(5)
    data = [torch.randn(9000, generator=g), torch.randint(0, 9, (4000,), generator=g).float(),
            torch.randn(200, generator=g)]  # the last is below DIRECT_SELECT_MAX: direct
    streams = []
    for x in data:
        n = x.numel()
        bounds = list(sp.chunk_bounds(n, 1000))
        streams.append(ost.Stream(n, [1, n // 3, n - 7, n], lambda s, e, x=x: x[s:e],
                                  lambda i, x=x: x[i], bounds))
    for threads in ("1", "2"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("EVOMERGE_MERGE_THREADS", threads)
            got = ost.order_statistics_many(streams)
        for x, st, stats in zip(data, streams, got):
            for r, stat in zip(st.ranks, stats):
                v = torch.kthvalue(x, r).values.item()
                assert (stat.rank, stat.value) == (r, v)
                assert stat.n_less == int((x < v).sum()) and stat.n_equal == int((x == v).sum())
                if stat.chunk_equal is not None:
                    assert list(stat.chunk_equal) == [int((x[s:e] == v).sum())
                                                      for s, e in st.bounds]


def test_sample_positions_are_sorted_and_one_per_stratum():
    for n, m in ((10**6, 1 << 14), (70001, 2048), (5000, 5000)):
        pos = ost.sample_positions(n, m)
        assert pos.numel() == m and int(pos.min()) >= 0 and int(pos.max()) < n
        assert bool((pos[1:] > pos[:-1]).all())  # strictly increasing: one per stratum
        assert torch.equal(pos, ost.sample_positions(n, m))  # fixed seed


def test_balanced_bounds_cover_in_a_multiple_of_four_chunks():
    for n in (1 << 20, 4 << 20, 2048 * 5632, 32000 * 2048, (1 << 20) + 3):
        b = list(sp.balanced_bounds(n, 1 << 20))
        assert b[0][0] == 0 and b[-1][1] == n
        assert all(e0 == s1 for (_, e0), (s1, _) in zip(b, b[1:]))
        assert all((e - s) % 4096 == 0 for s, e in b[:-1])
        assert max(e - s for s, e in b) <= (1 << 20) + 4096
        assert len(b) % 4 == 0


def test_order_statistics_discrete_values_settle_on_the_sample_estimate():
    """Few distinct values (as differences of bf16 numbers): the sample repeats its
    estimate, one count-only pass confirms it, and the stats are exact, ties per chunk
    included; continuous values never take that path and stay exact too."""
    g = torch.Generator().manual_seed(11)
    n = 300_000
    discrete = torch.randint(0, 40, (n,), generator=g).float() / 8
    continuous = torch.randn(n, generator=g)
    for x, expect_guess in ((discrete, True), (continuous, False)):
        bounds = list(sp.chunk_bounds(n, 70_000))
        st = ost.Stream(n, [1, n // 3, n // 2, n - 7], lambda s, e, x=x: x[s:e],
                        lambda i, x=x: x[i], bounds)
        brs = ost._brackets(st, None)
        assert all((br.guess is not None) == expect_guess for br in brs)
        for r, stat in zip(st.ranks, ost.order_statistics(st)):
            v = torch.kthvalue(x, r).values.item()
            assert (stat.rank, stat.value) == (r, v)
            assert stat.n_less == int((x < v).sum()) and stat.n_equal == int((x == v).sum())
            assert list(stat.chunk_equal) == [int((x[s:e] == v).sum()) for s, e in bounds]
