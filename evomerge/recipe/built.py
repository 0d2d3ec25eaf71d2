"""The normalized form of a recipe evomerge's own code built, without checking it again.

A search space decodes every candidate's genome into a recipe (a mergekit-style dict whose
models are keys of its ``sources``, already resolved to local directories) and compiles it
at once, in the same process. Sending that dict through :func:`normalize_recipe` re-checks
a structure the code itself wrote and re-resolves every source path, once per candidate.

:func:`built_form` gives what :func:`normalize_recipe` gives for such a recipe: the same
keys in the same order and the same values, so the plan, its hash (the fitness-cache key)
and ``plan.meta["recipe"]`` stay exactly what they were. It skips the structure checks
(the compiler parses every parameter again) and resolves a source by its path alone
(an existing directory), as :func:`~evomerge.checkpoint.resolve.resolve_ref` does for one.
A recipe of any other shape (aliases such as ``method``, ``out_dtype`` or ``random_seed``,
model references that are not keys of ``sources``, ``chat_template``, anything
:func:`normalize_recipe` would refuse) gives None, and :func:`normalize_built` then
normalizes it as user YAML. Recipes that cross a process boundary (a run's log, a file) go
through :func:`normalize_recipe`.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import PlanError
from .normalize import DTYPES, SOURCE_KEY_RE, normalize_recipe

_TOP = {"merge_method", "sources", "base_model", "models", "slices", "parameters", "dtype",
        "tokenizer_source", "seed", "non_layer"}
_MODEL = {"model", "parameters"}
_SLICE = {"sources", "parameters", "base_model"}
_SLICE_SOURCE = {"model", "layer_range", "parameters"}
_NON_LAYER = {"model", "merge", "merge_method", "parameters"}


class _Unknown(Exception):
    """The recipe is not of a shape :func:`built_form` knows: normalize it instead."""


def normalize_built(recipe: dict[str, Any]) -> dict[str, Any]:
    """The normalized form of a recipe the code built (:func:`built_form`), else of any
    recipe (:func:`normalize_recipe`, which raises ConfigError on bad input)."""
    norm = built_form(recipe)
    return norm if norm is not None else normalize_recipe(recipe)


def built_form(raw: Any) -> dict[str, Any] | None:
    """``normalize_recipe(raw)`` for a recipe of the shape search spaces build, or None.

    Args:
        raw: a recipe dict (merge_method, sources, models or slices, ...).
    """
    try:
        return _built(raw)
    except _Unknown:
        return None


def _built(raw: Any) -> dict[str, Any]:
    _need(isinstance(raw, dict) and set(raw) <= _TOP)
    method = _method(raw.get("merge_method"))
    sources = _sources(raw.get("sources"))
    base = _key(raw.get("base_model"), sources, optional=True)
    out: dict[str, Any] = {"merge_method": method, "sources": sources, "base_model": base}
    models, slices = raw.get("models"), raw.get("slices")
    _need((models is None) != (slices is None))
    if models is not None:
        out["models"] = _models(models, sources)
    else:
        out["slices"] = [_slice(s, sources) for s in _list(slices)]
    out["parameters"] = _params(raw.get("parameters"))
    dtype = raw.get("dtype")
    if dtype is not None:
        _need(isinstance(dtype, str) and dtype.lower() in DTYPES)
        dtype = DTYPES[dtype.lower()]
    out["dtype"] = dtype
    tok = raw.get("tokenizer_source")
    if tok == "base":
        _need(base is not None)
        tok = base
    elif tok == "union":
        raise _Unknown
    out["tokenizer_source"] = _key(tok, sources, optional=True)
    seed = raw.get("seed", 0)
    seed = 0 if seed is None else seed
    _need(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0)
    out["seed"] = int(seed)
    nl = raw.get("non_layer")
    if nl is not None:
        _need(slices is not None)
        out["non_layer"] = _non_layer(nl, sources)
    return out


def _need(ok: bool) -> None:
    if not ok:
        raise _Unknown


def _method(name: Any) -> str:
    from ..ops import get_op

    _need(isinstance(name, str) and bool(name))
    try:
        get_op(name)
    except PlanError:
        raise _Unknown from None
    return name


def _sources(raw: Any) -> dict[str, str]:
    """``sources`` with each path as resolve_ref gives an existing directory."""
    _need(isinstance(raw, dict))
    out = {}
    for key, path in raw.items():
        _need(isinstance(key, str) and SOURCE_KEY_RE.match(key) is not None)
        _need(isinstance(path, str) and bool(path) and not path.startswith("zoo:"))
        full = os.path.abspath(os.path.expanduser(path))
        _need(os.path.isdir(full))
        out[key] = full
    return out


def _key(raw: Any, sources: dict[str, str], optional: bool = False) -> str | None:
    if raw is None and optional:
        return None
    _need(isinstance(raw, str) and raw in sources)
    return raw


def _list(raw: Any) -> list[Any]:
    _need(isinstance(raw, list) and bool(raw))
    return raw


def _params(raw: Any) -> dict[str, Any]:
    _need(raw is None or isinstance(raw, dict))
    return dict(raw or {})


def _entry(raw: Any, allowed: set[str], sources: dict[str, str]) -> dict[str, Any]:
    """``{model: key, parameters: {...}}`` (parameters only when given)."""
    _need(isinstance(raw, dict) and set(raw) <= allowed)
    entry: dict[str, Any] = {"model": _key(raw.get("model"), sources)}
    if "layer_range" in allowed:
        r = raw.get("layer_range")
        _need(isinstance(r, (list, tuple)) and len(r) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in r))
        _need(0 <= r[0] < r[1])
        entry["layer_range"] = [int(r[0]), int(r[1])]
    if raw.get("parameters"):
        entry["parameters"] = _params(raw["parameters"])
    return entry


def _models(raw: Any, sources: dict[str, str]) -> list[dict[str, Any]]:
    entries = [_entry(m, _MODEL, sources) for m in _list(raw)]
    _need(len({e["model"] for e in entries}) == len(entries))
    return entries


def _slice(raw: Any, sources: dict[str, str]) -> dict[str, Any]:
    _need(isinstance(raw, dict) and set(raw) <= _SLICE)
    srcs = [_entry(s, _SLICE_SOURCE, sources) for s in _list(raw.get("sources"))]
    _need(len({e["model"] for e in srcs}) == len(srcs))
    entry: dict[str, Any] = {"sources": srcs}
    if raw.get("parameters"):
        entry["parameters"] = _params(raw["parameters"])
    if raw.get("base_model") is not None:
        entry["base_model"] = _key(raw["base_model"], sources)
    return entry


def _non_layer(raw: Any, sources: dict[str, str]) -> dict[str, Any]:
    _need(isinstance(raw, dict) and set(raw) <= _NON_LAYER)
    if raw.get("model") is not None:
        _need(not (raw.get("merge") or raw.get("merge_method") or raw.get("parameters")))
        return {"model": _key(raw["model"], sources)}
    _need(raw.get("merge") is True)
    entry: dict[str, Any] = {"merge": True}
    if raw.get("merge_method") is not None:
        entry["merge_method"] = _method(raw["merge_method"])
    if raw.get("parameters"):
        entry["parameters"] = _params(raw["parameters"])
    return entry
