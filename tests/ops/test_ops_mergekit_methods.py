"""mergekit's newer merge methods (nuslerp, multislerp, karcher, sce, ram, ramplus_tl,
nearswap, arcee_fusion): results computed by hand on small tensors, invariants, and the
one-line errors. The same operators are checked against mergekit-yaml itself in
tests/recipe/test_recipe_mergekit_methods.py when mergekit is installed."""

from __future__ import annotations

import math

import pytest
import torch
from test_ops import run

from evomerge.errors import PlanError
from evomerge.ops.swap_fusion import fusion_importance, iqr_threshold

torch.set_num_threads(1)

R = math.sqrt(0.5)
E1, E2, E3 = torch.eye(3)


def close(x, y, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(x, dtype=torch.float32),
                               torch.as_tensor(y, dtype=torch.float32), rtol=0, atol=atol)


# -- nuslerp ------------------------------------------------------------------------------
def test_nuslerp_endpoints_and_midpoint():
    a, b = torch.tensor([3.0, 0.0, 1.0]), torch.tensor([0.0, 2.0, -1.0])
    close(run("nuslerp", [a, b], weight=[1.0, 0.0]), a)  # t = w1 / (w0 + w1) = 0
    close(run("nuslerp", [a, b], weight=[0.0, 2.0]), b)  # t = 1
    # orthogonal unit vectors at t = 0.5: the arc's midpoint (1/sqrt2, 1/sqrt2)
    close(run("nuslerp", [E1[:2], E2[:2]], weight=[1.0, 1.0]), [R, R])
    # weights summing to ~0: t = 0.5 (mergekit's fallback)
    close(run("nuslerp", [E1[:2], E2[:2]], weight=[1.0, -1.0]), [R, R])


def test_nuslerp_with_base_interpolates_task_vectors():
    base = torch.tensor([1.0, 1.0])
    a, b = base + torch.tensor([2.0, 0.0]), base + torch.tensor([0.0, 2.0])
    close(run("nuslerp", [a, b], base=base, weight=[1.0, 1.0]), base + 2 * torch.tensor([R, R]))
    close(run("nuslerp", [a, b], base=base, weight=[3.0, 0.0]), a)
    close(run("nuslerp", [a, b], base=base, weight=[0.0, 3.0]), b)


def test_nuslerp_rows_vs_flattened():
    # row 0: e1 -> e2 (90 degrees), row 1: identical rows (colinear -> lerp)
    a = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    # per last-dimension vector (flatten off, row_wise off)
    got = run("nuslerp", [a, b], weight=[1.0, 1.0], nuslerp_flatten=False)
    close(got, [[R, R], [2.0, 2.0]])
    # per column (row_wise: vectors along dim 0): column 0 is (1,2)->(0,2), column 1 (0,2)->(1,2)
    got = run("nuslerp", [a, b], weight=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    for j, (u, v) in enumerate([((1.0, 2.0), (0.0, 2.0)), ((0.0, 2.0), (1.0, 2.0))]):
        u, v = torch.tensor(u), torch.tensor(v)
        th = math.acos(float(u @ v) / (u.norm() * v.norm()))
        want = (math.sin(th / 2) * u + math.sin(th / 2) * v) / math.sin(th)
        close(got[:, j], want)


def test_nuslerp_flattened_equals_slerp_when_not_colinear():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    for t in (0.2, 0.5, 0.9):
        close(run("nuslerp", [a, b], weight=[1 - t, t]), run("slerp", [a, b], t=t), atol=1e-5)


def test_nuslerp_refuses_bad_steps():
    with pytest.raises(PlanError, match="needs 'weight'"):
        run("nuslerp", [E1, E2])
    with pytest.raises(PlanError, match="takes 2 inputs, got 3"):
        run("nuslerp", [E1, E2, E3], weight=1.0)


# -- multislerp ---------------------------------------------------------------------------
def test_multislerp_by_hand():
    close(run("multislerp", [E1, E2], weight=[1.0, 1.0]), [R, R, 0.0])  # = slerp at 0.5
    s3 = 1 / math.sqrt(3)
    close(run("multislerp", [E1, E2, E3], weight=[1.0, 1.0, 1.0]), [s3, s3, s3])
    # not normalized: weights (2, 2) on unit vectors scale the result by sum w_i |x_i| = 4
    close(run("multislerp", [E1, E2], weight=[2.0, 2.0], normalize_weights=False),
          [4 * R, 4 * R, 0.0])
    # norms: the weighted mean of the norms (2 and 4 -> 3) along the midpoint direction
    close(run("multislerp", [2 * E1, 4 * E2], weight=[1.0, 1.0]), [3 * R, 3 * R, 0.0])


def test_multislerp_one_weight_is_that_model_and_base_is_added_back():
    x = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.1, 2.0]), torch.tensor([-1.0, 0.0, 1.0])]
    close(run("multislerp", x, weight=[0.0, 1.0, 0.0]), x[1], atol=1e-5)
    base = torch.tensor([0.5, 0.5, 0.5])
    close(run("multislerp", [base + E1, base + E2], base=base, weight=[1.0, 1.0]),
          base + torch.tensor([R, R, 0.0]))
    close(run("multislerp", [x[0]], weight=[0.7]), x[0])  # one input: returned as it is


