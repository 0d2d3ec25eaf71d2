"""Per-worker state that makes writing one more candidate into a resident model cheap.

A search worker writes candidate after candidate into the same resident model, over the same
sources. :class:`ResidentWriter` (used by :meth:`Materializer.materialize_into
<evomerge.materialize.Materializer.materialize_into>` when the materializer is built with
``resident=True``) keeps what does not depend on the genome:

- **task vectors** ``x - base`` of task-arithmetic steps, resident in float32 within a memory
  budget (:class:`~evomerge.ops.resident.ResidentDeltas`); a task-arithmetic step on CPU
  is then one fused pass from the resident vectors straight into the model's parameter
  (:func:`~evomerge.ops.resident.run_task_arithmetic`): no re-reading of sources, no fresh
  output tensor, no extra copy;
- the **other task-vector merges** (TIES, DARE, breadcrumbs, DELLA, LiNeS: operators
  registered with ``task_vectors=True``) run from the same resident task vectors, their
  exact thresholds from the worker's precomputed statistics, written straight into the
  model's parameter, and the chunks of all of a candidate's tensors run in one parallel
  pass (:class:`~evomerge.ops.parallel.ChunkBatch`) instead of one per tensor;
- **what each target tensor holds**: after writing a tensor it records a tag of what was
  written (operator, source tensors, parameters, seed, output dtype) and the tensor's
  version counter. A later step with the same tag whose tensor was not modified since
  (same version: torch bumps it on every in-place write) is not computed or written at
  all. A task-arithmetic step whose every task vector is zero (LoRA experts leave the
  embeddings and norms at the base) gets the tag "the base", whatever its weights, so it
  is written once per worker.

Results are bit-for-bit those of the plain path (tests compare them over sequences of
candidates). Assumption: target tensors are written only through torch ops (which bump the
version counter) or by this writer; call :meth:`ResidentWriter.forget` after writing them
behind torch's back (raw pointers).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .errors import PlanError
from .ops import OpContext, get_op
from .ops.fused import FUSED_CPU_MIN, FUSED_WARM_MIN, compile_seconds, fused_mode
from .ops.parallel import ChunkBatch, run_inline, run_items, threads_for_load
from .ops.resident import (
    ZERO,
    ResidentDeltas,
    TAJob,
    output_is_base,
    run_task_arithmetic,
    task_arithmetic_alpha,
)

if TYPE_CHECKING:
    from .materialize import Materializer
    from .plan import MergePlan, TensorStep

# operators with a resident fast path
FAST_OPS = ("task_arithmetic",)
# target dtypes written from resident task vectors (computed in float32, rounded once)
RESIDENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except (RuntimeError, AttributeError):  # inference tensors have no version counter
        return None


class ResidentWriter:
    """Task vectors and written-tensor tags of one worker (see the module docstring).

    Args:
        budget_bytes: most bytes of resident task vectors (None: ``$EVOMERGE_RESIDENT_BUDGET_MB``,
            default 4096 MiB).
    """

    def __init__(self, budget_bytes: int | None = None):
        self.deltas = ResidentDeltas(budget_bytes)
        self.setup_seconds = 0.0
        self._prepared: set[tuple] = set()  # plan shapes prepare() has walked
        self._written: dict[tuple, tuple[Any, int, tuple]] = {}
        self.skipped = 0
        self.fused = 0

    def clear(self) -> None:
        """Forget the task vectors and what was written (the sources changed)."""
        self.deltas.clear()
        self._written.clear()
        self._prepared.clear()

    # -- what a target tensor holds ----------------------------------------------------------
    def forget(self, dst: torch.Tensor | None = None) -> None:
        """Forget what ``dst`` (None: every tensor) holds: its next step is written."""
        if dst is None:
            self._written.clear()
        else:
            self._written.pop(_key(dst), None)

    def holds(self, dst: torch.Tensor, tag: tuple) -> bool:
        """True when ``dst`` still holds what was written with ``tag``."""
        got = self._written.get(_key(dst))
        if got is None:
            return False
        ref, version, old = got
        return ref() is dst and old == tag and _version(dst) == version

    def mark(self, dst: torch.Tensor, tag: tuple) -> None:
        """Record that ``dst`` now holds the result of ``tag`` (call right after writing)."""
        version = _version(dst)
        if version is None:
            return
        try:
            ref = weakref.ref(dst)
        except TypeError:
            return
        self._written[_key(dst)] = (ref, version, tag)

    @staticmethod
    def step_tag(plan: MergePlan, step: TensorStep, params: Mapping[str, Any],
                 out_dtype: torch.dtype, ids: Mapping[str, int]) -> tuple:
        """Everything that determines a step's output; ``ids`` maps source keys to the
        identity of their current reader (a changed source gets a new one)."""
        def ref(r):
            return (ids[r.model], r.tensor)

        return ("step", step.op, step.output, tuple(ref(r) for r in step.inputs),
                ref(step.base) if step.base is not None else None,
                repr(sorted(params.items())), int(plan.seed), str(out_dtype))

    # -- task arithmetic from resident task vectors --------------------------------------------
    @staticmethod
    def _base_of(mat: Materializer, step: TensorStep, readers: Mapping[str, Any],
                 dst: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, str] | None:
        """``(base as float32, its key)`` when the step can run from resident task vectors
        (CPU, a contiguous float32, bf16 or fp16 target written in its own dtype, sources
        computed in float32 as the plain path computes them, a non-empty base), else None.

        A narrow target gets the float32 result rounded once on the write, as the plain
        path rounds it (a bf16 evaluation model keeps its resident speed-up)."""
        if (step.base is None or mat.device.type != "cpu" or dst.device.type != "cpu"
                or dst.dtype not in RESIDENT_DTYPES or out_dtype != dst.dtype
                or not dst.is_contiguous()):
            return None
        # every source float64: the plain path computes in float64 (task vectors: float32)
        if all(readers[r.model].dtype(r.tensor) == torch.float64
               for r in (step.base, *step.inputs)):
            return None
        base_reader = readers[step.base.model]
        b = mat._load(base_reader, step.base)
        if b.numel() == 0:
            return None
        return b, tensor_key(base_reader, step.base)

    def _delta_of(self, mat: Materializer, readers: Mapping[str, Any], ref: Any, b: torch.Tensor,
                  base_key: str) -> tuple[Any, bool]:
        """``(task vector or ZERO, kept)`` of input ``ref``; ``(None, False)`` when its task
        vector was refused by the budget before (the caller reads the source instead)."""
        reader = readers[ref.model]
        key = tensor_key(reader, ref)
        if self.deltas.refused(key, base_key):
            return None, False
        return self.deltas.delta(key, base_key,
                                 lambda: mat._load(reader, ref, cache=False), b)

    def task_arithmetic_job(self, mat: Materializer, step: TensorStep, params: Mapping[str, Any],
                            readers: Mapping[str, Any], dst: torch.Tensor,
                            out_dtype: torch.dtype) -> tuple[TAJob, bool] | None:
        """``(job, output is the base bit for bit)`` for a task-arithmetic step, or None
        when the step takes the plain path (not CPU, fused path on, a target dtype other
        than float32 / bf16 / fp16 or other than the output's, a non-contiguous target)."""
        if step.op not in FAST_OPS:
            return None
        got = self._base_of(mat, step, readers, dst, out_dtype)
        if got is None:
            return None
        b, base_key = got
        flat_b = b.reshape(-1)
        weights = [float(w) for w in params["weight"]]
        inputs = []
        transient = False
        for ref, w in zip(step.inputs, weights):
            if w == 0.0:
                continue  # a dead input, as in the direct path
            d, kept = self._delta_of(mat, readers, ref, b, base_key)
            if d is None:
                inputs.append(("source", mat._load(readers[ref.model], ref).reshape(-1), w))
                transient = True
                continue
            inputs.append(("zero", None, w) if d is ZERO else ("delta", d, w))
            transient = transient or not kept
        alpha = task_arithmetic_alpha(weights, float(params.get("lambda", 1.0)),
                                      bool(params.get("normalize", False)))
        job = TAJob(dst.view(-1), flat_b, inputs, alpha, transient)
        return job, output_is_base(job, self.deltas.base_is_plain(base_key, flat_b))

    # -- the other task-vector merges (TIES, DARE, breadcrumbs, ...) from resident vectors -------
    def task_vector_inputs(self, mat: Materializer, step: TensorStep, readers: Mapping[str, Any],
                           dst: torch.Tensor, out_dtype: torch.dtype
                           ) -> tuple[list[torch.Tensor] | None, torch.Tensor] | None:
        """``(task vectors, base)`` of a step of an operator registered with
        ``task_vectors=True``: every input's resident ``x - base`` (float32, the base's
        shape), or ``(None, base)`` when all of them are zero and the result is the base bit
        for bit (every GTA merge of zero task vectors is, for finite parameters and a base
        without NaN or negative zero). None: the step takes the plain path (not CPU, a target
        dtype other than float32 / bf16 / fp16 or other than the output's, a non-contiguous
        target, a task vector over the budget, or some but not all of them zero)."""
        got = self._base_of(mat, step, readers, dst, out_dtype)
        if got is None:
            return None
        b, base_key = got
        deltas = []
        for ref in step.inputs:
            d, kept = self._delta_of(mat, readers, ref, b, base_key)
            if not kept:
                return None
            deltas.append(d)
        if all(d is ZERO for d in deltas):
            return (None, b) if self.deltas.base_is_plain(base_key, b.reshape(-1)) else None
        if any(d is ZERO for d in deltas):
            return None
        return [d.view(b.shape) for d in deltas], b

    def _task_vector_step(self, mat: Materializer, plan: MergePlan, step: TensorStep,
                          params: Mapping[str, Any], readers: Mapping[str, Any],
                          tv: tuple[list[torch.Tensor], torch.Tensor], dst: torch.Tensor,
                          batch: ChunkBatch) -> None:
        """Run the operator on the resident task vectors, writing into ``dst``; its chunks
        go to ``batch`` (run by :meth:`write` once every step is queued)."""
        spec = get_op(step.op)
        ctx = mat.op_context(plan, step, readers)
        ctx.task_vectors, ctx.out, ctx.batch = True, dst.view(-1), batch
        out = spec.fn(tv[0], tv[1], params, ctx)
        if tuple(out.shape) != tuple(dst.shape):
            raise PlanError(f"operator {step.op!r} produced shape {list(out.shape)} for tensor "
                            f"{step.output!r}, expected {list(dst.shape)}")
        if out.data_ptr() != dst.data_ptr():  # it did not write into dst: copy its result
            batch.run("cpu")
            dst.copy_(out)

    # -- genome-independent work, before the first candidate ---------------------------------
    def prepare(self, mat: Materializer, plan: MergePlan, readers: Mapping[str, Any],
                target: Mapping[str, torch.Tensor], ids: Mapping[str, int] | None = None) -> float:
        """Compute what no candidate changes for every step a candidate would compute from
        task vectors: the resident ``x - base`` and, for operators that prune by magnitude
        ranks (with statistics on), each input's sorted ``|x - base|``, all tensors' sorts in
        one parallel pass (numpy releases the GIL; per tensor, 3 inputs on 2 threads left
        one idle a third of the time). Returns the seconds spent when it computed anything,
        else 0 (the lookups of a later candidate are part of its merge). With ``ids`` (the
        sources' reader numbers), a plan whose steps and sources were prepared before is
        not walked again: a search's later candidates skip this pass."""
        shape = None
        if ids is not None:
            shape = (tuple(sorted(ids.items())), tuple((s.output, s.op) for s in plan.steps))
            if shape in self._prepared:
                return 0.0
        t0 = time.perf_counter()
        misses0 = self.deltas.misses
        sorts: dict[tuple[str, str], torch.Tensor] = {}
        with threads_for_load(mat.device):
            for step in plan.steps:
                spec = get_op(step.op)
                if not spec.task_vectors:
                    continue
                tv = self.task_vector_inputs(mat, step, readers, target[step.output],
                                             mat.output_dtype(plan, step, readers))
                if tv is None or tv[0] is None or not spec.magnitude_ranks or mat.stats is None:
                    continue
                base_key = tensor_key(readers[step.base.model], step.base)
                for ref, d in zip(step.inputs, tv[0]):
                    key = tensor_key(readers[ref.model], ref)
                    if not mat.stats.cached(key, base_key):
                        sorts[(key, base_key)] = d
        # compile meanwhile: the sorts run in numpy, mostly without the GIL (started
        # during the task-vector loop above, its many short ops each waited for the GIL)
        warm = warm_kernels(mat, plan, target) if sorts else None
        if sorts:
            run_items(lambda job: mat.stats.sorted_magnitudes(job[0][0], job[0][1], job[1], None),
                      list(sorts.items()), "cpu")
        if warm is not None:
            warm.join()  # its compile time is part of this setup's wall time
        if shape is not None:
            self._prepared.add(shape)
        if not sorts and self.deltas.misses == misses0:
            return 0.0
        return time.perf_counter() - t0

    # -- the write loop -----------------------------------------------------------------------
    def write(self, mat: Materializer, plan: MergePlan, readers: Mapping[str, Any],
              target: Mapping[str, torch.Tensor]) -> tuple[list[TensorStep], int, dict[str, int]]:
        """Write every step of ``plan`` whose target tensor no other step writes (checked
        plan and target). Returns the steps left to the plain loop (tied tensors), bytes
        written and counts ``skipped`` / ``fused``."""
        ids = mat._sync_sources(readers)
        count: dict[tuple, int] = {}
        for step in plan.steps:
            k = _key(target[step.output])
            count[k] = count.get(k, 0) + 1
        setup = self.prepare(mat, plan, readers, target, ids)  # its compiles included
        compiled0 = compile_seconds()
        rest, jobs = [], []
        # this call's task-vector merges: queued, then run in one pass (never kept past the
        # call: after an error nothing stale runs into a later candidate's tensors)
        batch = ChunkBatch()
        pending: list[tuple[torch.Tensor, tuple]] = []  # written by the batch's chunks
        n_bytes = skipped = fused = 0
        # loads and first-time task vectors run whole-tensor torch ops: fewer intra-op
        # threads on cores others hold (their barriers stall there), as the plain path does
        with torch.no_grad(), threads_for_load(mat.device):
            for step in plan.steps:
                dst = target[step.output]
                if count[_key(dst)] > 1:
                    rest.append(step)
                    continue
                spec = get_op(step.op)
                params = spec.resolve_params(step)
                out_dtype = mat.output_dtype(plan, step, readers)
                fast = self.task_arithmetic_job(mat, step, params, readers, dst, out_dtype)
                tv = None
                if fast is None and spec.task_vectors:
                    tv = self.task_vector_inputs(mat, step, readers, dst, out_dtype)
                is_base = (fast is not None and fast[1]) or (tv is not None and tv[0] is None)
                if is_base:
                    tag = ("base", ids[step.base.model], step.base.tensor, str(out_dtype))
                else:
                    tag = self.step_tag(plan, step, params, out_dtype, ids)
                if self.holds(dst, tag):
                    skipped += 1
                    continue
                self.forget(dst)
                n_bytes += dst.numel() * dst.element_size()
                if is_base:
                    base_output(fast[0].base if fast is not None else tv[1], dst, out_dtype)
                    self.mark(dst, tag)
                elif tv is not None:
                    self._task_vector_step(mat, plan, step, params, readers, tv, dst, batch)
                    pending.append((dst, tag))
                    fused += 1
                elif fast is None:
                    out = mat._compute_step(plan, step, readers, params)
                    if out_dtype != dst.dtype:  # as the plain loop: round, then cast
                        out = out.to(out_dtype)
                    dst.copy_(out)
                    self.mark(dst, tag)
                else:
                    jobs.append((fast[0], dst, tag))
                    fused += 1
                    if fast[0].transient:  # do not hold non-resident tensors
                        self._run(jobs)
            self._run(jobs)
            batch.run("cpu")  # every queued task-vector merge, one parallel pass
            for dst, tag in pending:
                self.mark(dst, tag)
        self.skipped += skipped
        self.fused += fused
        setup += compile_seconds() - compiled0
        self.setup_seconds += setup
        return rest, n_bytes, {"skipped": skipped, "fused": fused, "setup_seconds": setup}

    def _run(self, jobs: list[tuple[TAJob, torch.Tensor, tuple]]) -> None:
        """Compute queued task-arithmetic jobs into their destinations (one parallel pass)."""
        if not jobs:
            return
        run_task_arithmetic([j for j, _, _ in jobs], "cpu")
        for _, dst, tag in jobs:
            self.mark(dst, tag)
        jobs.clear()

    def summary(self) -> dict[str, Any]:
        """The task vectors' summary plus tensors skipped and fused over this worker's life."""
        return {**self.deltas.summary(), "skipped": self.skipped, "fused": self.fused,
                "setup_seconds": self.setup_seconds}


class SourceIds:
    """An identity number per source path's current reader: a rebuilt source opens as a new
    reader (:func:`~evomerge.checkpoint.opener.open_checkpoint` checks file stamps) and
    gets a new number, so nothing cached from the old files is taken for the new ones."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Any, int]] = {}
        self._next = 0

    def sync(self, readers: Mapping[str, Any]) -> tuple[dict[str, int], bool]:
        """``(number per source key, whether a known path's reader changed)``."""
        ids, changed = {}, False
        for key, reader in readers.items():
            path = str(reader.path)
            seen = self._seen.get(path)
            if seen is None or seen[0] is not reader:
                changed = changed or seen is not None
                seen = self._seen[path] = (reader, self._next)
                self._next += 1
            ids[key] = seen[1]
        return ids, changed


def tensor_key(reader: Any, ref: Any) -> str:
    """Identity of one source tensor (``model path::tensor name``) for per-worker caches."""
    return f"{reader.path}::{ref.tensor}"


def base_output(base: torch.Tensor, dst: torch.Tensor, out_dtype: torch.dtype) -> None:
    """Write ``base`` into ``dst`` as the plain path writes a result equal to it."""
    out = base.view(dst.shape)
    if out_dtype != dst.dtype:
        out = out.to(out_dtype)
    dst.copy_(out)


class _Warm(threading.Thread):
    """Runs :func:`warm_kernels`' tiny merges."""

    def __init__(self, jobs: list) -> None:
        super().__init__(name="evomerge-warm-kernels", daemon=True)
        self.jobs = jobs

    def run(self) -> None:
        for spec, params, n_inputs, dtype in self.jobs:
            g = torch.Generator().manual_seed(0)
            n = FUSED_CPU_MIN
            base = torch.randn(n, generator=g)
            tvs = [torch.randn(n, generator=g) * 0.01 for _ in range(n_inputs)]
            ctx = OpContext("warm-up", g, torch.device("cpu"), out_dtype=dtype)
            ctx.task_vectors = True
            try:
                with torch.no_grad(), run_inline():
                    spec.fn(tvs, base, params, ctx)
            except Exception:  # noqa: BLE001 - only a warm-up: the real merge reports errors
                pass


def warm_kernels(mat: Materializer, plan: MergePlan, target: Mapping[str, torch.Tensor]
                 ) -> _Warm | None:
    """Start compiling the fused kernels a plan's task-vector steps will run, in a thread,
    or None (nothing to compile: not CPU, compiling off, no tensor of
    :data:`~.ops.fused.FUSED_CPU_MIN` elements or more).

    A worker's first candidate otherwise waits for them after its one-time sorts. On the
    SmolLM2 TIES search (~2 s of sorts, ~2-3 s of tracing and loading inductor's cached
    code) the overlap now saves little: the warm-up's Python holds the GIL between the
    sorts' numpy calls, and overlapped they take about as long as one after the other
    (~4.8 s); it paid when the sorts were longer and mostly in one numpy call. Each
    distinct (operator, input count, weight signs, densities below 1, other parameters,
    target dtype) merges random task vectors of one compiled chunk's size, which compiles
    exactly the graphs its real steps run (results never depend on it: eager and compiled
    give the same bits)."""
    if mat.device.type != "cpu" or fused_mode(torch.device("cpu"), FUSED_CPU_MIN) != "compiled":
        return None
    jobs, seen, big = [], set(), False
    for step in plan.steps:
        spec = get_op(step.op)
        dst = target.get(step.output)
        if not spec.task_vectors or dst is None or dst.numel() < FUSED_WARM_MIN:
            continue
        big = big or dst.numel() >= FUSED_CPU_MIN
        params = spec.resolve_params(step)
        key = (step.op, len(step.inputs), dst.dtype,
               tuple((k, _graph_shape(k, v)) for k, v in sorted(params.items())))
        if key not in seen:
            seen.add(key)
            jobs.append((spec, params, len(step.inputs), dst.dtype))
    if not jobs or not big:  # only small tensors: the merge runs eagerly, nothing compiles
        return None
    warm = _Warm(jobs)
    warm.start()
    return warm


def _graph_shape(name: str, value: Any) -> Any:
    """What of a parameter can change which kernel graph runs: booleans, weight signs,
    densities below 1, and whether other numbers are 0 (not their values: one job, not
    one per layer)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_graph_shape(name, x) for x in value)
    if isinstance(value, (int, float)):
        if name == "weight":
            return value > 0
        return value < 1 if name == "density" else value != 0
    return repr(value)


def _key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.data_ptr(), tuple(t.shape), tuple(t.stride()))


__all__ = ["ResidentWriter", "SourceIds", "base_output", "tensor_key"]
