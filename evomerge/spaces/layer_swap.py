"""Layer swapping with evolved boundaries, and its generalization to a per-layer source mix.

Layer Swapping (Bandarkar et al.) replaces the bottom and top transformer layers of one
expert with another expert's; the paper picks k by hand. Here k is searched:

- ``per_layer: false`` (default): genes ``k_bottom``, ``k_top`` (each 0..L/2 layers from the
  ``outer`` expert; the middle from ``inner``) and ``non_layer`` (embeddings/final norm/head
  from the outer expert when >= 0.5, else the inner one).
- ``per_layer: true``: one gene per (layer, expert). With ``temperature: 0`` each output layer
  is copied whole from the expert with the largest gene (a frankenmerge with aligned layers);
  with ``temperature > 0`` each layer is a linear mix with softmax(genes / temperature)
  weights. Embeddings/head come from the expert with the largest non-layer gene.

Both decode to a recipe with ``slices`` (one source per slice = passthrough), which the
recipe compiler turns into passthrough / linear steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import SearchSpace, num_layers_of, register_space


@register_space("layer_swap")
class LayerSwapSpace(SearchSpace):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.num_layers = num_layers_of(self.models[self.experts[0]])
        if cfg.per_layer:
            self._names = [f"layer{i}.{e}" for i in range(self.num_layers) for e in self.experts]
            self._names += [f"non_layer.{e}" for e in self.experts]
        else:
            if len(self.experts) < 2 and (cfg.outer is None or cfg.inner is None):
                raise ConfigError("space: layer_swap needs two experts (space.outer / space.inner)")
            self.outer = cfg.outer or self.experts[0]
            self.inner = cfg.inner or self.experts[1]
            for field, key in (("outer", self.outer), ("inner", self.inner)):
                if key not in self.models:
                    raise ConfigError(f"space.{field}: {key!r} is not one of models")
            self.kmax = self.num_layers // 2
            self._names = ["k_bottom", "k_top", "non_layer"]

    @property
    def names(self) -> list[str]:
        return self._names

    def initial(self) -> np.ndarray:
        if self.cfg.per_layer:
            return np.full(self.dim, 0.5)
        # k = L/4 at each end, as a middle-of-the-road start; embeddings from outer
        return np.array([0.5, 0.5, 0.75])

    def layer_sources(self, genome: np.ndarray) -> tuple[list[dict[str, float]], str]:
        """Per layer: {expert: weight}; and the expert giving the non-layer tensors."""
        g = self.check_genome(genome)
        L = self.num_layers
        if not self.cfg.per_layer:
            kb = int(round(g[0] * self.kmax))
            kt = int(round(g[1] * self.kmax))
            layers = [
                {self.outer: 1.0} if (i < kb or i >= L - kt) else {self.inner: 1.0} for i in range(L)
            ]
            return layers, (self.outer if g[2] >= 0.5 else self.inner)
        M = len(self.experts)
        genes = g[: L * M].reshape(L, M)
        layers = []
        for row in genes:
            if self.cfg.temperature <= 0:
                layers.append({self.experts[int(np.argmax(row))]: 1.0})
            else:
                w = np.exp((row - row.max()) / self.cfg.temperature)
                w = w / w.sum()
                layers.append({e: round(float(x), 4) for e, x in zip(self.experts, w)})
        nl = self.experts[int(np.argmax(g[L * M:]))]
        return layers, nl

    def decode(self, genome: np.ndarray) -> dict[str, Any]:
        layers, nl_model = self.layer_sources(genome)
        slices: list[dict[str, Any]] = []
        for i, mix in enumerate(layers):
            if len(mix) == 1:
                (m,) = mix
                last = slices[-1]["sources"] if slices else None
                if last and len(last) == 1 and last[0]["model"] == m and last[0]["layer_range"][1] == i:
                    last[0]["layer_range"][1] = i + 1  # extend a run of layers from one model
                    continue
                slices.append({"sources": [{"model": m, "layer_range": [i, i + 1]}]})
            else:
                slices.append({
                    "sources": [
                        {"model": m, "layer_range": [i, i + 1], "parameters": {"weight": w}}
                        for m, w in mix.items()
                    ]
                })
        method = "linear" if any(len(m) > 1 for m in layers) else "passthrough"
        recipe = self._recipe_header(method)
        recipe.pop("base_model", None)
        recipe["tokenizer_source"] = nl_model
        recipe["slices"] = slices
        recipe["non_layer"] = {"model": nl_model}
        return recipe
