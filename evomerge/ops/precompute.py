"""Genome-independent merge statistics, computed once per worker and reused per candidate.

In a search the sources are fixed and only the recipe's numbers change, yet a TIES,
breadcrumbs or SLERP merge spends most of its time on quantities that do not depend on
them: the exact k-th largest ``|x_i - base|`` of every tensor (for any density the genome
picks) and, for SLERP, the inner product and norms of the two inputs. :class:`SourceStats`
keeps them per (input, base) pair of tensors:

- magnitude order statistics: the sorted ``|x - base|`` of the tensor (float32, 4 bytes per
  element, sorted once with numpy) and, where the budget allows, each sorted value's block
  of :data:`TIE_BLOCK` elements (1-2 bytes per element). Any rank is then one array lookup
  and two binary searches give the exact counts below / equal, i.e. exactly the
  :class:`OrderStat` the streaming selection finds, so the merge result is bit-for-bit the
  direct path's; the blocks give a tied threshold's per-chunk tie counts without a pass
  over the tensor, and the position where a tie budget ends by scanning one block;
- SLERP: ``(dot, |a|, |b|)`` accumulated exactly as the operator does.

Memory is bounded by ``budget_bytes`` (the sorted magnitudes and their blocks; the SLERP
numbers are three floats per tensor): tensors that do not fit use the direct path (and
blocks that do not fit, counting passes), so a candidate's result never depends on the
budget. The keys name the source file and tensor, so the cache is
valid as long as the worker's sources do not change on disk (they are fixed for a run).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

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
        # (input key, base key) -> (sorted values, their block ids or None, the block size)
        self._sorted: dict[tuple[str, str], tuple[np.ndarray, np.ndarray | None, int]] = {}
        self._refused: set[tuple[str, str]] = set()
        self._slerp: dict[tuple[str, str], tuple[float, float, float]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        with self._lock:
            self._sorted.clear()
            self._refused.clear()
            self._slerp.clear()
            self.used_bytes = 0

    # -- magnitude order statistics -------------------------------------------------------
    def sorted_magnitudes(self, key: str, base_key: str | None, t: torch.Tensor,
                          b: torch.Tensor | None
                          ) -> tuple[np.ndarray, np.ndarray | None, int] | None:
        """``(sorted float32 |t - b|, block ids, block size)``, computed on first use (``b``
        None: ``t`` is that difference already, a resident task vector). The block ids
        (``position // block``, uint8 or uint16, :func:`tie_block` elements per block) follow
        the sorted values; None for a tensor of one block or when the budget has no room
        for them (block size 0 then). None when over budget or not on CPU (on CUDA the
        streaming selection is already cheap)."""
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
        if b is None:
            a = torch.abs(t.reshape(-1).to(cdt)).numpy()  # a new array: t stays as it is
        else:
            a = torch.sub(t.reshape(-1).to(cdt), b.reshape(-1).to(cdt)).abs_().numpy()
        block_of = None
        if id_dtype is None:
            a.sort(kind="quicksort")  # introsort (numpy's SIMD sort for float32)
            if blocks > 1 and cdt == torch.float32:
                block = 0  # no room for the blocks: tie positions are not known
        else:
            a, block_of = sort_with_blocks(a, block, id_dtype)
        if cdt != torch.float32:
            block = 0
        got = self._sorted[k] = (a, block_of, block)
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
        arr, block_of, block = got
        n = t.numel()
        chunks = len(bounds) if bounds is not None else 0
        step = _uniform_step(bounds, n)
        per_block = step // block if step and block and step % block == 0 else None
        if per_block is not None and block_of is None and -(-n // block) > 1:
            per_block = None

        def stats(ranks: list[int]) -> list[OrderStat]:
            out = []
            for r in ranks:
                v = arr[r - 1]
                lo = int(np.searchsorted(arr, v, side="left"))
                hi = int(np.searchsorted(arr, v, side="right"))
                per_chunk = None
                tied = None if block_of is None else block_of[lo:hi]
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

    def summary(self) -> dict[str, float]:
        return {"tensors": len(self._sorted), "mib": self.used_bytes / 2**20,
                "budget_mib": self.budget_bytes / 2**20, "hits": self.hits,
                "misses": self.misses}


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


__all__ = ["TIE_BLOCK", "SourceStats", "default_budget_bytes", "tie_block"]
