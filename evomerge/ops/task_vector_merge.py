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
from .fused import fused_gta, fused_mode, gta_elementwise
from .parallel import run_chunks, scratch
from .random_drop import UniformField, della_row_probabilities
from .registry import OpContext, check_shapes, step_seed
from .sparsify import (
    RankCut,
    chunk_bounds,
    chunk_size,
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


__all__ = ["generalized_task_arithmetic"]
