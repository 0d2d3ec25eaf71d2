"""``lora_pool``: black-box merging of a provider's LoRA pool (Evo-Merging, LoraHub).

The provider (``evomerge serve-pool``) holds a base model and N LoRA adapters that the user
never sees; the user names them as ``pool:<adapter>`` models, in pool order. The genome has
2N coordinates in the unit box::

    alpha.<adapter> for every adapter   -> alpha_i in [0, 1]: the fraction of the adapter's
                                           LoRA-A entries of largest magnitude that is kept
    beta.<adapter>  for every adapter   -> beta_i in [beta_low, beta_high] (option
                                           ``beta_range``, default [-1.5, 1.5]): signed scale

(merged A = sum_i beta_i TopK_alpha_i(A_i), merged B = sum_i beta_i B_i, done by the provider).
Decoding gives a readable recipe ``{merge_method: evo_lora, adapters, alpha: {name: v}, beta:
{name: v}}`` (rounded to 4 decimals, so near-identical genomes share a cached evaluation);
compiling gives a *control* MergePlan whose one step (op ``evo_lora``, see
:mod:`evomerge.ops.control`) carries the control vector: the ``pool`` fitness backend sends it
to the provider, the fitness cache and the run log key on its hash as for any plan.

The start point is Evo-Merging's: alpha = 1 (dense) and beta = 1/N (the uniform average).
:meth:`optimizer_extras` tells the staged optimizers (``evo_merging``, ``lorahub``) which
coordinates are alphas and betas and where 1/N and 0 lie in unit coordinates. Export
(``evomerge export``) asks the provider for the merged adapter, when the operator allows it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..ops.control import ADAPTER_TENSOR, LORA_POOL_OUTPUT
from ..optim.base import optimizer_trait
from ..plan import MergePlan, TensorRef, TensorStep
from .base import SearchSpace, register_space

DECIMALS = 4
POOL_PREFIX = "pool:"
DEFAULT_BETA_RANGE = (-1.5, 1.5)


@register_space("lora_pool")
class LoraPoolSpace(SearchSpace):
    remote = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.base is not None:
            raise ConfigError("base_model: the lora_pool space merges adapters over the "
                              "provider's own base model; remove base_model")
        names = []
        for key, ref in self.models.items():
            if not isinstance(ref, str) or not ref.startswith(POOL_PREFIX) or not ref[len(POOL_PREFIX):]:
                raise ConfigError(f"models.{key}: the lora_pool space takes pool:<adapter> "
                                  f"references to the provider's adapters, got {ref!r}")
            names.append(ref[len(POOL_PREFIX):])
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"models: adapter pool:{dup} is listed twice")
        self.adapters = names
        self.n = len(names)
        opts = dict(self.cfg.options)
        known = {"beta_range"}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ConfigError(f"space.options.{unknown[0]}: unknown option of the lora_pool "
                              f"space (known: {', '.join(sorted(known))})")
        br = opts.get("beta_range", list(DEFAULT_BETA_RANGE))
        if (not isinstance(br, (list, tuple)) or len(br) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) for v in br)
                or not br[0] < br[1]):
            raise ConfigError(f"space.options.beta_range: must be [low, high] with low < high, "
                              f"got {br!r}")
        self.beta_low, self.beta_high = float(br[0]), float(br[1])
        if not self.beta_low <= 1.0 / self.n <= self.beta_high:
            raise ConfigError(f"space.options.beta_range: [{self.beta_low}, {self.beta_high}] "
                              f"must hold the start value 1/N = {1.0 / self.n:.4g}")
        self._names = ([f"alpha.{a}" for a in names] + [f"beta.{a}" for a in names])

    # -- what the optimizer sees ---------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return self._names

    @property
    def alpha_dims(self) -> list[int]:
        return list(range(self.n))

    @property
    def beta_dims(self) -> list[int]:
        return list(range(self.n, 2 * self.n))

    def beta_unit(self, value: float) -> float:
        """A beta value in unit-box coordinates."""
        return (float(value) - self.beta_low) / (self.beta_high - self.beta_low)

    def initial(self) -> np.ndarray:
        return np.concatenate([np.ones(self.n), np.full(self.n, self.beta_unit(1.0 / self.n))])

    def optimizer_extras(self, optimizer: str) -> dict[str, Any]:
        if optimizer_trait(optimizer, "space_extras") != "pool_blocks":
            return {}
        zero = self.beta_unit(0.0) if self.beta_low <= 0.0 <= self.beta_high else 0.0
        return {"alpha_dims": self.alpha_dims, "beta_dims": self.beta_dims,
                "beta_init": self.beta_unit(1.0 / self.n), "beta_zero": zero}

    # -- genome -> recipe -> plan ----------------------------------------------------------
    def control(self, genome: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(alpha, beta) of a genome, rounded as in the recipe."""
        g = self.check_genome(genome)
        alpha = np.round(g[: self.n], DECIMALS)
        beta = np.round(self.beta_low + g[self.n:] * (self.beta_high - self.beta_low), DECIMALS)
        return alpha, beta

    def decode(self, genome: np.ndarray) -> dict[str, Any]:
        alpha, beta = self.control(genome)
        return {
            "merge_method": "evo_lora",
            "adapters": list(self.adapters),
            "alpha": {a: float(v) for a, v in zip(self.adapters, alpha)},
            "beta": {a: float(v) for a, v in zip(self.adapters, beta)},
        }

    def control_of(self, recipe: dict[str, Any]) -> tuple[list[float], list[float]]:
        """(alpha, beta) in this space's adapter order from a recipe, checked."""
        if not isinstance(recipe, dict) or recipe.get("merge_method") != "evo_lora":
            raise ConfigError("recipe: a lora_pool recipe has merge_method: evo_lora")
        if recipe.get("adapters") != self.adapters:
            raise ConfigError(f"recipe.adapters: {recipe.get('adapters')!r} is not this run's "
                              f"pool ({', '.join(self.adapters)})")
        out = []
        for key, (lo, hi) in (("alpha", (0.0, 1.0)), ("beta", (self.beta_low, self.beta_high))):
            d = recipe.get(key)
            if not isinstance(d, dict) or set(d) != set(self.adapters):
                raise ConfigError(f"recipe.{key}: needs one value per adapter")
            vals = []
            for a in self.adapters:
                v = d[a]
                if (isinstance(v, bool) or not isinstance(v, (int, float))
                        or not math.isfinite(v) or not lo <= v <= hi):
                    raise ConfigError(f"recipe.{key}.{a}: {v!r} is not a number in [{lo}, {hi}]")
                vals.append(float(v))
            out.append(vals)
        return out[0], out[1]

    def compile(self, recipe: dict[str, Any]) -> MergePlan:
        alpha, beta = self.control_of(recipe)
        step = TensorStep(
            output=LORA_POOL_OUTPUT,
            op="evo_lora",
            inputs=[TensorRef(a, ADAPTER_TENSOR) for a in self.adapters],
            params={"density": alpha, "weight": beta},
        )
        return MergePlan(
            sources={a: f"{POOL_PREFIX}{a}" for a in self.adapters},
            steps=[step],
            meta={"method": "evo_lora", "recipe": recipe},
        )

    # -- export --------------------------------------------------------------------------
    def export(self, record: dict[str, Any], target: Any, card: dict[str, Any], cfg: Any) -> Path:
        """Download the merged adapter of ``record`` from the provider into ``target``."""
        from ..fitness.backends.pool import export_merged_adapter

        alpha, beta = self.control_of(record["recipe"])
        return export_merged_adapter(self.adapters, alpha, beta, record["recipe"], Path(target),
                                     card, cfg)
