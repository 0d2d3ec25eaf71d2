"""Sparsification of task vectors: which entries of a delta survive, and how they are rescaled.

Used by the task-vector operators (TIES, DARE, breadcrumbs, DELLA). Everything here works on
tensors streamed in fixed-size flat *chunks* (:func:`chunk_size`), because on a CPU every
full-size temporary costs a page-faulting allocation and a trip through main memory, while
chunk-sized temporaries stay in cache; on CUDA one chunk is normally the whole tensor.

Magnitude selection never sorts: the k-th largest ``|delta|`` is found exactly by a streamed
Floyd-Rivest style selection (:mod:`.order_stats`; :func:`order_statistics` here is its
one-stream form, with this module's chunking). ``torch.quantile`` sorts and refuses inputs
above 16M elements; ``torch.kthvalue`` and ``torch.topk`` measured 5-25x slower here.

Ties at the threshold are resolved so that *exactly* ``k`` elements are kept (as mergekit's
argsort does): every element strictly above the threshold, then elements equal to it in flat
index order until ``k`` are reached (:class:`RankCut`). For pruning a delta the one
exception is a threshold of exactly 0: kept and dropped zeros are the same zeros, so nothing
is masked (the values are identical to an exact-k selection).

Public helpers on whole tensors (:func:`kth_smallest`, :func:`topk_mask`,
:func:`magnitude_mask`, :func:`outlier_mask`, :func:`random_mask`,
:func:`della_keep_probabilities`, the last two in :mod:`.random_drop`) are the reference
semantics; the operators use the streaming forms and the tests check both agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from . import order_stats
from .order_stats import OrderStat, Stream
from .random_drop import (  # noqa: F401  (DARE / DELLA drops, re-exported for old imports)
    UniformField,
    della_keep_probabilities,
    della_row_probabilities,
    random_mask,
    row_ranks,
)

# Elements per chunk. CPU: 128K float32 = 512 KiB per temporary, a handful of which stay in
# L2/L3 cache. CUDA: large enough that one tensor is one chunk (kernel launches dominate).
CPU_CHUNK = 1 << 17
CUDA_CHUNK = 1 << 28

def chunk_size(device: torch.device | str | None) -> int:
    """Elements per chunk on ``device``. On CPU a fixed ``CPU_CHUNK``: chunks are the unit
    of parallel work (:mod:`.parallel`), each computed single-threaded with cache-sized
    temporaries, so results never depend on the thread count. (Before, torch's intra-op
    threads split every chunk, and each op's barrier stalled on busy cores: measured here
    with 2 threads on 2 busy cores a TIES merge 20x slower than with 1 thread.)"""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return CUDA_CHUNK
    return CPU_CHUNK


def chunk_bounds(n: int, size: int, align: int = 1) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive chunks covering ``range(n)``; starts are multiples of
    ``align`` (whole rows), each chunk at least one ``align`` unit long."""
    step = max(align, (size // align) * align)
    for start in range(0, n, step):
        yield start, min(n, start + step)


def balanced_bounds(n: int, size: int, parts: int = 4, quantum: int = 4096
                    ) -> Iterator[tuple[int, int]]:
    """Chunks of at most about ``size`` elements whose count is a multiple of ``parts``, each
    a multiple of ``quantum`` elements long (the last may be shorter): 1, 2 or 4 threads
    pulling them get equal shares. A tensor of 11 chunks ran 6 + 5 on 2 threads, one of a
    single chunk on one thread; as 12 and 4 chunks both threads finish together."""
    count = -(-n // max(1, size))
    count = -(-count // parts) * parts
    step = -(-n // count)
    step = max(quantum, -(-step // quantum) * quantum)
    return chunk_bounds(n, step)


# --------------------------------------------------------------------------------------
# Exact order statistics (the engine is :mod:`.order_stats`)
# --------------------------------------------------------------------------------------
def order_statistics(
    n: int,
    ranks: list[int],
    values: Callable[[int, int], torch.Tensor],
    gather: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device | str | None = None,
    bounds: list[tuple[int, int]] | None = None,
    band_fn: Callable[[int, int, float, float], tuple] | None = None,
) -> list[OrderStat]:
    """Exact k-th smallest values of one stream, for each 1-based rank in ``ranks``
    (:class:`.order_stats.Stream` documents the arguments; ``bounds`` defaults to
    :func:`chunk_bounds` of :func:`chunk_size`)."""
    if bounds is None:
        bounds = list(chunk_bounds(n, chunk_size(device)))
    return order_stats.order_statistics(Stream(n, list(ranks), values, gather, bounds, band_fn),
                                        device)


def kth_smallest(x: torch.Tensor, r: int) -> float:
    """Exact r-th smallest (1-based) element of ``x`` (any shape), without sorting."""
    flat = x.reshape(-1)
    return order_statistics(
        flat.numel(), [r], lambda s, e: flat[s:e], lambda idx: flat.index_select(0, idx), flat.device
    )[0].value


# --------------------------------------------------------------------------------------
# Exact top-k masks, streamed
# --------------------------------------------------------------------------------------
class RankCut:
    """Streams the mask "among the k largest scores", exactly k of them.

    Built from the order statistic of ascending rank ``n - k + 1`` (the k-th largest).
    Chunks must be fed in flat order, each exactly once: elements equal to the threshold
    are kept in flat index order until k elements are kept. With ``zero_ties_free`` a
    threshold of 0 keeps only the nonzero scores (for pruning deltas, where a kept zero and
    a dropped zero are the same value).

    Masks come as float 0/1 tensors: on CPU, comparisons written into float tensors and
    multiplications are several times faster than bool tensors with ``where`` or
    ``masked_fill_`` (measured here: 0.16 ms vs 2.8-3.4 ms per 256K elements).
    """

    def __init__(self, n: int, k: int, stat: OrderStat | None, zero_ties_free: bool = False):
        self.n, self.k = n, k
        self.thr = 0.0
        self.ties_left = 0
        self.chunk_equal = -1  # elements equal to thr in this cut's chunk (set by for_chunks)
        if k <= 0 or k >= n:
            self.mode = "none" if k <= 0 else "all"
            return
        assert stat is not None and stat.rank == n - k + 1
        self.thr = stat.value
        n_greater = n - stat.n_less - stat.n_equal
        self.ties_left = k - n_greater
        assert 1 <= self.ties_left <= stat.n_equal
        if zero_ties_free and self.thr == 0.0:
            self.mode = "gt"
        elif self.ties_left == stat.n_equal:
            self.mode = "ge"
        else:
            self.mode = "ties"

    @staticmethod
    def rank_for(n: int, k: int) -> int | None:
        """The ascending rank whose order statistic a cut keeping k of n needs (or None)."""
        return n - k + 1 if 0 < k < n else None

    def copy(self) -> RankCut:
        new = RankCut.__new__(RankCut)
        new.__dict__.update(self.__dict__)
        return new

    @property
    def sequential(self) -> bool:
        """True when the mask depends on how many threshold ties earlier chunks kept."""
        return self.mode == "ties"

    def for_chunks(self, equal_counts: list[int]) -> list[RankCut]:
        """One independent cut per chunk, given how many elements equal to the threshold
        each chunk (in flat order) holds: each gets the tie budget the sequential stream
        would leave it, so chunks can then be processed in any order."""
        out = []
        left = self.ties_left
        for c in equal_counts:
            cut = self.copy()
            cut.chunk_equal = c
            if self.mode == "ties":
                cut.ties_left = min(left, c)
                left -= cut.ties_left
            out.append(cut)
        return out

    @property
    def keeps_all_nonzero(self) -> bool:
        """True when pruning with this cut changes no value (nothing nonzero is dropped)."""
        return self.mode == "all" or (self.mode == "gt" and self.thr == 0.0)

    def keep(self, score: torch.Tensor) -> torch.Tensor:
        """Bool mask of the kept elements of this chunk (advances the tie counter)."""
        return self.keep_float(score).bool()

    def keep_float(self, score: torch.Tensor, kept: bool = True) -> torch.Tensor:
        """Float 0/1 mask of the kept (or, with ``kept=False``, the dropped) elements of
        this chunk; advances the tie counter."""
        if self.mode in ("all", "none"):
            full = (self.mode == "all") == kept
            return torch.full_like(score, 1.0 if full else 0.0)
        if self.mode == "gt" or (self.mode == "ties" and self.ties_left == 0):
            return (torch.gt if kept else torch.le)(score, self.thr, out=torch.empty_like(score))
        mask = torch.ge(score, self.thr, out=torch.empty_like(score))
        if self.mode == "ties":
            eq = torch.eq(score, self.thr, out=torch.empty_like(score))
            count = int(eq.sum())
            if count > self.ties_left:
                # keep only the first ties_left elements equal to the threshold (flat order)
                extra = eq.reshape(-1).nonzero().squeeze(1)[self.ties_left:]
                mask.reshape(-1)[extra] = 0.0
            self.ties_left -= min(count, self.ties_left)
        return mask if kept else mask.neg_().add_(1.0)

    def prune(self, d: torch.Tensor) -> torch.Tensor:
        """``d`` with the entries whose |d| is not kept set to 0 (may return ``d`` itself)."""
        if self.keeps_all_nonzero:
            return d
        if self.mode == "none":
            return d.zero_()
        if self.mode == "ge" and self.thr > 0.0:
            # |d| >= thr  <=>  |d| > (largest float below thr): one fused op
            return torch.ops.aten.hardshrink.out(d, float_below(self.thr, d.dtype), out=d)
        if self.mode == "gt" or (self.mode == "ties" and self.ties_left == 0):
            return torch.ops.aten.hardshrink.out(d, self.thr, out=d)
        return d.mul_(self.keep_float(d.abs()))


def float_below(x: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` below ``x`` (``|d| >= x  <=>  |d| > float_below(x)``)."""
    t = torch.tensor(x, dtype=dtype)
    return torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype)).item()


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly ``k`` largest entries of ``score`` (ties by flat index)."""
    flat = score.reshape(-1)
    n = flat.numel()
    r = RankCut.rank_for(n, k)
    stat = None
    if r is not None:
        stat = order_statistics(n, [r], lambda s, e: flat[s:e], lambda idx: flat.index_select(0, idx),
                                flat.device)[0]
    cut = RankCut(n, k, stat)
    return cut.keep(flat).reshape(score.shape)


def magnitude_k(n: int, density: float) -> int:
    """How many entries magnitude pruning keeps: ``int(density * n)`` as in mergekit."""
    return n if density >= 1 else max(0, int(density * n))


def outlier_ks(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs: (number of largest entries dropped, number kept) as in mergekit:
    keep ascending ranks [n_bot, n - n_top) where n_top = int(gamma n) and
    n_bot = n - int(density n) - n_top, taking from n_top when n_bot would be negative."""
    target = max(0, int(density * n))
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    return n_top, n - n_bot - n_top


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep mask of TIES magnitude pruning: exactly int(density n) largest |x|."""
    return topk_mask(x.abs(), magnitude_k(x.numel(), density))


def outlier_mask(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep mask of Model Breadcrumbs: drop the gamma largest |x| and the smallest, keep
    int(density n) in the middle (mergekit's ``magnitude_outliers``)."""
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    n_top, n_keep = outlier_ks(x.numel(), density, gamma)
    a = x.abs()
    return topk_mask(a, n_keep + n_top) & ~topk_mask(a, n_top)
