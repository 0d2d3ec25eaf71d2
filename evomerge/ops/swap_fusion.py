"""Two-model merges that take a fine-tuned model's changes only where they are small or
important: mergekit's ``nearswap`` and ``arcee_fusion``.

Both follow mergekit's code (``mergekit/merge_methods/{nearswap,arcee_fusion}.py``);
deviations are listed per operator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import OpContext, check_shapes, register_op
from .sparsify import kth_smallest


def _pair(tensors: list[torch.Tensor], base: torch.Tensor | None,
          ctx: OpContext) -> tuple[torch.Tensor, torch.Tensor]:
    check_shapes(tensors, base, ctx, need_base=True)
    return base, tensors[0]


def _nearswap_check(params: dict, n: int) -> str | None:
    if params.get("t") is None:
        return "needs 't' (differences up to t take the model's value, larger ones blend)"
    return None


@register_op(
    "nearswap",
    needs_base=True,
    defaults={"t": None},
    min_inputs=1,
    max_inputs=1,
    check=_nearswap_check,
)
def nearswap(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict,
             ctx: OpContext) -> torch.Tensor:
    """NearSwap, as mergekit computes it: per entry, ``w = clamp(t / max(|a - b|, 1e-6),
    0, 1)`` and the output is ``w b + (1 - w) a`` (a: base, b: the other model). Entries
    where the models differ by at most ``t`` take the model's value; larger differences
    stay closer to the base. ``t <= 0`` gives the base."""
    a, b = _pair(tensors, base, ctx)
    t = float(params["t"])
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * b + (1 - w) * a


def iqr_threshold(scores: torch.Tensor) -> float:
    """``median + 1.5 * (q3 - q1)`` of ``scores``, each quantile ``q`` being the sorted
    value at index ``floor(q (n - 1))`` (mergekit's ``approximate_quantiles``), found by
    exact selection instead of a sort."""
    n = scores.numel()

    def q(p: float) -> float:
        return kth_smallest(scores, int(p * (n - 1)) + 1)

    median, q1, q3 = q(0.5), q(0.25), q(0.75)
    return float(torch.tensor(median) + 1.5 * (torch.tensor(q3) - torch.tensor(q1)))


def fusion_importance(params: torch.Tensor, base: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's importance of each entry: ``|params - base|`` times the KL divergence
    between ``softmax(params)`` and ``softmax(base)`` along the last dimension (per row)."""
    diff = (params - base).abs()
    p = F.softmax(params, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    kl = torch.sum(p * torch.log(p / q), dim=-1)
    return diff * kl.unsqueeze(-1)


@register_op("arcee_fusion", needs_base=True, min_inputs=1, max_inputs=1)
def arcee_fusion(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict,
                 ctx: OpContext) -> torch.Tensor:
    """Arcee Fusion, as mergekit computes it: of the model's change ``b - a`` over the base
    ``a``, keep the entries whose importance (:func:`fusion_importance`) is at least
    ``median + 1.5 IQR`` of all importances (:func:`iqr_threshold`): ``a + (b - a) mask``.

    Deviation: mergekit estimates the quantiles from 1,000,000 entries drawn with torch's
    unseeded global generator when a tensor has more (so its result for such tensors is not
    reproducible); evomerge always uses the exact quantiles of all entries. For tensors of
    at most 1,000,000 entries the two agree."""
    a, b = _pair(tensors, base, ctx)
    scores = fusion_importance(b, a)
    if scores.numel() == 0:
        return a.clone()
    mask = (scores >= iqr_threshold(scores)).to(a.dtype)
    return a + (b - a) * mask
