"""Control operator ``output_mixture``: a mixture of API-only models' next-token distributions.

The ``output_mixture`` search space compiles a genome to a *control* MergePlan: one step
whose inputs name the endpoints (``[key, "next_token_logprobs"]``, sources ``api:<url>``)
and whose params are the mixture weights (``weight``, one per endpoint, >= 0, summing to 1),
``combine`` (linear | log_linear) and ``top_logprobs``. Registering the operator lets the
plan be validated like any other (unknown params, wrong lengths, ranges) and hashed for the
fitness cache; the mixture itself happens at decoding time (:mod:`evomerge.fitness.backends.mixture_decoder`:
the ``mixture`` fitness backend and ``evomerge serve --ensemble``), never on tensors, so the
operator's function refuses to run (there are no weights on this machine to combine).
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import PlanError
from .registry import OpContext, register_op

#: the output name of the one step of an output-mixture control plan
MIXTURE_OUTPUT = "output_mixture"
#: the "tensor" every input of that step reads: an endpoint's next-token distribution
MIXTURE_TENSOR = "next_token_logprobs"
COMBINES = ("linear", "log_linear")


def _check(params: dict[str, Any], n: int) -> str | None:
    if params.get("combine") not in COMBINES:
        return f"combine must be one of {', '.join(COMBINES)}, got {params.get('combine')!r}"
    top = params.get("top_logprobs")
    if not float(top).is_integer() or top < 1:
        return f"top_logprobs must be an integer >= 1, got {top!r}"
    total = math.fsum(params["weight"])
    if abs(total - 1.0) > 1e-6:
        return f"weights must sum to 1 (normalized mixture), got {total:.8g}"
    return None


@register_op("output_mixture", per_input=("weight",), defaults={"combine": "linear", "top_logprobs": 5},
             ranges={"weight": (0.0, 1.0), "top_logprobs": (1, None)}, min_inputs=1, check=_check)
def output_mixture(tensors: list[Any], base: Any, params: dict[str, Any], ctx: OpContext) -> Any:
    """Weighted mixture (linear or log-linear) of API-only models' next-token distributions,
    applied while decoding by the ``mixture`` backend / ``evomerge serve --ensemble``."""
    raise PlanError("operator 'output_mixture' is a control step applied while decoding (mixture backend, "
                    "evomerge serve --ensemble); it has no tensor implementation (the models are API-only)")
