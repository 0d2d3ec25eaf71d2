"""Read a user recipe (evomerge or mergekit YAML) into one normalized, checked form.

Normalizing does not open any checkpoint: it checks the structure and the field types,
resolves every model reference (a key of ``sources``, a directory path, ``zoo:x`` or a Hub id
``org/name[@rev]``; relative paths against the recipe's directory) to a short *key*, and returns a plain dict that compiles
to the same plan as the input. That dict is what ``plan.meta["recipe"]`` stores, what a
merged model's directory gets as ``recipe.yaml``, and what a search space's decoded
genome looks like.

Normalized form::

    merge_method: ties
    sources: {key: /abs/path, ...}       # every model the recipe uses
    base_model: key | null
    models: [{model: key, parameters: {...}}]          # or
    slices: [{sources: [{model: key, layer_range: [a, b], parameters: {...}}],
              parameters: {...}, base_model: key}]      # (slice base_model optional)
    parameters: {...}
    dtype: bfloat16 | null
    tokenizer_source: key | null
    seed: 0
    non_layer: {model: key} | {merge: true, merge_method: m, parameters: {...}}   # slices only
    chat_template: auto | chatml | {template: TEXT} | {source: key}     # only when given
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

from ..checkpoint.resolve import parse_hub_id
from ..errors import ConfigError, PlanError
from .params import parse_parameters

TOP_KEYS = {
    "merge_method", "method", "base_model", "models", "slices", "parameters", "dtype",
    "out_dtype", "tokenizer_source", "random_seed", "seed", "sources", "non_layer",
    "chat_template",
}
# mergekit fields evomerge does not implement: a clear error beats a silent difference.
UNSUPPORTED_MERGEKIT_KEYS = {
    "modules": "per-module merges ('modules') are not supported; use 'models' or 'slices'",
    "tokenizer": "the 'tokenizer' block (token surgery) is not supported; sources must share "
    "a tokenizer, pick it with 'tokenizer_source'",
}
DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
SOURCE_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _known_ops() -> list[str]:
    from ..ops import list_ops

    return list_ops()


def check_method(name: Any, path: str = "merge_method") -> str:
    """The operator name, or ConfigError naming ``path`` (with a close match if any)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: expected an operator name, got {name!r}")
    from ..ops import get_op

    try:
        get_op(name)
    except PlanError:
        known = _known_ops()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{path}: unknown operator {name!r}{hint}; known: {', '.join(known)}"
        ) from None
    return name


