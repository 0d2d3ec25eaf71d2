"""One registry of merge operators.

An operator is a small pure function on torch tensors::

    fn(tensors: list[Tensor], base: Tensor | None, params: dict, ctx: OpContext) -> Tensor

``tensors`` are the step's inputs (float32, on the compute device, same shape), ``base`` the
reference tensor for task-vector methods, ``params`` the step's parameters with defaults
filled in and per-input values as lists aligned with ``tensors``. ``ctx`` gives the output
tensor name and a seeded ``torch.Generator`` for random operators.

Register with :func:`register_op`, which also declares the parameters so a plan can be
checked before any tensor is touched (unknown operator, wrong number of per-model values,
densities out of range...).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import PlanError
from ..registry import Registry

if TYPE_CHECKING:  # torch is imported by the operator modules, not by the registry
    import torch

    from ..plan import TensorStep


def step_seed(plan_seed: int, tensor_name: str) -> int:
    """Seed of the random stream for one output tensor (DARE masks etc.).

    Depends only on the plan seed and the tensor name, so a plan materializes identically
    every time, in any order, on any device.
    """
    h = hashlib.sha256(f"{int(plan_seed)}:{tensor_name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class OpContext:
    name: str
    generator: torch.Generator | None = None
    device: Any = None
    # genome-independent statistics reused across candidates (a
    # :class:`~evomerge.ops.precompute.SourceStats`), with the identity of each input and
    # of the base ("model path::tensor name"); None: operators compute everything directly
    stats: Any = None
    input_keys: list[str] | None = None
    base_key: str | None = None
    # the dtype the result will be stored in; an operator may return it directly (rounded
    # once from its float32 result, as the caller's cast would); None: return float32
    out_dtype: Any = None
    # for operators registered with ``task_vectors=True`` (the GTA family), set by a search
    # worker's resident writer (evomerge/resident.py): the input tensors are the task vectors
    # ``x - base`` already (float32, kept per worker); ``out``: a flat contiguous tensor of
    # the output dtype the result may be written into (and returned as its view); ``batch``:
    # a :class:`~evomerge.ops.parallel.ChunkBatch` the operator may add its chunk work to
    # instead of running it (the caller runs the batch before reading the result)
    task_vectors: bool = False
    out: Any = None
    batch: Any = None


@dataclass
class OpSpec:
    name: str
    fn: Callable[..., Any]
    needs_base: bool = False
    # the base, when a recipe names one, is the step's reference (nuslerp, multislerp: merge
    # the task vectors) but the operator also works without one
    optional_base: bool = False
    # mergekit adds an unlisted base model as one more input (karcher; ``models:`` recipes)
    base_is_input: bool = False
    # names of parameters given once per input (lists aligned with inputs)
    per_input: tuple[str, ...] = ()
    # defaults for every parameter (per-input defaults are scalars broadcast to all inputs)
    defaults: dict[str, Any] = field(default_factory=dict)
    # closed ranges checked at validation time: name -> (lo, hi), None for open ends
    ranges: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    min_inputs: int = 1
    max_inputs: int | None = None
    random: bool = False
    # takes bf16 / fp16 inputs as stored (widening them chunk by chunk) and returns
    # ``ctx.out_dtype`` when set: no full-size float32 copy of any input or of the result
    narrow_inputs: bool = False
    doc: str = ""
    # cross-parameter check on the resolved params: check(params, n_inputs) -> problem or None
    check: Callable[[dict[str, Any], int], str | None] | None = None
    # computed by :func:`~.task_vector_merge.generalized_task_arithmetic`: honours the
    # context's ``task_vectors``, ``out`` and ``batch`` (a search worker's resident path)
    task_vectors: bool = False
    # prunes by exact magnitude ranks (TIES, breadcrumbs): a search worker sorts each input's
    # |x - base| once (evomerge/ops/precompute.py) before its first candidate
    magnitude_ranks: bool = False

    def resolve_params(self, step: TensorStep) -> dict[str, Any]:
        """Defaults filled, per-input scalars broadcast to lists. Raises PlanError."""
        n = len(step.inputs)
        unknown = set(step.params) - set(self.defaults) - set(self.per_input)
        if unknown:
            raise PlanError(
                f"operator {self.name!r} for tensor {step.output!r} got unknown "
                f"parameter(s) {sorted(unknown)}; it takes {sorted(set(self.defaults) | set(self.per_input))}"
            )
        out: dict[str, Any] = {}
        for key in set(self.defaults) | set(self.per_input):
            value = step.params.get(key, self.defaults.get(key))
            if key in self.per_input:
                if value is None:
                    raise PlanError(
                        f"operator {self.name!r} for tensor {step.output!r} needs {key!r}"
                    )
                if isinstance(value, (list, tuple)):
                    if len(value) != n:
                        raise PlanError(
                            f"operator {self.name!r} for tensor {step.output!r}: {key!r} has "
                            f"{len(value)} values for {n} input models"
                        )
                    value = [self._number(step, key, v) for v in value]
                else:
                    value = [self._number(step, key, value)] * n
            elif value is not None and key in self.defaults and self.defaults[key] is not None:
                value = self._like_default(step, key, value, self.defaults[key])
            out[key] = value
        for key, (lo, hi) in self.ranges.items():
            vals = out.get(key)
            if vals is None:
                continue
            for v in vals if isinstance(vals, list) else [vals]:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise PlanError(
                        f"operator {self.name!r} for tensor {step.output!r}: {key!r} must be "
                        f"a number, got {v!r}"
                    )
                if (lo is not None and v < lo) or (hi is not None and v > hi):
                    raise PlanError(
                        f"operator {self.name!r} for tensor {step.output!r}: {key}={v} is out "
                        f"of range [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                    )
        if self.check is not None:
            problem = self.check(out, n)
            if problem:
                raise PlanError(f"operator {self.name!r} for tensor {step.output!r}: {problem}")
        return out

    def _number(self, step: TensorStep, key: str, value: Any) -> float:
        number = None
        if not isinstance(value, (bool, str)):
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = None
        if number is None or not math.isfinite(number):
            raise PlanError(
                f"operator {self.name!r} for tensor {step.output!r}: {key!r} must be a finite "
                f"number, got {value!r}"
            )
        return number

    def _like_default(self, step: TensorStep, key: str, value: Any, default: Any) -> Any:
        """Scalar params take the type of their default (bool stays bool, numbers float)."""
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise PlanError(
                    f"operator {self.name!r} for tensor {step.output!r}: {key!r} must be "
                    f"true or false, got {value!r}"
                )
            return value
        if isinstance(default, (int, float)):
            return self._number(step, key, value)
        return value

    def validate(self, step: TensorStep) -> None:
        n = len(step.inputs)
        if n < self.min_inputs or (self.max_inputs is not None and n > self.max_inputs):
            want = (
                f"{self.min_inputs}" if self.max_inputs == self.min_inputs
                else f"{self.min_inputs}..{self.max_inputs if self.max_inputs else 'n'}"
            )
            raise PlanError(
                f"operator {self.name!r} for tensor {step.output!r} takes {want} inputs, got {n}"
            )
        if self.needs_base and step.base is None:
            raise PlanError(
                f"operator {self.name!r} for tensor {step.output!r} needs a base model"
            )
        self.resolve_params(step)


def check_shapes(tensors: list[Any], base: Any, ctx: OpContext, need_base: bool = False) -> None:
    """PlanError (one line) unless the inputs and the base (if any) share one shape;
    with ``need_base``, also when there is no base."""
    if need_base and base is None:
        raise PlanError(f"tensor {ctx.name!r}: this operator needs a base model")
    ref = base if base is not None else tensors[0]
    for t in tensors:
        if t.shape != ref.shape:
            raise PlanError(
                f"tensor {ctx.name!r}: input shapes differ ({tuple(t.shape)} vs "
                f"{tuple(ref.shape)}); merge operators need equal shapes"
            )


_OPS: Registry[OpSpec] = Registry("merge operator", "", PlanError, "evomerge.ops.builtin")


def register_op(name: str, **spec: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering an operator function under ``name`` with its :class:`OpSpec`
    fields (``spec``)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _OPS.add(name, OpSpec(name=name, fn=fn, doc=(fn.__doc__ or "").strip(), **spec))
        return fn

    return deco


def get_op(name: str) -> OpSpec:
    """The operator registered as ``name`` (PlanError naming the known ones otherwise)."""
    return _OPS.get(name)


def list_ops() -> list[str]:
    """Every registered operator name, sorted."""
    return _OPS.names()
