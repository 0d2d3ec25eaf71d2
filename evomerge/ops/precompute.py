"""Genome-independent merge statistics, computed once per worker and reused per candidate.

In a search the sources are fixed and only the recipe's numbers change, yet a TIES,
breadcrumbs or SLERP merge spends most of its time on quantities that do not depend on
them: the exact k-th largest ``|x_i - base|`` of every tensor (for any density the genome
picks) and, for SLERP, the inner product and norms of the two inputs. :class:`SourceStats`
keeps them per (input, base) pair of tensors:

- magnitude order statistics: the sorted ``|x - base|`` of the tensor (float32, 4 bytes per
  element, sorted once with numpy). Any rank is then one array lookup and two binary
  searches give the exact counts below / equal, i.e. exactly the :class:`OrderStat` the
  streaming selection finds, so the merge result is bit-for-bit the direct path's;
- SLERP: ``(dot, |a|, |b|)`` accumulated exactly as the operator does.

Memory is bounded by ``budget_bytes`` (the sorted magnitudes; the SLERP numbers are three
floats per tensor): tensors that do not fit use the direct path, so a candidate's result
never depends on the budget. The keys name the source file and tensor, so the cache is
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
        self._sorted: dict[tuple[str, str], np.ndarray] = {}
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
                          b: torch.Tensor) -> np.ndarray | None:
        """Sorted float32 ``|t - b|`` (flat), computed on first use; None when over budget
        or not on CPU (on CUDA the streaming selection is already cheap)."""
        if t.device.type != "cpu" or base_key is None:
            return None
        k = (key, base_key)
        arr = self._sorted.get(k)
        if arr is not None:
            self.hits += 1
            return arr
        nbytes = t.numel() * 4
        with self._lock:
            if k in self._refused or self.used_bytes + nbytes > self.budget_bytes:
                self._refused.add(k)
                return None
            self.used_bytes += nbytes
        self.misses += 1
        cdt = torch.float64 if t.dtype == b.dtype == torch.float64 else torch.float32
        arr = torch.sub(t.reshape(-1).to(cdt), b.reshape(-1).to(cdt)).abs_().numpy()
        arr.sort(kind="quicksort")  # introsort (numpy's SIMD sort for float32)
        self._sorted[k] = arr
        return arr

    def magnitude_stats_fn(self, key: str, base_key: str | None, t: torch.Tensor,
                           b: torch.Tensor) -> Callable[[list[int]], list[OrderStat]] | None:
        """A function ranks -> exact OrderStats of ``|t - b|``, or None (use the direct path)."""
        arr = self.sorted_magnitudes(key, base_key, t, b)
        if arr is None:
            return None

        def stats(ranks: list[int]) -> list[OrderStat]:
            out = []
            for r in ranks:
                v = arr[r - 1]
                lo = int(np.searchsorted(arr, v, side="left"))
                hi = int(np.searchsorted(arr, v, side="right"))
                out.append(OrderStat(r, float(v), lo, hi - lo))
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


__all__ = ["SourceStats", "default_budget_bytes"]
