"""Parameter settings of a recipe, as mergekit writes them, plus evomerge's two additions.

A setting is what stands to the right of a parameter name (``weight: ...``). Forms:

- a scalar (number, bool or string): the same value for every tensor;
- a list of numbers: a *gradient*, interpolated linearly across the layers of a slice
  (mergekit's rule, copied exactly: ``t = i / (n - 1)`` for layer ``i`` of ``n`` (``t = 1``
  when ``n == 1``), ``scaled = t * (len - 1)``, ``i0 = int(scaled)``,
  ``i1 = min(len - 1, i0 + 1)``, value ``(1 - f) * v[i0] + f * v[i1]`` with
  ``f = scaled - i0``); a list of strings/bools picks ``v[int(t * (len - 1))]``;
- ``{layers: [...]}`` (evomerge): exactly one value per layer of the slice, no
  interpolation. It is the same as a gradient list of length ``num_layers`` (up to float
  rounding), and is exported to mergekit as one;
- a list of ``{filter: SUBSTRING, value: ...}`` entries: the first entry whose filter is a
  substring of the tensor name wins; an entry without a filter (or ``filter: "*"``) matches
  everything. When nothing matches, the lookup falls through to the next level (slice, then
  global parameters), as in mergekit. evomerge adds the filter aliases ``attn`` and ``mlp``:
  they also match tensors that :meth:`ModelLayout.kind_of` classifies as attention / MLP,
  whatever the architecture calls them (``attention``, ``feed_forward``...).

Non-layer tensors (embeddings, final norm, head) use ``t = 0``, as mergekit 0.1 does for
both its pre- and post-layer weights (older mergekit used ``t = 1`` after the stack), and a
``layers:`` list gives them its first value. Settings are parsed once into small objects so
that evaluating them per tensor (hundreds of tensors per candidate) is cheap.
"""

from __future__ import annotations

import logging
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..checkpoint.layout import ModelLayout
from ..errors import ConfigError

# Filter values that also match a tensor kind (ModelLayout.kind_of), not just a substring.
KIND_ALIASES = ("attn", "mlp")


@dataclass(frozen=True)
class TensorCtx:
    """Where a tensor sits: name, kind, position in its slice (``layer`` None off-stack)."""

    name: str
    kind: str
    t: float
    layer: int | None = None

    @classmethod
    def make(cls, name: str, t: float, layer: int | None = None) -> TensorCtx:
        kind = _KINDS.get(name)
        if kind is None:
            if len(_KINDS) > _CACHE_LIMIT:
                _KINDS.clear()
            kind = _KINDS[name] = ModelLayout.kind_of(name)
        return cls(name=name, kind=kind, t=t, layer=layer)


# Compiling runs once per candidate of a search over the same tensor names: the kind of a
# name and which filter entry a name matches are memoized (bounded).
_CACHE_LIMIT = 1 << 20
_KINDS: dict[str, str] = {}
_MATCH: dict[tuple[tuple[str | None, ...], str], int] = {}


def gradient_t(index: int, num_layers: int) -> float:
    """mergekit's position of layer ``index`` in a slice of ``num_layers`` layers."""
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def interpolate(values: list[Any], t: float) -> Any:
    """mergekit's ``evaluate_setting`` for a list, bit for bit (bools and strings step)."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    return values[int(t * (len(values) - 1))]


class Setting(ABC):
    """A parsed parameter setting. ``value(ctx)`` is None when no filter matched."""

    path: str

    @abstractmethod
    def value(self, ctx: TensorCtx) -> Any:
        """The setting's value for one tensor."""

    def layer_lists(self) -> Iterator[tuple[str, int]]:
        """``(field path, length)`` of every ``layers:`` list, checked against slice sizes."""
        return iter(())


@dataclass
class Scalar(Setting):
    v: Any
    path: str = ""

    def value(self, ctx: TensorCtx) -> Any:
        return self.v


@dataclass
class Gradient(Setting):
    values: list[Any]
    path: str = ""

    def __post_init__(self) -> None:
        self._at: dict[float, Any] = {}  # one entry per layer position of the slice

    def value(self, ctx: TensorCtx) -> Any:
        v = self._at.get(ctx.t)
        if v is None:
            v = self._at[ctx.t] = interpolate(self.values, ctx.t)
        return v


@dataclass
class PerLayer(Setting):
    values: list[Any]
    path: str = ""

    def value(self, ctx: TensorCtx) -> Any:
        if ctx.layer is not None:
            return self.values[ctx.layer]
        return interpolate(self.values, ctx.t)

    def layer_lists(self) -> Iterator[tuple[str, int]]:
        yield self.path, len(self.values)


@dataclass
class Conditional(Setting):
    entries: list[tuple[str | None, Setting]]
    path: str = ""

    def __post_init__(self) -> None:
        self._filters = tuple(f for f, _ in self.entries)

    def match(self, ctx: TensorCtx) -> int:
        """Index of the first entry matching the tensor, -1 for none (memoized)."""
        key = (self._filters, ctx.name)
        i = _MATCH.get(key)
        if i is None:
            i = -1
            for j, flt in enumerate(self._filters):
                if flt is None or flt == "*" or flt in ctx.name or (
                    flt in KIND_ALIASES and ctx.kind == flt
                ):
                    i = j
                    break
            if len(_MATCH) > _CACHE_LIMIT:
                _MATCH.clear()
            _MATCH[key] = i
        return i

    def value(self, ctx: TensorCtx) -> Any:
        i = self.match(ctx)
        return None if i < 0 else self.entries[i][1].value(ctx)

    def layer_lists(self) -> Iterator[tuple[str, int]]:
        for _, inner in self.entries:
            yield from inner.layer_lists()


