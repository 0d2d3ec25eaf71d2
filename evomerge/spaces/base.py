"""Search spaces: a flat genome for the optimizer, a readable recipe for the user.

Every space maps ``genome (numpy vector in [0, 1]^dim) -> recipe (dict, mergekit-style YAML)
-> MergePlan``. The optimizer only sees the unit box; bounds and transforms (ranges, rounding,
softmax) live in the space, so the same optimizer serves every space. The decoded recipe is
what gets stored in the evaluation log and exported next to merged checkpoints, and
``evomerge merge`` can rebuild the exact weights from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import SpaceConfig
from ..errors import ConfigError
from ..plan import MergePlan
from ..registry import Registry

BASELINE_KINDS = ("initial", "experts", "task_arithmetic", "ties")


@dataclass
class Baseline:
    """One untuned merge: a label users read, its kind, its recipe (and genome if it has one)."""

    label: str
    kind: str
    recipe: dict[str, Any]
    genome: np.ndarray | None = None


class SearchSpace(ABC):
    #: default CMA-ES step size in unit-box coordinates (Sakana's paper uses 1/6)
    sigma0: float = 1.0 / 6.0
    #: black-box spaces (weights held by a provider or behind APIs) set this and implement
    #: :meth:`export`; their plans are control plans that a remote party carries out
    remote: bool = False

    def __init__(self, cfg: SpaceConfig, models: dict[str, str], base: str | None,
                 seed: int = 0, dtype: str | None = None):
        self.cfg = cfg
        self.models = dict(models)
        self.base = base
        self.seed = int(seed)
        self.dtype = dtype
        self.experts = [k for k in self.models if k != base]
        if not self.experts:
            raise ConfigError("models: the search needs at least one model besides base_model")

    # -- what the optimizer sees ---------------------------------------------------------
    @property
    @abstractmethod
    def names(self) -> list[str]:
        """One readable name per genome coordinate."""

    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def lower(self) -> np.ndarray:
        return np.zeros(self.dim)

    @property
    def upper(self) -> np.ndarray:
        return np.ones(self.dim)

    @abstractmethod
    def initial(self) -> np.ndarray:
        """The starting genome (x0) in the unit box."""

    def initial_population(self) -> list[np.ndarray] | None:
        """Genomes reproducing the sources, for optimizers that start from them (M2N2)."""
        return None

    def optimizer_extras(self, optimizer: str) -> dict[str, Any]:
        """Extra constructor arguments a space gives a particular optimizer (M2N2's crossover)."""
        return {}

    def backend_options(self, backend: str) -> dict[str, Any]:
        """Options the space needs from the fitness backend (DFS: room for its longest path)."""
        return {}

    def fitness_penalty(self, recipe: dict[str, Any]) -> float:
        """Subtracted from a candidate's fitness (DFS: a price on path length); 0 by default."""
        return 0.0

    def baselines(self, kinds: list[str] | tuple[str, ...] = BASELINE_KINDS) -> list[Baseline]:
        """The untuned merges a user would try without search, as far as the sources allow:
        ``initial`` (the space's starting genome), ``experts`` (each expert alone),
        ``task_arithmetic`` (uniform, weight 1 each) and ``ties`` (density 0.5, weight 1),
        the last two only with a base model. Black-box spaces only have their initial point
        (their sources live with a provider). The engine evaluates these as ordinary
        candidates at the start of a run (engine/baselines.py)."""
        out: list[Baseline] = []
        if "initial" in kinds:
            g = self.initial()
            out.append(Baseline("initial point", "initial", self.decode(g), g))
        if self.remote:
            return out
        head: dict[str, Any] = {"sources": dict(self.models)}
        if self.dtype:
            head["dtype"] = self.dtype
        if "experts" in kinds:
            for e in self.experts:
                out.append(Baseline(f"expert {e}", "experts", {
                    **head, "merge_method": "linear", "tokenizer_source": e,
                    "models": [{"model": e, "parameters": {"weight": 1.0}}]}))
        if self.base is not None and len(self.experts) >= 1:
            if "task_arithmetic" in kinds:
                out.append(Baseline("task arithmetic (uniform, w=1)", "task_arithmetic", {
                    **head, "merge_method": "task_arithmetic", "base_model": self.base,
                    "tokenizer_source": "base",
                    "models": [{"model": e, "parameters": {"weight": 1.0}} for e in self.experts]}))
            if "ties" in kinds:
                out.append(Baseline("TIES (density 0.5, w=1)", "ties", {
                    **head, "merge_method": "ties", "base_model": self.base,
                    "tokenizer_source": "base",
                    "models": [{"model": e, "parameters": {"weight": 1.0, "density": 0.5}}
                               for e in self.experts]}))
        return out

    # -- genome -> recipe -> plan ----------------------------------------------------------
    @abstractmethod
    def decode(self, genome: np.ndarray) -> dict[str, Any]:
        """Readable recipe (mergekit-style dict) for a genome."""

    def compile(self, recipe: dict[str, Any]) -> MergePlan:
        """MergePlan of a recipe from outside this process (a run's log, a file): it is
        normalized and checked as user YAML first."""
        from ..recipe import compile_recipe

        return compile_recipe(recipe)

    def compile_decoded(self, recipe: dict[str, Any]) -> MergePlan:
        """MergePlan of a recipe :meth:`decode` just built, in this process: the same plan,
        hash and ``meta`` as :meth:`compile`, without normalizing the recipe again (see
        :mod:`evomerge.recipe.built`). A space with its own :meth:`compile` uses that."""
        if type(self).compile is not SearchSpace.compile:
            return self.compile(recipe)
        from ..recipe import compile_built

        return compile_built(recipe)

    def plan(self, genome: np.ndarray) -> MergePlan:
        return self.compile_decoded(self.decode(genome))

    def export(self, record: dict[str, Any], target: Any, card: dict[str, Any], cfg: Any) -> Any:
        """Export one evaluated candidate of a remote space to folder ``target``; returns it.

        Local spaces are exported by materializing their plan (engine/export.py)."""
        raise ConfigError(f"space {self.cfg.type!r} has no remote export")

    def check_genome(self, genome: np.ndarray) -> np.ndarray:
        g = np.asarray(genome, dtype=float).reshape(-1)
        if g.shape[0] != self.dim:
            raise ConfigError(f"genome has {g.shape[0]} values, space {self.cfg.type!r} has {self.dim}")
        return np.clip(g, 0.0, 1.0)

    def _recipe_header(self, method: str) -> dict[str, Any]:
        r: dict[str, Any] = {"merge_method": method, "sources": dict(self.models)}
        if self.base is not None:
            r["base_model"] = self.base
            r["tokenizer_source"] = "base"
        if self.dtype:
            r["dtype"] = self.dtype
        r["seed"] = self.seed
        return r


SPACES: Registry[type[SearchSpace]] = Registry(
    "search space", "space.type: ", ConfigError, "evomerge.spaces.builtin")


def register_space(name: str):
    """Class decorator registering a search space under the ``space.type`` users write."""
    return SPACES.register(name)


def make_space(cfg: SpaceConfig, models: dict[str, str], base: str | None, seed: int = 0,
               dtype: str | None = None) -> SearchSpace:
    cls = SPACES.get(cfg.type)
    return cls(cfg, models, base, seed=seed, dtype=dtype)


def num_layers_of(path: str) -> int:
    from ..checkpoint import open_checkpoint

    return open_checkpoint(path).layout.num_layers


def layer_groups(num_layers: int, groups: int | str) -> list[list[int]]:
    """Split layers 0..L-1 into contiguous groups ("layer" = one group per layer)."""
    g = num_layers if groups == "layer" else int(groups)
    if g < 1 or g > num_layers:
        raise ConfigError(f"space.layer_groups: {groups} groups for a model with {num_layers} layers")
    bounds = np.linspace(0, num_layers, g + 1).round().astype(int)
    return [list(range(bounds[i], bounds[i + 1])) for i in range(g)]
