"""Genome-independent merge statistics, computed once per worker and reused per candidate.

In a search the sources are fixed and only the recipe's numbers change, yet a TIES,
breadcrumbs or SLERP merge spends most of its time on quantities that do not depend on
them: the exact k-th largest ``|x_i - base|`` of every tensor (for any density the genome
picks) and, for SLERP, the inner product and norms of the two inputs. :class:`SourceStats`
keeps them per (input, base) pair of tensors:

- magnitude order statistics: the ``|x - base|`` of the tensor (float32, 4 bytes per
  element) grouped into buckets of equal high 16 bits (:class:`MagnitudeIndex`: a stable
  radix argsort, 2.3x cheaper than a full sort, which was most of a TIES search's one-time
  setup) and, where the budget allows, each value's block of :data:`TIE_BLOCK` elements
  (1-2 bytes per element). Buckets follow value order, so any rank falls in one bucket,
  found from the bucket sizes, and a selection within that bucket (a few thousand values
  on real tensors) gives the exact value and counts below / equal, i.e. exactly the
  :class:`OrderStat` the streaming selection finds, so the merge result is bit-for-bit the
  direct path's; the blocks give a tied threshold's per-chunk tie counts without a pass
  over the tensor, and the position where a tie budget ends by scanning one block. For a
  resident task vector (float32, kept by the worker) only the positions are indexed
  (4 bytes per element, blocks included) and a bucket's values are read from the vector;
- SLERP: ``(dot, |a|, |b|)`` accumulated exactly as the operator does;
- DARE: the high 16 bits of each input's uniform draws (:class:`DrawHighs`, 2 bytes per
  element; the draws depend on the plan's seed and the tensor, not on the genome), so a
  candidate's keep masks need no new draws but for the few whose high bits tie the limit.

Memory is bounded by ``budget_bytes`` (the indexed magnitudes, their blocks and the stored
draws; the SLERP numbers are three floats per tensor): tensors that do not fit use the direct path (and
blocks that do not fit, counting passes), so a candidate's result never depends on the
budget. The keys name the source file and tensor, so the cache is
valid as long as the worker's sources do not change on disk (they are fixed for a run).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .order_stats import TIE_BLOCK  # the finest block whose id each sorted magnitude keeps
from .sparsify import OrderStat

DEFAULT_BUDGET_MB = 2048


def default_budget_bytes() -> int:
    """``$EVOMERGE_STATS_BUDGET_MB`` (default 2048 MiB) in bytes."""
    try:
        mb = float(os.environ.get("EVOMERGE_STATS_BUDGET_MB", DEFAULT_BUDGET_MB))
    except ValueError:
        mb = DEFAULT_BUDGET_MB
    return int(max(0.0, mb) * 2**20)


class SourceStats:
    """Per-worker cache of genome-independent statistics (see the module docstring)."""

    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = default_budget_bytes() if budget_bytes is None else budget_bytes
        self.used_bytes = 0
        # (input key, base key) -> (its magnitudes' index, the block size)
        self._sorted: dict[tuple[str, str], tuple[MagnitudeIndex, int]] = {}
        self._refused: set[tuple[str, str]] = set()
        self._slerp: dict[tuple[str, str], tuple[float, float, float]] = {}
        self._draws: dict[tuple[int, int], DrawHighs | None] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        with self._lock:
            self._sorted.clear()
            self._refused.clear()
            self._slerp.clear()
            self._draws.clear()
            self.used_bytes = 0

    # -- magnitude order statistics -------------------------------------------------------
    def sorted_magnitudes(self, key: str, base_key: str | None, t: torch.Tensor,
                          b: torch.Tensor | None) -> tuple[MagnitudeIndex, int] | None:
        """``(index of |t - b|, block size)``, computed on first use (``b`` None: ``t`` is
        that difference already, a resident task vector: its positions are indexed, see
        :class:`MagnitudeIndex`). The index gives the blocks (``position // block``,
        :func:`tie_block` elements per block) of the values equal to a rank's, except when
        the budget has no room for them (block size 0 then). None when over budget or not on
        CPU (on CUDA the streaming selection is already cheap)."""
        if t.device.type != "cpu" or base_key is None:
            return None
        k = (key, base_key)
        got = self._sorted.get(k)
        if got is not None:
            self.hits += 1
            return got
        n = t.numel()
        wide = t.dtype == torch.float64 and (b is None or b.dtype == torch.float64)
        cdt = torch.float64 if wide else torch.float32
        block = tie_block(n)
        blocks = -(-n // block)
        id_dtype = None
        if cdt == torch.float32 and blocks > 1:
            id_dtype = np.uint8 if blocks <= 1 << 8 else np.uint16
        with self._lock:
            room = self.budget_bytes - self.used_bytes
            if k in self._refused or room < n * cdt.itemsize:
                self._refused.add(k)
                return None
            if id_dtype is not None and room < n * (cdt.itemsize + np.dtype(id_dtype).itemsize):
                id_dtype = None  # the values fit, their blocks do not
            self.used_bytes += n * (cdt.itemsize + (0 if id_dtype is None else np.dtype(id_dtype).itemsize))
        self.misses += 1
        if b is None and t.dtype == torch.float32 and t.is_contiguous():
            # a resident task vector: index positions only, read values from it when asked
            index = MagnitudeIndex.of_positions(t.reshape(-1).numpy(), block)
            if index is not None:
                with self._lock:  # 4 bytes per element instead of the values' 4 + blocks'
                    self.used_bytes -= n * (cdt.itemsize + (0 if id_dtype is None else
                                                            np.dtype(id_dtype).itemsize))
                    self.used_bytes += index.order.nbytes + 4 * (n >> 3)  # + buckets read
                got = self._sorted[k] = (index, block)
                return got
        if b is None:
            a = torch.abs(t.reshape(-1).to(cdt)).numpy()  # a new array: t stays as it is
        else:
            a = torch.sub(t.reshape(-1).to(cdt), b.reshape(-1).to(cdt)).abs_().numpy()
        if id_dtype is None and blocks > 1 and cdt == torch.float32:
            block = 0  # no room for the blocks: tie positions are not known
        if cdt != torch.float32:
            block = 0
        got = self._sorted[k] = (MagnitudeIndex.build(a, block, id_dtype), block)
        return got

    def cached(self, key: str, base_key: str | None) -> bool:
        """Whether ``(key, base_key)``'s sorted magnitudes are kept (or were refused)."""
        k = (key, base_key)
        return k in self._sorted or k in self._refused

    def magnitude_stats_fn(self, key: str, base_key: str | None, t: torch.Tensor,
                           b: torch.Tensor | None, bounds: list[tuple[int, int]] | None = None
                           ) -> Callable[[list[int]], list[OrderStat]] | None:
        """A function ranks -> exact OrderStats of ``|t - b|`` (``b`` None: of ``|t|``), or
        None (use the direct path).

        Each statistic carries the blocks of the values equal to it (``tie_blocks``), and
        with the merge's chunk ``bounds`` (one chunk, or equal chunks a multiple of the block
        size, the last possibly shorter) how many of them every chunk holds
        (``chunk_equal``): a top-k cut whose threshold is tied then needs no counting pass
        over the tensor (on SmolLM2's float32 experts about 1 cut in 4 was tied), and the
        position where its tie budget ends is found in one block."""
        got = self.sorted_magnitudes(key, base_key, t, b)
        if got is None:
            return None
        index, block = got
        n = t.numel()
        chunks = len(bounds) if bounds is not None else 0
        step = _uniform_step(bounds, n)
        per_block = step // block if step and block and step % block == 0 else None
        if per_block is not None and not index.has_blocks and -(-n // block) > 1:
            per_block = None

        def stats(ranks: list[int]) -> list[OrderStat]:
            out = []
            for r in ranks:
                v, lo, hi, tied = index.at_rank(r)
                per_chunk = None
                # a threshold of 0 never needs tie budgets (zero deltas are free to drop)
                if chunks == 1:
                    per_chunk = (hi - lo,)  # one chunk holds every tie
                elif per_block is not None and v != 0:
                    ids = tied if tied is not None else np.zeros(hi - lo, np.int64)
                    per_chunk = tuple(int(c) for c in np.bincount(ids // per_block, minlength=chunks))
                out.append(OrderStat(r, float(v), lo, hi - lo, per_chunk, tied, block))
            return out

        return stats
    # -- SLERP ------------------------------------------------------------------------------
    def dot_norms(self, key_a: str, key_b: str,
                  compute: Callable[[], tuple[float, float, float]]) -> tuple[float, float, float]:
        k = (key_a, key_b)
        got = self._slerp.get(k)
        if got is None:
            got = compute()
            self._slerp[k] = got
        return got

    # -- DARE draws ---------------------------------------------------------------------------
    def draw_highs(self, seed: int, n: int) -> DrawHighs | None:
        """The store of the high 16 bits of the ``n`` uint32 draws of stream ``seed``
        (:class:`~.random_drop.UniformField`), filled as chunks are drawn; None when over
        budget (2 bytes per draw)."""
        k = (seed, n)
        with self._lock:
            if k in self._draws:
                return self._draws[k]
            got = None
            if self.budget_bytes - self.used_bytes >= 2 * n:
                self.used_bytes += 2 * n
                got = DrawHighs(n)
            self._draws[k] = got
            return got

    def summary(self) -> dict[str, float]:
        return {"tensors": len(self._sorted), "mib": self.used_bytes / 2**20,
                "budget_mib": self.budget_bytes / 2**20, "hits": self.hits,
                "misses": self.misses}


class DrawHighs:
    """High 16 bits of one stream's uint32 draws, by flat position, and which chunks
    ``(s, e)`` hold them. A DARE keep test ``draw < limit`` then reads 2 bytes per entry
    instead of drawing again (numpy's PCG64 at ~1.3 ns per draw here was half of a SmolLM2
    DARE-TIES candidate's merge); only the draws whose high bits equal the limit's (one in
    65536) need their low bits, drawn again one by one."""

    def __init__(self, n: int):
        self.highs = np.empty(n, dtype=np.uint16)
        self.filled: set[tuple[int, int]] = set()


# Buckets of magnitudes share their float32 bits' high 16 (sign 0, exponent, 7 mantissa
# bits); +inf and every NaN go to the last one (a sort treats NaNs as equal and last).
_KEY_SHIFT = 16
_LAST_KEY = 0x7F80
# A tensor whose largest bucket holds more values than this (and more than an eighth of
# them) is sorted whole instead: a rank lookup then needs no selection.
_BUCKET_MAX = 1 << 16
_ABS_MASK = np.uint32(0x7FFF_FFFF)


class MagnitudeIndex:
    """Non-negative float32 (or float64) values indexed for exact order statistics.

    Two layouts. Values: ``values`` holds them bucket after bucket in value order (each
    bucket in position order), ``blocks`` (optional) each value's block id, so the values
    equal to one value have ascending blocks. Positions (:meth:`of_positions`, a resident
    task vector ``d`` whose ``|d|`` is indexed): ``order`` holds the positions bucket after
    bucket, and a bucket's values are read from ``d`` when a rank falls in it (4 bytes per
    element instead of 5-6, plus the buckets read so far up to half a byte per element;
    no gather of every value while indexing: 30-40% less setup). ``ends`` is each bucket's
    end. A float64 input, or one whose largest bucket is too large, is sorted whole (one
    bucket per value then need not be found: ``ends`` None)."""

    def __init__(self, values: np.ndarray | None, ends: np.ndarray | None,
                 blocks: np.ndarray | None, order: np.ndarray | None = None,
                 source: np.ndarray | None = None, shift: int = -1):
        self.values, self.ends, self.blocks = values, ends, blocks
        self.order, self.source, self.shift = order, source, shift
        # buckets read from ``source`` so far, kept up to about an eighth of the values
        # (half a byte per element; two threads may both take the last room, unlocked): a
        # bucket is a gather of scattered positions
        self._read: dict[int, np.ndarray] = {}
        self._read_room = 0 if order is None else order.size >> 3

    @property
    def has_blocks(self) -> bool:
        """Whether the blocks of the values equal to a rank's come with it."""
        return self.blocks is not None or (self.order is not None and self.shift >= 0)

    @classmethod
    def build(cls, a: np.ndarray, block: int, id_dtype) -> MagnitudeIndex:
        """Index ``a`` (consumed: it may be reordered in place); ``id_dtype`` None: no
        block ids."""
        bucketed = _bucket_order(a.view(np.uint32), False) if a.dtype == np.float32 else None
        if bucketed is not None:
            order, ends = bucketed
            blocks = None
            if id_dtype is not None:
                shift = block.bit_length() - 1  # blocks are powers of two
                blocks = (order >> shift).astype(id_dtype)
            return cls(a[order], ends, blocks)
        if id_dtype is not None:
            values, blocks = sort_with_blocks(a, block, id_dtype)
            return cls(values, None, blocks)
        a.sort(kind="quicksort")  # introsort (numpy's SIMD sort for float32)
        return cls(a, None, None)

    @classmethod
    def of_positions(cls, d: np.ndarray, block: int) -> MagnitudeIndex | None:
        """The positions layout for ``|d|`` (``d`` float32, kept and never changed while
        the index lives; blocks of ``block`` elements, a power of two, 0: none), or None
        when one bucket holds too many of its values (then index a copy with
        :meth:`build`)."""
        if d.dtype != np.float32 or d.size >= 1 << 31:
            return None
        bits = d.view(np.uint32)
        bucketed = _bucket_order(bits, True)
        if bucketed is None:
            return None
        order, ends = bucketed
        shift = block.bit_length() - 1 if block else -1
        return cls(None, ends, None, order.astype(np.int32), bits, shift)

    def _bucket(self, start: int, end: int) -> tuple[np.ndarray, Callable[[Any], np.ndarray] | None]:
        """A bucket's values (position order) and a function: index into them -> their
        blocks (None: no blocks)."""
        if self.order is None:
            blocks = self.blocks
            return self.values[start:end], (None if blocks is None
                                             else lambda sel: blocks[start:end][sel])
        pos = self.order[start:end]
        seg = self._read.get(start)
        if seg is None:
            seg = (self.source[pos] & _ABS_MASK).view(np.float32)  # |d|: the sign bit cleared
            if self._read_room >= seg.size:  # a search revisits the buckets near its densities
                self._read_room -= seg.size
                self._read[start] = seg
        shift = self.shift
        return seg, (None if shift < 0 else lambda sel: pos[sel].astype(np.int64) >> shift)

    def at_rank(self, r: int) -> tuple[float, int, int, np.ndarray | None]:
        """``(value, first index, one past the last index, their blocks)`` of the values
        equal to the ``r``-th smallest (1-based) in value order, as a sort would place them
        (numpy's: NaNs equal and last)."""
        if self.ends is None:
            arr = self.values
            v = arr[r - 1]
            lo = int(np.searchsorted(arr, v, side="left"))
            hi = int(np.searchsorted(arr, v, side="right"))
            return float(v), lo, hi, None if self.blocks is None else self.blocks[lo:hi]
        q = int(np.searchsorted(self.ends, r - 1, side="right"))  # the bucket of rank r
        start = int(self.ends[q - 1]) if q > 0 else 0
        seg, blocks_of = self._bucket(start, int(self.ends[q]))
        j = r - 1 - start
        if q == len(self.ends) - 1 and (np.isnan(seg).any() or np.isinf(seg).any()):
            order = np.argsort(seg, kind="stable")  # inf and NaN: as the sort places them
            srt = seg[order]
            v = srt[j]
            lo = int(np.searchsorted(srt, v, side="left"))
            hi = int(np.searchsorted(srt, v, side="right"))
            tied = None if blocks_of is None else np.sort(blocks_of(order[lo:hi]))
            return float(v), start + lo, start + hi, tied
        v = np.partition(seg, j)[j]
        equal = seg == v
        lo = start + int(np.count_nonzero(seg < v))
        hi = lo + int(np.count_nonzero(equal))
        tied = None if blocks_of is None else blocks_of(equal)
        return float(v), lo, hi, tied


def _bucket_order(bits: np.ndarray, clear_sign: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Positions of float32 values (as uint32 ``bits``; their absolute values when
    ``clear_sign``) bucket after bucket, in position order within a bucket, and each
    non-empty bucket's end; None for fewer than 2 values or a bucket too large."""
    if bits.size < 2:
        return None
    k = np.bitwise_and(bits, _ABS_MASK) if clear_sign else bits.copy()
    np.right_shift(k, _KEY_SHIFT, out=k)
    np.minimum(k, _LAST_KEY, out=k)
    keys = k.astype(np.uint16)
    del k
    sizes = np.bincount(keys, minlength=_LAST_KEY + 1)
    if int(sizes.max()) > max(_BUCKET_MAX, bits.size >> 3):
        return None
    return np.argsort(keys, kind="stable"), np.cumsum(sizes[sizes > 0])  # a radix sort


def sort_with_blocks(a: np.ndarray, block: int, id_dtype) -> tuple[np.ndarray, np.ndarray]:
    """``a`` (float32, every value >= 0) sorted, and each sorted value's block
    (``position // block``, ``id_dtype``); equal values keep their blocks ascending.

    Non-negative float32 bits sort as integers, so each (value, block) pair is one int64:
    the value's bits in the high 32-bit word, the block in the low one, written through a
    view (no int64 arithmetic over the array: shifting, dividing and masking it cost more
    than the sort itself, 3.4-4.1 s -> 2.5-2.9 s for 30M values on this machine)."""
    n = a.size
    packed = np.empty(n, dtype=np.int64)
    words = packed.view(np.int32).reshape(n, 2)  # [low word, high word]
    if not np.little_endian:
        words = words[:, ::-1]
    words[:, 1] = a.view(np.int32)
    full = n // block
    ids = words[:, 0]
    ids[:full * block].reshape(full, block)[:] = np.arange(full, dtype=np.int32)[:, None]
    ids[full * block:] = full
    packed.sort(kind="quicksort")
    values = words[:, 1].copy().view(np.float32)
    return values, words[:, 0].astype(id_dtype)


def tie_block(n: int) -> int:
    """Elements per block of the block ids kept with sorted magnitudes: :data:`TIE_BLOCK`,
    doubled until a tensor of ``n`` elements has at most 65536 blocks (uint16 ids)."""
    block = TIE_BLOCK
    while -(-n // block) > 1 << 16:
        block *= 2
    return block


def _uniform_step(bounds: list[tuple[int, int]] | None, n: int) -> int | None:
    """The common length of ``bounds``' chunks (all but the last equal, covering ``range(n)``
    in order), or None."""
    if not bounds or len(bounds) < 2:
        return None
    step = bounds[0][1] - bounds[0][0]
    if step <= 0 or bounds[-1][1] != n:
        return None
    for i, (s, e) in enumerate(bounds):
        last = i == len(bounds) - 1
        if s != i * step or not (e - s == step or (last and 0 < e - s < step)):
            return None
    return step


__all__ = ["TIE_BLOCK", "DrawHighs", "MagnitudeIndex", "SourceStats", "default_budget_bytes", "tie_block"]
