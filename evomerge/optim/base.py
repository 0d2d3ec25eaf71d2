"""The ask/tell contract every optimizer implements (cma, nevergrad, random, m2n2).

Genomes are flat float64 numpy vectors inside the box the search space declares
(``lower``/``upper``). Fitness is *maximized* at this interface (optimizers that minimize
negate internally). Optimizers never import torch and never know about models.

Batch contract (pyribs-style):
- ``ask(n)`` returns up to ``n`` new candidates. A generation-based optimizer (CMA-ES)
  returns at most what is left of the current generation and ``[]`` while it waits for
  tells; a steady-state optimizer always returns ``n``.
- ``tell(results)`` takes results in any order; a generation-based optimizer buffers them
  and updates once its generation is complete, in ask order.
- A failed evaluation is told with ``failed=True``: the optimizer sees a penalty fitness
  (``FAILED_FITNESS``), never a crash and never a dropped candidate.

State is explicit: ``state_dict()`` returns plain data (numbers, strings, lists, numpy
arrays, nested dicts) that a checkpoint stores; ``load_state_dict()`` on a freshly built
optimizer with the same constructor arguments continues exactly: identical next asks.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..registry import Registry

FAILED_FITNESS = -1.0e9


@dataclass
class Candidate:
    id: int
    genome: np.ndarray
    # optimizer bookkeeping that must travel with the candidate (generation, parents...)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    id: int
    fitness: float
    # per-example scores in [0, 1], concatenated over tasks in a fixed order; M2N2 needs them
    per_example: np.ndarray | None = None
    failed: bool = False
    # multi-objective runs: the objective vector (each maximized; per-task means or groups);
    # None when failed or cut by racing (a partial estimate is never a point of a front)
    objectives: np.ndarray | None = None


def is_failed(result: Result) -> bool:
    """A result counts as failed when flagged, or when its fitness is missing or not finite."""
    f = result.fitness
    return bool(result.failed) or f is None or not math.isfinite(float(f))


def effective_fitness(result: Result) -> float:
    """The fitness an optimizer learns from: ``FAILED_FITNESS`` for a failed result."""
    return FAILED_FITNESS if is_failed(result) else float(result.fitness)


def check_box(lower: np.ndarray, upper: np.ndarray, x0: np.ndarray | None = None) -> None:
    """Refuse a search box optimizers cannot work in (one line naming the dimension)."""
    from ..errors import ConfigError

    if lower.ndim != 1 or upper.shape != lower.shape or lower.size == 0:
        raise ConfigError(
            f"search space bounds: lower {lower.shape} and upper {upper.shape} must be equal, "
            "non-empty 1-D vectors")
    for name, v in (("lower", lower), ("upper", upper)):
        if not np.all(np.isfinite(v)):
            raise ConfigError(f"search space bounds: {name} has a non-finite value at dimension "
                              f"{int(np.flatnonzero(~np.isfinite(v))[0])}")
    bad = np.flatnonzero(~(lower < upper))
    if bad.size:
        i = int(bad[0])
        raise ConfigError(f"search space bounds: dimension {i} has lower {lower[i]} >= upper {upper[i]}")
    if x0 is not None:
        if x0.shape != lower.shape:
            raise ConfigError(f"optimizer x0: shape {x0.shape} does not match the space {lower.shape}")
        out = np.flatnonzero(~((x0 >= lower) & (x0 <= upper)))
        if out.size:
            i = int(out[0])
            raise ConfigError(f"optimizer x0: dimension {i} value {x0[i]} is outside "
                              f"[{lower[i]}, {upper[i]}]")


def as_population(initial: Any, lower: np.ndarray, upper: np.ndarray) -> list[np.ndarray]:
    """The ``initial`` genomes an optimizer asks first (e.g. the sources), checked in the box."""
    from ..errors import ConfigError

    if initial is None:
        return []
    pop = [np.asarray(g, dtype=float) for g in initial]
    for i, g in enumerate(pop):
        if g.shape != lower.shape or not np.all((g >= lower) & (g <= upper)):
            raise ConfigError(f"optimizer initial[{i}]: genome of shape {g.shape} is not inside "
                              f"the search box of {lower.shape[0]} dimensions")
    return pop


def int_option(value: Any, field: str, minimum: int) -> int:
    """An integer option (``field`` is its config path), at least ``minimum``."""
    from ..errors import ConfigError

    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{field}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_options(optimizer: str, options: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    """``options`` completed with the defaults in ``known``; an unknown key is a ConfigError."""
    from ..errors import ConfigError

    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"optimizer.options.{unknown[0]}: unknown option for optimizer "
                          f"{optimizer!r} (known: {', '.join(sorted(known)) or 'none'})")
    return {**known, **options}


class Optimizer(ABC):
    """Base class of every optimizer (the contract is the module docstring). Subclasses
    register with :func:`register_optimizer`.

    Args:
        lower, upper: the search box (1-D, ``lower < upper``).
        x0: a start point inside the box, or None.
        sigma0: the initial step size in genome units.
        seed: the optimizer's own RNG seed.
        **options: the optimizer's ``optimizer.options`` from the config.
    """

    #: True when the constructor takes ``budget`` (the run's number of evaluations), for
    #: optimizers that plan with it (nevergrad's NGOpt, staged optimizers)
    needs_budget: bool = False

    #: True when updates happen per generation (results buffered until complete)
    generational: bool = False

    # Capabilities the engine and the spaces read through the registry (see
    # :func:`optimizer_class`), instead of testing optimizer names.
    #: True when the constructor takes ``n_objectives`` (multi-objective optimizers)
    multi_objective: bool = False
    #: True when it learns from every example's score (racing's partial estimates break it)
    needs_per_example: bool = False
    #: True when the constructor takes the space's ``initial_population`` as ``initial``
    takes_initial_population: bool = False
    #: True when the constructor takes ``num_workers`` (the engine's in-flight cap)
    takes_num_workers: bool = False
    #: which of a space's ``optimizer_extras`` it takes: "" (none), "crossover" (the m2n2
    #: space's Gram crossover), "pool_blocks" (a lora_pool's alpha/beta blocks), "dims" (the
    #: dfs space's scaling genes)
    space_extras: str = ""

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray | None = None,
                 sigma0: float = 0.2, seed: int = 0, **options: Any):
        self.lower = np.asarray(lower, dtype=float)
        self.upper = np.asarray(upper, dtype=float)
        self.dim = int(self.lower.shape[0])
        self.x0 = None if x0 is None else np.asarray(x0, dtype=float)
        self.sigma0 = float(sigma0)
        self.seed = int(seed)
        self.options = options

    @abstractmethod
    def ask(self, n: int) -> list[Candidate]: ...

    @abstractmethod
    def tell(self, results: list[Result]) -> None: ...

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def best(self) -> tuple[np.ndarray, float] | None:
        """Optional: the optimizer's own recommendation (genome, fitness)."""
        return None

    def estimate(self) -> np.ndarray | None:
        """Optional: the optimizer's own estimate of the optimum as a genome, which it may
        never have asked (CMA-ES: the mean of its search distribution). The engine scores it
        as a candidate when it selects a run's final model; None when there is none."""
        return None

    def clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(x, dtype=float), self.lower, self.upper)


