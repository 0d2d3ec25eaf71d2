"""Parameter-space search: per-layer-group coefficients per source model.

Genome layout (all in [0, 1], mapped linearly onto each parameter's declared range)::

    for group in layer groups (+ one "non-layer" group for embeddings/final norm/head):
        for kind in ("all",) or ("attn", "mlp"):
            for param in space.params:          # e.g. weight, density
                one value per expert if the operator takes the parameter per model,
                else one value (e.g. slerp's t)

Decoding expands groups to one value per layer (optionally smoothed across neighbouring
layers) and writes a mergekit-style recipe where each parameter is a list of filters:
non-layer tensors by exact name, then ``attn`` (attention tensors) when attention and MLP are
split, then a default holding the per-layer list (a list of length num_layers is exact, one
value per layer).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..checkpoint import open_checkpoint
from ..errors import ConfigError
from ..ops import get_op
from .base import SearchSpace, layer_groups, register_space

DECIMALS = 4  # recipe precision: readable, and near-identical genomes share a cached plan


@register_space("parameter")
class ParameterSpace(SearchSpace):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        spec = get_op(cfg.method)  # unknown method -> PlanError naming the operator
        if spec.needs_base and self.base is None:
            raise ConfigError(f"space.method: {cfg.method!r} needs base_model in the config")
        known = set(spec.per_input) | set(spec.defaults)
        for p in cfg.params:
            if p not in known:
                raise ConfigError(
                    f"space.params.{p}: operator {cfg.method!r} has no parameter {p!r} "
                    f"(it takes {', '.join(sorted(known))})"
                )
        bad = set(cfg.fixed) & set(cfg.params)
        if bad:
            raise ConfigError(f"space.fixed: {sorted(bad)} are also searched in space.params")
        self.per_input = {p: p in spec.per_input for p in cfg.params}
        ref = open_checkpoint(self.models[self.base or self.experts[0]])
        self.num_layers = ref.layout.num_layers
        self.non_layer_names = [n for n in ref.names if ref.layout.layer_of(n) is None]
        self.groups = layer_groups(self.num_layers, cfg.layer_groups)
        self.kinds = ("attn", "mlp") if cfg.split_attn_mlp else ("all",)
        # genome slots: (group index or "nl", kind, param, expert or None)
        slots: list[tuple[Any, str, str, str | None]] = []
        group_ids: list[Any] = list(range(len(self.groups)))
        if cfg.non_layer == "search" and self.non_layer_names:
            group_ids.append("nl")
        for g in group_ids:
            kinds = ("all",) if g == "nl" else self.kinds
            for kind in kinds:
                for p in cfg.params:
                    for e in self.experts if self.per_input[p] else [None]:
                        slots.append((g, kind, p, e))
        self.slots = slots
        self._names = [
            f"{'non_layer' if g == 'nl' else f'layers{self.groups[g][0]}-{self.groups[g][-1]}'}"
            f"{'' if kind == 'all' else '.' + kind}.{p}{'' if e is None else '.' + e}"
            for g, kind, p, e in slots
        ]
        lo = np.array([cfg.params[p].low for _, _, p, _ in slots])
        hi = np.array([cfg.params[p].high for _, _, p, _ in slots])
        self._lo, self._hi = lo, hi

    @property
    def names(self) -> list[str]:
        return self._names

    def initial(self) -> np.ndarray:
        x0 = []
        for _, _, p, _ in self.slots:
            r = self.cfg.params[p]
            init = r.init if r.init is not None else (r.low + r.high) / 2
            x0.append((init - r.low) / (r.high - r.low))
        return np.clip(np.array(x0), 0.0, 1.0)

    def values(self, genome: np.ndarray) -> np.ndarray:
        """Genome (unit box) -> parameter values in their declared ranges."""
        g = self.check_genome(genome)
        return self._lo + g * (self._hi - self._lo)

    def decode(self, genome: np.ndarray) -> dict[str, Any]:
        vals = self.values(genome)
        L = self.num_layers
        # per (kind, param, expert): per-layer array; non-layer value per (param, expert)
        per_layer: dict[tuple[str, str, str | None], np.ndarray] = {}
        non_layer: dict[tuple[str, str | None], float] = {}
        for (g, kind, p, e), v in zip(self.slots, vals):
            if g == "nl":
                non_layer[(p, e)] = float(v)
                continue
            arr = per_layer.setdefault((kind, p, e), np.zeros(L))
            arr[self.groups[g]] = v
        if self.cfg.smoothing > 0 and L > 2:
            s = self.cfg.smoothing
            for key, arr in per_layer.items():
                padded = np.concatenate([arr[:1], arr, arr[-1:]])
                per_layer[key] = (1 - s) * arr + s * (padded[:-2] + padded[2:]) / 2

        def spec(p: str, e: str | None) -> Any:
            entries: list[dict[str, Any]] = []
            nl = non_layer.get((p, e))
            if nl is None:  # non_layer: uniform -> the parameter's init value
                r = self.cfg.params[p]
                nl = r.init if r.init is not None else (r.low + r.high) / 2
            for name in self.non_layer_names:
                entries.append({"filter": name, "value": round(float(nl), DECIMALS)})
            if self.cfg.split_attn_mlp:
                entries.append({"filter": "attn", "value": _compact(per_layer[("attn", p, e)])})
                entries.append({"value": _compact(per_layer[("mlp", p, e)])})
            else:
                entries.append({"value": _compact(per_layer[("all", p, e)])})
            return entries

        recipe = self._recipe_header(self.cfg.method)
        models = []
        for e in self.experts:
            params = {p: spec(p, e) for p in self.cfg.params if self.per_input[p]}
            models.append({"model": e, "parameters": params})
        recipe["models"] = models
        scalars = {p: spec(p, None) for p in self.cfg.params if not self.per_input[p]}
        recipe["parameters"] = {**self.cfg.fixed, **scalars}
        return recipe


def _compact(arr: np.ndarray) -> Any:
    """Per-layer list rounded; a constant list becomes a scalar."""
    vals = [round(float(v), DECIMALS) for v in arr]
    return vals[0] if all(v == vals[0] for v in vals) else vals
