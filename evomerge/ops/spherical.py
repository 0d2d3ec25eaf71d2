"""Spherical interpolation: mergekit's ``slerp`` and M2N2's split-point crossover.

Both reduce to a linear combination ``cA * a + cB * b`` with scalar coefficients computed
from the two vectors' norms and inner product; only how the coefficients are computed
differs (mergekit: per tensor, lerp when |cos| > 0.9995; M2N2: over a whole parameter
vector, lerp when sin(angle) <= 1e-6).
"""

from __future__ import annotations

import math

import torch

from ..errors import PlanError
from .registry import OpContext, register_op

# mergekit's slerp: vectors this close to colinear (|cos| above it) are lerped
MERGEKIT_DOT_THRESHOLD = 0.9995
MERGEKIT_NORM_EPS = 1e-8


def slerp_coefficients(
    dot: float, norm_a: float, norm_b: float, t: float, eps: float = 1e-6
) -> tuple[float, float]:
    """Coefficients (cA, cB) with ``SLERP(a, b; t) = cA * a + cB * b`` as in M2N2's
    reference code (SakanaAI/natural_niches ``slerp``): ``omega = arccos(clip(cos, -1, 1))``
    with ``cos = dot / (|a| |b|)``, ``cA = sin((1-t) omega) / sin(omega)``,
    ``cB = sin(t omega) / sin(omega)``, and the linear ``(1 - t, t)`` when
    ``sin(omega) <= eps``.

    The caller computes ``dot``, ``norm_a``, ``norm_b`` over the whole vector being
    interpolated (e.g. all tensors of a model in a fixed flattening order), so the same
    coefficients apply to every tensor. Deviation: a zero-norm vector (where the reference
    divides by zero and yields NaN) also gets the linear coefficients.
    """
    t = float(t)
    if norm_a <= 0.0 or norm_b <= 0.0 or not math.isfinite(dot):
        return 1.0 - t, t
    cos = min(1.0, max(-1.0, float(dot) / (float(norm_a) * float(norm_b))))
    omega = math.acos(cos)
    so = math.sin(omega)
    if so <= eps:
        return 1.0 - t, t
    return math.sin((1.0 - t) * omega) / so, math.sin(t * omega) / so


def mergekit_slerp_coefficients(dot: float, norm_a: float, norm_b: float,
                                t: float) -> tuple[float, float]:
    """mergekit's slerp coefficients: vectors are normalized when their norm exceeds 1e-8;
    if the normalized dot product exceeds 0.9995 in absolute value, lerp ``(1-t, t)``;
    otherwise ``sin((1-t) theta) / sin(theta)`` and ``sin(t theta) / sin(theta)``."""
    t = float(t)
    na = norm_a if norm_a > MERGEKIT_NORM_EPS else 1.0
    nb = norm_b if norm_b > MERGEKIT_NORM_EPS else 1.0
    cos = float(dot) / (na * nb)
    if abs(cos) > MERGEKIT_DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(min(1.0, max(-1.0, cos)))
    st = math.sin(theta)
    return math.sin(theta - theta * t) / st, math.sin(theta * t) / st


def _same_shape(a: torch.Tensor, b: torch.Tensor, ctx: OpContext) -> None:
    if a.shape != b.shape:
        raise PlanError(
            f"tensor {ctx.name!r}: input shapes differ ({tuple(a.shape)} vs "
            f"{tuple(b.shape)}); merge operators need equal shapes"
        )


