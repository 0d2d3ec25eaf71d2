"""Compile a normalized recipe into a :class:`~evomerge.plan.MergePlan`.

One :class:`~evomerge.plan.TensorStep` per output tensor, with every parameter resolved
for that tensor (gradient position, filters, model > slice > global precedence as in
mergekit) and the operator's defaults filled in, so recipes that mean the same merge
compile to plans with the same hash.

Roles of the models, per operator (mergekit's conventions):

- operators that need a base (task arithmetic, TIES, DARE, breadcrumbs, DELLA, model
  stock, LiNeS, sce, ram, ramplus_tl, nearswap, arcee_fusion): ``base_model`` is each step's ``base`` reference and every *other* model
  is an input (a base also listed under ``models`` is dropped from the inputs, as mergekit
  does). In a slice whose sources do not include the base, the base's layers at the first
  source's ``layer_range`` are the reference (mergekit refuses such a slice);
- ``nuslerp``, ``multislerp``: with a ``base_model`` the base is the reference (they
  interpolate task vectors) and every other model an input; without one, the listed models;
- ``karcher``: the listed models, and in a ``models:`` recipe an unlisted ``base_model``
  appended as one more input (mergekit adds it; in ``slices`` it does not);
- ``slerp``: two inputs, the base first (``t = 0`` gives the base; mergekit adds an unlisted
  base the same way); without a base the first listed model is the ``t = 0`` end;
- every other operator (linear, passthrough): the listed models, in order. Unlike mergekit,
  an unlisted ``base_model`` is not added as an input of ``linear`` (mergekit then fails for
  lack of a weight); it only provides the config and the tokenizer.

A parameter the method does not take but another registered method does (``density``
on task_arithmetic, common in public configs) is ignored with one warning line per method
and parameter, as mergekit ignores it; a name no method takes is refused (a typo).

Layer assembly: a slice with a single source copies its layers (``passthrough``, with the
``scale`` parameter when the recipe's method is passthrough), renumbered into the output's
layer stack; the output config's ``num_hidden_layers`` (``n_layer`` for GPT-2) becomes the
assembled count, and a config ``layer_types`` list follows the assembled layers.

LiNeS: ``merge_method: task_arithmetic`` with ``lines_alpha`` and ``lines_beta`` (or
``merge_method: lines`` with ``alpha`` and ``beta``) compiles to the ``lines`` operator
with each tensor's layer position filled in: layer tensors their (output) layer index,
embeddings layer 0, the final norm and head the last layer.

Search spaces compile one recipe per candidate, so the per-checkpoint work (headers,
tensor names grouped by layer, the compatibility check) is cached per reader
(:mod:`.model_cache`). Parameter parsing and per-tensor resolution live in
:mod:`.step_params`.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..checkpoint.layout import ModelLayout
from ..checkpoint.opener import open_checkpoint
from ..errors import CheckpointError, ConfigError
from ..ops import OpSpec, get_op
from ..plan import MergePlan, TensorRef, TensorStep
from .model_cache import (  # noqa: F401  (re-exported for old imports)
    ModelInfo,
    clear_compile_cache,
    compatible_cached,
    model_info,
)
from .params import Setting, TensorCtx, gradient_t
from .step_params import (  # noqa: F401  (re-exported for old imports)
    COMPILER_PARAMS,
    IGNORED_PARAMS,
    LINES_ALIASES,
    OpParams,
    SourceGroup,
    check_layer_lists,
    validate_step,
)

# operators that need whole-model statistics, which a recipe cannot give per tensor.
NOT_IN_RECIPES = {
    "m2n2_crossover": "its coefficients and split point come from whole-model statistics; "
    "the M2N2 optimizer builds these plans itself",
}


# -- the compiler -----------------------------------------------------------------------
class _Compiler:
    def __init__(self, norm: dict[str, Any]):
        self.norm = norm
        self.method = norm["merge_method"]
        if self.method in NOT_IN_RECIPES:
            raise ConfigError(f"merge_method: {self.method!r} cannot be used in a recipe: {NOT_IN_RECIPES[self.method]}")
        self.spec = get_op(self.method)
        self.params = OpParams(
            self.spec, self.method, aliases=LINES_ALIASES if self.method == "lines" else None
        )
        self.base: str | None = norm.get("base_model")
        self.tok: str | None = norm.get("tokenizer_source")
        self.steps: list[TensorStep] = []
        self.glob = self.params_settings(norm.get("parameters"), "parameters", per_model=False)

    def params_settings(self, raw: Any, path: str, per_model: bool) -> dict[str, Setting]:
        # LiNeS on task arithmetic: switch to the lines operator on first sight of its knobs
        if (
            self.method == "task_arithmetic"
            and self.spec.name != "lines"
            and isinstance(raw, dict)
            and any(k in raw for k in LINES_ALIASES)
        ):
            if path != "parameters":
                raise ConfigError(f"{path}: lines_alpha/lines_beta are set once, under 'parameters'")
            self.spec = get_op("lines")
            self.params = OpParams(self.spec, self.method, aliases=LINES_ALIASES)
            missing = [k for k in LINES_ALIASES if k not in raw]
            if missing:
                raise ConfigError(f"parameters.{missing[0]}: missing; LiNeS needs both lines_alpha and lines_beta")
        return self.params.settings(raw, path, per_model)

    def _tokenizer_fallback(self, tok: str, used: list[str]) -> str:
        """``tok`` when it has tokenizer files, else the first source that has (warned): a
        source without a tokenizer merges as in mergekit, and the output still gets one."""
        src = self.norm["sources"]
        if open_checkpoint(src[tok]).tokenizer_dir is not None:
            return tok
        for k in [*used, *src]:
            if open_checkpoint(src[k]).tokenizer_dir is not None:
                warnings.warn(f"model {tok!r} has no tokenizer files: the merged model takes the "
                              f"tokenizer of {k!r} (set tokenizer_source to choose)", stacklevel=4)
                return k
        return tok

    def plan(self) -> MergePlan:
        if "models" in self.norm:
            used, cfg_key, overrides = self._models()
        else:
            used, cfg_key, overrides = self._slices()
        tok = self.tok or self.base or cfg_key
        if self.tok is None:
            tok = self._tokenizer_fallback(tok, used)
        for k in (cfg_key, tok):
            if k not in used:
                used.append(k)
        sources = {k: self.norm["sources"][k] for k in used}
        return MergePlan(
            sources=sources,
            steps=self.steps,
            base=self.base if self.base in sources else None,
            config_source=cfg_key,
            tokenizer_source=tok,
            config_overrides=overrides,
            dtype=self.norm.get("dtype"),
            seed=int(self.norm.get("seed", 0)),
            meta={"recipe": self.norm, "method": self.method},
        )

    def _open(self, keys: list[str], fields: dict[str, str]) -> dict[str, ModelInfo]:
        out = {}
        for k in keys:
            try:
                out[k] = model_info(open_checkpoint(self.norm["sources"][k]))
            except CheckpointError as e:
                raise CheckpointError(f"{fields.get(k, 'sources.' + k)}: {e}") from None
        return out

    def _roles(self, keys: list[str], base: str | None, where: str, spec: OpSpec | None = None,
               add_base_input: bool = True) -> tuple[list[str], str | None]:
        """(input keys, base key) of one group, by the operator's convention."""
        spec = spec or self.params.spec
        if spec.needs_base or (spec.optional_base and base is not None):
            if base is None:
                raise ConfigError(f"base_model: operator {spec.name!r} needs a base model")
            inputs = [k for k in keys if k != base]
            if not inputs:
                raise ConfigError(
                    f"{where}: operator {spec.name!r} needs at least one model besides the base {base!r}"
                )
            return inputs, base
        if spec.base_is_input and base is not None and add_base_input and base not in keys:
            return list(keys) + [base], None  # mergekit appends an unlisted base (models:)
        if spec.name == "slerp" and base is not None:
            return [base] + [k for k in keys if k != base], None
        return list(keys), None

    def _lines_fill(self, p: dict[str, Any], layer: int | None, kind: str, n_layers: int) -> None:
        if self.params.spec.name != "lines":
            return
        if layer is None:
            layer = 0 if kind == "embed" else max(n_layers - 1, 0)
        p["layer"] = int(layer)
        p["num_layers"] = int(max(n_layers, 1))

    def _step(self, g: SourceGroup, ctx: TensorCtx, out: str, names: dict[str, str],
              lines_layer: int | None, n_layers: int) -> None:
        p = g.params.resolve(ctx, g)
        if g.params is self.params:
            self._lines_fill(p, lines_layer, ctx.kind, n_layers)
        step = TensorStep(
            output=out,
            op=g.op,
            inputs=[TensorRef(k, names[k]) for k in g.inputs],
            base=TensorRef(g.base, names[g.base]) if g.base else None,
            params=p,
        )
        validate_step(g, step)
        self.steps.append(step)

    # -- whole models --------------------------------------------------------------------
    def _models(self) -> tuple[list[str], str, dict[str, Any]]:
        models = self.norm["models"]
        keys = [m["model"] for m in models]
        paths = {m["model"]: f"models[{i}]" for i, m in enumerate(models)}
        settings = {
            m["model"]: self.params_settings(m.get("parameters"), f"{paths[m['model']]}.parameters", per_model=True)
            for m in models
        }
        if self.params.spec.name == "passthrough" and len(keys) != 1:
            raise ConfigError(
                f"models: passthrough copies one model, got {len(keys)}; use slices to assemble layers"
            )
        inputs, base = self._roles(keys, self.base, "models")
        used = list(dict.fromkeys(inputs + [k for k in (base, self.base, self.tok) if k]))
        fields = {k: f"{p}.model" for k, p in paths.items()}
        if self.base:
            fields.setdefault(self.base, "base_model")
        if self.tok:
            fields.setdefault(self.tok, "tokenizer_source")
        infos = self._open(used, fields)
        compatible_cached({k: infos[k].reader for k in used}, True, "models")
        ref = infos[self.base or keys[0]]
        n = ref.layout.num_layers
        check_layer_lists([*settings.values(), self.glob], n, "")
        g = SourceGroup(
            params=self.params,
            inputs=inputs,
            base=base,
            starts={},
            chains=[[settings.get(k, {}), self.glob] for k in inputs],
            scalar_chain=([settings[inputs[0]]] if self.params.scalars_per_model else []) + [self.glob],
            paths=[paths.get(k, "base_model") for k in inputs],
            where="models",
        )
        for ctx in ref.whole_model_contexts():
            self._step(g, ctx, ctx.name, _Same(ctx.name), ctx.layer, n)
        return used, self.base or keys[0], {}

    # -- slices --------------------------------------------------------------------------
    def _slices(self) -> tuple[list[str], str, dict[str, Any]]:
        slices = self.norm["slices"]
        fields: dict[str, str] = {}
        if self.base:
            fields[self.base] = "base_model"
        for i, s in enumerate(slices):
            for j, src in enumerate(s["sources"]):
                fields.setdefault(src["model"], f"slices[{i}].sources[{j}].model")
            if s.get("base_model"):
                fields.setdefault(s["base_model"], f"slices[{i}].base_model")
        nl = self.norm.get("non_layer") or {}
        if nl.get("model"):
            fields.setdefault(nl["model"], "non_layer.model")
        if self.tok:
            fields.setdefault(self.tok, "tokenizer_source")
        cfg_key = self.base or slices[0]["sources"][0]["model"]
        infos = self._open(list(fields), fields)
        total = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in slices)
        out_layout = infos[cfg_key].layout
        if out_layout.layer_prefix is None:
            raise ConfigError(f"slices: model {cfg_key!r} has no layer stack to slice")

        groups: list[SourceGroup] = []
        slice_sources: list[tuple[list[str], dict[str, int], int]] = []
        for i, s in enumerate(slices):
            g, keys, starts, n = self._slice_group(i, s, infos)
            groups.append(g)
            slice_sources.append((keys, starts, n))
        used = [k for k in fields if any(k in g.inputs or k == g.base for g in groups)
                or k in (nl.get("model"), cfg_key, self.tok)]
        compatible_cached({k: infos[k].reader for k in used}, False, "slices")

        out_index = 0
        layer_types: list[Any] = []
        for g, (keys, starts, n) in zip(groups, slice_sources):
            ref = infos[keys[0]]
            types = ref.reader.config.get("layer_types")
            for idx in range(n):
                src_layer = starts[keys[0]] + idx
                if isinstance(types, list) and src_layer < len(types):
                    layer_types.append(types[src_layer])
                t = gradient_t(idx, n)
                for suffix in ref.layers.get(src_layer, []):
                    out_name = out_layout.layer_tensor(out_index, suffix)
                    names = {k: infos[k].layout.layer_tensor(g.starts[k] + idx, suffix)
                             for k in g.inputs + ([g.base] if g.base else [])}
                    self._step(g, TensorCtx.make(out_name, t, idx), out_name, names, out_index, total)
                out_index += 1

        self._non_layer(nl, slices, groups, infos, cfg_key, total)

        cfg = infos[cfg_key].reader.config
        count_key = "n_layer" if "n_layer" in cfg and "num_hidden_layers" not in cfg else "num_hidden_layers"
        overrides: dict[str, Any] = {count_key: out_index}
        types = cfg.get("layer_types")
        if isinstance(types, list) and len(layer_types) == out_index and layer_types != types:
            overrides["layer_types"] = layer_types
        return used, cfg_key, overrides

    def _slice_group(self, i: int, s: dict[str, Any], infos: dict[str, ModelInfo]):
        p = f"slices[{i}]"
        srcs = s["sources"]
        sl = self.params_settings(s.get("parameters"), f"{p}.parameters", per_model=False)
        per_src: dict[str, dict[str, Setting]] = {}
        lengths = []
        for j, src in enumerate(srcs):
            q = f"{p}.sources[{j}]"
            per_src[src["model"]] = self.params_settings(src.get("parameters"), f"{q}.parameters", per_model=True)
            a, b = src["layer_range"]
            have = infos[src["model"]].layout.num_layers
            if b > have:
                raise ConfigError(
                    f"{q}.layer_range: [{a}, {b}] is out of range for model {src['model']!r}, "
                    f"which has {have} layers (0..{have - 1})"
                )
            lengths.append(b - a)
        if len(set(lengths)) != 1:
            raise ConfigError(f"{p}.sources: every source of a slice needs the same number of layers, got {lengths}")
        n = lengths[0]
        check_layer_lists([*per_src.values(), sl, self.glob], n, f" of {p}")
        keys = [src["model"] for src in srcs]
        starts = {src["model"]: src["layer_range"][0] for src in srcs}
        index = {k: j for j, k in enumerate(keys)}
        if self.params.spec.name == "passthrough" and len(keys) != 1:
            raise ConfigError(f"{p}.sources: passthrough takes one source per slice, got {len(keys)}")
        if len(keys) == 1:  # one source: a copy of its layers
            k = keys[0]
            params = self.params if self.params.spec.name == "passthrough" else OpParams(get_op("passthrough"), "passthrough")
            own = params is self.params
            g = SourceGroup(
                params=params, inputs=[k], base=None, starts=starts,
                chains=[[per_src[k], sl, self.glob] if own else []],
                scalar_chain=[per_src[k], sl, self.glob] if own else [],
                paths=[f"{p}.sources[0]"], where=p,
            )
            return g, keys, starts, n
        base = s.get("base_model") or self.base
        inputs, b = self._roles(keys, base, f"{p}.sources", add_base_input=False)
        for k in inputs + ([b] if b else []):
            if k in starts:
                continue
            # the base, when not among the sources: its layers at the first source's range
            starts = {**starts, k: starts[keys[0]]}
            have = infos[k].layout.num_layers
            if starts[k] + n > have:
                raise ConfigError(
                    f"{p}: the base model {k!r} has {have} layers, fewer than the slice's "
                    f"layer_range [{starts[k]}, {starts[k] + n}] (list the base among the sources)"
                )
        g = SourceGroup(
            params=self.params, inputs=inputs, base=b, starts=starts,
            chains=[[per_src.get(k, {}), sl, self.glob] for k in inputs],
            scalar_chain=[sl, self.glob],
            paths=[f"{p}.sources[{index[k]}]" if k in index else "base_model" for k in inputs],
            where=p,
        )
        return g, keys, starts, n

    def _non_layer(self, nl: dict[str, Any], slices: list[dict[str, Any]], groups: list[SourceGroup],
                   infos: dict[str, ModelInfo], cfg_key: str, total: int) -> None:
        names = infos[cfg_key].non_layer
        if nl.get("model"):
            k = nl["model"]
            g = SourceGroup(params=OpParams(get_op("passthrough"), "passthrough"), inputs=[k], base=None,
                       starts={}, chains=[[]], scalar_chain=[], paths=["non_layer"], where="non_layer")
            for name in names:
                self._step(g, TensorCtx.make(name, 0.0), name, _Same(name), None, total)
            return
        if nl.get("merge"):
            g = self._merge_group(nl, slices)
            for name in names:
                self._step(g, TensorCtx.make(name, 0.0), name, _Same(name), None, total)
            return
        # mergekit: embeddings from the first slice's sources, the rest from the last slice's,
        # with the slice's own parameters at the start of its gradient (t = 0)
        for name in names:
            g = groups[0] if ModelLayout.kind_of(name) == "embed" else groups[-1]
            self._step(g, TensorCtx.make(name, 0.0), name, _Same(name), None, total)

    def _merge_group(self, nl: dict[str, Any], slices: list[dict[str, Any]]) -> SourceGroup:
        """``non_layer: {merge: true}``: every slice model merged (passthrough -> average)."""
        method = nl.get("merge_method") or self.method
        if method == "passthrough":
            method = "linear"
        if method in NOT_IN_RECIPES:
            raise ConfigError(f"non_layer.merge_method: {method!r} cannot be used in a recipe")
        same = method == self.method
        params = self.params if same else OpParams(get_op(method), method)
        own = params.settings(nl.get("parameters"), "non_layer.parameters", per_model=False)
        glob = [own, self.glob] if same else [own]
        keys: list[str] = []
        per_model: dict[str, dict[str, Setting]] = {}
        paths: dict[str, str] = {}
        for i, s in enumerate(slices):
            for j, src in enumerate(s["sources"]):
                k = src["model"]
                if k in per_model:
                    continue
                keys.append(k)
                paths[k] = f"slices[{i}].sources[{j}]"
                per_model[k] = (
                    params.settings(src.get("parameters"), f"{paths[k]}.parameters", per_model=True)
                    if same else {}
                )
        spec = params.spec
        if spec.needs_base and self.base is None:
            raise ConfigError(f"non_layer.merge_method: {method!r} needs a base_model")
        inputs, b = self._roles(keys, self.base, "non_layer", spec=spec, add_base_input=False)
        return SourceGroup(
            params=params, inputs=inputs, base=b, starts={},
            chains=[[per_model.get(k, {}), *glob] for k in inputs],
            scalar_chain=glob, paths=[paths.get(k, "base_model") for k in inputs],
            where="non_layer",
        )


class _Same(dict):
    """``names[key]`` for tensors read under the same name from every model."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def __missing__(self, key: str) -> str:
        return self.name


def compile_normalized(norm: dict[str, Any]) -> MergePlan:
    """MergePlan of a recipe already normalized by :func:`normalize_recipe`."""
    return _Compiler(norm).plan()
