"""Run a MergePlan: turn plain data into weights, in place in a resident model or on disk.

One candidate of a search is one plan; evaluating it means writing its weights somewhere.
The :class:`Materializer` streams the plan step by step: for each output tensor it reads
the step's source tensors lazily (memory-mapped, see :mod:`evomerge.checkpoint.reader`),
moves them to the compute device as float32, runs the operator from :mod:`evomerge.ops`
with a generator seeded per (plan seed, tensor name), casts to the output dtype and hands
the result on. Only one step's inputs and output are alive at a time (plus the optional
source cache), so peak memory does not grow with model size.

Two sinks:

- :meth:`Materializer.materialize_into` copies each result into an existing tensor of a
  resident model (``copy_``: no reallocation between candidates, CUDA graphs and vLLM
  buffers stay valid). This is what evaluation uses.
- :meth:`Materializer.materialize_to_disk` streams into
  :func:`~evomerge.checkpoint.writer.write_checkpoint` (sharded safetensors, config,
  tokenizer, recipe, model card).

Every referenced source tensor is checked (exists, shapes agree) from metadata before any
math, so a bad plan fails in milliseconds with a message naming the tensor and model.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint.opener import open_checkpoint
from .checkpoint.resolve import portable_recipe
from .checkpoint.writer import parse_dtype, write_checkpoint
from .errors import CheckpointError, PlanError
from .ops import OpContext, get_op
from .ops.parallel import threads_for_load
from .output_config import config_source_key, merged_config
from .plan import MergePlan, TensorRef, TensorStep, step_seed
from .resident import ResidentWriter, SourceIds, tensor_key

GENERATION_CONFIG = "generation_config.json"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Source bytes read through the file mappings before they are dropped (see
# Materializer._release_mappings): bounds the source pages a merge keeps resident.
RELEASE_MAPPED_BYTES = 256 << 20


def open_sources(plan: MergePlan) -> dict[str, Any]:
    """A reader per source key (memoized across plans by :func:`open_checkpoint`)."""
    readers = {}
    for key, path in plan.sources.items():
        try:
            readers[key] = open_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"source model {key!r}: {e}") from None
    return readers


class Materializer:
    """Runs MergePlans on one device.

    ``device``: where the operators compute (None: CUDA when available, else CPU).
    ``cache_sources``: keep every source tensor read on the device (float32) for the life
    of this object, so repeated candidates over the same small sources skip the reads;
    the default streams from the memory-mapped files each time. ``precompute``: reuse
    magnitude statistics (:mod:`evomerge.ops.precompute`). ``resident``: a search worker's
    :meth:`materialize_into` keeps task vectors and skips unchanged tensors
    (:mod:`evomerge.resident`). A rebuilt source drops everything cached from it.

    Operators must not modify their input tensors: on CPU a float32 input may be a view of
    the memory-mapped file (or of the cache) shared by every later read.
    """

    def __init__(self, device: str | torch.device | None = None, cache_sources: bool = False,
                 precompute: bool = False, stats_budget_bytes: int | None = None,
                 resident: bool = False, resident_budget_bytes: int | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.cache_sources = cache_sources
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self.bytes_read = 0
        self._mapped = 0  # source bytes read through the file mappings since they were dropped
        # genome-independent statistics (top-k thresholds at any density, SLERP norms)
        # reused across candidates over the same sources; see evomerge.ops.precompute
        self.stats = None
        if precompute:
            from .ops.precompute import SourceStats

            self.stats = SourceStats(stats_budget_bytes)
        # resident task vectors and what each target tensor holds (see evomerge.resident)
        self.resident = ResidentWriter(resident_budget_bytes) if resident else None
        self._sources = SourceIds()  # a rebuilt source drops everything cached from it

    def clear_cache(self) -> None:
        self._cache.clear()
        for cache in (self.stats, self.resident):
            if cache is not None:
                cache.clear()

    def _sync_sources(self, readers: Mapping[str, Any]) -> dict[str, int]:
        """Identity number per source key; drops every cache when a source's reader changed."""
        ids, changed = self._sources.sync(readers)
        if changed:
            self.clear_cache()
        return ids

    # -- checks -------------------------------------------------------------------------
    def check(self, plan: MergePlan, readers: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Validate ``plan`` and every source tensor it reads (metadata only); returns readers."""
        plan.validate()
        readers = dict(readers) if readers is not None else open_sources(plan)
        self._sync_sources(readers)
        for step in plan.steps:
            refs = list(step.inputs) + ([step.base] if step.base is not None else [])
            shapes = []
            for ref in refs:
                reader = readers[ref.model]
                if not reader.has(ref.tensor):
                    raise PlanError(_missing_message(step, ref, reader))
                shapes.append((ref, tuple(reader.shape(ref.tensor))))
            first_ref, first = shapes[0]
            for ref, shape in shapes[1:]:
                if shape != first:
                    raise PlanError(
                        f"output tensor {step.output!r}: input {ref.tensor!r} of model {ref.model!r} "
                        f"has shape {list(shape)} but {first_ref.tensor!r} of model "
                        f"{first_ref.model!r} has {list(first)}"
                    )
        return readers

    def output_shape(self, plan: MergePlan, step: TensorStep, readers: Mapping[str, Any]) -> tuple[int, ...]:
        ref = step.inputs[0]
        return tuple(readers[ref.model].shape(ref.tensor))

    def output_dtype(self, plan: MergePlan, step: TensorStep, readers: Mapping[str, Any]) -> torch.dtype:
        """``plan.dtype``; else the config source's dtype for this tensor; else the first input's."""
        if plan.dtype:
            return parse_dtype(plan.dtype)
        cs = readers[config_source_key(plan)]
        if cs.has(step.output):
            return cs.dtype(step.output)
        ref = step.inputs[0]
        return readers[ref.model].dtype(ref.tensor)

    # -- the stream ---------------------------------------------------------------------
    def _load(self, reader: Any, ref: TensorRef, cache: bool = True,
              widen: bool = True) -> torch.Tensor:
        """``ref`` on the compute device, widened to float32 unless ``widen`` is False
        (operators with ``narrow_inputs`` take bf16 / fp16 as stored); from the source cache
        when on, kept there unless ``cache`` is False."""
        key = (str(reader.path), ref.tensor, widen)
        if self.cache_sources:
            t = self._cache.get(key)
            if t is not None:
                return t
        # Move in the stored dtype (half the bytes for bf16 on the way to a GPU), then widen.
        stored = reader.get(ref.tensor, device=self.device)
        self.bytes_read += stored.numel() * stored.element_size()
        t = stored.to(torch.float32) if widen else stored
        if self.cache_sources and cache:
            if t is stored and t.device.type == "cpu":
                t = t.clone()  # own the memory: do not keep a mapping of a file that may change
            self._cache[key] = t
        return t

    def _run(self, plan: MergePlan, readers: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields ``(name, tensor)`` cast to the output dtype."""
        for step, out in self._compute(plan, readers):
            yield step.output, out.to(self.output_dtype(plan, step, readers))

    def _compute(self, plan: MergePlan, readers: Mapping[str, Any]) -> Iterator[tuple[TensorStep, torch.Tensor]]:
        """Yields ``(step, result)`` on the compute device, one step at a time: float32, or
        already the output dtype from operators with ``narrow_inputs``."""
        for step in plan.steps:
            out = self._compute_step(plan, step, readers)
            self._release_mappings(readers)
            yield step, out

    def op_context(self, plan: MergePlan, step: TensorStep,
                   readers: Mapping[str, Any]) -> OpContext:
        """The operator's context for ``step``: its generator seeded per (plan seed, tensor),
        the output dtype for operators with ``narrow_inputs``, the statistics cache and the
        keys of the step's tensors when statistics are on."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(step_seed(plan.seed, step.output))
        ctx = OpContext(step.output, gen, self.device)
        if get_op(step.op).narrow_inputs:
            ctx.out_dtype = self.output_dtype(plan, step, readers)
        if self.stats is not None:
            ctx.stats = self.stats
            ctx.input_keys = [tensor_key(readers[r.model], r) for r in step.inputs]
            ctx.base_key = (tensor_key(readers[step.base.model], step.base)
                            if step.base is not None else None)
        return ctx

    def _compute_step(self, plan: MergePlan, step: TensorStep, readers: Mapping[str, Any],
                      params: dict[str, Any] | None = None) -> torch.Tensor:
        """One step's result on the compute device (float32, or the output dtype from
        operators with ``narrow_inputs``)."""
        spec = get_op(step.op)
        if params is None:
            params = spec.resolve_params(step)
        widen = not spec.narrow_inputs
        with threads_for_load(self.device):  # fewer threads on cores others hold
            tensors = [self._load(readers[r.model], r, widen=widen) for r in step.inputs]
            base = (self._load(readers[step.base.model], step.base, widen=widen)
                    if step.base is not None else None)
            ctx = self.op_context(plan, step, readers)
            with torch.no_grad():
                out = spec.fn(tensors, base, params, ctx)
        if not isinstance(out, torch.Tensor):
            raise PlanError(
                f"operator {step.op!r} returned {type(out).__name__} for tensor {step.output!r}"
            )
        want = tuple(tensors[0].shape)
        if tuple(out.shape) != want:
            raise PlanError(
                f"operator {step.op!r} produced shape {list(out.shape)} for tensor "
                f"{step.output!r}, expected {list(want)}"
            )
        return out

    def _release_mappings(self, readers: Mapping[str, Any]) -> None:
        """Unmap the source files every :data:`RELEASE_MAPPED_BYTES` read (CPU, no source
        cache): pages read through a mapping stay in the process's resident set until it is
        unmapped, so without this a merge's RSS grows by every source byte it touched
        (measured: a streamed export of 0.98 GB from four 0.98 GB models peaked at 5.47 GB
        RSS). Tensors still in use keep their own mapping alive; the files reopen lazily."""
        if self.cache_sources or self.device.type != "cpu":
            return
        if self.bytes_read - self._mapped < RELEASE_MAPPED_BYTES:
            return
        self._mapped = self.bytes_read
        for reader in readers.values():
            close = getattr(reader, "close", None)
            if close is not None:
                close()

    def iter_tensors(self, plan: MergePlan) -> Iterator[tuple[str, torch.Tensor]]:
        """``(output_name, tensor)`` for every step, in plan order, on the compute device.

        Checks the whole plan first. A yielded tensor may share memory with a source (e.g.
        passthrough of a float32 tensor on CPU): copy it before writing into it.
        """
        readers = self.check(plan)
        yield from self._run(plan, readers)

    # -- sinks --------------------------------------------------------------------------
    def materialize_into(
        self,
        plan: MergePlan,
        target: Mapping[str, torch.Tensor],
        keep: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Write the plan's tensors into ``target``'s existing tensors in place.

        ``target`` maps names to tensors (e.g. ``model.state_dict()``, whose tensors share
        storage with the parameters). Rules, all checked before any tensor is written:

        - every name the plan produces must exist in ``target`` with the same shape;
        - every ``target`` tensor must be produced by the plan, be tied to (share storage
          with) one that is, or be listed in ``keep`` — otherwise it would silently keep the
          previous candidate's values, so it is a PlanError;
        - tied tensors are written once; if the plan produces both names of a tied pair,
          their values must agree (PlanError otherwise).

        With ``resident=True`` (see :mod:`evomerge.resident`) a tensor that already holds
        this step's result is not written again and task arithmetic runs from resident task
        vectors; the weights are the same bits either way.

        Returns stats: ``seconds``, ``bytes`` (written), ``bytes_read``, ``tensors``, and
        with ``resident`` ``skipped`` (tensors left as they were) and ``fused`` (tensors
        computed from resident task vectors).
        """
        t0 = time.perf_counter()
        readers = self.check(plan)
        produced = plan.output_names
        produced_set = set(produced)
        for step in plan.steps:
            if step.output not in target:
                raise PlanError(f"plan produces tensor {step.output!r} which the target model lacks")
            want = self.output_shape(plan, step, readers)
            have = tuple(target[step.output].shape)
            if have != want:
                raise PlanError(
                    f"tensor {step.output!r}: the plan produces shape {list(want)} but the target "
                    f"model's tensor has {list(have)}"
                )
        produced_ptrs = {_storage_key(target[n]) for n in produced}
        keep = set(keep)
        for name, t in target.items():
            if name in produced_set or name in keep or _storage_key(t) in produced_ptrs:
                continue
            raise PlanError(
                f"target tensor {name!r} is not produced by the plan (it would keep stale "
                f"values); produce it or pass it in keep="
            )
        written: set[tuple] = set()
        n_bytes = 0
        read0 = self.bytes_read
        steps, extra = plan.steps, {}
        if self.resident is not None:  # every step but those of tied tensors
            steps, n_bytes, extra = self.resident.write(self, plan, readers, target)
        with torch.no_grad():
            for step in steps:
                out = self._compute_step(plan, step, readers)
                self._release_mappings(readers)
                name = step.output
                dst = target[name]
                out_dtype = self.output_dtype(plan, step, readers)
                if out_dtype != dst.dtype:  # round as the on-disk model would, then cast
                    out = out.to(out_dtype)
                key = _storage_key(dst)
                if key in written:
                    if not torch.equal(dst, out.to(device=dst.device, dtype=dst.dtype)):
                        raise PlanError(
                            f"target tensor {name!r} is tied to another tensor the plan already "
                            f"wrote, but the plan gives it different values"
                        )
                    continue
                dst.copy_(out)  # converts float32 -> the target dtype in the same pass
                written.add(key)
                n_bytes += dst.numel() * dst.element_size()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {
            "seconds": time.perf_counter() - t0,
            "bytes": n_bytes,
            "bytes_read": self.bytes_read - read0,
            "tensors": len(produced),
            **extra,
        }

    def output_config(self, plan: MergePlan, readers: Mapping[str, Any]) -> dict[str, Any]:
        """Config of the merged model (:func:`.output_config.merged_config`)."""
        return merged_config(plan, readers)

    def materialize_to_disk(
        self,
        plan: MergePlan,
        out_dir: str | os.PathLike,
        shard_size: int | str = "2GB",
        recipe: Mapping[str, Any] | None = None,
        card: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        mergekit: bool = True,
    ) -> Path:
        """Write the merged model as an HF directory (atomic; see ``write_checkpoint``).

        Config from ``plan.config_source`` (else the base, else the first source) with
        ``plan.config_overrides`` applied; tokenizer (and ``generation_config.json``) from
        ``plan.tokenizer_source`` (else the config source). ``recipe`` defaults to
        ``plan.meta['recipe']``, else the plan itself; the model card lists sources,
        method, recipe and ``plan.meta['scores']`` when present. With ``mergekit`` and a
        recipe mergekit can express, ``mergekit_config.yml`` is written too. Sources from
        the Hub are written as ``org/name@commit`` in both recipe files.
        """
        _refuse_output_over_source(plan, out_dir)
        readers = self.check(plan)
        cs_key = config_source_key(plan)
        config = self.output_config(plan, readers)
        tok_key = plan.tokenizer_source or cs_key
        tok_dir = readers[tok_key].tokenizer_dir
        if tok_dir is None and plan.tokenizer_source is not None:
            raise CheckpointError(
                f"tokenizer_source {tok_key!r} ({plan.sources[tok_key]}) has no tokenizer files"
            )
        if tok_dir is None:  # the config source has none: take the first source that has one
            tok_key = next((k for k in plan.sources if readers[k].tokenizer_dir is not None), None)
            tok_dir = readers[tok_key].tokenizer_dir if tok_key is not None else None
            if tok_key is not None:
                warnings.warn(f"model {cs_key!r} has no tokenizer files: the merged model takes "
                              f"the tokenizer of {tok_key!r}", stacklevel=2)
        cs_reader = readers[cs_key]
        cs_dir = getattr(cs_reader, "base", cs_reader).path
        extra = [cs_dir / GENERATION_CONFIG] if (cs_dir / GENERATION_CONFIG).is_file() else []
        if recipe is None:
            recipe = plan.meta.get("recipe") or {"merge_plan": plan.to_dict()}
        mk_text = None
        if mergekit and "merge_plan" not in recipe:
            from .recipe.mergekit import portable_mergekit_yaml

            mk_text = portable_mergekit_yaml(dict(recipe))
        template = None
        if recipe.get("chat_template") is not None:
            from .checkpoint.chat_template import resolve_chat_template

            srcs = recipe.get("sources") or plan.sources
            template = resolve_chat_template(recipe["chat_template"], srcs,
                                             [k for k in plan.sources if k in srcs])
        recipe = portable_recipe(recipe)
        full_card: dict[str, Any] = {
            "name": Path(out_dir).name,
            "method": plan.meta.get("method"),
            "base_model": plan.sources.get(plan.base) if plan.base else None,
            "sources": dict(plan.sources),
            "scores": plan.meta.get("scores"),
            "plan_hash": plan.hash(),
        }
        full_card.update(card or {})
        return write_checkpoint(
            out_dir,
            self._run(plan, readers),
            config,
            tokenizer_dir=tok_dir,
            shard_size=shard_size,
            recipe=recipe,
            card=full_card,
            dtype=plan.dtype,
            overwrite=overwrite,
            extra_files=extra,
            mergekit_config=mk_text,
            chat_template=template,
        )


