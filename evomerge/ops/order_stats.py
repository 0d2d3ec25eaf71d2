"""Exact order statistics of streamed tensors, without sorting, several streams at once.

The k-th largest ``|delta|`` behind every magnitude cut (TIES, breadcrumbs, DELLA's
magnitude ranks) is found by a Floyd-Rivest style selection: read a fixed random sample,
bracket the wanted rank between two sample quantiles, stream the values once to count the
elements below the bracket and collect the few inside it, and finish with a selection on
that small band (numpy's introselect on CPU, ``torch.kthvalue`` on CUDA). It falls back to
a selection over all values in the (~1e-9 likely) case that the bracket misses.

A merge selects in several streams per tensor (one per fine-tuned input), so
:func:`order_statistics_many` runs each phase over all of them at once: the samples of all
streams in parallel, one pool pass over every (stream, chunk) pair, and the band selections
of every (stream, rank) in parallel (numpy's partition and sort release the GIL). Done one
stream at a time, the sample and band selections ran serially between parallel counting
passes: measured on this 2-core CPU they were a third of a TIES merge at 2 threads.

Measured here for 16M float32 elements (busy machine, best of 3): ``torch.kthvalue``
350-630 ms, ``torch.topk`` 500-1850 ms, ``torch.sort`` 2.3-3.5 s, ``np.partition`` ~110 ms
(plus a full-size copy), this streamed selection ~50-80 ms with chunk-sized temporaries
only. On CPU the streamed comparisons run in numpy (or a compiled kernel, ``band_fn``):
torch's CPU kernels that produce bool tensors measured 3-20x slower here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .parallel import run_items

# Below this many elements, selection just runs a selection on all values.
DIRECT_SELECT_MAX = 1 << 16
# Sample size bounds and the bracket half-width in sample ranks (in units of sqrt(m); the
# sample rank's standard deviation is at most sqrt(m)/2, so 3 sqrt(m) is 6 standard
# deviations: a miss, which only costs time, has probability ~1e-9). A larger sample
# narrows the band (~6 n / sqrt(m) values to extract and select): on TIES over real-shaped
# tensors 2**16 measured 6-8% faster than 2**14 here, 2**18 no faster at 2 threads.
SAMPLE_MAX = 1 << 16
SAMPLE_MIN = 1 << 11
BRACKET = 3.0
# Fixed seed of the sample positions: results never depend on it (selection is exact).
_SAMPLE_SEED = 0x5EED
# Elements per block in which the values equal to an order statistic are located (see
# OrderStat.tie_blocks): a tied threshold's k-th value in flat order is then found by
# scanning one block. Merge chunks start at multiples of it (balanced_bounds' quantum).
TIE_BLOCK = 1 << 12


@dataclass(frozen=True)
class OrderStat:
    """The value of ascending rank ``rank`` (1-based) among ``n`` values, plus how many
    values are strictly below it and how many are equal to it (for exact tie handling)."""

    rank: int
    value: float
    n_less: int
    n_equal: int
    # how many values equal to it each chunk of the stream holds, when the selection saw
    # it for free (the per-chunk tie budgets of a top-k cut need exactly this); else None
    chunk_equal: tuple[int, ...] | None = None
    # from precomputed statistics (:mod:`.precompute`): the block (``tie_block`` elements,
    # a power of two) of every value equal to it, in ascending order (None: one block), so
    # the k-th of them in flat order is found by scanning one block; tie_block 0: unknown
    tie_blocks: Any = None
    tie_block: int = 0


@dataclass
class Stream:
    """One stream of ``n`` values to select ranks in.

    Args:
        n: number of values.
        ranks: wanted ascending ranks, 1-based.
        values: ``values(s, e)`` returns the values at flat positions ``[s, e)`` as a flat
            float tensor (may be a reused buffer); called once per chunk of ``bounds``.
        gather: ``gather(idx)`` returns the values at flat positions ``idx`` (a sorted long
            tensor on the stream's device).
        bounds: the chunks ``(s, e)`` covering ``range(n)`` in flat order.
        band_fn: optional one-call counting pass of a chunk (CPU, a compiled kernel):
            ``band_fn(s, e, lo, hi)`` returns the chunk's values, how many are ``< lo`` and
            ``== lo``, and the uint8 0/1 mask of ``lo < value <= hi``.
        count_fn: optional compiled count of a chunk: ``count_fn(s, e, v)`` returns how many
            of its values are ``< v`` and ``== v``.
    """

    n: int
    ranks: list[int]
    values: Callable[[int, int], torch.Tensor]
    gather: Callable[[torch.Tensor], torch.Tensor]
    bounds: list[tuple[int, int]]
    band_fn: Callable[[int, int, float, float], tuple] | None = None
    count_fn: Callable[[int, int, float], tuple[int, int]] | None = None

    def everything(self) -> torch.Tensor:
        # values() may hand out a reused buffer: copy each chunk
        return torch.cat([self.values(s, e).reshape(-1).clone() for s, e in self.bounds])


def order_statistics(stream: Stream, device: torch.device | str | None = None) -> list[OrderStat]:
    """Exact order statistics of one stream (see :func:`order_statistics_many`)."""
    return order_statistics_many([stream], device)[0]


def order_statistics_many(streams: list[Stream], device: torch.device | str | None = None,
                          count_many: Callable | None = None) -> list[list[OrderStat]]:
    """Exact k-th smallest values of each stream, for each of its ranks, in rank order.

    Cost per stream: one streaming pass of cheap comparisons plus, unless the sample's
    estimate was right, a selection on a band of about ``6 n / sqrt(m)`` values, instead of
    a selection or sort over all ``n``; the phases of all streams run together in one thread
    pool (:func:`.parallel.run_items`). ``count_many(s, e, [(stream, values), ...])``, when
    the streams share their chunks: the counts of :func:`_count_at` for several streams on
    one chunk in one call (per stream, ``(less, equal)`` per value), e.g. one compiled pass
    that reads their common base once.
    """
    for st in streams:
        for r in st.ranks:
            assert 1 <= r <= st.n, (r, st.n)
    out: list[list[OrderStat | None]] = [[None] * len(st.ranks) for st in streams]
    sampled = []
    for i, st in enumerate(streams):
        if not st.ranks:
            continue
        if st.n <= DIRECT_SELECT_MAX:
            out[i] = list(_direct(st.everything(), st.ranks))
        else:
            sampled.append(i)
    if not sampled:
        return out  # type: ignore[return-value]
    brackets = dict(zip(sampled, run_items(lambda i: _brackets(streams[i], device), sampled,
                                           device)))
    _check_guesses(streams, brackets, out, device, count_many)
    todo = {i: [j for j, stat in enumerate(out[i]) if stat is None] for i in sampled}
    todo = {i: js for i, js in todo.items() if js}
    per_chunk = _per_chunk(streams, {i: [brackets[i][j] for j in js] for i, js in todo.items()},
                           _count, device)
    jobs = [(i, k) for i in todo for k in range(len(todo[i]))]
    found = run_items(lambda job: _finish(streams[job[0]], todo[job[0]][job[1]], job[1],
                                          brackets[job[0]][todo[job[0]][job[1]]],
                                          per_chunk[job[0]], device), jobs, device)
    for (i, k), stat in zip(jobs, found):
        out[i][todo[i][k]] = stat
    per_chunk.clear()
    for i in todo:  # a bracket missed its rank: exact fallback on all values
        missed = [j for j, stat in enumerate(out[i]) if stat is None]
        if missed:
            exact = _direct(streams[i].everything(), [streams[i].ranks[j] for j in missed])
            for j, stat in zip(missed, exact):
                out[i][j] = stat
    return out  # type: ignore[return-value]


def _check_guesses(streams: list[Stream], brackets: dict[int, list[Bracket]],
                   out: list[list[OrderStat | None]], device, count_many=None) -> None:
    """The counting pass that checks the sample's estimates (:class:`Bracket`): per chunk,
    how many values are below and equal to each estimate, without writing anything per
    element. Where the wanted rank falls among the values equal to its estimate, the
    estimate *is* the order statistic, with its exact counts and per-chunk ties: ``out`` is
    filled in and no band is extracted or selected."""
    guessed = {i: [j for j, br in enumerate(brs) if br.guess is not None]
               for i, brs in brackets.items()}
    guessed = {i: js for i, js in guessed.items() if js}
    if not guessed:
        return
    guesses = {i: [brackets[i][j].guess for j in js] for i, js in guessed.items()}
    if count_many is not None and len({tuple(streams[i].bounds) for i in guessed}) == 1:
        # the streams share their chunks (one tensor's inputs): count them all per chunk
        which = list(guessed)
        bounds = streams[which[0]].bounds
        rows = run_items(lambda c: count_many(*bounds[c], [(i, guesses[i]) for i in which]),
                         list(range(len(bounds))), device)
        per_chunk = {i: [row[q] for row in rows] for q, i in enumerate(which)}
    else:
        per_chunk = _per_chunk(streams, guesses, _count_at, device)
    for i, js in guessed.items():
        for k, j in enumerate(js):
            r = streams[i].ranks[j]
            less = sum(c[k][0] for c in per_chunk[i])
            equal = tuple(c[k][1] for c in per_chunk[i])
            if less < r <= less + sum(equal):
                out[i][j] = OrderStat(r, brackets[i][j].guess, less, sum(equal), equal)


def _per_chunk(streams: list[Stream], args: dict[int, list], fn: Callable,
               device) -> dict[int, list]:
    """``fn(stream, chunk, args[i])`` for every chunk of every stream ``i`` in ``args``, all
    in one thread pool; the results grouped per stream, in chunk order."""
    work = [(i, c) for i in args for c in range(len(streams[i].bounds))]
    results = run_items(lambda w: fn(streams[w[0]], w[1], args[w[0]]), work, device)
    grouped: dict[int, list] = {i: [] for i in args}
    for (i, _), res in zip(work, results):
        grouped[i].append(res)
    return grouped


@functools.lru_cache(maxsize=16)
def sample_positions(n: int, m: int) -> torch.Tensor:
    """``m`` sorted positions in ``range(n)``: one uniform draw in each of ``m`` equal
    strata (sorted by construction, so the gather walks memory forward and no sort is
    needed; a stratified sample's rank counts vary no more than a plain random one's).

    Shared, read-only: the same positions serve every stream of ``n`` values (the inputs
    of one tensor, and the tensors of one shape across layers: drawing them was 1/6 of the
    sample phase of a TIES merge of the 0.49 B benchmark models)."""
    gen = torch.Generator().manual_seed(_SAMPLE_SEED ^ n)
    edges = torch.arange(m + 1, dtype=torch.float64).mul_(n / m).floor_().long()
    edges[-1] = n
    width = (edges[1:] - edges[:-1]).clamp_(min=1)
    u = torch.rand(m, generator=gen, dtype=torch.float64)
    return (edges[:-1] + (u * width).long()).clamp_(max=n - 1)


@dataclass(frozen=True)
class Bracket:
    """Sample quantiles ``lo < hi`` around a wanted rank's value, and the sample's estimate
    of that value (its value at the rank's place) when the sample holds it more than once.
    A repeated value means the values are discrete there (differences of bf16 numbers take
    few distinct values: the 0.49 B benchmark models' brackets held 33-64 of them, and the
    estimate was the exact answer in all 174 magnitude cuts), so one pass of counts against
    the estimate usually settles the rank without extracting a band; with continuous values
    the estimate is never exact and no such pass runs."""

    lo: float
    hi: float
    guess: float | None = None


def _brackets(st: Stream, device) -> list[Bracket]:
    """Per rank, the sample's :class:`Bracket` of the rank's value."""
    n = st.n
    m = min(SAMPLE_MAX, max(SAMPLE_MIN, n >> 6))
    idx = sample_positions(n, m)
    sample = st.gather(idx.to(device if device is not None else "cpu"))
    margin = BRACKET * math.sqrt(m)
    places = []  # per rank: the sample ranks (1-based) of lo, hi and the estimate
    for r in st.ranks:
        center = (r - 0.5) / n * m
        places.append((math.floor(center - margin), math.ceil(center + margin),
                       min(m, max(1, round(center)))))
    if sample.device.type == "cpu":
        # only a few sample ranks are read: a partition on them (numpy's introselect),
        # 2x cheaper than a sort of the whole sample (~0.7 vs 1.4 ms for 2**16 values)
        kth = sorted({p - 1 for pl in places for p in pl if 1 <= p <= m})
        sample = sample.numpy().copy()
        sample.partition(kth)
    else:
        sample = torch.sort(sample).values.cpu().numpy()
    brackets = []
    for lo_r, hi_r, c in places:
        lo = float(sample[lo_r - 1]) if lo_r >= 1 else -math.inf
        hi = float(sample[hi_r - 1]) if hi_r <= m else math.inf
        est = sample[c - 1]
        repeats = int(np.count_nonzero(sample == est))
        brackets.append(Bracket(lo, hi, float(est) if repeats > 1 else None))
    return brackets


def _count_at(st: Stream, c: int, guesses: list[float]) -> list[tuple[int, int]]:
    """One chunk: per value in ``guesses``, how many values are below it and equal to it."""
    s, e = st.bounds[c]
    if st.count_fn is not None:
        return [st.count_fn(s, e, v) for v in guesses]
    x, nz = counting(st.values(s, e))
    return [(int(nz(x < v)), int(nz(x == v))) for v in guesses]


def _count(st: Stream, c: int, brackets: list[Bracket]) -> list[tuple]:
    """One chunk's counting pass: per rank, (how many < lo, how many == lo, band values)."""
    s, e = st.bounds[c]
    if st.band_fn is not None:
        res = []
        for br in brackets:
            lo, hi = br.lo, br.hi
            a, below, at_lo, inside = st.band_fn(s, e, lo, hi)
            vals = a.numpy()[inside.numpy().view(bool)] if hi > lo else None
            res.append((int(below), int(at_lo), vals))
        return res
    x, nz = counting(st.values(s, e))
    res = []
    for br in brackets:
        lo, hi = br.lo, br.hi
        below = at_lo = 0
        band = None
        if lo != -math.inf:
            below = int(nz(x < lo))
            at_lo = int(nz(x == lo))
        if hi > lo:
            inside = (x > lo) & (x <= hi) if lo != -math.inf else x <= hi
            band = x[inside]
        res.append((below, at_lo, band))
    return res


def counting(a: torch.Tensor) -> tuple[Any, Callable]:
    """``a`` as the array to compare and the matching ``count_nonzero``: numpy's on CPU
    (its comparisons, counts and boolean extraction measured several times faster than
    torch's bool kernels there), torch's elsewhere."""
    if a.device.type == "cpu":
        return a.numpy(), np.count_nonzero
    return a, torch.count_nonzero


def _finish(st: Stream, j: int, k: int, bracket: Bracket, per_chunk: list,
            device) -> OrderStat | None:
    """The order statistic of rank ``st.ranks[j]`` from the band pass, whose results for it
    are the ``k``-th of each chunk's (None: the bracket missed)."""
    r = st.ranks[j]
    below = sum(c[k][0] for c in per_chunk)
    at_lo = sum(c[k][1] for c in per_chunk)
    local = r - below
    if 1 <= local <= at_lo:
        return OrderStat(r, bracket.lo, below, at_lo, tuple(int(c[k][1]) for c in per_chunk))
    band = _concat([c[k][2] for c in per_chunk if c[k][2] is not None], device)
    if not at_lo < local <= at_lo + band.numel():
        return None
    v = _kth(band, local - at_lo, inplace=True)  # the band is this job's own copy
    x, nz = counting(band)
    n_less = below + at_lo + int(nz(x < v))
    n_eq = int(nz(x == v))
    per = tuple(0 if c[k][2] is None else int(nz(c[k][2] == v)) for c in per_chunk)
    return OrderStat(r, v, n_less, n_eq, per)


def _kth(values: torch.Tensor, r: int, inplace: bool = False) -> float:
    """r-th smallest (1-based): numpy's introselect on CPU (about 10x faster than
    torch.kthvalue there; reorders ``values`` when ``inplace``), torch.kthvalue elsewhere."""
    if values.device.type == "cpu":
        arr = values.numpy() if inplace else values.numpy().copy()
        arr.partition(r - 1)
        return float(arr[r - 1])
    return torch.kthvalue(values, r).values.item()


def _concat(parts: list, device: torch.device | str | None) -> torch.Tensor:
    if not parts:
        return torch.empty(0, device=device)
    if isinstance(parts[0], np.ndarray):
        return torch.from_numpy(np.concatenate(parts))
    return torch.cat(parts)


def _direct(values: torch.Tensor, ranks: list[int]) -> list[OrderStat]:
    res = []
    for r in ranks:
        v = _kth(values, r)
        res.append(
            OrderStat(
                r, v, int(torch.count_nonzero(values < v)), int(torch.count_nonzero(values == v))
            )
        )
    return res


__all__ = ["TIE_BLOCK", "Bracket", "OrderStat", "Stream", "counting", "order_statistics", "order_statistics_many",
           "sample_positions"]
