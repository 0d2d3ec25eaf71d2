"""Operator parameters in recipes: where each may be set, and their value per tensor.

:class:`OpParams` parses a ``parameters:`` mapping for one operator (aliases, ignored and
compiler-filled names, per-model vs global) and resolves every parameter for one tensor
(model > slice > global precedence, defaults, types, ranges); :class:`SourceGroup` is the
set of sources a run of tensors combines; :func:`validate_step` runs the operator's own
checks on a compiled step. Used by :mod:`.compile`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, PlanError
from ..ops import OpSpec
from ..plan import TensorStep
from .params import (
    Setting,
    TensorCtx,
    known_param_names,
    lookup,
    parse_parameters,
    warn_unused_param,
)

# mergekit parameters that do not change the result (memory tricks): accepted, unused.
IGNORED_PARAMS = frozenset({"int8_mask"})
# evomerge's LiNeS knobs on task_arithmetic, and the lines operator's names for them.
LINES_ALIASES = {"lines_alpha": "alpha", "lines_beta": "beta"}
# parameters the compiler fills in per tensor; users cannot set them.
COMPILER_PARAMS = {"lines": ("layer", "num_layers")}


class OpParams:
    """One operator's parameters: where each may be set, and resolution per tensor."""

    def __init__(self, spec: OpSpec, label: str, aliases: dict[str, str] | None = None):
        self.spec = spec
        self.label = label  # the method name users wrote
        self.aliases = dict(aliases or {})
        fixed = COMPILER_PARAMS.get(spec.name, ())
        self.fixed = set(fixed)
        self.per_input = tuple(spec.per_input)
        self.scalars = tuple(k for k in spec.defaults if k not in spec.per_input and k not in fixed)
        # a single-input operator (passthrough) may take its scalars per model too
        self.scalars_per_model = spec.max_inputs == 1

    def names(self) -> set[str]:
        user = {k for k in self.per_input + self.scalars}
        rev = {v: k for k, v in self.aliases.items()}
        return {rev.get(k, k) for k in user}

    def settings(self, raw: Any, path: str, per_model: bool) -> dict[str, Setting]:
        """Parse and check one ``parameters:`` mapping; keys renamed to the operator's names."""
        parsed = parse_parameters(raw, path)
        out: dict[str, Setting] = {}
        for name, setting in parsed.items():
            if name in IGNORED_PARAMS:
                continue
            op_name = self.aliases.get(name, name)
            if op_name in self.fixed:
                raise ConfigError(f"{path}.{name}: set by the compiler for each tensor, not in recipes")
            if op_name not in self.per_input and op_name not in self.scalars:
                if self.spec.name == "lines" and name == "lambda":
                    raise ConfigError(
                        f"{path}.lambda: cannot be combined with lines_alpha/lines_beta: LiNeS "
                        f"sets the task-vector scale per layer (scale those instead)"
                    )
                if name in known_param_names(IGNORED_PARAMS | set(LINES_ALIASES)):
                    # another method's knob (density on task_arithmetic...): mergekit
                    # ignores it, so do we, saying so once
                    warn_unused_param(self.label, name, f"{path}.{name}")
                    continue
                takes = ", ".join(sorted(self.names())) or "no parameters"
                raise ConfigError(
                    f"{path}.{name}: operator {self.label!r} has no parameter {name!r} (it takes {takes})"
                )
            if per_model and op_name not in self.per_input and not self.scalars_per_model:
                raise ConfigError(
                    f"{path}.{name}: {name!r} is one value for the whole merge in "
                    f"{self.label!r}, not per model; set it under 'parameters'"
                )
            out[op_name] = setting
        return out

    def _range(self, name: str, value: Any, path: str | None, tensor: str) -> None:
        rng = self.spec.ranges.get(name)
        if rng is None or isinstance(value, (str, bool)) or value is None:
            return
        lo, hi = rng
        v = float(value)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            where = path or f"{self.label} default {name}"
            raise ConfigError(
                f"{where}: {name}={v:g} is out of range "
                f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}] "
                f"for operator {self.label!r} (tensor {tensor!r})"
            )

    def resolve(self, ctx: TensorCtx, g: SourceGroup) -> dict[str, Any]:
        """Parameters of one step of group ``g`` (defaults filled, types and ranges checked)."""
        out: dict[str, Any] = {}
        defaults = self.spec.defaults
        for name in self.per_input:
            vals = []
            for chain, ipath in zip(g.chains, g.paths):
                v, path = lookup(chain, name, ctx)
                if v is None:
                    v = defaults.get(name)
                    if v is None:
                        raise ConfigError(
                            f"{ipath}.parameters.{name}: missing; operator {self.label!r} needs "
                            f"{name!r} for every model (tensor {ctx.name!r})"
                        )
                    v = float(v)
                else:
                    v = _number(v, path, name)
                if name in self.spec.ranges:
                    self._range(name, v, path, ctx.name)
                vals.append(v)
            out[name] = vals
        for name in self.scalars:
            v, path = lookup(g.scalar_chain, name, ctx)
            default = defaults.get(name)
            if v is None:
                if default is None:
                    continue
                v = default
            elif isinstance(default, bool):
                if not isinstance(v, bool):
                    if v in (0, 1) and not isinstance(v, str):
                        v = bool(v)
                    else:
                        raise ConfigError(f"{path}: {name} must be true or false, got {v!r}")
            else:
                v = _number(v, path, name)
            if name in self.spec.ranges:
                self._range(name, v, path, ctx.name)
            out[name] = v
        return out


def check_layer_lists(levels: list[dict[str, Setting]], n: int, where: str) -> None:
    """Refuse any per-layer ``layers`` list whose length is not ``n``.

    Raises:
        ConfigError: naming the list, its length and the layer count.
    """
    for level in levels:
        for setting in level.values():
            for lpath, length in setting.layer_lists():
                if length != n:
                    raise ConfigError(
                        f"{lpath}: {length} values for {n} layers{where} "
                        f"(a 'layers' list needs one value per layer)"
                    )


def _number(v: Any, path: str | None, name: str) -> float:
    if not isinstance(v, bool):
        try:
            return float(v)
        except (TypeError, ValueError):
            pass
    raise ConfigError(f"{path}: {name} must be a number, got {v!r}")


@dataclass
class SourceGroup:
    """How a set of sources combines for a run of tensors (one slice, or whole models)."""

    params: OpParams
    inputs: list[str]
    base: str | None
    starts: dict[str, int]  # first source layer of each key (0 for whole models)
    chains: list[list[dict[str, Setting]]]  # per input: model > slice > global settings
    scalar_chain: list[dict[str, Setting]]
    paths: list[str]  # recipe field of each input, for error messages
    where: str
    validated: bool = False

    @property
    def op(self) -> str:
        return self.params.spec.name


def validate_step(g: SourceGroup, step: TensorStep) -> None:
    """The operator's own checks: all of them on a group's first step (input count, base,
    parameter names), then only its cross-parameter rule, since :meth:`OpParams.resolve`
    already checked types and ranges and the rest is the same for every step of a group."""
    spec = g.params.spec
    try:
        if not g.validated:
            spec.validate(step)
            g.validated = True
        elif spec.check is not None:
            problem = spec.check(step.params, len(step.inputs))
            if problem:
                raise PlanError(f"operator {spec.name!r} for tensor {step.output!r}: {problem}")
    except PlanError as e:
        raise ConfigError(f"{g.where}: {e}") from None