def _refuse_output_over_source(plan: MergePlan, out_dir: str | os.PathLike) -> None:
    """The output folder must not be (or hold) a source: replacing it would destroy the
    weights being read, even with ``overwrite``."""
    out = Path(out_dir).expanduser().resolve()
    for key, src in plan.sources.items():
        if src.startswith(("zoo:", "pool:", "api:")):
            continue
        path = Path(src).expanduser().resolve()
        if path == out or out in path.parents:
            raise CheckpointError(f"output {out} would replace source {key!r} ({src}) of this merge; "
                                  "write the merge to another folder")


def _storage_key(t: torch.Tensor) -> tuple:
    """Identity of the memory a tensor covers (tied weights share it)."""
    return (t.device.type, t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def _missing_message(step: TensorStep, ref: TensorRef, reader: Any) -> str:
    where = f"model {ref.model!r} ({reader.path})"
    layout = reader.layout
    idx = layout.layer_of(ref.tensor)
    if idx is not None and idx >= layout.num_layers:
        return (
            f"output tensor {step.output!r} reads {ref.tensor!r}: layer index {idx} is out of "
            f"range for {where}, which has {layout.num_layers} layers (0..{layout.num_layers - 1})"
        )
    return f"output tensor {step.output!r} reads {ref.tensor!r}, which {where} does not have"