def test_multislerp_antipodal_inputs():
    # two antipodal inputs with equal weights: mergekit's linear fallback (here 0)
    close(run("multislerp", [E1, -E1], weight=[1.0, 1.0]), [0.0, 0.0, 0.0])
    with pytest.raises(PlanError, match="weighted mean of the unit vectors is zero"):
        run("multislerp", [E1, -E1, E2 - E2], weight=[1.0, 1.0, 1.0])
    with pytest.raises(PlanError, match="sum to 0"):
        run("multislerp", [E1, E2], weight=[1.0, -1.0])


# -- karcher ------------------------------------------------------------------------------
def test_karcher_invariants():
    x = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    close(run("karcher", [x, x.clone(), x.clone()]), x)  # identical tensors: that tensor
    # two unit-norm points, equal weights: the geodesic midpoint = slerp at t = 0.5
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, generator=g), torch.randn(6, generator=g)
    a, b = a / a.norm(), b / b.norm()
    close(run("karcher", [a, b]), run("slerp", [a, b], t=0.5), atol=1e-5)
    # different norms: the direction of the midpoint, the mean of the norms
    close(run("karcher", [2 * E1, 4 * E2]), [3 * R, 3 * R, 0.0])


def test_karcher_by_hand_three_points_and_zero_input():
    s3 = 1 / math.sqrt(3)
    close(run("karcher", [E1, E2, E3]), [s3, s3, s3])
    # a zero tensor does not pull the direction but counts in the mean norm: x / 2
    x = torch.tensor([3.0, -4.0])
    close(run("karcher", [torch.zeros(2), x]), x / 2)
    close(run("karcher", [torch.zeros(2), torch.zeros(2)]), [0.0, 0.0])
    with pytest.raises(PlanError, match="max_iter=2.5 must be a whole number"):
        run("karcher", [E1, E2], max_iter=2.5)


# -- sce ----------------------------------------------------------------------------------
D1, D2 = torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([2.0, 2.0, -2.0, 0.0])


def test_sce_by_hand():
    base = torch.tensor([0.5, 0.0, -1.0, 2.0])
    # weights: mean squares 14/4 and 12/4 -> w = (14/26, 12/26); elected sign of the sum
    # (3, 0, 1, 0) is + everywhere; entry 0: both agree -> (w1*1 + w2*2) / (w1 + w2)
    w1, w2 = 14 / 26, 12 / 26
    want = torch.tensor([(w1 * 1 + w2 * 2) / (w1 + w2), 2.0, 3.0, 0.0])
    close(run("sce", [base + D1, base + D2], base=base), base + want)


def test_sce_select_topk_by_hand():
    base = torch.zeros(4)
    # population variance over the two models: ((d1 - d2) / 2)^2 = (0.25, 4, 6.25, 0);
    # 3 nonzero, select_topk 0.7 -> k = int(2.1) = 2: entries 1 and 2 survive.
    # d1 = (0, -2, 3, 0), d2 = (0, 2, -2, 0); sums (0, 0, 1, 0) -> + everywhere (0 counts +)
    # entry 1: only d2 agrees -> 2; entry 2: only d1 -> 3
    close(run("sce", [D1, D2], base=base, select_topk=0.7), [0.0, 2.0, 3.0, 0.0])
    close(run("sce", [D1, D2], base=base, select_topk=0.0), base)  # nothing selected
    x = torch.tensor([1.0, -3.0, 0.0, 2.0])
    close(run("sce", [x, x.clone()], base=base), x)  # identical models: that model
    with pytest.raises(PlanError, match=r"select_topk=1.5 is out of range"):
        run("sce", [D1, D2], base=base, select_topk=1.5)


