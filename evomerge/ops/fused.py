"""The elementwise part of task-vector merges as one function per chunk, compiled where it pays.

:func:`gta_kernel` is the whole per-chunk computation of
:func:`~.task_vector_merge.generalized_task_arithmetic` once the thresholds are known: widen
the chunk's inputs (bf16 / fp16 / fp32) to the compute dtype, take the deltas, prune them
(keep ``|d| > low`` and ``|d| <= high``), apply DARE masks, weight them, elect the TIES sign,
sum the agreeing deltas, add to the base and round to the output dtype. Every rounding step
is explicit: scalars come as tensors of the compute dtype (no Python double enters the
arithmetic), inductor's C++ runs with FP contraction off, and the two multiply-adds of the
earlier eager loop (``add`` with ``alpha`` is an FMA on CPU) are :func:`fma`: ATen's FMA
eagerly (the earlier loop's bits exactly), inductor's FMA prim compiled. So eager and
compiled give the same bits (``tests/ops/test_fused_cpu.py``): which path runs (size
threshold, a failed compile, ``EVOMERGE_FUSED``) does not change a result.

Compiled (``torch.compile``, inductor) it reads each input once per element instead of
about ten eager kernels each going through memory: measured on this 2-core CPU for 11.5M
elements of three bf16 inputs, TIES 0.74 s eager vs 0.03 s compiled (after a compile of
~9 s, cached on disk by inductor for later processes). Used on CPU for tensors of at least
:data:`FUSED_CPU_MIN` elements and on CUDA; smaller tensors, ``EVOMERGE_FUSED=0`` or
``eager``, and any failure to compile run the same function eagerly. On CUDA the compiled
kernel may contract multiply-adds (triton), so there it is checked against eager to float32
rounding (``tests/ops/test_cuda_ops.py``).

A chunk where a cut's tie budget ends (it keeps only the first few elements equal to its
threshold, in flat order) runs as pieces split at that position (:func:`split_ties`), so the
kernel compares values only, never positions. DELLA's row-wise drops are pruned eagerly by
:mod:`.task_vector_merge` and then combined by :func:`gta_combine`, the same arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from .order_stats import TIE_BLOCK

# CPU tensors below this many elements run eagerly: compiling costs seconds once per process
# and shape class (sizes are dynamic), a small tensor's merge milliseconds. At 2**20,
# SmolLM2-135M's MLP and attention tensors (884736 / 331776 elements) ran eagerly and a TIES
# search candidate merged in 4.3-5.3 s (eager torch.where alone 3 s); at 2**17 it merges in
# 1.1-1.5 s. The toy zoo's largest tensor (65536) stays eager: no compile in the demo.
FUSED_CPU_MIN = 1 << 17
# Elements per chunk when the compiled kernel runs on CPU: it keeps no temporaries in memory,
# so chunks only need to be many enough to spread over threads and few enough that the call
# overhead (guards, wrapper: ~0.1 ms) stays negligible.
COMPILED_CPU_CHUNK = 1 << 20
# Once a merge kernel has been compiled in this process (a large tensor paid for it), CPU
# tensors from this many elements use it too: its call costs ~0.1 ms where the eager ops
# cost milliseconds (SmolLM2's k/v projections, 110592 elements: 3 ms eager per TIES tensor).
FUSED_WARM_MIN = 1 << 12

_COMPILED: dict[str, Any] = {}
_FAILED: dict[str, bool] = {}
_COMPILE_LOCK = threading.RLock()
_WARM: set[tuple] = set()  # shape keys (_shape_key) whose graph is compiled
_COMPILED_ON: set[str] = set()  # device types where a merge kernel ran compiled
_COMPILE_CLOCK = [0.0]  # wall seconds of calls that may have compiled (see compile_seconds)


@dataclass
class ChunkCut:
    """One input's magnitude pruning on one chunk, as numbers (so every chunk, whatever its
    cuts, runs the same compiled graph). Keep ``|d|`` when

    ``(|d| > low or (|d| == tie_low and position < ties_low))`` and not
    ``(|d| > high or (|d| == tie_high and position < ties_high))``

    (positions count from the chunk's start; NaN is kept, as the eager loop kept it). The
    defaults keep everything. The kernel sees no positions: :func:`split_ties` cuts a chunk
    where a tie budget ends, so in each piece every budget is empty or whole.
    """

    low: float = -math.inf
    tie_low: float = math.nan
    ties_low: int = 0
    high: float = math.inf
    tie_high: float = math.nan
    ties_high: int = 0

    def folded(self, dtype: torch.dtype) -> ChunkCut:
        """The same cut with every whole tie budget (``ties == the piece's length``, as
        :func:`split_ties` leaves them) folded into its threshold: "``> t`` or ``== t``" is
        "``> t'``" for ``t'`` the next ``dtype`` value below ``t`` (none lies between; NaN
        still passes ``not <=`` and fails ``>``), so the kernel needs no tie comparison."""
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        low, tie_low, ties_low = self.low, self.tie_low, self.ties_low
        high, tie_high, ties_high = self.high, self.tie_high, self.ties_high
        if ties_low > 0 and tie_low == low and math.isfinite(low):
            low = float(np.nextafter(np_dtype(low), np_dtype(-math.inf)))
            tie_low, ties_low = math.nan, 0
        if ties_high > 0 and tie_high == high and math.isfinite(high):
            high = float(np.nextafter(np_dtype(high), np_dtype(-math.inf)))
            tie_high, ties_high = math.nan, 0
        return ChunkCut(low, tie_low, ties_low, high, tie_high, ties_high)

    def has_ties(self) -> bool:
        """True when a tie value is compared against (a nonempty budget, not NaN)."""
        return ((self.ties_low > 0 and not math.isnan(self.tie_low))
                or (self.ties_high > 0 and not math.isnan(self.tie_high)))

    def uses_high(self) -> bool:
        """True when the cut of the largest values drops anything (breadcrumbs' outliers)."""
        return self.high != math.inf or (self.ties_high > 0 and not math.isnan(self.tie_high))


class KernelFlags(NamedTuple):
    """What one call of :func:`gta_kernel` computes (each combination is its own graph).

    ``prune``: apply each input's :class:`ChunkCut`; ``consensus``: TIES sign election;
    ``normalize``: divide by the agreeing weights (TIES) or their sum; ``given``: the inputs
    are already the task vectors ``x - base`` in the compute dtype (resident ones);
    ``high``: some input's cut of the largest values drops anything (breadcrumbs);
    ``ties``: some input's cut keeps (or drops) the values equal to a threshold in this
    piece; ``negative``: some input's weight is negative. The last three only drop
    comparisons and sign products whose result is known without them (a NaN tie value
    equals nothing, a sign of +1 changes nothing): the same bits, fewer instructions
    (without the tie comparisons and sign products the 3-input TIES kernel measured
    1.86 -> 1.40 ns per element on one core here).
    """

    prune: bool = False
    consensus: bool = False
    normalize: bool = False
    given: bool = False
    high: bool = True
    ties: bool = True
    negative: bool = True


def split_ties(cuts: list[ChunkCut], length: int) -> list[tuple[int, int, list[ChunkCut]]]:
    """A chunk of ``length`` cut where any tie budget ends: ``(start, end, cuts)`` pieces,
    positions relative to the chunk, whose cuts keep all or none of their ties (a budget of
    ``end - start`` or 0), so the kernel needs no positions. Exact: an element's fate
    depends only on its position against the budget's end, which is a piece boundary."""
    ends = {t for c in cuts for t in (c.ties_low, c.ties_high) if 0 < t < length}
    if not ends:
        return [(0, length, cuts)]
    points = [0, *sorted(ends), length]
    pieces = []
    for a, b in zip(points, points[1:]):
        pieces.append((a, b, [dataclasses.replace(c, ties_low=b - a if c.ties_low >= b else 0,
                                                  ties_high=b - a if c.ties_high >= b else 0)
                              for c in cuts]))
    return pieces


def fused_mode(device: torch.device, numel: int) -> str:
    """"compiled" or "eager" for a tensor of ``numel`` elements on ``device``.

    Compiled on CUDA and, from :data:`FUSED_CPU_MIN` elements (:data:`FUSED_WARM_MIN` once a
    merge kernel was compiled in this process), on CPU, unless ``EVOMERGE_FUSED`` is ``0``
    or ``eager`` or compiling failed before on that device type. Either mode gives the same
    bits.
    """
    env = os.environ.get("EVOMERGE_FUSED", "1")
    if env in ("0", "eager") or _FAILED.get(device.type):
        return "eager"
    if device.type == "cuda" or (device.type == "cpu" and numel >= FUSED_CPU_MIN):
        return "compiled"
    if device.type == "cpu" and numel >= FUSED_WARM_MIN and "cpu" in _COMPILED_ON:
        return "compiled"
    return "eager"


PER_INPUT = 7  # numbers per input in the kernel's scalar tensor (see scalars)


def scalars(cuts: list[ChunkCut], ews: list[float], ws: list[float], lam: float,
            dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernel's numbers: a tensor of the compute dtype with, per input (:data:`PER_INPUT`
    values), ``low, tie_low, high, tie_high, weight x rescale, weight, sign of the weight``
    and then the final multiplier (lambda, or lambda / divisor). Every tie budget must be
    empty or whole (:func:`split_ties`): an empty one's tie value is NaN, equal to nothing."""
    vals: list[float] = []
    for c, ew, w in zip(cuts, ews, ws):
        tie_low = c.tie_low if c.ties_low > 0 else math.nan
        tie_high = c.tie_high if c.ties_high > 0 else math.nan
        vals += [c.low, tie_low, c.high, tie_high, ew, w, 1.0 if w > 0 else -1.0]
    vals.append(lam)
    return torch.tensor(vals, dtype=dtype, device=device)


def gta_deltas(bc: torch.Tensor, xs: list[torch.Tensor], masks: list[Any], scal: torch.Tensor,
               flags: KernelFlags) -> list[torch.Tensor]:
    """Pruned (:class:`ChunkCut`, every tie budget empty or whole), masked deltas
    ``x - base`` in the compute dtype of ``bc`` (``xs`` are those deltas already with
    ``flags.given``)."""
    ds = []
    for i, x in enumerate(xs):
        d = x if flags.given else torch.sub(x.to(bc.dtype), bc)
        if flags.prune:
            a = torch.abs(d)
            keep = torch.logical_not(torch.le(a, scal[PER_INPUT * i]))
            if flags.ties:
                keep = torch.logical_or(keep, torch.eq(a, scal[PER_INPUT * i + 1]))
            if flags.high:
                drop = torch.gt(a, scal[PER_INPUT * i + 2])
                if flags.ties:
                    drop = torch.logical_or(drop, torch.eq(a, scal[PER_INPUT * i + 3]))
                keep = torch.logical_and(keep, torch.logical_not(drop))
            d = torch.where(keep, d, 0.0)
        if masks[i] is not None:
            d = torch.mul(d, masks[i])
        ds.append(d)
    return ds


def _prims_fma() -> Any:
    """Inductor's ``prims.fma`` (a single-rounding multiply-add, emitted as the CPU's FMA
    instruction), or None where this torch has none."""
    try:
        import torch._inductor.inductor_prims  # noqa: F401 - registers prims.fma

        return torch.ops.prims.fma
    except (ImportError, AttributeError, RuntimeError):
        return None


def fma(a: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``c + a * x`` rounded once, as the eager chunk loop always computed it.

    Eager: ATen's ``add(c, a, alpha=x)`` (a fused multiply-add on CPU; the same op as before
    this module existed). Compiled: inductor's ``prims.fma``, a true FMA as well (the same
    bits; measured 1.7x faster for the TIES kernel than the exact float64 emulation used
    before, which stays as the fallback where a torch lacks the prim: the product exact in
    float64, the sum rounded to float64 then to float32, i.e. the FMA result except in
    double-rounding ties). float64 inputs are never compiled.
    """
    if c.dtype == torch.float64 or not torch.compiler.is_compiling():
        return torch.add(c, a, alpha=x.item())
    prim = _prims_fma()
    if prim is not None:
        return prim(a, x, c)
    wide = torch.float64
    return torch.add(c.to(wide), torch.mul(a.to(wide), x.to(wide))).to(c.dtype)


def gta_combine(bc: torch.Tensor, ds: list[torch.Tensor], scal: torch.Tensor, consensus: bool,
                normalize: bool, negative: bool = True) -> torch.Tensor:
    """``base + lam * mix(weighted deltas)`` in the compute dtype.

    Without consensus the mix is the plain sum. With consensus (TIES) the elected sign is
    that of the weighted sum (``>= 0`` is +), a delta agrees when its weighted value has
    that sign and is nonzero, and the mix sums the agreeing weighted deltas, divided with
    ``normalize`` by the sum of their weights (a zero sum becomes 1, as in mergekit). The
    rounding is the eager chunk loop's: the weighted sum and the final step are multiply-adds
    (:func:`fma`), the agreeing deltas ``(w d) * agree`` summed from zero. ``negative``
    False: no weight is negative (the product with each weight's sign is skipped).
    """
    ps = [torch.mul(d, scal[PER_INPUT * i + 4]) for i, d in enumerate(ds)]
    S = ps[0]
    for i in range(1, len(ds)):
        S = fma(ds[i], scal[PER_INPUT * i + 4], S)
    lam = scal[-1]
    if not consensus:
        return fma(S, lam, bc)
    pos = torch.ge(S, 0)
    mixed = div = None
    for i, (d, p) in enumerate(zip(ds, ps)):
        # d times the elected sign and the weight's sign, exactly: > 0 where w d agrees
        sd = torch.where(pos, d, torch.neg(d))
        if negative:
            sd = torch.mul(sd, scal[PER_INPUT * i + 6])
        agree = torch.gt(sd, 0)
        m = torch.where(agree, p, 0.0)
        mixed = m if mixed is None else torch.add(mixed, m)
        if normalize:
            wv = torch.where(agree, scal[PER_INPUT * i + 5], 0.0)
            div = wv if div is None else torch.add(div, wv)
    assert mixed is not None
    if div is not None:
        mixed = torch.div(mixed, torch.where(torch.eq(div, 0), 1.0, div))
    return fma(mixed, lam, bc)


def gta_kernel(b: torch.Tensor, xs: list[torch.Tensor], masks: list[Any], scal: torch.Tensor,
               flags: KernelFlags, out_dtype: torch.dtype) -> torch.Tensor:
    """One chunk, end to end: the merged values in ``out_dtype`` (computed in ``scal``'s
    dtype, rounded once at the end). ``masks``: a 0/1 tensor per input or None (DARE);
    ``scal``: :func:`scalars`; ``flags``: :class:`KernelFlags`."""
    bc = b.to(scal.dtype)
    ds = gta_deltas(bc, xs, masks, scal, flags)
    return gta_combine(bc, ds, scal, flags.consensus, flags.normalize,
                       flags.negative).to(out_dtype)


def gta_kernel_into(o: torch.Tensor, b: torch.Tensor, xs: list[torch.Tensor], masks: list[Any],
                    scal: torch.Tensor, flags: KernelFlags) -> None:
    """:func:`gta_kernel` written into ``o`` (its dtype), with no result tensor in between."""
    o.copy_(gta_kernel(b, xs, masks, scal, flags, o.dtype))


def band_kernel(t: torch.Tensor, b: torch.Tensor,
                lohi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CPU pass of exact selection over a chunk (:func:`.sparsify.order_statistics`):
    ``a = |t - b|`` in ``lohi``'s dtype, how many ``a < lo`` and ``a == lo`` (float32 sums
    of 0/1: exact below 2**24 elements, so chunks must be smaller), and the uint8 0/1 mask
    of the band ``lo < a <= hi`` (``lohi = [lo, hi]``; infinities allowed). Float and uint8
    results because inductor's CPU code for bool results measured 5x slower here; ``a`` is
    written because gathering the band's values by position afterwards measured slower."""
    a = torch.abs(torch.sub(t.to(lohi.dtype), b.to(lohi.dtype)))
    lo, hi = lohi[0], lohi[1]
    below = torch.sum(torch.where(torch.lt(a, lo), 1.0, 0.0))
    at_lo = torch.sum(torch.where(torch.eq(a, lo), 1.0, 0.0))
    inside = torch.where(torch.logical_and(torch.gt(a, lo), torch.le(a, hi)), 1, 0)
    return a, below, at_lo, inside.to(torch.uint8)


def count_kernel(t: torch.Tensor, b: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many ``|t - b| < v`` and ``== v`` in the chunk (float32 sums of 0/1: exact below
    2**24 elements). It writes nothing per element: the pass of exact selection that checks
    the sample's estimate of a rank (:mod:`.order_stats`), and the per-chunk tie counts."""
    a = torch.abs(torch.sub(t.to(v.dtype), b.to(v.dtype)))
    return (torch.sum(torch.where(torch.lt(a, v), 1.0, 0.0)),
            torch.sum(torch.where(torch.eq(a, v), 1.0, 0.0)))


def tie_blocks_kernel(t: torch.Tensor, b: torch.Tensor,
                      v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many ``|t - b| == v`` in each block of :data:`~.order_stats.TIE_BLOCK` elements
    of the chunk, and in its shorter last block (float32 sums of 0/1): where a tie budget
    ends is then found by scanning one block."""
    eq = torch.where(torch.eq(torch.abs(torch.sub(t.to(v.dtype), b.to(v.dtype))), v), 1.0, 0.0)
    full = (eq.shape[0] // TIE_BLOCK) * TIE_BLOCK
    return torch.sum(eq[:full].view(-1, TIE_BLOCK), 1), torch.sum(eq[full:])


def count_many_kernel(b: torch.Tensor, xs: list[torch.Tensor], vs: torch.Tensor,
                      layout: tuple[int, ...]) -> torch.Tensor:
    """:func:`count_kernel` for several inputs of one base in one pass (the base is read
    once, not once per input): input ``i`` against the next ``layout[i]`` values of ``vs``;
    ``[less, equal]`` per (input, value), flat, in that order."""
    bc = b.to(vs.dtype)
    sums = []
    j = 0
    for x, k in zip(xs, layout):
        a = torch.abs(torch.sub(x.to(vs.dtype), bc))
        for _ in range(k):
            sums.append(torch.sum(torch.where(torch.lt(a, vs[j]), 1.0, 0.0)))
            sums.append(torch.sum(torch.where(torch.eq(a, vs[j]), 1.0, 0.0)))
            j += 1
    return torch.stack(sums)


def run_count_many(mode: str, b: torch.Tensor, xs: list[torch.Tensor], values: list[list[float]],
                   dtype: torch.dtype) -> list[list[tuple[int, int]]]:
    """:func:`count_many_kernel` (compiled in mode "compiled"): per input, per value of
    ``values[i]``, ``(less, equal)`` as ints.

    Every input is given as many values as the longest list (a shorter list repeats its last
    value; those counts are dropped): the graph then depends on the input count and that
    length only, not on which inputs need how many values. Breadcrumbs' two cuts per input
    otherwise met up to 3**n layouts, each a graph to compile (seconds each on a machine
    whose inductor cache does not hold it yet), mid-merge."""
    k = max(len(vals) for vals in values)
    vs = torch.tensor([v for vals in values for v in (*vals, *[vals[-1]] * (k - len(vals)))],
                      dtype=dtype, device=b.device)
    layout = (k,) * len(values)
    flat = [int(x) for x in _run(mode, "count_many", count_many_kernel, b, xs, vs, layout).tolist()]
    return [[(flat[2 * (i * k + q)], flat[2 * (i * k + q) + 1]) for q in range(len(vals))]
            for i, vals in enumerate(values)]


def run_count(mode: str, t: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    """:func:`count_kernel` (compiled in mode "compiled"), as ints."""
    less, equal = _run(mode, "count", count_kernel, t, b, v)
    return int(less), int(equal)


def run_tie_blocks(mode: str, t: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    """:func:`tie_blocks_kernel` (compiled in mode "compiled"): int64 counts per block, the
    shorter last block included."""
    blocks, tail = _run(mode, "tie_blocks", tie_blocks_kernel, t, b, v)
    per_block = blocks.to(torch.int64).numpy()
    if t.shape[0] % TIE_BLOCK:
        per_block = np.append(per_block, int(tail))
    return per_block


def run_band(mode: str, t: torch.Tensor, b: torch.Tensor, lohi: torch.Tensor):
    """:func:`band_kernel`, compiled in mode "compiled" (eager when compiling fails)."""
    return _run(mode, "band", band_kernel, t, b, lohi)


def run_kernel_into(mode: str, *args: Any) -> None:
    """:func:`gta_kernel_into` compiled (mode "compiled"; falls back to eager, for good on
    this device type, if compiling fails) or eager."""
    _run(mode, "gta_into", gta_kernel_into, *args)


def _shape_key(name: str, args: tuple) -> tuple:
    """What decides which compiled graph a call runs (besides values): a call with a key
    not seen yet may compile."""
    key: list[Any] = [name]
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.device.type, a.storage_offset() == 0, a.numel() <= 1))
        elif isinstance(a, list):
            key.append(tuple(None if x is None else (x.dtype, x.storage_offset() == 0)
                             for x in a))
        else:
            key.append(a)
    return tuple(key)


def _run(mode: str, name: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` under no_grad (grad mode is per thread: the same graph in every thread),
    compiled in mode "compiled". A call that may compile (a shape key not seen before)
    holds the compile lock, so graphs compile once and never in two threads at a time;
    the others run in parallel."""
    dev = args[0].device.type
    with torch.no_grad():
        if mode == "compiled" and not _FAILED.get(dev):
            try:
                key = _shape_key(name, args)
                if key in _WARM:
                    return _compiled_fn(name, fn)(*args)
                with _COMPILE_LOCK:
                    t0 = time.perf_counter()
                    try:
                        compiled = _compiled_fn(name, fn)
                        _configure_thread()  # this thread may compile (or recompile) now
                        out = compiled(*args)
                    finally:
                        _COMPILE_CLOCK[0] += time.perf_counter() - t0
                    _WARM.add(key)
                    if name.startswith("gta"):
                        _COMPILED_ON.add(dev)
                    return out
            except Exception:  # noqa: BLE001 - any compiler problem: eager gives the same numbers
                _FAILED[dev] = True
        return fn(*args)


def _configure_thread() -> None:
    """The compiler settings the kernels need, in the calling thread: torch keeps these
    settings per thread (one made in a thread is not seen in the others), and a graph
    compiles in whichever thread first runs it (a pool thread, the warm-up thread). Seen
    here: settings made only in the thread of the first compile left the others at dynamo's
    recompile limit of 8, a later variant failed to compile, and every merge of the process
    fell back to eager."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config

    # no FP contraction in the generated C++: the eager ops round every step
    inductor_config.cpp.enable_floating_point_contract_flag = "off"
    # one graph per input count and flags; never fall back to eager silently for running
    # out of cache entries (eager would be right, only slow)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4096)
    # chunks are views at different offsets: no guard tying an offset to a size
    fx_config.use_duck_shape = False


def _compiled_fn(name: str, fn: Any) -> Any:
    with _COMPILE_LOCK:
        if name not in _COMPILED:
            _configure_thread()
            # the C++ wrapper releases the GIL while the graph runs, so chunks run in parallel
            # in the Python threads of .parallel.run_chunks (the default Python wrapper
            # calls each kernel holding it)
            options = {"cpp_wrapper": True} if os.environ.get("EVOMERGE_CPP_WRAPPER", "1") != "0" else {}
            _COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True, options=options)
        return _COMPILED[name]


def compile_seconds() -> float:
    """Wall seconds this process spent in kernel calls that may have compiled a graph (the
    first call of each shape key: tracing, compiling or loading inductor's cached code, and
    that one chunk): one-time setup, not per-candidate merge work."""
    return _COMPILE_CLOCK[0]


def compile_failed(device_type: str) -> bool:
    """True when compiling failed on this device type in this process (eager runs instead)."""
    return bool(_FAILED.get(device_type))


__all__ = ["COMPILED_CPU_CHUNK", "FUSED_CPU_MIN", "ChunkCut", "KernelFlags", "PER_INPUT", "band_kernel",
           "compile_failed", "compile_seconds", "count_kernel", "count_many_kernel", "fma", "tie_blocks_kernel", "fused_mode", "gta_combine", "gta_deltas",
           "gta_kernel", "gta_kernel_into", "run_band", "run_count", "run_count_many", "run_tie_blocks",
           "run_kernel_into", "scalars", "split_ties"]
