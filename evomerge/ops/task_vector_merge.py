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
    ChunkCut,
    KernelFlags,
    fused_mode,
    gta_combine,
    run_band,
    run_count,
    run_count_many,
    run_kernel_into,
    run_tie_blocks,
    scalars,
    split_ties,
)
from .order_stats import TIE_BLOCK, OrderStat, Stream, counting, order_statistics_many
from .parallel import run_chunks, run_items, scratch
from .random_drop import UniformField, della_row_probabilities
from .registry import OpContext, check_shapes, step_seed
from .sparsify import (
    RankCut,
    balanced_bounds,
    chunk_bounds,
    chunk_size,
    magnitude_k,
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
    given: bool = False  # ``flat`` is the task vector x - base already (resident, float32)
    # threshold -> (blocks of the values equal to it, block size), from precomputed stats
    tie_blocks: dict[float, tuple] = field(default_factory=dict)


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


def _delta(t: torch.Tensor, b: torch.Tensor, s: int, e: int, out: torch.Tensor,
           given: bool = False) -> torch.Tensor:
    """``t[s:e] - b[s:e]`` in ``out``'s dtype (inputs may be narrower: widened exactly first);
    with ``given``, ``t`` is that task vector already (copied: callers modify ``out``)."""
    if given:
        return out.copy_(t[s:e])
    if t.dtype == out.dtype and b.dtype == out.dtype:
        return torch.sub(t[s:e], b[s:e], out=out)
    out.copy_(t[s:e])
    return out.sub_(b[s:e])


def _cut_ranks(inp: _Input, n: int, method: str) -> tuple[list[int], list[int | None]] | None:
    """How many elements each cut of magnitude / outlier pruning keeps, and the ascending
    rank of the order statistic each needs; None when the input keeps nothing."""
    if method == "magnitude":
        ks = [magnitude_k(n, inp.density)]
        if ks[0] == 0:
            return None
    else:  # outliers
        n_top, n_keep = outlier_ks(n, inp.density, inp.gamma)
        if n_keep == 0:
            return None
        ks = [n_keep + n_top, n_top]
    return ks, [RankCut.rank_for(n, k) for k in ks]


def _prepare_cuts(inputs: list[_Input], b: torch.Tensor, method: str,
                  bounds: list[tuple[int, int]], stats_fns: dict, mode: str = "eager") -> None:
    """Exact thresholds for magnitude / outlier pruning of ``inputs``: a lookup in
    precomputed statistics (``stats_fns[pos](ranks)``, when given) or one streamed
    selection for all the other inputs together (:func:`.order_stats.order_statistics_many`)."""
    n = b.numel()
    pending: list[tuple] = []
    streams: list[Stream] = []
    base_at: dict[tuple, torch.Tensor] = {}

    def gather_base(idx: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        """``b[idx]`` in ``cdt``, gathered once for all inputs: their samples share the
        positions (a gather is a cache miss per position on a large tensor)."""
        key = (idx.data_ptr(), idx.numel(), cdt)
        got = base_at.get(key)
        if got is None:
            got = base_at[key] = b[idx].to(cdt)
        return got

    for inp in inputs:
        got = _cut_ranks(inp, n, method)
        if got is None:
            inp.dead = True
            continue
        ks, ranks = got
        cdt = compute_dtype(inp.flat, b)
        t = inp.flat
        band_fn = count_fn = None
        if mode == "compiled" and b.device.type == "cpu" and cdt == torch.float32 and not inp.given:
            def band_fn(s: int, e: int, lo: float, hi: float, t=t, cdt=cdt):
                return run_band(mode, t[s:e], b[s:e], torch.tensor([lo, hi], dtype=cdt))

            def count_fn(s: int, e: int, v: float, t=t, cdt=cdt) -> tuple[int, int]:
                return run_count(mode, t[s:e], b[s:e], torch.tensor(v, dtype=cdt))
        wanted = sorted({r for r in ranks if r is not None})
        stats_fn = stats_fns.get(inp.pos)
        if stats_fn is not None:
            _set_cuts(inp, b, ks, ranks, stats_fn(wanted), bounds, count_fn)
            continue
        pending.append((inp, ks, ranks, count_fn))
        streams.append(Stream(
            n, wanted,
            lambda s, e, t=t, cdt=cdt, g=inp.given: _delta(t, b, s, e, _buf(e - s, cdt, b.device),
                                                           g).abs_(),
            lambda idx, t=t, cdt=cdt, g=inp.given: (torch.abs(t[idx]) if g else
                                                    torch.sub(t[idx].to(cdt), gather_base(idx, cdt)).abs_()),
            bounds, band_fn, count_fn))
    count_many = None
    if pending and all(c is not None for _, _, _, c in pending):  # compiled counts, fp32
        flats = [inp.flat for inp, _, _, _ in pending]
        cdt = compute_dtype(flats[0], b)

        def count_many(s: int, e: int, which: list[tuple[int, list[float]]]) -> list:
            """The inputs' guesses counted on one chunk in one pass (the base read once)."""
            return run_count_many(mode, b[s:e], [flats[i][s:e] for i, _ in which],
                                  [vals for _, vals in which], cdt)
    for (inp, ks, ranks, count_fn), stats in zip(
            pending, order_statistics_many(streams, b.device, count_many)):
        _set_cuts(inp, b, ks, ranks, stats, bounds, count_fn)


def _set_cuts(inp: _Input, b: torch.Tensor, ks: list[int], ranks: list[int | None],
              stats: list[OrderStat], bounds: list[tuple[int, int]], count_fn) -> None:
    """The input's cuts from its order statistics, with per-chunk tie budgets where a cut
    keeps only some of the elements equal to its threshold."""
    n = b.numel()
    by_rank = {s.rank: s for s in stats}
    inp.tie_blocks = {s.value: (s.tie_blocks, s.tie_block) for s in stats if s.tie_block}
    inp.cuts = [RankCut(n, k, by_rank.get(r), zero_ties_free=True) for k, r in zip(ks, ranks)]
    if any(c.sequential for c in inp.cuts):
        seq = [by_rank.get(r) for c, r in zip(inp.cuts, ranks) if c.sequential]
        if all(st is not None and st.chunk_equal is not None for st in seq):
            # the selection's pass already counted each chunk's ties: no second pass
            counts = [list(by_rank[r].chunk_equal) if c.sequential else [0] * len(bounds)
                      for c, r in zip(inp.cuts, ranks)]
        else:
            counts = _tie_counts(inp.cuts, inp.flat, b, bounds, count_fn, inp.given)
        per_cut = [c.for_chunks(cs) for c, cs in zip(inp.cuts, counts)]
        inp.chunk_cuts = {s: [pc[i] for pc in per_cut] for i, (s, _) in enumerate(bounds)}


def _tie_counts(cuts: list[RankCut], t: torch.Tensor, b: torch.Tensor,
                bounds: list[tuple[int, int]], count_fn=None, given: bool = False) -> list[list[int]]:
    """Per cut, how many ``|t - b|`` equal its threshold in each chunk (0 for cuts that
    need no tie budget); ``count_fn(s, e, v)``: a compiled (below, equal) count of one
    chunk."""
    thrs = [c.thr if c.sequential else None for c in cuts]

    def count(s: int, e: int) -> list[int]:
        if count_fn is not None:
            return [0 if v is None else count_fn(s, e, v)[1] for v in thrs]
        a = _delta(t, b, s, e, _buf(e - s, compute_dtype(t, b), b.device), given).abs_()
        x, nz = counting(a)
        return [0 if v is None else int(nz(x == v)) for v in thrs]

    rows = run_chunks(count, bounds, b.device)
    return [[row[j] for row in rows] for j in range(len(cuts))]


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
                                                  device=b.device), inp.given)
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
    "magnitude", "outliers", "random", "della"; ``extra_scale`` multiplies lambda (LiNeS).

    From ``ctx`` (:class:`~.registry.OpContext`): ``task_vectors`` (``tensors`` are the task
    vectors ``x - base`` already: a search worker's resident ones), ``out`` (a flat
    destination of the output dtype: the result is written there and returned as its view)
    and ``batch`` (the chunks are added to it instead of run: the caller runs them, with
    other tensors', before reading the result); the result's bits never depend on them."""
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
    b = base.reshape(-1)
    weights = [float(w) for w in params["weight"]]
    densities = params.get("density") or [1.0] * len(tensors)
    gammas = params.get("gamma") or [0.0] * len(tensors)
    epsilons = params.get("epsilon") or [0.0] * len(tensors)
    normalize = bool(params.get("normalize", False))
    rescale = bool(params.get("rescale", False))
    lam = float(params.get("lambda", 1.0)) * extra_scale

    given = bool(ctx.task_vectors)
    inputs = [
        _Input(i, t.reshape(-1), weights[i], float(densities[i]), float(gammas[i]),
               float(epsilons[i]), given=given)
        for i, t in enumerate(tensors)
    ]
    method = sparsification
    align = 1
    if method == "della":
        align = n if base.dim() < 2 else n // base.shape[0]
        align = max(align, 1)
    if mode == "compiled" and device.type == "cpu" and align == 1:
        # one tensor alone: a multiple of 4 chunks, so the threads share it; in a batch of
        # many tensors their chunks already spread, and each chunk costs Python work
        # holding the GIL (cuts, scalars): as few as the compiled chunk size allows
        bounds = list(chunk_bounds(n, COMPILED_CPU_CHUNK) if ctx.batch is not None
                      else balanced_bounds(n, COMPILED_CPU_CHUNK))
    else:
        bounds = list(chunk_bounds(n, chunk_size(device), align))
    if method in ("random", "della"):
        for inp, seed in zip(inputs, _input_seeds(len(inputs), ctx, device)):
            inp.draws = UniformField(seed, device)
    to_cut: list[_Input] = []
    stats_fns: dict = {}
    for inp in inputs:
        if inp.weight == 0.0:
            inp.dead = True
            continue
        if method is None or inp.density >= 1.0:
            continue  # mergekit: density >= 1 leaves the delta untouched (no rescale)
        if inp.density <= 0.0:
            inp.dead = True
        elif method in ("magnitude", "outliers"):
            to_cut.append(inp)
        elif method == "random" and rescale:
            inp.scale = 1.0 / inp.density
    if to_cut and ctx.stats is not None and ctx.input_keys is not None:
        keys, stats = ctx.input_keys, ctx.stats

        def stats_fn(inp: _Input):
            return stats.magnitude_stats_fn(keys[inp.pos], ctx.base_key, inp.flat,
                                            None if inp.given else b, bounds)

        if all(stats.cached(keys[inp.pos], ctx.base_key) for inp in to_cut):
            fns = [stats_fn(inp) for inp in to_cut]  # a later candidate: lookups only
        else:  # the first: sort the inputs' |delta| side by side (numpy releases the GIL)
            fns = run_items(stats_fn, to_cut, device)
        stats_fns = {inp.pos: fn for inp, fn in zip(to_cut, fns)}
    if to_cut:
        _prepare_cuts(to_cut, b, method, bounds, stats_fns, mode)
        for inp in to_cut:
            if rescale and not inp.dead:
                inp.scale = _l1_rescale(inp, b, method, bounds)
    live = [inp for inp in inputs if not inp.dead]
    pruning = {inp.pos: method is not None and inp.density < 1.0 for inp in live}

    divisor = 1.0
    if normalize and not consensus:
        total_w = sum(weights)
        divisor = total_w if abs(total_w) >= 1e-8 else 1.0

    o = ctx.out
    if (o is None or o.dtype != out_dtype or o.device != device or o.dim() != 1
            or o.numel() != n or not o.is_contiguous()):
        o = torch.empty(n, dtype=out_dtype, device=device)
    out = o.view(base.shape)
    if not live:
        o.copy_(b)
        return out
    ews = [inp.weight * inp.scale for inp in live]  # weight of the (rescaled) delta
    ws = [inp.weight for inp in live]
    lam_eff = lam if consensus else lam / divisor
    plain_scal = scalars([ChunkCut()] * len(live), ews, ws, lam_eff, cdt, device)
    prune = method in ("magnitude", "outliers") and any(pruning[inp.pos] for inp in live)
    dare = method == "random" and any(pruning[inp.pos] for inp in live)

    def chunk(s: int, e: int) -> None:
        if method == "della":  # row-wise drops: prune eagerly, then the same arithmetic
            ds = []
            for inp in live:
                d = _delta(inp.flat, b, s, e, torch.empty(e - s, dtype=cdt, device=device),
                           inp.given)
                if pruning[inp.pos]:
                    d = _sparsify_chunk(inp, d, method, rescale, align, device, s, e)
                ds.append(d)
            res = gta_combine(b[s:e].to(cdt), ds, plain_scal, consensus, normalize)
            o[s:e].copy_(res)
            return
        masks: list[torch.Tensor | None] = [None] * len(live)
        if dare:  # every input gets a mask (ones where not pruned): one graph for all genomes
            masks = [inp.draws.keep_at(s, e, inp.density).to(device) if pruning[inp.pos]
                     else torch.ones(e - s, device=device) for inp in live]
        cuts = [_chunk_cut(inp, b, s, e, method, cdt, mode) if prune and pruning[inp.pos]
                else ChunkCut() for inp in live]
        flags = KernelFlags(prune, consensus, normalize, given,
                            high=prune and any(c.uses_high() for c in cuts))
        for a, z, piece in split_ties(cuts, e - s):  # where a tie budget ends: a new piece
            p, q = s + a, s + z
            scal = scalars(piece, ews, ws, lam_eff, cdt, device)
            run_kernel_into(mode, o[p:q], b[p:q], [inp.flat[p:q] for inp in live],
                            [None if m is None else m[a:z] for m in masks], scal, flags)

    # a graph not compiled yet compiles once, under .fused's lock, in whichever thread
    # gets the first chunk (the others wait for it)
    if ctx.batch is not None:  # the caller runs many tensors' chunks in one parallel pass
        ctx.batch.add(chunk, bounds)
    else:
        run_chunks(chunk, bounds, device)
    return out


def _chunk_cut(inp: _Input, b: torch.Tensor, s: int, e: int, method: str,
               dtype: torch.dtype, mode: str = "eager") -> ChunkCut:
    """The :class:`.fused.ChunkCut` of one input's magnitude / outlier pruning on the chunk
    ``[s, e)``: thresholds from its cuts, and where a cut keeps only some of the elements
    equal to its threshold here, the chunk position before which it keeps them (from the
    precomputed statistics' tie blocks by scanning one block, else by a scan of this chunk)."""
    cuts = _cuts_at(inp, s)
    cut = ChunkCut()
    a = None

    def before(c: RankCut) -> int:
        """Positions [0, p) of this chunk hold the c.ties_left elements equal to c.thr
        that the cut keeps (0: none; the chunk length: all of them)."""
        nonlocal a
        if c.ties_left == 0:
            return 0
        if c.ties_left == c.chunk_equal:
            return e - s
        located = inp.tie_blocks.get(c.thr)
        if located is not None and s % located[1] == 0:
            return _tie_end(inp, b, s, c, located[0], located[1], dtype)
        if mode == "compiled" and b.device.type == "cpu" and not inp.given:
            # count the ties per block in one compiled pass, then scan only the block that
            # holds the wanted one (an eager scan of the chunk took ~3x as long)
            per_block = run_tie_blocks(mode, inp.flat[s:e], b[s:e], torch.tensor(c.thr, dtype=dtype))
            blocks = np.repeat(np.arange(per_block.size) + s // TIE_BLOCK, per_block)
            return _tie_end(inp, b, s, c, blocks, TIE_BLOCK, dtype, first=0)
        if a is None:
            a = _delta(inp.flat, b, s, e, torch.empty(e - s, dtype=dtype, device=b.device),
                       inp.given).abs_()
        where = torch.eq(a, c.thr).nonzero().squeeze(1)
        return int(where[c.ties_left - 1]) + 1

    def numbers(c: RankCut) -> tuple[float, float, int]:
        """(threshold, tie value, tie positions) of "above the threshold or one of the
        first tied": c.mode is gt, ge or ties here."""
        if c.mode == "gt":
            return c.thr, math.nan, 0
        return c.thr, c.thr, (e - s) if c.mode == "ge" else before(c)

    top = cuts[0]
    if top.mode == "none":
        cut.low = math.inf
    elif top.mode != "all":
        cut.low, cut.tie_low, cut.ties_low = numbers(top)
    if method == "outliers":  # drop what the cut of the n_top largest keeps
        out = cuts[1]
        if out.mode == "all":
            cut.high = -math.inf
        elif out.mode != "none":
            cut.high, cut.tie_high, cut.ties_high = numbers(out)
    return cut


def _tie_end(inp: _Input, b: torch.Tensor, s: int, c: RankCut, blocks, block: int,
             dtype: torch.dtype, first: int | None = None) -> int:
    """Where the tie budget of cut ``c`` ends in the chunk starting at ``s`` (a multiple of
    ``block``): one past the position of the ``c.ties_left``-th value equal to ``c.thr``
    from ``s`` on, relative to ``s``. ``blocks``: the ascending blocks of all values equal
    to it (precomputed statistics; None: the tensor is one block), so only the block that
    holds the wanted value is scanned; ``first``: how many of them lie before ``s``
    (found in ``blocks`` when None)."""
    if blocks is None:
        g, blk, j = c.ties_left - 1, 0, c.ties_left - 1
    else:
        if first is None:
            first = int(np.searchsorted(blocks, s // block, "left"))
        g = first + c.ties_left - 1
        blk = int(blocks[g])
        j = g - int(np.searchsorted(blocks, blk, "left"))
    lo, hi = blk * block, min(b.numel(), (blk + 1) * block)
    a = _delta(inp.flat, b, lo, hi, torch.empty(hi - lo, dtype=dtype, device=b.device),
               inp.given).abs_()
    return lo + int(torch.eq(a, c.thr).nonzero()[j]) + 1 - s


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