def _dot_norms(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """Inner product and norms, accumulated in float64 (in slices, to bound temporaries)."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    dot = sa = sb = 0.0
    step = 1 << 20
    for s in range(0, fa.numel(), step):
        xa, xb = fa[s:s + step].double(), fb[s:s + step].double()
        dot += float(torch.dot(xa, xb))
        sa += float(torch.dot(xa, xa))
        sb += float(torch.dot(xb, xb))
    return dot, math.sqrt(sa), math.sqrt(sb)


def _combine(a: torch.Tensor, b: torch.Tensor, ca: float, cb: float) -> torch.Tensor:
    out = torch.mul(a, ca)
    out.add_(b, alpha=cb)
    return out


def _slerp_check(params: dict, n: int) -> str | None:
    if params.get("t") is None:
        return "needs 't' (the interpolation factor, 0 = first input, 1 = second)"
    return None


@register_op(
    "slerp",
    defaults={"t": None},
    ranges={"t": (0.0, 1.0)},
    min_inputs=2,
    max_inputs=2,
    check=_slerp_check,
)
def slerp(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict,
          ctx: OpContext) -> torch.Tensor:
    """Spherical interpolation between the two inputs (``t = 0`` gives the first, mergekit's
    base model, ``t = 1`` the second), with mergekit's semantics: one angle per tensor from
    the normalized flattened tensors, linear interpolation when ``|cos| > 0.9995``.
    The angle is computed in float64 (mergekit: float32 numpy); the result is identical up
    to float32 rounding."""
    a, b = tensors
    _same_shape(a, b, ctx)
    t = float(params["t"])
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    if ctx.stats is not None and ctx.input_keys is not None:  # genome-independent: reuse
        dot, na, nb = ctx.stats.dot_norms(ctx.input_keys[0], ctx.input_keys[1],
                                          lambda: _dot_norms(a, b))
    else:
        dot, na, nb = _dot_norms(a, b)
    ca, cb = mergekit_slerp_coefficients(dot, na, nb, t)
    return _combine(a, b, ca, cb)


def _m2n2_check(params: dict, n: int) -> str | None:
    if params.get("split") is None:
        return "needs 'split' (element index in this tensor's flattened view)"
    split = params["split"]
    if isinstance(split, bool) or not isinstance(split, (int, float)) or split != int(split):
        return f"split={split!r} must be a whole number"
    for key in ("coef_before", "coef_after"):
        value = params.get(key)
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) for v in value)
        ):
            return f"{key!r} must be two finite numbers [cA, cB], got {value!r}"
    return None


@register_op(
    "m2n2_crossover",
    defaults={"split": None, "coef_before": None, "coef_after": None},
    ranges={"split": (0, None)},
    min_inputs=2,
    max_inputs=2,
    check=_m2n2_check,
)
def m2n2_crossover(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict,
                   ctx: OpContext) -> torch.Tensor:
    """M2N2 split-point crossover, for one tensor of the parents A and B.

    With ``flat`` this tensor's flattened view and ``split`` an element index local to it
    (in [0, numel]; the caller maps the global split point of the model's fixed flattening
    order onto each tensor: 0 or numel for tensors wholly after or before it)::

        flat[:split] = coef_before[0] * A + coef_before[1] * B
        flat[split:] = coef_after[0] * A + coef_after[1] * B

    The coefficients are scalars the caller computes once for the whole vector, e.g. with
    :func:`slerp_coefficients` at ``w`` before the split and ``1 - w`` after it, so the
    operator itself is a piecewise linear combination (cheap, exact, any device).
    """
    a, b = tensors
    _same_shape(a, b, ctx)
    n = a.numel()
    split = int(params["split"])
    if split > n:
        raise PlanError(
            f"tensor {ctx.name!r}: m2n2_crossover split={split} is beyond the tensor's "
            f"{n} elements"
        )
    (cab, cbb), (caa, cba) = params["coef_before"], params["coef_after"]
    out = torch.empty_like(a)
    fo, fa, fb = out.view(-1), a.reshape(-1), b.reshape(-1)
    if split > 0:
        torch.mul(fa[:split], float(cab), out=fo[:split])
        fo[:split].add_(fb[:split], alpha=float(cbb))
    if split < n:
        torch.mul(fa[split:], float(caa), out=fo[split:])
        fo[split:].add_(fb[split:], alpha=float(cba))
    return out
