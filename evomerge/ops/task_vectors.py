"""Task-vector operators: task_arithmetic, ties, dare_*, breadcrumbs*, della*, lines.

All of them are mergekit's "generalized task arithmetic" (GTA):

1. task vectors ``d_i = x_i - base``;
2. optional sparsification of each ``d_i`` (magnitude top-k, random DARE drop, breadcrumbs
   outliers, DELLA magnitude-ranked sampling), optionally rescaled;
3. weighting ``w_i d_i``;
4. optional TIES sign consensus ("sum" method): the elected sign of each entry is the sign
   of ``sum_i w_i d_i`` (>= 0 counts as +), and only agreeing entries are summed;
5. optional normalization by the sum of weights (of the agreeing inputs under consensus);
6. scaling by ``lambda``; output ``base + mixed``.

Parameters and defaults follow mergekit (``weight``, ``density``, ``gamma``, ``epsilon``
per model; ``lambda``, ``normalize``, ``rescale`` global). Deviations, all deliberate:

- DARE ``rescale`` divides the kept entries by the density (the DARE paper, and mergekit
  before it switched to matching the L1 norm of the delta; equal in expectation). DELLA
  ``rescale`` divides each kept entry by its own keep probability (the DELLA paper).
  ``rescale`` on magnitude methods (ties, breadcrumbs; off by default) matches the L1 norm
  of the pruned delta to the unpruned one, as mergekit does.
- ``density: 0`` keeps nothing (mergekit asserts); breadcrumbs with ``int(gamma n) = 0``
  drops no outliers (mergekit's ``indices[n_bot:-0]`` then keeps nothing at all).
- Random masks (DARE, DELLA) keep an entry when its draw from a per-input
  :class:`~.random_drop.UniformField` is below the keep probability. Each input's field is
  seeded from the step's generator (one seed drawn per input, for every input), so one
  input's mask does not depend on the other inputs' weights or densities, and a higher
  density keeps a superset. Reproducible per device type; CPU (numpy PCG64) and CUDA
  (torch Philox) streams differ, as mergekit's do.
- Magnitude ties at the threshold are broken by flat index so exactly ``k`` entries are
  kept (mergekit's argsort breaks them arbitrarily). mergekit's ``int8_mask`` (a memory
  option with no effect on the values) is not a parameter here.
- The computation (:mod:`.task_vector_merge`) streams flat chunks (see :mod:`.sparsify`);
  results equal the whole-tensor formulas up to float32 summation order.
"""

from __future__ import annotations

import math

from .registry import register_op
from .task_vector_merge import generalized_task_arithmetic

# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------
_DENSITY = {"density": (0.0, 1.0)}


def _della_check(params: dict, n: int) -> str | None:
    for d, eps in zip(params["density"], params["epsilon"]):
        if 0.0 < d < 1.0 and not (d - eps > 0.0 and d + eps < 1.0):
            return (
                f"epsilon={eps} with density={d}: keep probabilities density +/- epsilon "
                f"must lie inside (0, 1)"
            )
    return None


@register_op(
    "task_arithmetic",
    narrow_inputs=True,
    task_vectors=True,
    needs_base=True,
    per_input=("weight",),
    defaults={"weight": 1.0, "lambda": 1.0, "normalize": False},
)
def task_arithmetic(tensors, base, params, ctx):
    """Task arithmetic: base + lambda * sum_i w_i (x_i - base) (divided by sum w if
    ``normalize``; mergekit's default is false)."""
    return generalized_task_arithmetic(tensors, base, params, ctx, sparsification=None,
                                       consensus=False)


@register_op(
    "ties",
    narrow_inputs=True,
    task_vectors=True,
    magnitude_ranks=True,
    needs_base=True,
    per_input=("weight", "density"),
    defaults={"weight": 1.0, "density": 1.0, "lambda": 1.0, "normalize": True,
              "rescale": False},
    ranges=_DENSITY,
)
def ties(tensors, base, params, ctx):
    """TIES: keep the int(density n) largest |delta| per input (exactly, no sort), elect
    the sign of the weighted sum, sum the agreeing weighted deltas and divide by the sum
    of the agreeing weights (``normalize``, default true as in mergekit)."""
    return generalized_task_arithmetic(tensors, base, params, ctx,
                                       sparsification="magnitude", consensus=True)


def _register_dare(name: str):
    """The registration the two DARE variants share (they differ in sign consensus only)."""
    return register_op(
        name,
        narrow_inputs=True,
        task_vectors=True,
        needs_base=True,
        per_input=("weight", "density"),
        defaults={"weight": 1.0, "density": 1.0, "lambda": 1.0, "normalize": False,
                  "rescale": True},
        ranges=_DENSITY,
        random=True,
    )


@_register_dare("dare_ties")
def dare_ties(tensors, base, params, ctx):
    """DARE-TIES: drop each delta entry with probability 1 - density (seeded), rescale the
    kept ones by 1/density, then TIES sign consensus. mergekit defaults: no normalize."""
    return generalized_task_arithmetic(tensors, base, params, ctx,
                                       sparsification="random", consensus=True)


@_register_dare("dare_linear")
def dare_linear(tensors, base, params, ctx):
    """DARE without sign consensus: random drop with 1/density rescale, weighted sum."""
    return generalized_task_arithmetic(tensors, base, params, ctx,
                                       sparsification="random", consensus=False)


