"""The generalized task arithmetic (GTA) merge behind the task-vector operators.

:func:`generalized_task_arithmetic` computes ``base + lambda * mix(sparsified, weighted
deltas)`` chunk by chunk: exact magnitude / outlier cuts (:mod:`.sparsify`), random DARE /
DELLA drops (:mod:`.random_drop`), optional TIES sign consensus, and a fused per-chunk path
(:mod:`.fused`) where it applies. The operators registered on top of it, with their
parameters, defaults and deliberate deviations from mergekit, are in :mod:`.task_vectors`
(which re-exports this function).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import PlanError
from .fused import (
    COMPILED_CPU_CHUNK,
    InputFlags,
    fused_mode,
    gta_combine,
    run_band,
    run_equal_count,
    run_kernel,
    scalars,
)
from .parallel import run_chunks, scratch, torch_single_threaded
from .random_drop import UniformField, della_row_probabilities
from .registry import OpContext, check_shapes, step_seed
from .sparsify import (
    RankCut,
    chunk_bounds,
    chunk_size,
    float_below,
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


def compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    """float64 when every tensor is float64, else float32 (bf16 / fp16 inputs are widened
    chunk by chunk, exactly)."""
    return torch.float64 if all(t.dtype == torch.float64 for t in ts) else torch.float32


def _buf(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread scratch vector of ``n`` elements (:func:`.parallel.scratch`)."""
    return scratch(1, n, torch.empty(0, dtype=dtype, device=device))[0]


def _delta(t: torch.Tensor, b: torch.Tensor, s: int, e: int, out: torch.Tensor) -> torch.Tensor:
    """``t[s:e] - b[s:e]`` in ``out``'s dtype (inputs may be narrower: widened exactly first)."""
    if t.dtype == out.dtype and b.dtype == out.dtype:
        return torch.sub(t[s:e], b[s:e], out=out)
    out.copy_(t[s:e])
    return out.sub_(b[s:e])


def _prepare_cuts(inp: _Input, b: torch.Tensor, method: str,
                  bounds: list[tuple[int, int]], stats_fn=None, mode: str = "eager") -> None:
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
    cdt = compute_dtype(inp.flat, b)
    t = inp.flat
    band_fn = equal_fn = None
    if mode == "compiled" and b.device.type == "cpu" and cdt == torch.float32:
        def band_fn(s: int, e: int, lo: float, hi: float):
            return run_band(mode, t[s:e], b[s:e], torch.tensor([lo, hi], dtype=cdt))

        def equal_fn(s: int, e: int, v: float) -> int:
            return run_equal_count(mode, t[s:e], b[s:e], torch.tensor(v, dtype=cdt))
    wanted = sorted({r for r in ranks if r is not None})
    if stats_fn is not None:
        stats = stats_fn(wanted)
    else:
        stats = order_statistics(
            n,
            wanted,
            lambda s, e: _delta(t, b, s, e, _buf(e - s, cdt, b.device)).abs_(),
            lambda idx: torch.sub(t[idx].to(cdt), b[idx].to(cdt)).abs_(),
            b.device,
            bounds,
            band_fn=band_fn,
        )
    by_rank = {s.rank: s for s in stats}
    inp.cuts = [RankCut(n, k, by_rank.get(r), zero_ties_free=True) for k, r in zip(ks, ranks)]
    if any(c.sequential for c in inp.cuts):
        inp.chunk_cuts = _chunk_cuts(inp.cuts, t, b, bounds, equal_fn)


