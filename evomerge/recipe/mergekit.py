"""Write a recipe back as a mergekit config, where mergekit can express it.

Reading mergekit YAML needs nothing special: evomerge's recipe format is mergekit's plus a
few fields, so :func:`~evomerge.recipe.load_recipe` reads both. Writing goes the other way
and must refuse what mergekit cannot do the same way; :func:`recipe_to_mergekit` returns
``(config, None)`` or ``(None, reason)``.

Translation:

- model keys become the directory paths (mergekit has no ``sources`` table);
- ``{layers: [...]}`` becomes the equivalent gradient list;
- ``dtype: X`` becomes ``dtype: float32`` + ``out_dtype: X`` (evomerge computes in float32
  and writes X);
- task-vector slices that leave the base out get it added with the first source's
  ``layer_range`` (mergekit needs the base among a slice's sources);
- ``linear`` with an unlisted ``base_model``: the base is dropped (mergekit would add it as
  a weightless input) and kept as ``tokenizer_source``;
- ``non_layer: {model: K}`` is dropped when mergekit's own rule (embeddings from the first
  slice's source, the rest from the last's) gives the same tensors;
- ``attn`` / ``mlp`` filters are kept when, for these models, the substring match mergekit
  does selects the same tensors as evomerge's kind match.

Not expressible (reason returned): LiNeS, ``m2n2_crossover``, other ``non_layer`` choices,
single-source slices under a task-vector method (mergekit needs the base in each slice),
kind filters whose substring meaning differs. The seed is not part of a mergekit config:
give ``--random-seed`` to ``mergekit-yaml`` (random methods still draw different masks,
since the two tools' random streams differ).
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from ..checkpoint.layout import ModelLayout
from ..checkpoint.opener import open_checkpoint
from ..errors import ConfigError
from ..ops import get_op
from .params import KIND_ALIASES, filters_of, to_gradient

MERGEKIT_METHODS = frozenset({
    "linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough",
    "nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
})
_LINES = ("lines_alpha", "lines_beta")


def _params_out(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    if not raw:
        return None
    return {k: to_gradient(copy.deepcopy(v)) for k, v in raw.items()}


def _all_params(norm: dict[str, Any]) -> list[dict[str, Any]]:
    out = [norm.get("parameters") or {}]
    for m in norm.get("models") or []:
        out.append(m.get("parameters") or {})
    for s in norm.get("slices") or []:
        out.append(s.get("parameters") or {})
        out += [src.get("parameters") or {} for src in s["sources"]]
    nl = norm.get("non_layer") or {}
    out.append(nl.get("parameters") or {})
    return out


def _kind_filters_ok(norm: dict[str, Any]) -> str | None:
    """None when every attn/mlp filter selects the same tensors as a plain substring."""
    used = {f for p in _all_params(norm) for v in p.values() for f in filters_of(v) if f in KIND_ALIASES}
    if not used:
        return None
    for key, path in norm["sources"].items():
        names = open_checkpoint(path).names
        for flt in used:
            for n in names:
                if (flt in n) != ((flt in n) or ModelLayout.kind_of(n) == flt):
                    return (
                        f"filter {flt!r} matches tensor {n!r} of model {key!r} by kind, which a "
                        f"mergekit substring filter would not"
                    )
    return None


def _as_normalized(recipe: Any, base_dir: Any) -> dict[str, Any] | None:
    from ..plan import MergePlan
    from .io import load_recipe
    from .normalize import normalize_recipe

    if isinstance(recipe, MergePlan):
        recipe = recipe.meta.get("recipe")
        if recipe is None:
            return None
    if isinstance(recipe, dict):
        return normalize_recipe(recipe, base_dir)
    return load_recipe(recipe)


def recipe_to_mergekit(recipe: Any, base_dir: Any = None) -> tuple[dict[str, Any] | None, str | None]:
    """``(mergekit config dict, None)``, or ``(None, reason)`` when mergekit cannot express it.

    ``recipe``: a recipe dict (raw or normalized), a recipe file, or a MergePlan compiled
    from a recipe (its ``meta['recipe']``).
    """
    norm = _as_normalized(recipe, base_dir)
    if norm is None:
        return None, "the plan was not compiled from a recipe (no meta['recipe'])"
    return _export(norm)


def _export(norm: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    method = norm["merge_method"]
    if method not in MERGEKIT_METHODS:
        return None, f"merge_method {method!r} has no mergekit equivalent"
    if any(k in p for p in _all_params(norm) for k in _LINES):
        return None, "LiNeS (lines_alpha / lines_beta) has no mergekit equivalent"
    why = _kind_filters_ok(norm)
    if why:
        return None, why

    src = norm["sources"]
    spec = get_op(method)
    base = norm.get("base_model")
    out: dict[str, Any] = {"merge_method": method}
    tok = norm.get("tokenizer_source")
    if "models" in norm:
        keys = [m["model"] for m in norm["models"]]
        drop_base = (base is not None and base not in keys and method != "slerp"
                     and not (spec.needs_base or spec.optional_base or spec.base_is_input))
        if base is not None and not drop_base:
            out["base_model"] = src[base]
        elif drop_base and tok is None:
            tok = base
        models = []
        for m in norm["models"]:
            e: dict[str, Any] = {"model": src[m["model"]]}
            p = _params_out(m.get("parameters"))
            if p:
                e["parameters"] = p
            models.append(e)
        out["models"] = models
    else:
        slices = norm["slices"]
        nl = norm.get("non_layer") or {}
        if nl.get("merge"):
            return None, "non_layer: {merge: true} has no mergekit equivalent"
        if nl.get("model"):
            first = [s["model"] for s in slices[0]["sources"]]
            last = [s["model"] for s in slices[-1]["sources"]]
            if not (first == [nl["model"]] and last == [nl["model"]]):
                return None, (
                    f"non_layer: {{model: {nl['model']}}} differs from mergekit's rule "
                    f"(embeddings from the first slice's sources, the rest from the last slice's)"
                )
        if base is not None:
            out["base_model"] = src[base]
        out_slices = []
        for i, s in enumerate(slices):
            srcs = s["sources"]
            sbase = s.get("base_model") or base
            if len(srcs) == 1 and method != "passthrough":
                if spec.needs_base or spec.optional_base or method == "slerp":
                    return None, (
                        f"slices[{i}] has a single source: evomerge copies it, mergekit's "
                        f"{method!r} would need the base among the slice's sources"
                    )
                p = srcs[0].get("parameters") or {}
                if (norm.get("parameters") or {}).get("normalize") is False or p or s.get("parameters"):
                    return None, (
                        f"slices[{i}] has a single source: evomerge copies it, mergekit's "
                        f"{method!r} would apply the weights"
                    )
            entries = []
            for sc in srcs:
                e = {"model": src[sc["model"]], "layer_range": list(sc["layer_range"])}
                p = _params_out(sc.get("parameters"))
                if p:
                    e["parameters"] = p
                entries.append(e)
            uses_base = spec.needs_base or (spec.optional_base and sbase is not None)
            if uses_base and len(srcs) > 1 and sbase not in [sc["model"] for sc in srcs]:
                entries.append({"model": src[sbase], "layer_range": list(srcs[0]["layer_range"])})
            so: dict[str, Any] = {"sources": entries}
            if s.get("base_model"):
                so["base_model"] = src[s["base_model"]]
            p = _params_out(s.get("parameters"))
            if p:
                so["parameters"] = p
            out_slices.append(so)
        out["slices"] = out_slices
    p = _params_out(norm.get("parameters"))
    if p:
        out["parameters"] = p
    if norm.get("dtype"):
        out["dtype"] = "float32"
        out["out_dtype"] = norm["dtype"]
    if tok is not None:
        out["tokenizer_source"] = "base" if tok == base and "base_model" in out else src[tok]
    ct = norm.get("chat_template")
    if ct is not None:  # mergekit reads auto, its built-in names, or a Jinja string
        from ..checkpoint.chat_template import resolve_chat_template

        out["chat_template"] = ct if isinstance(ct, str) else resolve_chat_template(ct, src)
    return out, None


def plan_to_mergekit(plan_or_recipe: Any) -> dict[str, Any] | None:
    """The mergekit config of a recipe or of a plan compiled from one; None when not expressible."""
    config, _ = recipe_to_mergekit(plan_or_recipe)
    return config


def recipe_to_mergekit_yaml(recipe: Any, base_dir: Any = None) -> str:
    """mergekit YAML text for ``recipe``; ConfigError with the reason when not expressible."""
    norm = _as_normalized(recipe, base_dir)
    if norm is None:
        raise ConfigError("mergekit export: the plan was not compiled from a recipe")
    config, why = _export(norm)
    if config is None:
        raise ConfigError(f"mergekit export: {why}")
    return _with_header(config, norm, "# mergekit config written by evomerge\n")


def _with_header(config: dict[str, Any], norm: dict[str, Any], header: str) -> str:
    if get_op(config["merge_method"]).random:
        header += f"# random masks: run mergekit-yaml with --random-seed {norm.get('seed', 0)}\n"
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def portable_mergekit_yaml(recipe: Any) -> str | None:
    """The mergekit config of ``recipe`` with Hub snapshots named ``org/name@commit`` (the
    revision mergekit should fetch), or None when mergekit cannot express the recipe."""
    from ..checkpoint.resolve import hub_ref_of_path

    try:
        norm = _as_normalized(recipe, None)
    except ConfigError:
        return None
    if norm is None:
        return None
    config, _ = _export(norm)
    if config is None:
        return None
    refs = {p: hub_ref_of_path(p) for p in norm["sources"].values()}

    def swap(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return (refs.get(v) or v) if isinstance(v, str) else v

    return _with_header(swap(config), norm,
                        "# mergekit config written by evomerge (mergekit-yaml mergekit_config.yml OUT)\n")
