"""Magnitude and outlier cuts of a GTA merge's inputs, and their per-chunk tie budgets.

A cut keeps the ``k`` largest ``|x - base|`` of an input. :func:`prepare_cuts` finds each
cut's threshold exactly (a lookup in a search worker's precomputed statistics, or one
streamed selection for all inputs of a tensor, :mod:`.order_stats`); where a threshold is
shared by more elements than the cut keeps, each chunk gets the number of them it keeps
(a tie budget). :func:`chunk_cut` turns the cuts of one chunk into the thresholds the fused
kernel compares against (:class:`.fused.ChunkCut`); :func:`magnitude_prune` applies them
eagerly. :mod:`.task_vector_merge` drives them chunk by chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .fused import ChunkCut, run_band, run_count, run_count_many, run_tie_blocks
from .order_stats import TIE_BLOCK, OrderStat, Stream, counting, order_statistics_many
from .parallel import run_chunks, scratch
from .random_drop import UniformField
from .sparsify import RankCut, magnitude_k, outlier_ks


@dataclass
class MergeInput:
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


def compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    """float64 when every tensor is float64, else float32 (bf16 / fp16 inputs are widened
    chunk by chunk, exactly)."""
    return torch.float64 if all(t.dtype == torch.float64 for t in ts) else torch.float32


def _buf(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread scratch vector of ``n`` elements (:func:`.parallel.scratch`)."""
    return scratch(1, n, torch.empty(0, dtype=dtype, device=device))[0]


def delta_into(t: torch.Tensor, b: torch.Tensor, s: int, e: int, out: torch.Tensor,
           given: bool = False) -> torch.Tensor:
    """``t[s:e] - b[s:e]`` in ``out``'s dtype (inputs may be narrower: widened exactly first);
    with ``given``, ``t`` is that task vector already (copied: callers modify ``out``)."""
    if given:
        return out.copy_(t[s:e])
    if t.dtype == out.dtype and b.dtype == out.dtype:
        return torch.sub(t[s:e], b[s:e], out=out)
    out.copy_(t[s:e])
    return out.sub_(b[s:e])


def _cut_ranks(inp: MergeInput, n: int, method: str) -> tuple[list[int], list[int | None]] | None:
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


def prepare_cuts(inputs: list[MergeInput], b: torch.Tensor, method: str,
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
        positions (a gather is a cache miss per position on a large tensor). Gathers here use
        ``index_select``: 2.6x cheaper than ``b[idx]`` for a 65536-position sample (whose
        advanced indexing goes through the generic index kernel)."""
        key = (idx.data_ptr(), idx.numel(), cdt)
        got = base_at.get(key)
        if got is None:
            got = base_at[key] = b.index_select(0, idx).to(cdt)
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
            lambda s, e, t=t, cdt=cdt, g=inp.given: delta_into(t, b, s, e, _buf(e - s, cdt, b.device),
                                                           g).abs_(),
            lambda idx, t=t, cdt=cdt, g=inp.given: (torch.abs(t.index_select(0, idx)) if g else
                                                    torch.sub(t.index_select(0, idx).to(cdt),
                                                              gather_base(idx, cdt)).abs_()),
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


def _set_cuts(inp: MergeInput, b: torch.Tensor, ks: list[int], ranks: list[int | None],
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
        a = delta_into(t, b, s, e, _buf(e - s, compute_dtype(t, b), b.device), given).abs_()
        x, nz = counting(a)
        return [0 if v is None else int(nz(x == v)) for v in thrs]

    rows = run_chunks(count, bounds, b.device)
    return [[row[j] for row in rows] for j in range(len(cuts))]


def cuts_at(inp: MergeInput, s: int, fresh: bool = False) -> list[RankCut]:
    """The cuts for the chunk starting at ``s`` (copies when ``fresh``: pruning advances
    tie counters)."""
    cuts = inp.cuts if inp.chunk_cuts is None else inp.chunk_cuts[s]
    return [c.copy() for c in cuts] if fresh or inp.chunk_cuts is not None else cuts


def magnitude_prune(cuts: list[RankCut], d: torch.Tensor, method: str) -> torch.Tensor:
    """``d`` with the entries the cuts drop set to 0 (advances the cuts' tie counters)."""
    if method == "magnitude":
        return cuts[0].prune(d)
    top, outliers = cuts
    a = None if outliers.mode == "none" else d.abs()
    d = top.prune(d)
    if a is not None:
        d.mul_(outliers.keep_float(a, kept=False))
    return d


def chunk_cut(inp: MergeInput, b: torch.Tensor, s: int, e: int, method: str,
               dtype: torch.dtype, mode: str = "eager") -> ChunkCut:
    """The :class:`.fused.ChunkCut` of one input's magnitude / outlier pruning on the chunk
    ``[s, e)``: thresholds from its cuts, and where a cut keeps only some of the elements
    equal to its threshold here, the chunk position before which it keeps them (from the
    precomputed statistics' tie blocks by scanning one block, else by a scan of this chunk)."""
    cuts = cuts_at(inp, s)
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
            a = delta_into(inp.flat, b, s, e, torch.empty(e - s, dtype=dtype, device=b.device),
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


def _tie_end(inp: MergeInput, b: torch.Tensor, s: int, c: RankCut, blocks, block: int,
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
    a = delta_into(inp.flat, b, lo, hi, torch.empty(hi - lo, dtype=dtype, device=b.device),
               inp.given).abs_()
    return lo + int(torch.eq(a, c.thr).nonzero()[j]) + 1 - s



__all__ = ["MergeInput", "chunk_cut", "compute_dtype", "cuts_at", "delta_into",
           "magnitude_prune", "prepare_cuts"]
