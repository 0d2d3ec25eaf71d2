"""Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models",
2024): interpolate between the average of the fine-tuned models and the base with a ratio
derived from the angle between their task vectors."""

from __future__ import annotations

import torch

from ..errors import PlanError
from .registry import OpContext, check_shapes, register_op
from .sparsify import chunk_bounds, chunk_size


@register_op(
    "model_stock",
    needs_base=True,
    defaults={"filter_wise": False},
    min_inputs=2,
)
def model_stock(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict,
                ctx: OpContext) -> torch.Tensor:
    """mergekit's model_stock: with task vectors ``d_i = x_i - base`` and ``cos`` the mean
    pairwise cosine between them (norm product clamped at 1e-6, cosine clamped to [-1, 1]),
    ``t = N cos / (1 + (N - 1) cos)`` and the output is ``t * mean(x_i) + (1 - t) * base``.

    ``filter_wise`` computes one ratio per row (last dimension; 1-D tensors are one row)
    instead of one per tensor. Deviation: where ``1 + (N - 1) cos`` is within 1e-6 of 0
    (only possible for negatively correlated task vectors) ``t = 0`` (the base) instead of
    mergekit's inf/NaN. Needs at least two fine-tuned inputs besides the base, as mergekit.
    """
    if base is None:
        raise PlanError(f"tensor {ctx.name!r}: model_stock needs a base model")
    check_shapes(tensors, base, ctx)
    n_models = len(tensors)
    size = chunk_size(base.device)
    out = torch.empty_like(base)
    if params["filter_wise"]:
        # rows are independent: statistics and output for each block of whole rows
        rows = 1 if base.dim() < 2 else base.shape[0]
        cols = base.numel() // max(rows, 1)
        b2, o2 = base.reshape(rows, cols), out.view(rows, cols)
        xs = [t.reshape(rows, cols) for t in tensors]
        step = max(1, size // max(cols, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            offsets = torch.stack([x[r0:r1] - b2[r0:r1] for x in xs])  # (N, R, C)
            gram = torch.einsum("irc,jrc->rij", offsets, offsets).double()
            t = _ratio(gram, n_models).to(base.dtype).unsqueeze(-1)  # (R, 1)
            _interpolate(offsets, t, b2[r0:r1], o2[r0:r1])
        return out
    b = base.reshape(-1)
    xs = [t.reshape(-1) for t in tensors]
    gram = torch.zeros(n_models, n_models, dtype=torch.float64, device=base.device)
    for s, e in chunk_bounds(b.numel(), size):
        offsets = torch.stack([x[s:e] - b[s:e] for x in xs])  # (N, chunk)
        gram += (offsets @ offsets.T).double()
    t = _ratio(gram.unsqueeze(0), n_models)[0].item()
    o = out.view(-1)
    for s, e in chunk_bounds(b.numel(), size):
        offsets = torch.stack([x[s:e] - b[s:e] for x in xs])
        _interpolate(offsets, t, b[s:e], o[s:e])
    return out


def _ratio(gram: torch.Tensor, n: int) -> torch.Tensor:
    """Model Stock's ratio from a batch of Gram matrices of the task vectors, (B, N, N)."""
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp(min=0).sqrt()  # (B, N)
    iu = torch.triu_indices(n, n, offset=1)
    dots = gram[:, iu[0], iu[1]]
    prod = (norms[:, iu[0]] * norms[:, iu[1]]).clamp(min=1e-6)
    cos = (dots / prod).clamp(-1.0, 1.0).mean(dim=-1)  # mean pairwise cosine, (B,)
    den = 1.0 + (n - 1) * cos
    ok = den.abs() > 1e-6
    return torch.where(ok, n * cos / torch.where(ok, den, torch.ones_like(den)),
                       torch.zeros_like(den))


def _interpolate(offsets: torch.Tensor, t: torch.Tensor | float, base: torch.Tensor,
                 out: torch.Tensor) -> None:
    """out = t * mean(x_i) + (1 - t) * base  ==  base + t * mean(x_i - base)."""
    mean = offsets.mean(dim=0)
    if isinstance(t, torch.Tensor):
        torch.addcmul(base, mean, t, out=out)
    else:
        torch.add(base, mean, alpha=t, out=out)