class _Refs:
    """Turns model references into keys; owns the ``sources`` mapping being built."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self.sources: dict[str, str] = {}
        self._by_path: dict[str, str] = {}

    def declare(self, raw: Any) -> None:
        if raw is None:
            return
        if not isinstance(raw, dict):
            raise ConfigError(f"sources: expected a mapping of key -> model directory, got {raw!r}")
        for key, path in raw.items():
            key = str(key)
            if not SOURCE_KEY_RE.match(key):
                raise ConfigError(
                    f"sources.{key}: a key may only use letters, digits, '_', '-' and '.'"
                )
            if not isinstance(path, (str, os.PathLike)):
                raise ConfigError(f"sources.{key}: expected a directory path, zoo:NAME or a Hub "
                                  f"id, got {path!r}")
            full, _ = self._resolve(path, f"sources.{key}")
            self.sources[key] = full
            self._by_path.setdefault(full, key)

    def _resolve(self, path: Any, field: str) -> tuple[str, str]:
        """(local directory, key hint): a directory, ``zoo:x`` or a Hub id ``org/name[@rev]``."""
        from ..checkpoint.resolve import resolve_ref
        from ..errors import CheckpointError

        try:
            r = resolve_ref(str(path), self.base_dir)
        except CheckpointError as e:
            raise ConfigError(f"{field}: {e}") from None
        return os.path.normpath(r.path), r.key_hint

    def key(self, raw: Any, field: str) -> str:
        if isinstance(raw, dict) and "model" in raw and len(raw) == 1:
            raw = raw["model"]  # mergekit's {model: path} spelling of a reference
        if not isinstance(raw, (str, os.PathLike)) or not str(raw):
            raise ConfigError(f"{field}: expected a source key or a model directory, got {raw!r}")
        raw = str(raw)
        if raw in self.sources:
            return raw
        if "+" in raw and not Path(raw).exists():
            raise ConfigError(
                f"{field}: mergekit's 'model+adapter' references are not supported; name the "
                "adapter directory itself (its adapter_config.json names the base model)"
            )
        try:
            full, hint = self._resolve(raw, field)
        except ConfigError:
            looked = os.path.normpath(self.base_dir / os.path.expanduser(raw))
            if os.path.exists(looked) or raw.startswith("zoo:") or parse_hub_id(raw):
                raise
            known = f"a key of sources ({', '.join(self.sources)}) nor " if self.sources else ""
            raise ConfigError(
                f"{field}: {raw!r} is neither {known}a model directory ({looked!r} not found)"
            ) from None
        if full in self._by_path:
            return self._by_path[full]
        stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", hint) or "model"
        key, n = stem, 2
        while key in self.sources:
            key, n = f"{stem}_{n}", n + 1
        self.sources[key] = full
        self._by_path[full] = key
        return key


def _chat_template(raw: Any, refs: _Refs) -> Any:
    """``auto``, a built-in name, ``{template: TEXT}`` or ``{source: KEY}`` (see
    :mod:`evomerge.checkpoint.chat_template`)."""
    from ..checkpoint.chat_template import BUILTIN, is_template_text

    if isinstance(raw, dict) and set(raw) in ({"template"}, {"source"}):
        if "template" in raw:
            return {"template": str(raw["template"])}
        return {"source": refs.key(raw["source"], "chat_template.source")}
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"chat_template: expected auto, {', '.join(BUILTIN)}, a Jinja template "
                          f"or a source model, got {raw!r}")
    if raw == "auto" or raw in BUILTIN:
        return raw
    if is_template_text(raw):
        return {"template": raw}
    return {"source": refs.key(raw, "chat_template")}


def _mapping(raw: Any, path: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(raw).__name__} {raw!r}")
    return raw


def _check_keys(d: dict, allowed: set[str], path: str) -> None:
    unknown = [str(k) for k in d if k not in allowed]
    if unknown:
        raise ConfigError(
            f"{path}: unknown field(s) {', '.join(repr(u) for u in unknown)}; "
            f"expected {', '.join(sorted(allowed))}"
        )


def _params(raw: Any, path: str) -> dict[str, Any]:
    parse_parameters(raw, path)  # structure check; values are kept as written
    return dict(raw or {})


def _layer_range(raw: Any, path: str) -> list[int]:
    if (
        not isinstance(raw, (list, tuple))
        or len(raw) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw)
    ):
        raise ConfigError(f"{path}: expected [start, end] (two integers, end exclusive), got {raw!r}")
    a, b = int(raw[0]), int(raw[1])
    if a < 0 or b <= a:
        raise ConfigError(f"{path}: [{a}, {b}] is not a range of layers (need 0 <= start < end)")
    return [a, b]


def normalize_recipe(raw: Any, base_dir: str | Path | None = None) -> dict[str, Any]:
    """Check a recipe's structure and return its normalized dict (see module docstring)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe: expected a mapping at the top level, got {type(raw).__name__}")
    for key, why in UNSUPPORTED_MERGEKIT_KEYS.items():
        if raw.get(key) is not None:
            raise ConfigError(f"{key}: {why}")
    _check_keys(raw, TOP_KEYS | set(UNSUPPORTED_MERGEKIT_KEYS), "recipe")
    refs = _Refs(Path(base_dir) if base_dir is not None else Path.cwd())

    # -- method ------------------------------------------------------------------------
    method = raw.get("merge_method")
    if raw.get("method") is not None:
        if method is not None and method != raw["method"]:
            raise ConfigError(
                f"method: {raw['method']!r} contradicts merge_method {method!r}; give one of them"
            )
        method = raw["method"]
    if method is None:
        raise ConfigError("merge_method: missing (e.g. merge_method: ties)")
    method = check_method(method)

    # -- models ------------------------------------------------------------------------
    refs.declare(raw.get("sources"))
    out: dict[str, Any] = {"merge_method": method, "sources": refs.sources}
    base = raw.get("base_model")
    out["base_model"] = refs.key(base, "base_model") if base is not None else None

    has_models, has_slices = raw.get("models") is not None, raw.get("slices") is not None
    if has_models == has_slices:
        raise ConfigError(
            "recipe: give exactly one of 'models' (merge whole models) or 'slices' "
            "(assemble layer ranges)"
        )
    if has_models:
        models = raw["models"]
        if not isinstance(models, list) or not models:
            raise ConfigError("models: expected a non-empty list of {model: ..., parameters: ...}")
        out["models"], seen = [], {}
        for i, m in enumerate(models):
            p = f"models[{i}]"
            if isinstance(m, str):
                m = {"model": m}
            _check_keys(_mapping(m, p), {"model", "parameters"}, p)
            if m.get("model") is None:
                raise ConfigError(f"{p}.model: missing")
            key = refs.key(m["model"], f"{p}.model")
            if key in seen:
                raise ConfigError(f"{p}.model: {key!r} is already listed as models[{seen[key]}]")
            seen[key] = i
            entry: dict[str, Any] = {"model": key}
            if m.get("parameters"):
                entry["parameters"] = _params(m["parameters"], f"{p}.parameters")
            out["models"].append(entry)
    else:
        slices = raw["slices"]
        if not isinstance(slices, list) or not slices:
            raise ConfigError("slices: expected a non-empty list of {sources: [...]}")
        out["slices"] = []
        for i, s in enumerate(slices):
            p = f"slices[{i}]"
            _check_keys(_mapping(s, p), {"sources", "parameters", "base_model"}, p)
            srcs = s.get("sources")
            if not isinstance(srcs, list) or not srcs:
                raise ConfigError(f"{p}.sources: expected a non-empty list of {{model, layer_range}}")
            entry = {"sources": []}
            seen_keys: dict[str, int] = {}
            for j, src in enumerate(srcs):
                q = f"{p}.sources[{j}]"
                _check_keys(_mapping(src, q), {"model", "layer_range", "parameters"}, q)
                if src.get("model") is None:
                    raise ConfigError(f"{q}.model: missing")
                key = refs.key(src["model"], f"{q}.model")
                if key in seen_keys:
                    raise ConfigError(
                        f"{q}.model: {key!r} is already a source of this slice "
                        f"(sources[{seen_keys[key]}])"
                    )
                seen_keys[key] = j
                if src.get("layer_range") is None:
                    raise ConfigError(f"{q}.layer_range: missing (e.g. layer_range: [0, 8])")
                se: dict[str, Any] = {
                    "model": key,
                    "layer_range": _layer_range(src["layer_range"], f"{q}.layer_range"),
                }
                if src.get("parameters"):
                    se["parameters"] = _params(src["parameters"], f"{q}.parameters")
                entry["sources"].append(se)
            if s.get("parameters"):
                entry["parameters"] = _params(s["parameters"], f"{p}.parameters")
            if s.get("base_model") is not None:
                entry["base_model"] = refs.key(s["base_model"], f"{p}.base_model")
            out["slices"].append(entry)

    # -- everything else ---------------------------------------------------------------
    out["parameters"] = _params(raw.get("parameters"), "parameters")
    dtype = raw.get("out_dtype") if raw.get("out_dtype") is not None else raw.get("dtype")
    field = "out_dtype" if raw.get("out_dtype") is not None else "dtype"
    if dtype is not None:
        if not isinstance(dtype, str) or dtype.lower() not in DTYPES:
            raise ConfigError(f"{field}: unknown dtype {dtype!r}; use float32, float16 or bfloat16")
        dtype = DTYPES[dtype.lower()]
    out["dtype"] = dtype

    tok = raw.get("tokenizer_source")
    if tok is None:
        out["tokenizer_source"] = None
    elif tok == "base":
        if out["base_model"] is None:
            raise ConfigError("tokenizer_source: 'base' needs a base_model")
        out["tokenizer_source"] = out["base_model"]
    elif tok == "union":
        raise ConfigError(
            "tokenizer_source: 'union' is not supported: a union vocabulary needs new embedding "
            "and lm_head rows for tokens some sources lack (mergekit resizes and fills them), and "
            "evomerge merges sources that share one tokenizer; name the model whose tokenizer "
            "to copy (e.g. tokenizer_source: base)"
        )
    else:
        out["tokenizer_source"] = refs.key(tok, "tokenizer_source")

    ct = raw.get("chat_template")
    if ct is not None:
        out["chat_template"] = _chat_template(ct, refs)

    seed_field = "random_seed" if raw.get("random_seed") is not None else "seed"
    seed = raw.get(seed_field, 0)
    if seed is None:
        seed = 0
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"{seed_field}: expected a non-negative integer, got {seed!r}")
    out["seed"] = int(seed)

    nl = raw.get("non_layer")
    if nl is not None:
        if "slices" not in out:
            raise ConfigError(
                "non_layer: only applies to 'slices' recipes (with 'models' every tensor is merged)"
            )
        _check_keys(_mapping(nl, "non_layer"), {"model", "merge", "merge_method", "parameters"}, "non_layer")
        if nl.get("model") is not None:
            if nl.get("merge") or nl.get("merge_method") or nl.get("parameters"):
                raise ConfigError("non_layer: give either {model: KEY} or {merge: true, ...}, not both")
            out["non_layer"] = {"model": refs.key(nl["model"], "non_layer.model")}
        elif nl.get("merge") is True:
            entry = {"merge": True}
            if nl.get("merge_method") is not None:
                entry["merge_method"] = check_method(nl["merge_method"], "non_layer.merge_method")
            if nl.get("parameters"):
                entry["parameters"] = _params(nl["parameters"], "non_layer.parameters")
            out["non_layer"] = entry
        else:
            raise ConfigError("non_layer: expected {model: KEY} or {merge: true}")
    return out
