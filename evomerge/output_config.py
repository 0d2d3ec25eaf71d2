"""The config of a merged model: the config source's, overrides applied, completeness checked.

Used by :class:`~evomerge.materialize.Materializer` before it writes a checkpoint: the layer
count the plan produces must match the config, and every tensor the config source's
architecture needs must be produced (transformers would otherwise fill it with random values).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from .checkpoint.compat import list_names
from .checkpoint.layout import detect_layout
from .checkpoint.writer import parse_dtype
from .errors import PlanError
from .plan import MergePlan


def config_source_key(plan: MergePlan) -> str:
    return plan.config_source or plan.base or next(iter(plan.sources))


def apply_config_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with ``overrides`` merged in (nested mappings merge key by key).

    When the layer count changes and the config lists one ``layer_types`` entry per layer
    all of one kind (Qwen2/Llama-style), the list is resized to match; a mixed list must be
    given in ``overrides`` by whoever chose the layers.
    """
    out = copy.deepcopy(dict(config))

    def merge(dst: dict, src: Mapping) -> None:
        for k, v in src.items():
            if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = copy.deepcopy(v)

    merge(out, overrides)
    n = out.get("num_hidden_layers")
    types = out.get("layer_types")
    if isinstance(n, int) and isinstance(types, list) and len(types) != n and "layer_types" not in overrides:
        if len(set(map(str, types))) <= 1 and types:
            out["layer_types"] = [types[0]] * n
        else:
            raise PlanError(
                f"config_overrides sets num_hidden_layers={n} but the config's layer_types lists "
                f"{len(types)} mixed entries: give layer_types in config_overrides too"
            )
    return out


def merged_config(plan: MergePlan, readers: Mapping[str, Any]) -> dict[str, Any]:
    """Config of the merged model: the config source's, overrides applied, layer count checked."""
    config = apply_config_overrides(readers[config_source_key(plan)].config, plan.config_overrides)
    if plan.dtype:
        config["dtype"] = str(parse_dtype(plan.dtype)).removeprefix("torch.")
    layout = detect_layout(plan.output_names)
    if layout.layer_prefix is not None:
        indices = {i for n in plan.output_names if (i := layout.layer_of(n)) is not None}
        missing = sorted(set(range(layout.num_layers)) - indices)
        if missing:
            raise PlanError(
                f"plan produces layers up to {layout.num_layers - 1} but no tensor of layer(s) "
                f"{missing[:5]} ({layout.layer_prefix}N.*)"
            )
        for key in ("num_hidden_layers", "n_layer"):
            n_cfg = config.get(key)
            if isinstance(n_cfg, int) and n_cfg != layout.num_layers:
                raise PlanError(
                    f"plan produces {layout.num_layers} layers but the output config says "
                    f"{key}={n_cfg}: set config_overrides.{key}"
                )
    check_complete(plan, readers, layout.num_layers)
    return config

def check_complete(plan: MergePlan, readers: Mapping[str, Any], num_layers: int) -> None:
    """Every tensor the config source's architecture needs is produced.

    transformers fills missing weights with random values and only warns, so an
    incomplete plan would save a model that loads and silently generates garbage.
    Non-layer tensors must match the config source's; every output layer needs every
    per-layer tensor the config source's layers have.
    """
    key = config_source_key(plan)
    cs = readers[key]
    lay = cs.layout
    produced = set(plan.output_names)
    missing = [n for n in cs.names if lay.layer_of(n) is None and n not in produced]
    if lay.layer_prefix is not None:
        suffixes = sorted({lay.suffix_of(n) for n in cs.names if lay.layer_of(n) is not None})
        missing += [
            lay.layer_tensor(i, sfx)
            for i in range(num_layers)
            for sfx in suffixes
            if lay.layer_tensor(i, sfx) not in produced
        ]
    if missing:
        raise PlanError(
            f"the plan does not produce tensor(s) {list_names(missing)} "
            f"that the architecture of config source {key!r} needs; the saved model would be "
            f"incomplete"
        )
