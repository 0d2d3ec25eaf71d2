"""One fused pass for the elementwise part of task-vector merges on CUDA (torch.compile).

The eager chunk loop of :func:`~.task_vector_merge.generalized_task_arithmetic` runs about ten
kernels per input (subtract, prune, mask, weight, sign election, agreement, sums), each a
full trip through device memory. :func:`gta_elementwise` writes the same computation as one
function of the chunk's tensors and scalars, with the same ATen ops in the same order as
the eager path (so, run eagerly, it is bit-for-bit that path: a test checks it), and
:func:`fused_gta` runs it through ``torch.compile`` on CUDA, which fuses it into a kernel
or two that read each input once.

Used when the inputs are on CUDA, every magnitude cut is a plain threshold (no partial
ties at the threshold, which need a sequential tie budget) and the sparsification is none,
magnitude, outliers or random (DARE's masks are drawn outside, as before). Anything else,
``EVOMERGE_FUSED=0``, or any failure to compile falls back to the eager path. Compiled
code may contract multiply-adds differently from eager kernels, so the fused result is
checked against eager to float32 rounding (and reported bit-for-bit where it is), on the
CUDA machine (``tests/ops/test_cuda_ops.py``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

_COMPILED: Any = None
_FAILED = False


def fused_mode(device: torch.device) -> str | None:
    """"compiled" on CUDA (unless ``EVOMERGE_FUSED=0`` or compiling failed before),
    "eager" on any device with ``EVOMERGE_FUSED=eager`` (the same function uncompiled: how
    the tests check it equals the chunk loop), else None."""
    env = os.environ.get("EVOMERGE_FUSED", "1")
    if env == "eager":
        return "eager"
    if device.type == "cuda" and env != "0" and not _FAILED:
        return "compiled"
    return None


def gta_elementwise(b: torch.Tensor, xs: list[torch.Tensor], masks: list[Any],
                    lows: list[float], highs: list[float], ews: list[float],
                    ws: list[float], consensus: bool, normalize: bool, lam: float,
                    divisor: float) -> torch.Tensor:
    """Base + merged task vectors for one chunk.

    Per input i: ``d = x - b``; keep ``|d| > lows[i]`` (a hardshrink; -1 keeps all), drop
    ``|d| > highs[i]`` (breadcrumbs outliers; inf keeps all), multiply by ``masks[i]``
    (DARE; None: no mask); weight ``ews[i]`` (weight x rescale). Without consensus:
    ``b + sum / divisor * lam``. With consensus (TIES): elect the sign of the weighted sum
    and sum the agreeing weighted deltas, divided by the sum of agreeing ``ws`` when
    ``normalize``.
    """
    ds = []
    S = None
    for i, x in enumerate(xs):
        d = torch.sub(x, b)
        if lows[i] >= 0.0 or highs[i] != math.inf:
            a = torch.abs(d)
            if lows[i] >= 0.0:
                d = torch.ops.aten.hardshrink(d, lows[i])
            if highs[i] != math.inf:
                d = torch.mul(d, torch.le(a, highs[i]).to(d.dtype))
        if masks[i] is not None:
            d = torch.mul(d, masks[i])
        if consensus:
            ds.append(d)
            S = torch.mul(d, ews[i]) if S is None else torch.add(S, d, alpha=ews[i])
        else:
            S = torch.mul(d, ews[i]) if S is None else torch.add(S, d, alpha=ews[i])
    assert S is not None
    if not consensus:
        return torch.add(b, S, alpha=lam / divisor)
    sgn = torch.sub(torch.mul(torch.ge(S, 0).to(S.dtype), 2.0), 1.0)
    mixed = torch.zeros_like(b)
    div = torch.zeros_like(b) if normalize else None
    for i, d in enumerate(ds):
        prod = torch.mul(d, sgn)
        agree = (torch.gt(prod, 0) if ws[i] > 0 else torch.lt(prod, 0)).to(d.dtype)
        mixed = torch.addcmul(mixed, d, agree, value=ews[i])
        if div is not None:
            div = torch.add(div, agree, alpha=ws[i])
    if div is not None:
        div = torch.add(div, torch.eq(div, 0).to(div.dtype))
        mixed = torch.div(mixed, div)
    return torch.add(b, mixed, alpha=lam)


def fused_gta(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """:func:`gta_elementwise` compiled (None when compiling failed: use the eager path)."""
    global _COMPILED, _FAILED
    if _FAILED:
        return None
    try:
        import torch._dynamo

        if _COMPILED is None:
            _COMPILED = torch.compile(gta_elementwise, dynamic=True, fullgraph=False)
        # floats (weights, thresholds) as graph inputs: a new genome is not a recompile
        with torch._dynamo.config.patch(specialize_float=False, cache_size_limit=64):
            return _COMPILED(*args, **kwargs)
    except Exception:  # noqa: BLE001 - any compiler problem: the eager path is exact
        _FAILED = True
        return None


__all__ = ["fused_gta", "fused_mode", "gta_elementwise"]
