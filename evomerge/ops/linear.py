"""The linear merge (model soup): a weighted average of the inputs."""

from __future__ import annotations

import torch

from .registry import OpContext, check_shapes, register_op


def zero_weight_sum(flag: str):
    """A cross-parameter check refusing weights that sum to 0 while ``flag`` (a boolean
    parameter) says to divide by their sum."""

    def check(params: dict, n: int) -> str | None:
        if params[flag] and abs(sum(params["weight"])) < 1e-8:
            return (
                f"weights {params['weight']} sum to 0, so '{flag}' would divide by zero "
                f"(set {flag}: false or change the weights)"
            )
        return None

    return check


@register_op(
    "linear",
    per_input=("weight",),
    defaults={"weight": 1.0, "normalize": True},
    check=zero_weight_sum("normalize"),
)
def linear(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict,
           ctx: OpContext) -> torch.Tensor:
    """Weighted sum ``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize`` (the
    default, as in mergekit). A zero weight sum with ``normalize`` is refused at validation
    instead of producing inf/NaN weights."""
    weights = params["weight"]
    ref = tensors[0]
    check_shapes(tensors, None, ctx)
    factor = 1.0
    if params["normalize"]:
        factor = 1.0 / sum(weights)
    # one output allocation, then in-place accumulation (no stacked copy of the inputs)
    out = torch.mul(ref, weights[0] * factor)
    for t, w in zip(tensors[1:], weights[1:]):
        if w != 0.0:
            out.add_(t, alpha=w * factor)
    return out
