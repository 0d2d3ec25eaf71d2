"""Task-vector merges that pick entries by agreement between the models: mergekit's ``sce``,
``ram`` and ``ramplus_tl``.

Each follows mergekit's code (``mergekit/merge_methods/sce.py``, ``ram.py``) on stacked
float32 task vectors ``d_i = x_i - base``; deviations are listed per operator.
"""

from __future__ import annotations

import torch

from .registry import OpContext, check_shapes, register_op
from .sparsify import topk_mask


def _task_vectors(tensors: list[torch.Tensor], base: torch.Tensor | None,
                  ctx: OpContext) -> torch.Tensor:
    check_shapes(tensors, base, ctx, need_base=True)
    return torch.stack([t - base for t in tensors], dim=0)


# --------------------------------------------------------------------------------------
# SCE
# --------------------------------------------------------------------------------------
def sce_mask(tvs: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's ``sce_mask``: keep the entries whose task vectors vary most across the
    models: ``k = int(density * count_nonzero(var))`` entries with the largest
    (population) variance over the models, as a 0/1 float tensor of one model's shape.
    Ties at the threshold are kept in flat index order (mergekit's ``topk`` breaks them
    arbitrarily)."""
    if density <= 0:
        return torch.zeros_like(tvs[0])
    if density >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * density)
    if k == 0:
        return torch.zeros_like(var)
    return topk_mask(var.abs(), k).to(var.dtype)


def sce_weights(tvs: torch.Tensor) -> torch.Tensor:
    """Per-model weights: mean square of each task vector over the whole tensor, divided by
    their sum (equal weights when the sum is below 1e-6)."""
    w = torch.mean(tvs**2, dim=list(range(1, tvs.dim())))
    total = torch.sum(w).item()
    if abs(total) < 1e-6:
        return torch.ones_like(w) / w.shape[0]
    return w / total


@register_op(
    "sce",
    needs_base=True,
    defaults={"select_topk": 1.0},
    ranges={"select_topk": (0.0, 1.0)},
)
def sce(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict,
        ctx: OpContext) -> torch.Tensor:
    """SCE (Wan et al., "FuseChat", 2024), as mergekit computes it: **S**elect the
    ``select_topk`` fraction of entries with the largest variance across the models' task
    vectors (:func:`sce_mask`; 1 keeps all), **C**alculate one weight per model from the
    mean square of its selected task vector (:func:`sce_weights`), **E**rase the entries
    whose sign differs from the sign of the summed task vectors (TIES election, sum >= 0 is
    +; zero entries count as disagreeing), and average the rest:
    ``base + sum_i w_i m_i d_i / max(sum_i w_i m_i, 1e-6)``. No per-model weights (mergekit
    has none); ``int8_mask`` is accepted and ignored like for ties."""
    tvs = _task_vectors(tensors, base, ctx)
    topk = float(params["select_topk"])
    if topk < 1:
        tvs = tvs * sce_mask(tvs, topk).unsqueeze(0)
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    keep = (tvs.sign() == majority).to(tvs.dtype)
    w = sce_weights(tvs)
    while w.dim() < tvs.dim():
        w = w.unsqueeze(-1)
    kept_w = w * keep
    merged = (tvs * kept_w).sum(dim=0)
    return base + merged / torch.sum(kept_w, dim=0).clamp(min=1e-6)


# --------------------------------------------------------------------------------------
# RAM
# --------------------------------------------------------------------------------------
def _ram_parts(tvs: torch.Tensor, epsilon: float):
    flat = tvs.view(tvs.shape[0], -1)
    nonzero = flat.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return flat, nonzero, counts, counts > 1, counts == 1


@register_op(
    "ram",
    needs_base=True,
    defaults={"epsilon": 1e-5},
    ranges={"epsilon": (0.0, None)},
)
def ram(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict,
        ctx: OpContext) -> torch.Tensor:
    """Reinforced Agent Merging (arXiv 2601.13572), as mergekit computes it: task-vector
    entries with ``|d| <= epsilon`` are dropped; an entry only one model changes takes that
    model's change in full, an entry several models change takes the mean of their
    changes: ``base + sum_i d_i [unique] + sum_i d_i [shared] / count``."""
    tvs = _task_vectors(tensors, base, ctx)
    flat, nonzero, counts, overlap, unique = _ram_parts(tvs, float(params["epsilon"]))
    z = flat * nonzero
    merged = (z * unique + z * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@register_op(
    "ramplus_tl",
    needs_base=True,
    defaults={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
    ranges={"epsilon": (0.0, None)},
)
def ramplus_tl(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict,
               ctx: OpContext) -> torch.Tensor:
    """RAM+ (tensor-local), as mergekit computes it: RAM, with each model's unique
    changes scaled by ``1 + r * clamp(rho_i, 0, alpha)`` where ``rho_i`` is the number of
    this tensor's entries model i shares with others over the number it alone changes
    (``max(unique, epsilon)`` in the denominator)."""
    tvs = _task_vectors(tensors, base, ctx)
    eps = float(params["epsilon"])
    flat, nonzero, counts, overlap, unique = _ram_parts(tvs, eps)
    shared_n = (nonzero & overlap).sum(dim=1).to(flat.dtype)
    unique_n = (nonzero & unique).sum(dim=1).to(flat.dtype)
    rho = shared_n / unique_n.clamp(min=eps)
    lam = 1 + float(params["r"]) * rho.clamp(min=0, max=float(params["alpha"]))
    z = flat * nonzero
    merged = (z * unique * lam.unsqueeze(-1) + z * overlap / counts.clamp(min=1)).sum(
        dim=0, keepdim=True
    )
    return base + merged.reshape_as(base)