@register_op(
    "breadcrumbs",
    narrow_inputs=True,
    task_vectors=True,
    magnitude_ranks=True,
    needs_base=True,
    per_input=("weight", "density", "gamma"),
    defaults={"weight": 1.0, "density": 1.0, "gamma": 0.01, "lambda": 1.0,
              "normalize": False, "rescale": False},
    ranges={**_DENSITY, "gamma": (0.0, 1.0)},
)
def breadcrumbs(tensors, base, params, ctx):
    """Model Breadcrumbs: per input drop the int(gamma n) largest |delta| (outliers) and the
    smallest, keeping int(density n) (exactly, no sort); weighted sum, no consensus."""
    return generalized_task_arithmetic(tensors, base, params, ctx,
                                       sparsification="outliers", consensus=False)


@register_op(
    "breadcrumbs_ties",
    narrow_inputs=True,
    task_vectors=True,
    magnitude_ranks=True,
    needs_base=True,
    per_input=("weight", "density", "gamma"),
    defaults={"weight": 1.0, "density": 1.0, "gamma": 0.01, "lambda": 1.0,
              "normalize": False, "rescale": False},
    ranges={**_DENSITY, "gamma": (0.0, 1.0)},
)
def breadcrumbs_ties(tensors, base, params, ctx):
    """Model Breadcrumbs pruning followed by TIES sign consensus (mergekit: no normalize)."""
    return generalized_task_arithmetic(tensors, base, params, ctx,
                                       sparsification="outliers", consensus=True)


_DELLA = dict(
    needs_base=True,
    per_input=("weight", "density", "epsilon"),
    ranges={**_DENSITY, "epsilon": (0.0, 0.5)},
    random=True,
    check=_della_check,
)


@register_op(
    "della",
    narrow_inputs=True,
    task_vectors=True,
    defaults={"weight": 1.0, "density": 1.0, "epsilon": 0.15, "lambda": 1.0,
              "normalize": True, "rescale": True},
    **_DELLA,
)
def della(tensors, base, params, ctx):
    """DELLA: per row, keep each delta entry with probability rising linearly with its
    magnitude rank from density-epsilon to density+epsilon, rescale kept entries by
    1/probability, then TIES sign consensus (normalize on, as in mergekit). The per-row
    ranks need one row-wise sort (DELLA's definition is rank based)."""
    return generalized_task_arithmetic(tensors, base, params, ctx,
                                       sparsification="della", consensus=True)


@register_op(
    "della_linear",
    narrow_inputs=True,
    task_vectors=True,
    defaults={"weight": 1.0, "density": 1.0, "epsilon": 0.15, "lambda": 1.0,
              "normalize": False, "rescale": True},
    **_DELLA,
)
def della_linear(tensors, base, params, ctx):
    """DELLA pruning without sign consensus: weighted sum of the rescaled sampled deltas."""
    return generalized_task_arithmetic(tensors, base, params, ctx,
                                       sparsification="della", consensus=False)


# --------------------------------------------------------------------------------------
# LiNeS: depth-dependent scaling of the task vector
# --------------------------------------------------------------------------------------
def lines_scale(alpha: float, beta: float, layer: float, num_layers: int) -> float:
    """LiNeS scale of layer ``layer`` (0-based) of ``num_layers``: ``alpha`` at the first
    layer growing linearly to ``beta`` at the last (``alpha`` when there is one layer)."""
    if num_layers <= 1:
        return float(alpha)
    return float(alpha) + (float(beta) - float(alpha)) * float(layer) / (num_layers - 1)


def _lines_check(params: dict, n: int) -> str | None:
    for key in ("alpha", "beta", "layer", "num_layers"):
        value = params.get(key)
        if value is None:
            return f"needs {key!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value
        ):
            return f"{key!r} must be a finite number, got {value!r}"
    num_layers, layer = params["num_layers"], params["layer"]
    if float(num_layers) != int(num_layers) or int(num_layers) < 1:
        return f"num_layers={num_layers} must be a positive integer"
    if not 0 <= layer <= int(num_layers) - 1:
        return f"layer={layer} is out of range [0, {int(num_layers) - 1}]"
    return None


@register_op(
    "lines",
    narrow_inputs=True,
    task_vectors=True,
    needs_base=True,
    per_input=("weight",),
    defaults={"weight": 1.0, "alpha": None, "beta": None, "layer": None,
              "num_layers": None, "normalize": False},
    check=_lines_check,
)
def lines(tensors, base, params, ctx):
    """LiNeS (Wang et al., "LiNeS: Post-training layer scaling prevents forgetting and
    enhances model merging", 2024): the task vector sum_i w_i (x_i - base) (divided by
    sum w if ``normalize``) is scaled by a factor that grows linearly with depth,
    ``scale = alpha + (beta - alpha) * layer / (num_layers - 1)``, so shallow layers stay
    near the base (general features) and deep layers take the task-specific change.

    ``layer`` is 0-based; the planner assigns non-layer tensors (embeddings, head) a layer
    position of its choice. The paper writes the scale as ``alpha + beta * (l-1)/(L-1)``
    with 1-based l; here ``beta`` is the scale at the last layer (the paper's alpha+beta).
    """
    scale = lines_scale(params["alpha"], params["beta"], params["layer"],
                        int(params["num_layers"]))
    p = dict(params)
    p["lambda"] = 1.0
    return generalized_task_arithmetic(tensors, base, p, ctx, sparsification=None,
                                       consensus=False, extra_scale=scale)


__all__ = ["generalized_task_arithmetic", "lines_scale"]
