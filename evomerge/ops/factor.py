"""Operators on LoRA factors: the asymmetric sparse sum of black-box Evo-Merging.

A LoRA pool merge (see :mod:`evomerge.blackbox.pool`) works on each adapter's raw factor
tensors, not on dense weights: merged ``A = sum_i w_i * TopK_{d_i}(A_i)`` where ``TopK_d``
keeps the ``ceil(d * numel)`` entries of largest magnitude of that adapter's ``A`` (``d = 0``
keeps none), and merged ``B = sum_i w_i * B_i`` (the existing ``linear`` operator with
``normalize: false``). Only ``A`` is sparsified, as in the paper's code: ``B`` carries the
output directions, ``A`` the (sparse-tolerant) input projections.

Top-k selection uses :func:`evomerge.ops.sparsify.topk_mask`, which keeps *exactly* k
entries (ties at the threshold resolved by flat index), so a plan materializes identically
on every run. There is no base tensor: the factors are already deltas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..errors import PlanError
from .registry import OpContext, register_op
from .sparsify import topk_mask


def topk_count(n: int, density: float) -> int:
    """Entries ``TopK_density`` keeps of ``n``: ``ceil(density * n)``, clamped to [0, n].

    The product is rounded to 9 decimals first so that e.g. ``0.3 * 10`` (which is
    ``3.0000000000000004`` in binary floating point) keeps 3 entries, not 4.
    """
    if density <= 0.0:
        return 0
    if density >= 1.0:
        return n
    return min(n, max(0, math.ceil(round(density * n, 9))))


def topk_magnitude(x: torch.Tensor, density: float) -> torch.Tensor:
    """``x`` with all but its ``topk_count(numel, density)`` largest-|value| entries zeroed
    (a new tensor; ``x`` is not modified)."""
    k = topk_count(x.numel(), density)
    if k >= x.numel():
        return x.clone()
    if k == 0:
        return torch.zeros_like(x)
    return x * topk_mask(x.abs(), k).to(x.dtype)


def merge_lora_factors(
    adapters: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
    alpha: Sequence[float],
    beta: Sequence[float],
    scales: Sequence[float] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The LoRA pool merge rule, per module: ``A = sum_i beta_i TopK_{alpha_i}(A_i)``,
    ``B = sum_i beta_i s_i B_i`` (the one implementation; the zoo pools use it).

    Args:
        adapters: per adapter, module name -> ``(A, B)`` (every adapter has the same modules).
        alpha: per adapter, the density of its ``A`` kept by :func:`topk_magnitude`
            (``topk_count`` entries; 0 keeps none, 1 all).
        beta: per adapter, its signed weight; an adapter with weight 0 adds nothing.
        scales: per adapter, the factor ``s_i`` of its ``B`` (its ``lora_alpha / r``);
            default 1 (``B`` already carries the scale).

    Returns:
        module name -> merged ``(A, B)``; the dense delta is ``B @ A``.
    """
    scales = [1.0] * len(adapters) if scales is None else scales
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in adapters[0]:
        a_sum = torch.zeros_like(adapters[0][module][0])
        b_sum = torch.zeros_like(adapters[0][module][1])
        for factors, al, be, sc in zip(adapters, alpha, beta, scales):
            if be == 0.0:
                continue
            a, b = factors[module]
            a_sum += be * topk_magnitude(a, float(al))
            b_sum += (be * sc) * b
        out[module] = (a_sum, b_sum)
    return out


@register_op(
    "topk_sum",
    per_input=("weight", "density"),
    defaults={"weight": 1.0, "density": 1.0},
    ranges={"density": (0.0, 1.0)},
)
def topk_sum(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict,
             ctx: OpContext) -> torch.Tensor:
    """``sum_i weight_i * TopK_{density_i}(x_i)``: each input keeps its ``ceil(density *
    numel)`` entries of largest magnitude, then the kept parts are summed with signed
    weights (no normalization, no base). Inputs with weight 0 or density 0 add nothing."""
    ref = tensors[0]
    for t in tensors[1:]:
        if t.shape != ref.shape:
            raise PlanError(
                f"tensor {ctx.name!r}: input shapes differ ({tuple(t.shape)} vs "
                f"{tuple(ref.shape)}); topk_sum needs equal shapes"
            )
    out = torch.zeros_like(ref)
    for t, w, d in zip(tensors, params["weight"], params["density"]):
        if w == 0.0 or d <= 0.0:
            continue
        k = topk_count(t.numel(), d)
        if k >= t.numel():
            out.add_(t, alpha=w)
        else:
            out.add_(t * topk_mask(t.abs(), k).to(t.dtype), alpha=w)
    return out
