"""Passthrough: output tensor = one input tensor, optionally scaled.

This is how layer assembly is expressed: output layer i taken from model m layer j is a
step whose single input names ``[m, "model.layers.j..."]``. Layer swaps, frankenmerges and
stacking are therefore plain MergePlan data, not a separate mechanism.
"""

from __future__ import annotations

import torch

from .registry import OpContext, register_op


@register_op("passthrough", defaults={"scale": 1.0}, min_inputs=1, max_inputs=1)
def passthrough(tensors: list[torch.Tensor], base: torch.Tensor | None, params: dict,
                ctx: OpContext) -> torch.Tensor:
    """The single input, times ``scale`` (mergekit's passthrough ``scale`` parameter).

    With ``scale == 1`` the input tensor itself is returned (no copy): callers cast or copy
    it into the output and must not modify it in place.
    """
    x = tensors[0]
    scale = float(params["scale"])
    if scale == 1.0:
        return x
    return torch.mul(x, scale)
