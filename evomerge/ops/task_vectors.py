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
  :class:`~.sparsify.UniformField` is below the keep probability. Each input's field is
  seeded from the step's generator (one seed drawn per input, for every input), so one
  input's mask does not depend on the other inputs' weights or densities, and a higher
  density keeps a superset. Reproducible per device type; CPU (numpy PCG64) and CUDA
  (torch Philox) streams differ, as mergekit's do.
- Magnitude ties at the threshold are broken by flat index so exactly ``k`` entries are
  kept (mergekit's argsort breaks them arbitrarily). mergekit's ``int8_mask`` (a memory
  option with no effect on the values) is not a parameter here.
- The computation streams flat chunks (see :mod:`.sparsify`); results equal the
  whole-tensor formulas up to float32 summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import PlanError
from .fused import fused_gta, fused_mode, gta_elementwise
from .parallel import run_chunks, scratch
from .registry import OpContext, check_shapes, register_op, step_seed
from .sparsify import (
    RankCut,
    UniformField,
    chunk_bounds,
    chunk_size,
    della_row_probabilities,
    magnitude_k,
    order_statistics,
    outlier_ks,
)

# mergekit's tolerance for the L1 rescale of magnitude-pruned deltas
_RESCALE_EPS = 1e-7


@dataclass
class _Input:
    pos: int
    flat: torch.Tensor
    weight: float
    density: float = 1.0
    gamma: float = 0.0
    epsilon: float = 0.0
    # magnitude: one cut; outliers: (cut keeping top n_keep+n_top, cut of the n_top outliers)
    cuts: list[RankCut] = field(default_factory=list)
    # per chunk start: independent copies of the cuts with their tie budgets (only when a
    # cut keeps some but not all elements equal to its threshold)
    chunk_cuts: dict[int, list[RankCut]] | None = None
    draws: UniformField | None = None  # random draws (DARE, DELLA)
    scale: float = 1.0  # multiplies the sparsified delta (DARE 1/p, L1 rescale)
    dead: bool = False  # contributes nothing (zero weight or nothing kept)


def _input_seeds(n: int, ctx: OpContext, device: torch.device) -> list[int]:
    """One seed per input, drawn from the step's generator (every input draws one, so each
    input's stream depends only on the step seed and its position)."""
    g = ctx.generator
    if g is None:
        g = torch.Generator(device=device).manual_seed(step_seed(0, ctx.name))
    return [int(s) for s in torch.randint(0, 2**62, (n,), generator=g, device=g.device).tolist()]


def _prepare_cuts(inp: _Input, b: torch.Tensor, method: str,
                  bounds: list[tuple[int, int]], stats_fn=None) -> None:
    """Exact thresholds for magnitude / outlier pruning of one input (one streaming pass,
    or a lookup in precomputed statistics: ``stats_fn(ranks)`` when given)."""
    n = b.numel()
    if method == "magnitude":
        ks = [magnitude_k(n, inp.density)]
        if ks[0] == 0:
            inp.dead = True
            return
    else:  # outliers
        n_top, n_keep = outlier_ks(n, inp.density, inp.gamma)
        if n_keep == 0:
            inp.dead = True
            return
        ks = [n_keep + n_top, n_top]
    ranks = [RankCut.rank_for(n, k) for k in ks]
    wanted = sorted({r for r in ranks if r is not None})
    t = inp.flat
    if stats_fn is not None:
        stats = stats_fn(wanted)
    else:
        stats = order_statistics(
            n,
            wanted,
            lambda s, e: torch.sub(t[s:e], b[s:e], out=scratch(1, e - s, b)[0]).abs_(),
            lambda idx: torch.sub(t[idx], b[idx]).abs_(),
            b.device,
            bounds,
        )
    by_rank = {s.rank: s for s in stats}
    inp.cuts = [RankCut(n, k, by_rank.get(r), zero_ties_free=True) for k, r in zip(ks, ranks)]
    if any(c.sequential for c in inp.cuts):
        inp.chunk_cuts = _chunk_cuts(inp.cuts, t, b, bounds)


def _chunk_cuts(cuts: list[RankCut], t: torch.Tensor, b: torch.Tensor,
                bounds: list[tuple[int, int]]) -> dict[int, list[RankCut]]:
    """Per-chunk copies of ``cuts`` with the tie budget each chunk gets in flat order."""
    thrs = [c.thr if c.sequential else None for c in cuts]

    def count(s: int, e: int) -> list[int]:
        a = torch.sub(t[s:e], b[s:e], out=scratch(1, e - s, b)[0]).abs_()
        x = a.numpy() if a.device.type == "cpu" else a  # numpy's compare: faster on CPU
        nz = np.count_nonzero if a.device.type == "cpu" else torch.count_nonzero
        return [0 if v is None else int(nz(x == v)) for v in thrs]

    counts = run_chunks(count, bounds, b.device)
    per_cut = [c.for_chunks([row[j] for row in counts]) for j, c in enumerate(cuts)]
    return {s: [pc[i] for pc in per_cut] for i, (s, _) in enumerate(bounds)}


def _cuts_at(inp: _Input, s: int, fresh: bool = False) -> list[RankCut]:
    """The cuts for the chunk starting at ``s`` (copies when ``fresh``: pruning advances
    tie counters)."""
    cuts = inp.cuts if inp.chunk_cuts is None else inp.chunk_cuts[s]
    return [c.copy() for c in cuts] if fresh or inp.chunk_cuts is not None else cuts


def _magnitude_prune(cuts: list[RankCut], d: torch.Tensor, method: str) -> torch.Tensor:
    """``d`` with the entries the cuts drop set to 0 (advances the cuts' tie counters)."""
    if method == "magnitude":
        return cuts[0].prune(d)
    top, outliers = cuts
    a = None if outliers.mode == "none" else d.abs()
    d = top.prune(d)
    if a is not None:
        d.mul_(outliers.keep_float(a, kept=False))
    return d


def _l1_rescale(inp: _Input, b: torch.Tensor, method: str,
                bounds: list[tuple[int, int]]) -> float:
    """mergekit's rescale of a magnitude-pruned delta: ||d||_1 / ||pruned d||_1."""

    def sums(s: int, e: int) -> tuple[float, float]:
        d = torch.sub(inp.flat[s:e], b[s:e])
        total = float(d.abs().sum(dtype=torch.float64))
        d = _magnitude_prune(_cuts_at(inp, s, fresh=True), d, method)
        return total, float(d.abs().sum(dtype=torch.float64))

    total = kept = 0.0
    for t_c, k_c in run_chunks(sums, bounds, b.device):
        total += t_c
        kept += k_c
    if total < _RESCALE_EPS or kept < _RESCALE_EPS:
        return 1.0
    return total / kept


def generalized_task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    params: dict,
    ctx: OpContext,
    *,
    sparsification: str | None,
    consensus: bool,
    extra_scale: float = 1.0,
) -> torch.Tensor:
    """The GTA merge (see the module docstring). ``sparsification`` is one of None,
    "magnitude", "outliers", "random", "della"; ``extra_scale`` multiplies lambda (LiNeS)."""
    if base is None:
        raise PlanError(f"tensor {ctx.name!r}: this operator needs a base model")
    check_shapes(tensors, base, ctx)
    if base.dtype not in (torch.float32, torch.float64) or any(
        t.dtype != base.dtype for t in tensors
    ):  # the contract is float32; anything else is computed in float32
        base = base.float()
        tensors = [t.float() for t in tensors]
    n = base.numel()
    if n == 0:
        return base.clone()
    device = base.device
    size = chunk_size(device)
    b = base.reshape(-1)
    weights = [float(w) for w in params["weight"]]
    densities = params.get("density") or [1.0] * len(tensors)
    gammas = params.get("gamma") or [0.0] * len(tensors)
    epsilons = params.get("epsilon") or [0.0] * len(tensors)
    normalize = bool(params.get("normalize", False))
    rescale = bool(params.get("rescale", False))
    lam = float(params.get("lambda", 1.0)) * extra_scale

    inputs = [
        _Input(i, t.reshape(-1), weights[i], float(densities[i]), float(gammas[i]),
               float(epsilons[i]))
        for i, t in enumerate(tensors)
    ]
    method = sparsification
    align = 1
    if method == "della":
        align = n if base.dim() < 2 else n // base.shape[0]
        align = max(align, 1)
    bounds = list(chunk_bounds(n, size, align))
    if method in ("random", "della"):
        for inp, seed in zip(inputs, _input_seeds(len(inputs), ctx, device)):
            inp.draws = UniformField(seed, device)
    for inp in inputs:
        if inp.weight == 0.0:
            inp.dead = True
            continue
        if method is None or inp.density >= 1.0:
            continue  # mergekit: density >= 1 leaves the delta untouched (no rescale)
        if inp.density <= 0.0:
            inp.dead = True
        elif method in ("magnitude", "outliers"):
            stats_fn = None
            if ctx.stats is not None and ctx.input_keys is not None:
                stats_fn = ctx.stats.magnitude_stats_fn(ctx.input_keys[inp.pos],
                                                        ctx.base_key, inp.flat, b)
            _prepare_cuts(inp, b, method, bounds, stats_fn)
            if rescale and not inp.dead:
                inp.scale = _l1_rescale(inp, b, method, bounds)
        elif method == "random" and rescale:
            inp.scale = 1.0 / inp.density
    live = [inp for inp in inputs if not inp.dead]
    pruning = {inp.pos: method is not None and inp.density < 1.0 for inp in live}

    divisor = 1.0
    if normalize and not consensus:
        total_w = sum(weights)
        divisor = total_w if abs(total_w) >= 1e-8 else 1.0

    out = torch.empty_like(base)
    o = out.view(-1)
    if _fused_pass(live, pruning, method, consensus, normalize, lam, divisor, b, o, bounds,
                   device):
        return out

    def chunk(s: int, e: int) -> None:
        b_c = b[s:e]
        bufs = scratch(len(live) + 4, e - s, b)  # per-thread buffers: no allocation per chunk
        # 1) sparsified deltas, and their weighted sum S (the elected sign is sign(S))
        deltas: list[tuple[_Input, torch.Tensor]] = []
        S = None
        for j, inp in enumerate(live):
            d = torch.sub(inp.flat[s:e], b_c, out=bufs[j])
            if pruning[inp.pos]:
                d = _sparsify_chunk(inp, d, method, rescale, align, device, s, e)
            ew = inp.weight * inp.scale  # weight of the (rescaled) delta
            if consensus:
                deltas.append((inp, d))
                S = torch.mul(d, ew, out=bufs[-1]) if S is None else S.add_(d, alpha=ew)
            else:
                S = d.mul_(ew) if S is None else S.add_(d, alpha=ew)
        if S is None:
            o[s:e].copy_(b_c)
            return
        if not consensus:
            torch.add(b_c, S, alpha=lam / divisor, out=o[s:e])
            return
        # 2) TIES: keep the entries whose weighted delta has the elected sign (S >= 0 is +)
        sgn = torch.ge(S, 0, out=S).mul_(2.0).sub_(1.0)  # +1 / -1, reuses S
        mixed = bufs[-2].zero_()
        div = bufs[-3].zero_() if normalize else None
        agree = bufs[-4]
        for inp, d in deltas:
            torch.mul(d, sgn, out=agree)
            # sign(w d) == elected sign  <=>  d * sgn has the sign of w, and is nonzero
            (torch.gt if inp.weight > 0 else torch.lt)(agree, 0, out=agree)
            mixed.addcmul_(d, agree, value=inp.weight * inp.scale)
            if div is not None:
                div.add_(agree, alpha=inp.weight)
        if div is not None:
            div.add_(torch.eq(div, 0, out=agree))  # mergekit: a zero divisor becomes 1
            mixed.div_(div)
        torch.add(b_c, mixed, alpha=lam, out=o[s:e])

    run_chunks(chunk, bounds, device)
    return out


