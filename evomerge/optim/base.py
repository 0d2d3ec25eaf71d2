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

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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


class Optimizer(ABC):
    """Base class. Subclasses register with :func:`register_optimizer`."""

    #: True when updates happen per generation (results buffered until complete)
    generational: bool = False

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

    def clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(x, dtype=float), self.lower, self.upper)


_OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {}


def register_optimizer(name: str) -> Callable[[type[Optimizer]], type[Optimizer]]:
    def deco(cls: type[Optimizer]) -> type[Optimizer]:
        if name in _OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} registered twice")
        _OPTIMIZERS[name] = cls
        return cls

    return deco


def make_optimizer(name: str, **kwargs: Any) -> Optimizer:
    from ..errors import ConfigError
    from . import builtin  # noqa: F401  (registers the built-in optimizers)

    if name in _OPTIMIZERS:
        return _OPTIMIZERS[name](**kwargs)
    if name.startswith("ng:") or name.startswith("nevergrad:"):
        return _OPTIMIZERS["nevergrad"](method=name.split(":", 1)[1], **kwargs)
    raise ConfigError(
        f"optimizer.name: unknown optimizer {name!r}; known: {', '.join(sorted(_OPTIMIZERS))}"
        " (or 'ng:<NevergradName>')"
    )


def list_optimizers() -> list[str]:
    from . import builtin  # noqa: F401

    return sorted(_OPTIMIZERS)