_OPTIMIZERS: Registry[type[Optimizer]] = Registry(
    "optimizer", "optimizer.name: ", ConfigError, "evomerge.optim.builtin",
    hint=" (or 'ng:<NevergradName>')")


def register_optimizer(name: str) -> Callable[[type[Optimizer]], type[Optimizer]]:
    """Class decorator registering an optimizer under the name users write in YAML."""
    return _OPTIMIZERS.register(name)


def make_optimizer(name: str, **kwargs: Any) -> Optimizer:
    """A new optimizer ``name`` (``ng:<X>`` = nevergrad's optimizer X) built with ``kwargs``.

    Raises:
        ConfigError: unknown name (one line listing the known ones).
    """
    cls = _OPTIMIZERS.find(name)
    if cls is not None:
        return cls(**kwargs)
    if name.startswith(("ng:", "nevergrad:")):
        return _OPTIMIZERS.get("nevergrad")(method=name.split(":", 1)[1], **kwargs)
    return _OPTIMIZERS.get(name)(**kwargs)  # raises: unknown name


def optimizer_class(name: str) -> type[Optimizer] | None:
    """The registered class behind ``name`` (``ng:<X>`` is the nevergrad class), or None."""
    if name.startswith(("ng:", "nevergrad:")):
        name = "nevergrad"
    return _OPTIMIZERS.find(name)


def optimizer_trait(name: str, trait: str) -> Any:
    """A capability class attribute of the optimizer registered as ``name`` (e.g.
    ``needs_per_example``), or None for an unknown name."""
    cls = optimizer_class(name)
    return None if cls is None else getattr(cls, trait)


def list_optimizers() -> list[str]:
    """Every registered optimizer name, sorted."""
    return _OPTIMIZERS.names()
