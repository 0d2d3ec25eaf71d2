"""MergePlan: the one intermediate form every merge compiles to.

Plain data, no torch math. For each output tensor a :class:`TensorStep` says which source
tensors it reads (model key + tensor name, so layer swaps and frankenmerges are just data),
which operator (a name in :mod:`evomerge.ops`) and the operator's parameters. The plan also
names its sources (key -> checkpoint directory), the base model, the output config changes
(e.g. ``num_hidden_layers``), where config and tokenizer come from, the output dtype and the
seed that makes random operators (DARE, DELLA) reproducible.

A plan is serializable (dict / JSON / YAML) and hashable: :meth:`MergePlan.hash` keys the
fitness cache, so two plans that would produce the same weights hash the same.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import PlanError
from .ops.registry import get_op, step_seed  # torch-free; the one plan -> ops arrow

__all__ = ["MergePlan", "TensorRef", "TensorStep", "step_seed"]

PLAN_FORMAT = 1


@dataclass(frozen=True)
class TensorRef:
    """One source tensor: ``model`` is a key of :attr:`MergePlan.sources`."""

    model: str
    tensor: str

    def to_list(self) -> list[str]:
        return [self.model, self.tensor]

    @classmethod
    def parse(cls, value: Any) -> TensorRef:
        if isinstance(value, TensorRef):
            return value
        if isinstance(value, dict):
            return cls(str(value["model"]), str(value["tensor"]))
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return cls(str(value[0]), str(value[1]))
        raise PlanError(f"bad tensor reference {value!r}: expected [model, tensor]")


@dataclass
class TensorStep:
    """How one output tensor is made.

    ``params`` holds scalars (``lambda``, ``normalize``, ``t`` ...) and per-input lists
    (``weight``, ``density`` ...), one value per entry of ``inputs`` in the same order.
    ``base`` is the reference tensor for task-vector operators (None for the others).
    """

    output: str
    op: str
    inputs: list[TensorRef]
    base: TensorRef | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "output": self.output,
            "op": self.op,
            "inputs": [r.to_list() for r in self.inputs],
        }
        if self.base is not None:
            d["base"] = self.base.to_list()
        if self.params:
            d["params"] = _plain(self.params)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorStep:
        try:
            return cls(
                output=str(d["output"]),
                op=str(d["op"]),
                inputs=[TensorRef.parse(r) for r in d["inputs"]],
                base=TensorRef.parse(d["base"]) if d.get("base") is not None else None,
                params=dict(d.get("params") or {}),
            )
        except KeyError as e:
            raise PlanError(f"plan step is missing field {e.args[0]!r}: {d!r}") from None


@dataclass
class MergePlan:
    sources: dict[str, str]
    steps: list[TensorStep]
    base: str | None = None
    config_source: str | None = None
    tokenizer_source: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    seed: int = 0
    # Free-form description (method, recipe); not part of the hash.
    meta: dict[str, Any] = field(default_factory=dict)

    # -- checks -------------------------------------------------------------------------
    def validate(self) -> None:
        """Structural checks plus each operator's parameter checks (PlanError on failure)."""
        if not self.sources:
            raise PlanError("plan has no sources")
        for key in (self.base, self.config_source, self.tokenizer_source):
            if key is not None and key not in self.sources:
                raise PlanError(f"plan refers to unknown source model {key!r}")
        seen: set[str] = set()
        for step in self.steps:
            if step.output in seen:
                raise PlanError(f"output tensor {step.output!r} is produced twice")
            seen.add(step.output)
            refs = list(step.inputs) + ([step.base] if step.base is not None else [])
            for ref in refs:
                if ref.model not in self.sources:
                    raise PlanError(
                        f"tensor {step.output!r} reads unknown source model {ref.model!r}"
                    )
            get_op(step.op).validate(step)

    # -- identity -----------------------------------------------------------------------
    def canonical(self) -> dict[str, Any]:
        """Everything that determines the output weights, in a stable form."""
        d = self.to_dict()
        d.pop("meta", None)
        return d

    def hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # -- (de)serialization --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "sources": dict(self.sources),
            "base": self.base,
            "config_source": self.config_source,
            "tokenizer_source": self.tokenizer_source,
            "config_overrides": _plain(self.config_overrides),
            "dtype": self.dtype,
            "seed": int(self.seed),
            "steps": [s.to_dict() for s in self.steps],
            "meta": _plain(self.meta),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MergePlan:
        if not isinstance(d, dict) or "sources" not in d or "steps" not in d:
            raise PlanError("not a MergePlan: expected a mapping with 'sources' and 'steps'")
        if d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise PlanError(f"unsupported plan format {d.get('format')!r}")
        return cls(
            sources={str(k): str(v) for k, v in d["sources"].items()},
            steps=[TensorStep.from_dict(s) for s in d["steps"]],
            base=d.get("base"),
            config_source=d.get("config_source"),
            tokenizer_source=d.get("tokenizer_source"),
            config_overrides=dict(d.get("config_overrides") or {}),
            dtype=d.get("dtype"),
            seed=int(d.get("seed", 0)),
            meta=dict(d.get("meta") or {}),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MergePlan:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # -- helpers ------------------------------------------------------------------------
    def step_for(self, output: str) -> TensorStep:
        for s in self.steps:
            if s.output == output:
                return s
        raise KeyError(output)

    @property
    def output_names(self) -> list[str]:
        return [s.output for s in self.steps]


def _plain(value: Any) -> Any:
    """Convert numpy scalars/arrays and tuples into plain JSON/YAML types, floats canonical."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PlanError(f"non-finite parameter value {value!r} in plan")
        # 12 significant digits: genomes decoded on different machines hash the same.
        return float(f"{value:.12g}")
    return value