def _fused_thresholds(inp: _Input, method: str | None,
                      pruned: bool) -> tuple[float, float] | None:
    """(low, high) of :func:`.fused.gta_elementwise` for one input: keep ``|d| > low`` and
    ``|d| <= high``; None when its cuts need a sequential tie budget."""
    if not pruned or method not in ("magnitude", "outliers"):
        return -1.0, math.inf
    if inp.chunk_cuts is not None:
        return None
    top = inp.cuts[0]
    if top.keeps_all_nonzero or (top.mode == "ge" and top.thr == 0.0):
        low = -1.0
    elif top.mode == "ge":
        low = _float_below(top.thr)
    elif top.mode == "gt":
        low = top.thr
    else:
        return None
    high = math.inf
    if method == "outliers":
        cut = inp.cuts[1]
        if cut.mode == "gt":
            high = cut.thr
        elif cut.mode == "ge":
            high = _float_below(cut.thr)
        elif cut.mode != "none":
            return None
    return low, high


def _float_below(x: float) -> float:
    t = torch.tensor(x, dtype=torch.float32)
    return torch.nextafter(t, torch.tensor(-math.inf)).item()


def _fused_pass(live: list[_Input], pruning: dict[int, bool], method: str | None,
                consensus: bool, normalize: bool, lam: float, divisor: float,
                b: torch.Tensor, o: torch.Tensor, bounds: list[tuple[int, int]],
                device: torch.device) -> bool:
    """The merge as one fused function per chunk (:mod:`.fused`); False: not applicable
    here (then the chunk loop runs)."""
    mode = fused_mode(device)
    if mode is None or not live or method == "della":
        return False
    th = [_fused_thresholds(inp, method, pruning[inp.pos]) for inp in live]
    if any(t is None for t in th):
        return False
    ews = [inp.weight * inp.scale for inp in live]
    ws = [inp.weight for inp in live]
    for s, e in bounds:  # CUDA: one chunk per tensor up to CUDA_CHUNK elements
        masks = [inp.draws.keep_at(s, e, inp.density).to(device)
                 if method == "random" and pruning[inp.pos] else None for inp in live]
        args = (b[s:e], [inp.flat[s:e] for inp in live], masks, [t[0] for t in th],
                [t[1] for t in th], ews, ws, consensus, normalize, lam, divisor)
        res = fused_gta(*args) if mode == "compiled" else gta_elementwise(*args)
        if res is None:
            if s != 0:  # draws already taken for earlier chunks: finish eagerly here
                res = gta_elementwise(*args)
            else:
                return False
        o[s:e].copy_(res)
    return True