# -- ram / ramplus_tl ---------------------------------------------------------------------
def test_ram_by_hand():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    d1 = torch.tensor([1.0, -2.0, 3.0, 0.0, 1e-6])
    d2 = torch.tensor([2.0, 0.0, -1.0, 0.0, 1e-6])
    # entry 0 and 2: shared -> mean; entry 1: unique -> full; 3: nobody; 4: below epsilon
    want = torch.tensor([1.5, -2.0, 1.0, 0.0, 0.0])
    close(run("ram", [base + d1, base + d2], base=base), base + want)
    # epsilon 0: the tiny changes count (shared -> their mean)
    close(run("ram", [base + d1, base + d2], base=base, epsilon=0.0)[4], base[4] + 1e-6)


def test_ramplus_tl_by_hand():
    base = torch.zeros(4)
    d1, d2 = torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([2.0, 0.0, -1.0, 0.0])
    # model 1: 2 shared / 1 unique -> rho 2 -> clamp to alpha 0.2 -> lambda = 1 + 0.1 * 0.2
    close(run("ramplus_tl", [d1, d2], base=base), [1.5, -2.0 * 1.02, 1.0, 0.0])
    # r = 0 is plain RAM
    close(run("ramplus_tl", [d1, d2], base=base, r=0.0), run("ram", [d1, d2], base=base))
    # three models: model 1 shares entry 0 only and alone changes entries 1 and 2 -> rho 0.5
    d3 = torch.tensor([4.0, 0.0, 0.0, 0.0])
    got = run("ramplus_tl", [d1, torch.zeros(4), d3], base=base, r=0.5, alpha=1.0)
    close(got, [2.5, -2.0 * 1.25, 3.0 * 1.25, 0.0])


# -- nearswap -----------------------------------------------------------------------------
def test_nearswap_by_hand():
    a = torch.tensor([0.0, 0.0, 0.0, 1.0])
    b = torch.tensor([1.0, -2.0, 3.0, 1.0])
    # w = clamp(t / |a - b|, 0, 1) = (1, 0.5, 1/3, 1)
    close(run("nearswap", [b], base=a, t=1.0), [1.0, -1.0, 1.0, 1.0])
    close(run("nearswap", [b], base=a, t=0.0), a)
    close(run("nearswap", [b], base=a, t=10.0), b)
    with pytest.raises(PlanError, match="needs 't'"):
        run("nearswap", [b], base=a)
    with pytest.raises(PlanError, match="takes 1 inputs, got 2"):
        run("nearswap", [b, b], base=a, t=1.0)
    with pytest.raises(PlanError, match="needs a base model"):
        run("nearswap", [b], t=1.0)


# -- arcee_fusion -------------------------------------------------------------------------
def test_arcee_fusion_by_hand():
    a = torch.zeros(5)
    b = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    # 1-D: one KL value k > 0 for the whole vector, importance k |b|; quantiles at sorted
    # index floor(q * 4): q1 = 2k, median = 3k, q3 = 4k -> threshold 6k: only 100 is kept
    close(run("arcee_fusion", [b], base=a), [0.0, 0.0, 0.0, 0.0, 100.0])
    close(run("arcee_fusion", [a.clone()], base=a), a)  # no change: the base
    assert iqr_threshold(torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])) == pytest.approx(3 + 1.5 * 2)


def test_arcee_fusion_importance_is_per_row_kl():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    imp = fusion_importance(b, a)
    p = torch.softmax(b[0], -1) + 1e-8
    q = torch.softmax(a[0], -1) + 1e-8
    kl0 = float((p * (p / q).log()).sum())
    close(imp, [[kl0 * 1.0, 0.0], [0.0, 0.0]])


# -- devices ------------------------------------------------------------------------------
CASES = [
    ("nuslerp", 2, False, {"weight": [0.3, 0.7]}),
    ("nuslerp", 2, True, {"weight": [0.3, 0.7], "nuslerp_flatten": False}),
    ("multislerp", 3, True, {"weight": [0.2, 0.5, 0.3]}),
    ("karcher", 3, False, {}),
    ("sce", 3, True, {"select_topk": 0.3}),
    ("ram", 2, True, {"epsilon": 0.01}),
    ("ramplus_tl", 3, True, {"epsilon": 0.01, "r": 0.5}),
    ("nearswap", 1, True, {"t": 0.01}),
    ("arcee_fusion", 1, True, {}),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("op,n,with_base,params", CASES)
def test_cuda_matches_cpu(op, n, with_base, params):
    from test_ops import step

    from evomerge.ops import OpContext, get_op

    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g)
    xs = [base + 0.02 * torch.randn(64, 48, generator=g) for _ in range(n)]
    spec = get_op(op)
    p = spec.resolve_params(step(op, n, with_base, **params))
    outs = []
    for dev in ("cpu", "cuda"):
        b = base.to(dev) if with_base else None
        outs.append(spec.fn([x.to(dev) for x in xs], b, p, OpContext("w", None, dev)).cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
