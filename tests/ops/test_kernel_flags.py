"""The kernel's shortcuts keep its bits: whole tie budgets folded into the threshold, and
the sign products skipped when every weight is positive (``ops/fused.py``).

A cut keeps ``|d| > low`` or ``|d| == tie_low`` (within a whole budget); folded, it keeps
``|d| > nextafter(low, -inf)``, with no tie comparison. These tests run the eager kernel
both ways on values around the thresholds (exact ties, the neighbouring floats, zeros of
both signs, NaN, infinities, subnormals) and compare bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from evomerge.ops import fused
from evomerge.ops.fused import ChunkCut, KernelFlags


def _around(values: list[float]) -> torch.Tensor:
    f = np.float32
    out = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e-45, -1e-45, 1e-40]
    for v in values:
        for s in (1.0, -1.0):
            out += [s * v, s * float(np.nextafter(f(v), f(math.inf))),
                    s * float(np.nextafter(f(v), f(0.0)))]
    return torch.tensor(out, dtype=torch.float32)


def _kernel(b, xs, cuts, flags, ws=(1.0, 0.5, 0.7)):
    scal = fused.scalars(cuts, list(ws), list(ws), 0.9, torch.float32, b.device)
    return fused.gta_kernel(b, xs, [None] * len(xs), scal, flags, torch.float32)


def test_folded_whole_tie_budgets_keep_the_same_bits():
    thr_low, thr_high = 0.01, 0.05
    d = _around([thr_low, thr_high, 1e-38, 0.0])
    n = d.numel()
    g = torch.Generator().manual_seed(0)
    b = torch.randn(n, generator=g) * 0.02
    # each input sees the probe values in another order, so the sign election varies
    xs = [b + d[torch.randperm(n, generator=g)] for _ in range(3)]
    cases = [
        ChunkCut(low=thr_low, tie_low=thr_low, ties_low=n),  # keep >= low
        ChunkCut(low=thr_low, tie_low=thr_low, ties_low=n,
                 high=thr_high, tie_high=thr_high, ties_high=n),  # and drop >= high
        ChunkCut(low=thr_low, high=thr_high, tie_high=thr_high, ties_high=n),
        ChunkCut(low=0.0, tie_low=0.0, ties_low=n),  # a zero threshold: keep >= 0
        ChunkCut(low=thr_low),  # nothing to fold
    ]
    for cut in cases:
        folded = cut.folded(torch.float32)
        assert not folded.has_ties()
        high = cut.uses_high()
        want = _kernel(b, xs, [cut] * 3, KernelFlags(True, True, True, high=high))
        got = _kernel(b, xs, [folded] * 3,
                      KernelFlags(True, True, True, high=high, ties=False))
        assert torch.equal(want.view(torch.int32), got.view(torch.int32)), cut


def test_partial_budgets_are_not_folded():
    cut = ChunkCut(low=0.01, tie_low=0.01, ties_low=0)  # no budget: "> low" already
    assert cut.folded(torch.float32) == cut
    nan_tie = ChunkCut(low=0.01)
    assert not nan_tie.has_ties()


def test_positive_weights_skip_the_sign_products_with_the_same_bits():
    g = torch.Generator().manual_seed(1)
    n = 4096
    b = torch.randn(n, generator=g) * 0.02
    xs = [b + torch.randn(n, generator=g) * 0.002 for _ in range(3)]
    xs[1][::7] = b[::7]  # zero deltas: they never agree
    xs[2][::11] = math.nan
    cuts = [ChunkCut(low=0.001)] * 3
    for normalize in (False, True):
        want = _kernel(b, xs, cuts, KernelFlags(True, True, normalize, high=False))
        got = _kernel(b, xs, cuts, KernelFlags(True, True, normalize, high=False,
                                               ties=False, negative=False))
        assert torch.equal(want.view(torch.int32), got.view(torch.int32))