def _sparsify_chunk(inp: _Input, d: torch.Tensor, method: str | None, rescale: bool,
                    align: int, device: torch.device, s: int, e: int) -> torch.Tensor:
    if method in ("magnitude", "outliers"):
        return _magnitude_prune(_cuts_at(inp, s), d, method)
    assert inp.draws is not None
    if method == "random":
        return d.mul_(inp.draws.keep_at(s, e, inp.density).to(device))
    # della: this chunk holds whole rows of length ``align``
    probs = della_row_probabilities(d.view(-1, align).abs(), inp.density, inp.epsilon)
    probs = probs.view(-1)
    u = inp.draws.uniform_at(s, e).to(device)
    d.mul_(torch.lt(u, probs, out=u))
    if rescale:
        d.div_(probs)
    return d


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


@register_op(
    "dare_ties",
    needs_base=True,
    per_input=("weight", "density"),
    defaults={"weight": 1.0, "density": 1.0, "lambda": 1.0, "normalize": False,
              "rescale": True},
    ranges=_DENSITY,
    random=True,
)
def dare_ties(tensors, base, params, ctx):
    """DARE-TIES: drop each delta entry with probability 1 - density (seeded), rescale the
    kept ones by 1/density, then TIES sign consensus. mergekit defaults: no normalize."""
    return generalized_task_arithmetic(tensors, base, params, ctx,
                                       sparsification="random", consensus=True)


@register_op(
    "dare_linear",
    needs_base=True,
    per_input=("weight", "density"),
    defaults={"weight": 1.0, "density": 1.0, "lambda": 1.0, "normalize": False,
              "rescale": True},
    ranges=_DENSITY,
    random=True,
)
def dare_linear(tensors, base, params, ctx):
    """DARE without sign consensus: random drop with 1/density rescale, weighted sum."""
    return generalized_task_arithmetic(tensors, base, params, ctx,
                                       sparsification="random", consensus=False)


@register_op(
    "breadcrumbs",
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
