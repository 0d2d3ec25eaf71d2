"""Genome-independent merge statistics, computed once per worker and reused per candidate.

In a search the sources are fixed and only the recipe's numbers change, yet a TIES,
breadcrumbs or SLERP merge spends most of its time on quantities that do not depend on
them: the exact k-th largest ``|x_i - base|`` of every tensor (for any density the genome
picks) and, for SLERP, the inner product and norms of the two inputs. :class:`SourceStats`
keeps them per (input, base) pair of tensors:

- magnitude order statistics: the sorted ``|x - base|`` of the tensor (float32, 4 bytes per
  element, sorted once with numpy) and, where the budget allows, each sorted value's chunk
  of the merge (1-2 bytes per element). Any rank is then one array lookup and two binary
  searches give the exact counts below / equal, i.e. exactly the :class:`OrderStat` the
  streaming selection finds, so the merge result is bit-for-bit the direct path's; the
  chunks give a tied threshold's per-chunk tie counts without a pass over the tensor;
- SLERP: ``(dot, |a|, |b|)`` accumulated exactly as the operator does.

Memory is bounded by ``budget_bytes`` (the sorted magnitudes and their chunks; the SLERP
numbers are three floats per tensor): tensors that do not fit use the direct path (and
chunks that do not fit, a counting pass), so a candidate's result never depends on the
budget. The keys name the source file and tensor, so the cache is
valid as long as the worker's sources do not change on disk (they are fixed for a run).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import numpy as np
import torch

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
        # (input key, base key) -> (sorted values, their chunks or None, the chunk step)
        self._sorted: dict[tuple[str, str], tuple[np.ndarray, np.ndarray | None, int | None]] = {}
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
                          b: torch.Tensor | None, step: int | None = None
                          ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Sorted float32 ``|t - b|`` (flat; ``b`` None: ``t`` is that difference already, a
        resident task vector), computed on first use, and with ``step`` (the
        merge's chunk length) each sorted value's chunk (``position // step``, uint8 or
        uint16; None when kept for another step or the budget has no room for it); None
        when over budget or not on CPU (on CUDA the streaming selection is already cheap)."""
        if t.device.type != "cpu" or base_key is None:
            return None
        k = (key, base_key)
        got = self._sorted.get(k)
        if got is not None:
            self.hits += 1
            arr, chunk_of, kept_step = got
            return arr, (chunk_of if step is not None and kept_step == step else None)
        n = t.numel()
        wide = t.dtype == torch.float64 and (b is None or b.dtype == torch.float64)
        cdt = torch.float64 if wide else torch.float32
        chunks = -(-n // step) if step else 0
        id_dtype = None
        if cdt == torch.float32 and 1 < chunks <= 1 << 16:
            id_dtype = np.uint8 if chunks <= 1 << 8 else np.uint16
        with self._lock:
            room = self.budget_bytes - self.used_bytes
            if k in self._refused or room < n * cdt.itemsize:
                self._refused.add(k)
                return None
            if id_dtype is not None and room < n * (cdt.itemsize + np.dtype(id_dtype).itemsize):
                id_dtype = None  # the values fit, their chunks do not
            self.used_bytes += n * (cdt.itemsize + (0 if id_dtype is None else np.dtype(id_dtype).itemsize))
        self.misses += 1
        if b is None:
            a = torch.abs(t.reshape(-1).to(cdt)).numpy()  # a new array: t stays as it is
        else:
            a = torch.sub(t.reshape(-1).to(cdt), b.reshape(-1).to(cdt)).abs_().numpy()
        chunk_of = None
        if id_dtype is None:
            a.sort(kind="quicksort")  # introsort (numpy's SIMD sort for float32)
        else:
            # |d| >= 0, so its float32 bits sort as integers: sort (bits, chunk) pairs packed
            # in one int64 and unpack the values and their chunks in sorted order
            packed = a.view(np.int32).astype(np.int64) << 16
            packed |= np.arange(n, dtype=np.int64) // step
            packed.sort(kind="quicksort")
            a = (packed >> 16).astype(np.int32).view(np.float32)
            chunk_of = (packed & 0xFFFF).astype(id_dtype)
            del packed
        self._sorted[k] = (a, chunk_of, step if chunk_of is not None else None)
        return a, chunk_of

    def cached(self, key: str, base_key: str | None) -> bool:
        """Whether ``(key, base_key)``'s sorted magnitudes are kept (or were refused)."""
        k = (key, base_key)
        return k in self._sorted or k in self._refused

    def magnitude_stats_fn(self, key: str, base_key: str | None, t: torch.Tensor,
                           b: torch.Tensor | None, bounds: list[tuple[int, int]] | None = None
                           ) -> Callable[[list[int]], list[OrderStat]] | None:
        """A function ranks -> exact OrderStats of ``|t - b|`` (``b`` None: of ``|t|``), or
        None (use the direct path).

        With the merge's chunk ``bounds`` (equal chunks, the last possibly shorter) each
        statistic also says how many values equal to it every chunk holds (``chunk_equal``):
        a top-k cut whose threshold is tied then needs no counting pass over the tensor (on
        SmolLM2's float32 experts about 1 cut in 4 was tied, a pass of 1.2 ms each)."""
        step = _uniform_step(bounds, t.numel())
        got = self.sorted_magnitudes(key, base_key, t, b, step)
        if got is None:
            return None
        arr, chunk_of = got
        chunks = len(bounds) if bounds is not None else 0

        def stats(ranks: list[int]) -> list[OrderStat]:
            out = []
            for r in ranks:
                v = arr[r - 1]
                lo = int(np.searchsorted(arr, v, side="left"))
                hi = int(np.searchsorted(arr, v, side="right"))
                per_chunk = None
                # a threshold of 0 never needs tie budgets (zero deltas are free to drop)
                if chunk_of is not None and v != 0:
                    per_chunk = tuple(int(c) for c in np.bincount(chunk_of[lo:hi], minlength=chunks))
                out.append(OrderStat(r, float(v), lo, hi - lo, per_chunk))
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


__all__ = ["SourceStats", "default_budget_bytes"]