def _check_scalar(v: Any, path: str) -> Any:
    if isinstance(v, bool) or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        if not math.isfinite(float(v)):
            raise ConfigError(f"{path}: value {v!r} is not a finite number")
        return v
    raise ConfigError(f"{path}: expected a number, bool or string, got {type(v).__name__} {v!r}")


def _parse_list(values: list[Any], path: str) -> list[Any]:
    if not values:
        raise ConfigError(f"{path}: empty list")
    return [_check_scalar(v, f"{path}[{i}]") for i, v in enumerate(values)]


def _parse_value(raw: Any, path: str) -> Setting:
    """A filter entry's value: scalar, gradient or ``{layers: [...]}`` (no nested filters)."""
    if isinstance(raw, dict):
        if set(raw) == {"layers"}:
            if not isinstance(raw["layers"], list):
                raise ConfigError(f"{path}.layers: expected a list with one value per layer")
            return PerLayer(_parse_list(raw["layers"], f"{path}.layers"), path=f"{path}.layers")
        raise ConfigError(
            f"{path}: expected a scalar, a list (gradient) or {{layers: [...]}}, "
            f"got a mapping with keys {sorted(map(str, raw))}"
        )
    if isinstance(raw, list):
        if any(isinstance(v, dict) for v in raw):
            raise ConfigError(f"{path}: filter entries cannot be nested inside a value")
        return Gradient(_parse_list(raw, path), path=path)
    return Scalar(_check_scalar(raw, path), path=path)


def _parse_entry(raw: Any, path: str) -> tuple[str | None, Setting]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected {{filter: ..., value: ...}}, got {raw!r}")
    unknown = set(raw) - {"filter", "value"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(map(str, unknown))}; expected filter, value")
    if "value" not in raw:
        raise ConfigError(f"{path}: filter entry has no 'value'")
    flt = raw.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise ConfigError(f"{path}.filter: expected a string, got {flt!r}")
    if flt == "":
        raise ConfigError(f"{path}.filter: empty filter string (omit it for a default entry)")
    return flt, _parse_value(raw["value"], f"{path}.value")


def parse_setting(raw: Any, path: str) -> Setting:
    """Parse one parameter setting; ConfigError names ``path`` (e.g. ``models[1].parameters.weight``)."""
    if isinstance(raw, list) and raw and all(isinstance(v, dict) for v in raw):
        return Conditional([_parse_entry(e, f"{path}[{i}]") for i, e in enumerate(raw)], path=path)
    if isinstance(raw, dict) and "value" in raw:  # a single {filter, value}
        return Conditional([_parse_entry(raw, path)], path=path)
    if raw is None:
        raise ConfigError(f"{path}: missing value")
    return _parse_value(raw, path)


def parse_parameters(raw: Any, path: str) -> dict[str, Setting]:
    """Parse a ``parameters:`` mapping (None -> empty)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of parameter names to values, got {raw!r}")
    return {str(k): parse_setting(v, f"{path}.{k}") for k, v in raw.items()}


def lookup(chain: list[dict[str, Setting]], name: str, ctx: TensorCtx) -> tuple[Any, str | None]:
    """First non-None value of ``name`` along ``chain`` (model, slice, global), and its path."""
    for level in chain:
        s = level.get(name)
        if s is not None:
            v = s.value(ctx)
            if v is not None:
                return v, s.path
    return None, None


def to_gradient(raw: Any) -> Any:
    """The mergekit spelling of a setting: ``{layers: [...]}`` becomes a plain gradient list."""
    if isinstance(raw, dict) and set(raw) == {"layers"}:
        return list(raw["layers"])
    if isinstance(raw, dict) and "value" in raw:
        return {**raw, "value": to_gradient(raw["value"])}
    if isinstance(raw, list) and raw and all(isinstance(v, dict) for v in raw):
        return [to_gradient(e) for e in raw]
    return raw


def filters_of(raw: Any) -> list[str]:
    """Every filter string used in a raw setting."""
    if isinstance(raw, dict) and "value" in raw:
        raw = [raw]
    if isinstance(raw, list) and raw and all(isinstance(v, dict) for v in raw):
        return [e["filter"] for e in raw if isinstance(e, dict) and e.get("filter") is not None]
    return []


log = logging.getLogger("evomerge.recipe")
_WARNED: set[tuple[str, str]] = set()
_WARN_LOCK = threading.Lock()


def known_param_names(extra: Any = ()) -> frozenset[str]:
    """Every parameter name some registered operator takes, plus ``extra``."""
    from ..ops import get_op, list_ops

    names = set(extra)
    for op in list_ops():
        spec = get_op(op)
        names |= set(spec.defaults) | set(spec.per_input)
    return frozenset(names)


def warn_unused_param(method: str, name: str, path: str) -> None:
    """One warning line per (method, parameter) and process: the parameter is ignored."""
    with _WARN_LOCK:
        if (method, name) in _WARNED:
            return
        _WARNED.add((method, name))
    log.warning(
        "warning: %s: merge method %r does not use %r; ignored (as mergekit does)",
        path, method, name,
    )