def _chunk_cuts(cuts: list[RankCut], t: torch.Tensor, b: torch.Tensor,
                bounds: list[tuple[int, int]], equal_fn=None) -> dict[int, list[RankCut]]:
    """Per-chunk copies of ``cuts`` with the tie budget each chunk gets in flat order
    (``equal_fn(s, e, v)``: a compiled count of ``|t - b| == v`` in the chunk)."""
    thrs = [c.thr if c.sequential else None for c in cuts]

    def count(s: int, e: int) -> list[int]:
        if equal_fn is not None:
            return [0 if v is None else equal_fn(s, e, v) for v in thrs]
        a = _delta(t, b, s, e, _buf(e - s, compute_dtype(t, b), b.device)).abs_()
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
        d = _delta(inp.flat, b, s, e, torch.empty(e - s, dtype=compute_dtype(inp.flat, b),
                                                  device=b.device))
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
    floats = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    if base.dtype not in floats or any(t.dtype not in floats for t in tensors):
        base = base.float()  # the contract is float32: anything else is computed in float32
        tensors = [t.float() for t in tensors]
    cdt = compute_dtype(base, *tensors)
    if cdt == torch.float64 or (base.device.type != "cpu" and base.device.type != "cuda"):
        base, tensors = base.to(cdt), [t.to(cdt) for t in tensors]
    out_dtype = ctx.out_dtype or cdt
    n = base.numel()
    if n == 0:
        return base.to(out_dtype, copy=True)
    device = base.device
    mode = fused_mode(device, n) if cdt == torch.float32 else "eager"
    size = COMPILED_CPU_CHUNK if mode == "compiled" and device.type == "cpu" else chunk_size(device)
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
            _prepare_cuts(inp, b, method, bounds, stats_fn, mode)
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

    out = torch.empty(base.shape, dtype=out_dtype, device=device)
    o = out.view(-1)
    if not live:
        o.copy_(b)
        return out
    ews = [inp.weight * inp.scale for inp in live]  # weight of the (rescaled) delta
    ws = [inp.weight for inp in live]
    lam_eff = lam if consensus else lam / divisor
    mixed_flags = tuple(InputFlags(False, False, False, w > 0) for w in ws)
    mixed_scal = scalars([0.0] * len(live), [0.0] * len(live), ews, ws, lam_eff, cdt, device)

    def chunk(s: int, e: int) -> None:
        if method == "della":  # row-wise drops: prune eagerly, then the same arithmetic
            ds = []
            for inp in live:
                d = _delta(inp.flat, b, s, e, torch.empty(e - s, dtype=cdt, device=device))
                if pruning[inp.pos]:
                    d = _sparsify_chunk(inp, d, method, rescale, align, device, s, e)
                ds.append(d)
            res = gta_combine(b[s:e].to(cdt), ds, mixed_scal, mixed_flags, consensus, normalize)
            o[s:e].copy_(res)
            return
        lows: list[float | None] = []
        highs: list[float | None] = []
        masks: list[torch.Tensor | None] = []
        for inp in live:
            lo = hi = m = None
            if method == "random" and pruning[inp.pos]:
                m = inp.draws.keep_at(s, e, inp.density).to(device)
            else:
                th = _chunk_thresholds(inp, s, method, pruning[inp.pos], cdt)
                if th is None:  # a partial tie budget here: this input's exact keep mask
                    m = _partial_tie_mask(inp, b, s, e, method, cdt)
                else:
                    lo, hi = th
            lows.append(lo)
            highs.append(hi)
            masks.append(m)
        flags = tuple(InputFlags(lo is not None, hi is not None, m is not None, w > 0)
                      for lo, hi, m, w in zip(lows, highs, masks, ws))
        scal = scalars([lo or 0.0 for lo in lows], [hi or 0.0 for hi in highs], ews, ws,
                       lam_eff, cdt, device)
        res = run_kernel(mode, b[s:e], [inp.flat[s:e] for inp in live], masks, scal, flags,
                         consensus, normalize, out_dtype)
        o[s:e].copy_(res)

    # the first chunk in this thread (a new graph compiles once, not in every pool thread)
    with torch_single_threaded():
        chunk(*bounds[0])
    if len(bounds) > 1:
        run_chunks(chunk, bounds[1:], device)
    return out


def _chunk_thresholds(inp: _Input, s: int, method: str | None, pruned: bool,
                      dtype: torch.dtype) -> tuple[float | None, float | None] | None:
    """(low, high) for :func:`.fused.gta_kernel` on the chunk starting at ``s``: keep
    ``|d| > low`` and ``|d| <= high`` (None: no such cut); None when a cut keeps only some of
    the elements equal to its threshold in this chunk (then pruning is sequential)."""
    if not pruned or method not in ("magnitude", "outliers"):
        return None, None
    cuts = _cuts_at(inp, s)
    top = _plain(cuts[0])
    if top is None:
        return None
    thr = cuts[0].thr
    if top == "all" or cuts[0].keeps_all_nonzero or (top == "ge" and thr == 0.0):
        low = None
    elif top == "none":
        low = math.inf
    else:
        low = thr if top == "gt" else float_below(thr, dtype)
    high = None
    if method == "outliers":  # keep what the cut of the n_top largest drops
        out = _plain(cuts[1])
        thr = cuts[1].thr
        if out is None:
            return None
        if out == "all":
            high = -math.inf
        elif out == "gt":
            high = thr
        elif out == "ge":
            high = float_below(thr, dtype)
    return low, high


def _partial_tie_mask(inp: _Input, b: torch.Tensor, s: int, e: int, method: str,
                      dtype: torch.dtype) -> torch.Tensor:
    """0/1 mask of what magnitude / outlier pruning keeps of this chunk, computed eagerly
    with the chunk's tie budgets (multiplying by it is exactly the pruning)."""
    a = _delta(inp.flat, b, s, e, torch.empty(e - s, dtype=dtype, device=b.device)).abs_()
    cuts = _cuts_at(inp, s, fresh=True)
    mask = cuts[0].keep_float(a)
    if method == "outliers" and cuts[1].mode != "none":
        mask.mul_(cuts[1].keep_float(a, kept=False))
    return mask


def _plain(cut: RankCut) -> str | None:
    """The cut's mode on its chunk when it is a plain threshold ("all", "none", "gt": keep
    above, "ge": keep at or above), None when it keeps only some ties there."""
    if cut.mode != "ties":
        return cut.mode
    if cut.ties_left == 0:
        return "gt"
    if cut.ties_left == cut.chunk_equal:
        return "ge"
    return None


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


__all__ = ["generalized_task_arithmetic"]
