"""Task vectors kept resident per worker, and task arithmetic computed from them.

In a search the sources are fixed and only the recipe's numbers change, yet every candidate
of a task-arithmetic search used to re-read each source tensor, subtract the base again and
write the result into a fresh tensor that was then copied into the resident model. Here:

- :class:`ResidentDeltas` keeps each task vector ``d = x - base`` (float32, flat) computed
  once per worker, within ``budget_bytes`` (``$EVOMERGE_RESIDENT_BUDGET_MB``, default 4096
  MiB). A task vector whose bits are all zero (LoRA experts leave embeddings and norms at
  the base) is remembered as :data:`ZERO` and costs no memory. One over the budget is not
  kept: the merge then subtracts on the fly, as before;
- :func:`run_task_arithmetic` computes ``base + lambda * sum_i w_i d_i`` for a batch of
  output tensors straight into their destination (e.g. the resident model's parameter),
  chunk by chunk, all tensors' chunks in one parallel pass (:func:`~.parallel.run_chunks`).

Bit-for-bit the direct path's result (:func:`~.task_vector_merge.generalized_task_arithmetic`
without sparsification): per element the same ATen ops in the same order (elementwise, so
chunk bounds do not change a bit) (``x - b`` is exact to compute once; then ``S = d_0 * w_0``, ``S += w_j d_j``,
``out = b + (lambda / divisor) S``). A zero task vector is fed as zeros, so even signed
zeros and non-finite weights give the same bits. Tests compare both paths bit for bit.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .parallel import run_chunks
from .sparsify import chunk_bounds

# Elements per chunk of the resident pass: larger than the general CPU_CHUNK because there is
# no temporary beyond three chunk buffers per thread; on the real SmolLM2 demo sources
# (per-candidate median, quiet 2-core machine) 128K: 0.189 s, 512K: 0.154 s, 1M: 0.142 s,
# 2M: 0.141 s.
RESIDENT_CHUNK = 1 << 20

DEFAULT_BUDGET_MB = 4096


class _Zero:
    """Marker: the task vector is exactly zero (every bit)."""

    def __repr__(self) -> str:
        return "ZERO"


ZERO = _Zero()


def default_budget_bytes() -> int:
    """``$EVOMERGE_RESIDENT_BUDGET_MB`` (default 4096 MiB) in bytes."""
    try:
        mb = float(os.environ.get("EVOMERGE_RESIDENT_BUDGET_MB", DEFAULT_BUDGET_MB))
    except ValueError:
        mb = DEFAULT_BUDGET_MB
    return int(max(0.0, mb) * 2**20)


class ResidentDeltas:
    """Per-worker task vectors ``x - base`` (float32, flat), computed once and reused.

    Args:
        budget_bytes: most bytes of task vectors kept (None: :func:`default_budget_bytes`).
            Zero task vectors cost nothing; one that does not fit is not kept.
    """

    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = default_budget_bytes() if budget_bytes is None else int(budget_bytes)
        self.used_bytes = 0
        self._deltas: dict[tuple[str, str], torch.Tensor | _Zero] = {}
        self._refused: set[tuple[str, str]] = set()
        self._plain: dict[str, bool] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        """Forget everything (the sources changed)."""
        with self._lock:
            self._deltas.clear()
            self._refused.clear()
            self._plain.clear()
            self.used_bytes = 0

    def known(self, key: str, base_key: str) -> torch.Tensor | _Zero | None:
        """The kept task vector (or :data:`ZERO`) of ``key`` over ``base_key``, or None."""
        return self._deltas.get((key, base_key))

    def refused(self, key: str, base_key: str) -> bool:
        """True when this task vector was over the budget (the caller subtracts on the fly)."""
        return (key, base_key) in self._refused

    def delta(self, key: str, base_key: str, load: Callable[[], torch.Tensor],
              base: torch.Tensor) -> tuple[torch.Tensor | _Zero, bool]:
        """``(task vector, kept)``: the resident one, else ``load() - base`` computed now
        (kept when it is zero or fits the budget). ``base``: float32, same shape as ``load()``."""
        k = (key, base_key)
        got = self._deltas.get(k)
        if got is not None:
            self.hits += 1
            return got, True
        self.misses += 1
        x = load()
        d = torch.sub(x.reshape(-1), base.reshape(-1))
        del x
        if d.numel() == 0 or not bool(d.view(torch.int32).any()):
            with self._lock:
                self._deltas[k] = ZERO
            return ZERO, True
        nbytes = d.numel() * d.element_size()
        with self._lock:
            if k in self._refused or self.used_bytes + nbytes > self.budget_bytes:
                self._refused.add(k)
                return d, False
            self.used_bytes += nbytes
            self._deltas[k] = d
        return d, True

    def base_is_plain(self, base_key: str, base: torch.Tensor) -> bool:
        """No NaN and no negative zero in ``base`` (then ``base + (+-0)`` is ``base``, bit
        for bit); memoized per base tensor."""
        got = self._plain.get(base_key)
        if got is None:
            neg_zero = torch.logical_and(torch.eq(base, 0), torch.signbit(base))
            got = not bool(torch.isnan(base).any()) and not bool(neg_zero.any())
            self._plain[base_key] = got
        return got

    def summary(self) -> dict[str, float]:
        """Tensors kept (zero ones counted apart), memory used and budget (MiB), hits, misses."""
        zero = sum(1 for v in self._deltas.values() if v is ZERO)
        return {"tensors": len(self._deltas) - zero, "zero": zero, "over_budget": len(self._refused),
                "mib": self.used_bytes / 2**20, "budget_mib": self.budget_bytes / 2**20,
                "hits": self.hits, "misses": self.misses}


@dataclass
class TAJob:
    """One output tensor of a task-arithmetic merge for :func:`run_task_arithmetic`.

    ``out``: flat contiguous destination (float32, bf16 or fp16: the float32 result is
    rounded once on the write); ``base``: flat float32 base; ``inputs``:
    per live input (weight != 0, in plan order) ``(kind, tensor, weight)`` with kind "delta"
    (a resident task vector), "source" (the source tensor: subtract the base per chunk) or
    "zero" (:data:`ZERO`; tensor None); ``alpha``: ``lambda / divisor``; ``transient``: it
    holds tensors that are not resident (run it soon rather than queue it).
    """

    out: torch.Tensor | None
    base: torch.Tensor
    inputs: list[tuple[str, torch.Tensor | None, float]]
    alpha: float
    transient: bool = False

    def bounds(self) -> list[tuple[int, int]]:
        return list(chunk_bounds(self.base.numel(), RESIDENT_CHUNK))


def task_arithmetic_alpha(weights: Sequence[float], lam: float, normalize: bool) -> float:
    """``lambda / divisor`` exactly as the direct path computes it."""
    divisor = 1.0
    if normalize:
        total_w = sum(weights)
        divisor = total_w if abs(total_w) >= 1e-8 else 1.0
    return lam / divisor


def output_is_base(job: TAJob, base_plain: bool) -> bool:
    """True when the job's result is its base, bit for bit: every live task vector is zero,
    the weights and alpha are finite and the base has no NaN or negative zero (no live input
    at all: always)."""
    if not job.inputs:
        return True
    if not base_plain or not math.isfinite(job.alpha):
        return False
    return all(kind == "zero" and math.isfinite(w) for kind, _, w in job.inputs)


_local = threading.local()


def _buffers() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This thread's chunk-sized float32 buffers: the running sum, a task vector computed
    on the fly, and zeros (never written). Kept per thread: no allocator trip per chunk."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = (torch.empty(RESIDENT_CHUNK), torch.empty(RESIDENT_CHUNK),
                                   torch.zeros(RESIDENT_CHUNK))
    return bufs


def _chunk(job: TAJob, s: int, e: int) -> None:
    b_c = job.base[s:e]
    m = e - s
    s_buf, d_buf, zeros = _buffers()
    S = None
    for kind, t, w in job.inputs:
        if kind == "delta":
            d = t[s:e]
        elif kind == "source":
            d = torch.sub(t[s:e], b_c, out=d_buf[:m])
        else:
            d = zeros[:m]
        if S is None:
            S = torch.mul(d, w, out=s_buf[:m])
        else:
            S.add_(d, alpha=w)
    if S is None:
        job.out[s:e].copy_(b_c)
        return
    torch.add(b_c, S, alpha=job.alpha, out=job.out[s:e])


def run_task_arithmetic(jobs: Sequence[TAJob], device: torch.device | str | None = "cpu") -> None:
    """Compute every job into its ``out``: all chunks of all jobs in one parallel pass."""
    work = [(j, s, e) for j, job in enumerate(jobs) for s, e in job.bounds()]
    if not work:
        return
    index = [(i, 0) for i in range(len(work))]
    run_chunks(lambda i, _: _chunk(jobs[work[i][0]], work[i][1], work[i][2]), index, device)


__all__ = ["ResidentDeltas", "TAJob", "ZERO", "default_budget_bytes", "output_is_base",
           "run_task_arithmetic", "task_arithmetic_alpha"]
