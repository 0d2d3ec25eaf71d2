"""Data-flow space (DFS): evolve the path a token takes through the layers of M models.

Sakana's formulation (Akiba et al., "Evolutionary Optimization of Model Merging Recipes"):
M source models of one architecture with ``L_m`` layers each; the *slots* are the
concatenation of all M models' layers, repeated ``r`` times (``T = r * sum(L_m)`` slots, in
the order repeat -> model -> layer). An indicator gene per slot says whether that layer is on
the path; a scaling matrix ``W`` (M x M) scales the hidden state passed from a layer of model
``a`` to the next layer on the path, of model ``b``, by ``W[a, b]``.

Exact export as a plain checkpoint (no custom model class): in a pre-norm residual block
``y = x + f(norm(x))`` with a scale-invariant norm, ``block(s x) = s (x + f(norm(x)) / s)``
(up to the norm's epsilon). So scaling the residual stream before layer k by the cumulative
factor ``c_k = prod_{i<=k} s_i`` equals dividing that layer's *output projections*
(``o_proj``, ``down_proj``: everything a layer adds to the stream) by ``c_k`` and leaving the
stream unscaled; the stream at the end is off by ``c_n``, which the final norm removes. A
candidate therefore compiles to a ``slices`` recipe of ordinary passthrough copies with a
``scale`` parameter on two tensors per layer, and ``num_hidden_layers`` = path length.

Where this is not exact: (1) the norm's epsilon (``x / sqrt(mean(x^2) + eps)`` is not scale
invariant; the error is ~``eps / mean(x^2)`` relative, negligible once the stream is O(1),
measurable on tiny random models with small embeddings); (2) architectures where something
other than a pre-norm reads the stream or the update is normalized after the sublayer
(Gemma-2/3 and OLMo-2 post-norms, MoE routers, GPT-2's Conv1D naming): refused at
construction with one line (see ``checkpoint.layout.residual_output_projections``). The
search evaluates the folded weights themselves, so what is searched is exactly what is
exported.

Evaluation during a search (``backend_options``): the HF backend's resident model keeps
``max_path_length`` layer slots; a candidate writes its path's layers in place and the active
stack is cut to the path (references, no copies; each layer keeps its ``layer_idx``, so the
KV cache is right for paths longer than any source). The alternatives, measured in
``benchmarks/dfs.py`` and ``benchmarks/dfs_modes.py``: keeping every slot active with the
unused ones switched off (output projections scaled by 0, ``dfs_recipe(pad_to=...)``: exact
but every candidate pays the full depth) and writing each candidate to disk and loading it
(a disk round trip per candidate). Slots were never slower; scores are identical in all three.

Genome (unit box): ``T`` indicator genes (on when > 0.5: a relaxation threshold, so CMA-ES,
nevergrad's discrete optimizers (``ng:DiscreteOnePlusOne``, ``ng:PortfolioDiscreteOnePlusOne``)
and M2N2's flat crossover all drive it) then ``M * M`` scaling genes, log-uniform over
``scale_range``. At most ``max_path_length`` layers: when more indicators are on, the ones
with the largest genes are kept (in slot order). A genome with every indicator off keeps the
slot with the largest gene: the path is never empty. ``length_penalty`` subtracts
``penalty * path_length / L`` from the fitness (L: layers of the first source), a price on
inference cost.

Options (``space.options``): ``repeats`` (r, default 2), ``max_path_length`` (default
``min(T, 2 L)``), ``length_penalty`` (default 0), ``scale_range`` (default [0.5, 2.0]),
``sources`` (model keys on the slots, default every model), ``non_layer`` (model giving
embeddings, final norm and head, default ``init_model``), ``init_model`` (the source whose
layers form the initial path, default ``base_model`` or the first source).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..checkpoint import open_checkpoint
from ..checkpoint.compat import check_compatible
from ..checkpoint.layout import residual_output_projections
from ..errors import ConfigError, IncompatibleModelsError, PlanError
from ..optim.base import optimizer_trait
from .base import SearchSpace, register_space

OPTIONS = {"repeats", "max_path_length", "length_penalty", "scale_range", "sources", "non_layer",
           "init_model"}
ON_INIT, OFF_INIT = 0.7, 0.3  # initial indicator genes (threshold 0.5)
DECIMALS = 6


def dfs_recipe(models: dict[str, str], path: list[tuple[str, int]], scales: list[float],
               non_layer: str, projections: tuple[str, ...], dtype: str | None = None,
               seed: int = 0, pad_to: int | None = None) -> dict[str, Any]:
    """The passthrough ``slices`` recipe of a data-flow path.

    ``path[k] = (model, layer)``; ``scales[k]`` multiplies the residual stream *before* path
    layer k (``scales[0]`` included; 1.0 = unscaled). Layer k's output projections are
    divided by the cumulative product. A plain mergekit-style recipe: ``evomerge merge``
    rebuilds the exported checkpoint from it. ``pad_to``: append switched-off layers (copies
    of the last one with output projections scaled by 0, an exact identity in a pre-norm
    block) up to that depth; the search does not need them (it cuts the resident stack)."""
    if not path:
        raise PlanError("dfs: the data-flow path is empty (no layer on it)")
    if len(scales) != len(path):
        raise PlanError(f"dfs: {len(scales)} scales for a path of {len(path)} layers")
    slices = []
    c = 1.0
    for (m, j), s in zip(path, scales):
        if not (math.isfinite(s) and s > 0):
            raise PlanError(f"dfs: scale {s!r} before layer {m}.{j} must be positive and finite")
        c *= float(s)
        src: dict[str, Any] = {"model": m, "layer_range": [int(j), int(j) + 1]}
        inv = round(1.0 / c, DECIMALS)
        if inv != 1.0:
            src["parameters"] = {"scale": [{"filter": p, "value": inv} for p in projections]
                                 + [{"value": 1.0}]}
        slices.append({"sources": [src]})
    m, j = path[-1]
    off = [{"filter": p, "value": 0.0} for p in projections] + [{"value": 1.0}]
    slices += [{"sources": [{"model": m, "layer_range": [int(j), int(j) + 1],
                             "parameters": {"scale": list(off)}}]}
               for _ in range(max(0, (pad_to or 0) - len(path)))]
    recipe: dict[str, Any] = {"merge_method": "passthrough", "sources": dict(models),
                              "slices": slices, "non_layer": {"model": non_layer},
                              "tokenizer_source": non_layer, "seed": int(seed)}
    if dtype:
        recipe["dtype"] = dtype
    return recipe


@register_space("dfs")
class DFSSpace(SearchSpace):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        opts = dict(self.cfg.options)
        unknown = sorted(set(opts) - OPTIONS)
        if unknown:
            raise ConfigError(f"space.options: unknown dfs option(s) {unknown}; known: "
                              f"{', '.join(sorted(OPTIONS))}")
        self.sources = list(opts.get("sources") or self.models)
        for k in self.sources:
            if k not in self.models:
                raise ConfigError(f"space.options.sources: {k!r} is not one of models")
        readers = {k: open_checkpoint(self.models[k]) for k in self.sources}
        self._check_sources(readers)
        self.layers = {k: readers[k].layout.num_layers for k in self.sources}
        self.L = self.layers[self.sources[0]]
        r = opts.get("repeats", 2)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(f"space.options.repeats: the number of repeats r must be an "
                              f"integer >= 1, got {r!r}")
        self.repeats = r
        self.slots = [(m, j) for _ in range(r) for m in self.sources
                      for j in range(self.layers[m])]
        T = len(self.slots)
        cap = opts.get("max_path_length", min(T, 2 * self.L))
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ConfigError(f"space.options.max_path_length: must be an integer >= 1 (an "
                              f"empty path is no model), got {cap!r}")
        self.max_path = min(int(cap), T)
        self.penalty = float(opts.get("length_penalty", 0.0))
        if not math.isfinite(self.penalty) or self.penalty < 0:
            raise ConfigError(f"space.options.length_penalty: must be >= 0, got {self.penalty}")
        lo, hi = (float(x) for x in opts.get("scale_range", (0.5, 2.0)))
        if not (0 < lo <= 1.0 <= hi) or lo == hi:
            raise ConfigError(f"space.options.scale_range: need 0 < low <= 1 <= high, low < high; "
                              f"got [{lo}, {hi}]")
        self.log_lo, self.log_hi = math.log(lo), math.log(hi)
        default = self.base if self.base in self.sources else self.sources[0]
        self.init_model = str(opts.get("init_model", default))
        self.non_layer = str(opts.get("non_layer", self.init_model))
        for field, key in (("init_model", self.init_model), ("non_layer", self.non_layer)):
            if key not in self.models:
                raise ConfigError(f"space.options.{field}: {key!r} is not one of models")
        M = len(self.sources)
        self._names = [f"on.r{rep}.{m}.{j}" for rep in range(r) for m in self.sources
                       for j in range(self.layers[m])]
        self._names += [f"scale.{a}->{b}" for a in self.sources for b in self.sources]
        self.n_scale = M * M

    def _check_sources(self, readers: dict[str, Any]) -> None:
        types = {k: str(rd.config.get("model_type")) for k, rd in readers.items()}
        first = next(iter(types))
        for k, t in types.items():
            if t != types[first]:
                raise IncompatibleModelsError(
                    f"dfs: sources must share one architecture; {first!r} is {types[first]!r} "
                    f"but {k!r} is {t!r}")
        try:
            self.projections = residual_output_projections(readers[first].config)
        except ValueError as e:
            raise ConfigError(f"dfs: source {first!r}: {e}") from None
        try:
            check_compatible(readers, same_layer_count=False)
        except IncompatibleModelsError as e:
            raise IncompatibleModelsError(f"dfs: {e}") from None

    # -- what the optimizer sees ---------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return self._names

    def _genome_for(self, model: str) -> np.ndarray:
        """The path of one source's own layers (first repeat), unscaled."""
        g = np.full(self.dim, OFF_INIT)
        for k, (m, _) in enumerate(self.slots[: len(self.slots) // self.repeats]):
            if m == model:
                g[k] = ON_INIT
        g[len(self.slots):] = self._unit_of_scale(1.0)
        return g

    def _unit_of_scale(self, s: float) -> float:
        return (math.log(s) - self.log_lo) / (self.log_hi - self.log_lo)

    def initial(self) -> np.ndarray:
        return self._genome_for(self.init_model if self.init_model in self.sources
                                else self.sources[0])

    def initial_population(self) -> list[np.ndarray] | None:
        return [self._genome_for(m) for m in self.sources]

    # -- genome -> path -> recipe ------------------------------------------------------------
    def path(self, genome: np.ndarray) -> tuple[list[tuple[str, int]], list[float]]:
        """The layers on the path and the scale before each (1.0 before the first)."""
        g = self.check_genome(genome)
        T = len(self.slots)
        ind = g[:T]
        on = np.flatnonzero(ind > 0.5)
        if on.size == 0:
            on = np.array([int(np.argmax(ind))])
        if on.size > self.max_path:
            keep = np.argsort(-ind[on], kind="stable")[: self.max_path]
            on = np.sort(on[keep])
        W = np.exp(self.log_lo + g[T:] * (self.log_hi - self.log_lo)).reshape(
            len(self.sources), len(self.sources))
        index = {m: i for i, m in enumerate(self.sources)}
        path = [self.slots[k] for k in on]
        scales = [1.0] + [float(W[index[a[0]], index[b[0]]]) for a, b in zip(path, path[1:])]
        return path, scales

    def decode(self, genome: np.ndarray) -> dict[str, Any]:
        path, scales = self.path(genome)
        return dfs_recipe(self.models, path, scales, self.non_layer, self.projections,
                          dtype=self.dtype, seed=self.seed)

    # -- what the engine asks ----------------------------------------------------------------
    def optimizer_extras(self, optimizer: str) -> dict[str, Any]:
        # ``subspace`` without ``dims``: CMA-ES (or any inner optimizer) on the scaling genes
        # alone, the path held at ``fixed`` (e.g. the best genome of a discrete-path run)
        if optimizer_trait(optimizer, "space_extras") == "dims":
            return {"dims": list(range(len(self.slots), self.dim))}
        return {}

    def backend_options(self, backend: str) -> dict[str, Any]:
        if backend != "hf":
            raise ConfigError(f"space dfs: candidates change the layer count, which only the hf "
                              f"backend's resident model follows (got backend {backend!r}); "
                              f"serve the exported model with vLLM instead")
        return {"max_layers": self.max_path}

    def fitness_penalty(self, recipe: dict[str, Any]) -> float:
        if not self.penalty:
            return 0.0
        return self.penalty * len(recipe.get("slices") or []) / self.L
