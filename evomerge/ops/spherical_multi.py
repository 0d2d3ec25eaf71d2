"""Spherical merges of more than a plain pair: mergekit's ``nuslerp``, ``multislerp`` and
``karcher``.

All three follow mergekit's code (``mergekit/merge_methods/{nuslerp,multislerp,karcher}.py``)
operation by operation in float32, so results agree with mergekit up to float32 rounding.
Deviations are listed in each operator's docstring.
"""

from __future__ import annotations

import torch

from ..errors import PlanError
from .linear import zero_weight_sum
from .registry import OpContext, check_shapes, register_op


# --------------------------------------------------------------------------------------
# nuslerp
# --------------------------------------------------------------------------------------
def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool = False,
                    flatten: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's ``nuslerp(t, v0, v1, dim, flatten)`` (0.1.5): spherical interpolation of
    the whole flattened tensors (``flatten``), of each row (``row_wise``: vectors along
    dim 0) or of each vector along the last dimension. Vectors are normalized with their
    norm clamped at 1e-7; pairs with ``1 - cos^2 <= eps^2`` are interpolated linearly.
    The output keeps the norms of the inputs (unlike ``slerp`` it does not lerp when the
    vectors are merely close to colinear)."""
    out_shape = v0.shape
    dim = 0 if row_wise else -1
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    del u0, u1
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(out_shape)


@register_op(
    "nuslerp",
    optional_base=True,
    per_input=("weight",),
    defaults={"weight": None, "nuslerp_row_wise": False, "nuslerp_flatten": True},
    min_inputs=2,
    max_inputs=2,
)
def nuslerp(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict,
            ctx: OpContext) -> torch.Tensor:
    """mergekit's NuSLERP: spherical interpolation of two models at
    ``t = w_1 / (w_0 + w_1)`` (0.5 when the weights sum to less than 1e-6 in absolute
    value), over the whole flattened tensor by default (``nuslerp_flatten: true``), per
    row (``nuslerp_row_wise: true``, with flatten off) or per last-dimension vector.
    With a base model it interpolates the task vectors and adds the base back:
    ``base + nuslerp(t, x_0 - base, x_1 - base)``.

    Deviation: a base also listed among the models is dropped from the inputs (mergekit
    0.1.5 refuses such a config)."""
    check_shapes(tensors, base, ctx)
    w0, w1 = (float(w) for w in params["weight"])
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    row_wise, flatten = bool(params["nuslerp_row_wise"]), bool(params["nuslerp_flatten"])
    a, b = tensors
    if base is None:
        return nuslerp_tensors(t, a, b, row_wise, flatten)
    return base + nuslerp_tensors(t, a - base, b - base, row_wise, flatten)


# --------------------------------------------------------------------------------------
# multislerp
# --------------------------------------------------------------------------------------
@register_op(
    "multislerp",
    optional_base=True,
    per_input=("weight",),
    defaults={"weight": None, "normalize_weights": True, "eps": 1e-8},
    ranges={"eps": (0.0, None)},
    check=zero_weight_sum("normalize_weights"),
)
def multislerp(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict,
               ctx: OpContext) -> torch.Tensor:
    """mergekit's Multi-SLERP (barycentric interpolation on the hypersphere) of any number
    of models, with per-model ``weight`` (divided by their sum when ``normalize_weights``,
    the default). With a base model it works on the task vectors ``x_i - base`` and adds
    the base back. Steps: unit vectors ``u_i = x_i / (|x_i| + eps)``; their weighted mean
    ``m`` normalized; tangent vectors ``u_i - (u_i . m) m``; their weighted sum ``v``;
    the exponential map ``m cos|v| + v sin|v| / |v|`` (``|v|`` plus eps); scaled by the
    weighted mean of the norms ``sum_i w_i |x_i|``. One input is returned as it is.

    When the weighted mean of the unit vectors is (nearly) zero: two inputs fall back to
    ``w_0 x_0 + w_1 x_1`` as in mergekit; more inputs are refused with one line (mergekit
    raises the same condition). Deviation: weights summing to 0 with
    ``normalize_weights`` are refused at validation (mergekit divides by zero)."""
    check_shapes(tensors, base, ctx)
    if len(tensors) == 1:
        return tensors[0].clone()
    eps = float(params["eps"])
    stacked = torch.stack(tensors, dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    weights = torch.tensor(params["weight"], dtype=stacked.dtype, device=stacked.device)
    if params["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            res = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
            return res + base if base is not None else res
        raise PlanError(
            f"tensor {ctx.name!r}: multislerp's weighted mean of the unit vectors is zero "
            f"(antipodal inputs whose weights balance out); change the weights"
        )
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = units - dots * mean
    tangent_result = (tangent * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent_result) + eps
    result = mean * torch.cos(tangent_norm) + tangent_result * (torch.sin(tangent_norm) / tangent_norm)
    result = result * (norms.squeeze(-1) * weights).sum()
    result = result.view(stacked.shape[1:])
    return result + base if base is not None else result


# --------------------------------------------------------------------------------------
# karcher
# --------------------------------------------------------------------------------------
def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """mergekit's ``karcher_merge_tensors``: the weighted Riemannian (Karcher) mean of the
    inputs' directions on the unit sphere, found by at most ``max_iter`` gradient steps
    from the normalized weighted mean of the unit vectors (stopping when the tangent step
    is shorter than ``tol``), scaled by the weighted sum of the inputs' norms. Inputs whose
    norm is at most ``tol`` do not pull the direction (their weight still counts in the
    norm)."""
    if len(tensors) == 1:
        return tensors[0].clone()
    norms: list[float] = []
    units: list[torch.Tensor] = []
    for t in tensors:
        n = torch.linalg.norm(t).item()
        norms.append(n)
        units.append(torch.zeros_like(t) if n == 0.0 else t / n)
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    vunits = [units[i] for i in valid]
    u = torch.zeros_like(vunits[0])
    for a, ui in zip(weights, vunits):
        u += a * ui
    norm_u = torch.linalg.norm(u).item()
    u = vunits[0].clone() if norm_u < tol else u / norm_u
    for _ in range(int(max_iter)):
        step = torch.zeros_like(u)
        for a, ui in zip(weights, vunits):
            dot = torch.clamp(torch.dot(u.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            step += a * (theta / torch.sin(theta)) * (ui - dot * u)
        norm_step = torch.linalg.norm(step)
        if norm_step.item() < tol:
            break
        u = torch.cos(norm_step) * u + torch.sin(norm_step) * (step / norm_step)
        u_norm = torch.linalg.norm(u)
        if u_norm.item() > tol:
            u = u / u_norm
    scale = 0.0
    for a, n in zip(alphas, norms):
        scale += a * n
    return scale * u


@register_op(
    "karcher",
    base_is_input=True,
    defaults={"max_iter": 10.0, "tol": 1e-5},
    ranges={"max_iter": (0.0, None), "tol": (0.0, None)},
    check=lambda p, n: None if float(p["max_iter"]) == int(p["max_iter"])
    else f"max_iter={p['max_iter']} must be a whole number",
)
def karcher(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict,
            ctx: OpContext) -> torch.Tensor:
    """mergekit's Karcher-mean merge: the equally weighted Riemannian mean of all inputs
    (see :func:`karcher_mean`). As in mergekit, the models have no weights, and a
    ``base_model`` of a ``models:`` recipe is one more input (added last when not listed).
    For two inputs of equal norm it is ``slerp(x_0, x_1, t=0.5)``."""
    check_shapes(tensors, base, ctx)
    n = len(tensors)
    return karcher_mean(tensors, [1.0 / n] * n, int(params["max_iter"]), float(params["tol"]))
