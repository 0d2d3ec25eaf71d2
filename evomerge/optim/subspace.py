"""``subspace``: any optimizer (``cma``, ``ng:*``, ...) over some coordinates of the genome,
the others held fixed.

Staged black-box merging searches one block of a genome at a time (Evo-Merging: first the
adapters' sparsities, then their scales; LoraHub: only the scales). :class:`Subspace` is the
building block: it builds the *inner* optimizer on the box restricted to ``dims`` (its x0 is
``x0[dims]``), and embeds every genome it asks into a copy of ``fixed`` (default ``x0``), so
the engine and the search space always see full genomes.

Ids, generations and exact state are the inner optimizer's: asks, tells and ``best()`` pass
through (with genomes embedded), ``state_dict`` wraps the inner state with this wrapper's
settings, and ``load_state_dict`` refuses state saved with other dims or fixed values.

Registered as an optimizer too, for direct use::

    optimizer: {name: subspace, options: {dims: [0, 1, 2], inner: cma, inner_options: {...}}}
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import Candidate, Optimizer, Result, check_options, optimizer_class, register_optimizer
from .state import check_header, settings_of

STATE_VERSION = 1


def check_dims(dims: Any, dim: int, field: str) -> list[int]:
    """``dims`` as a sorted list of distinct coordinate indices of a ``dim``-vector."""
    if not isinstance(dims, (list, tuple)) or not dims:
        raise ConfigError(f"{field}: a non-empty list of genome coordinates, got {dims!r}")
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 0 <= d < dim:
            raise ConfigError(f"{field}: {d!r} is not a coordinate of the {dim}-dimensional genome")
        out.append(int(d))
    if len(set(out)) != len(out):
        raise ConfigError(f"{field}: coordinate {next(d for d in out if out.count(d) > 1)} "
                          "is listed twice")
    return sorted(out)


class Subspace:
    """An inner optimizer over ``dims`` of a full genome whose other coordinates are ``fixed``.

    ``lower``/``upper``/``x0``/``fixed`` are full-length; ``inner_options`` go to the inner
    optimizer's constructor (``budget`` only when the inner one takes it)."""

    def __init__(self, inner: str, dims: list[int], lower: np.ndarray, upper: np.ndarray,
                 x0: np.ndarray, sigma0: float, seed: int, fixed: np.ndarray | None = None,
                 budget: int | None = None, **inner_options: Any):
        from .base import make_optimizer

        self.inner_name = inner
        self.dims = list(dims)
        self.fixed = np.array(x0 if fixed is None else fixed, dtype=float)
        idx = np.asarray(self.dims)
        kwargs: dict[str, Any] = dict(lower=np.asarray(lower, dtype=float)[idx],
                                      upper=np.asarray(upper, dtype=float)[idx],
                                      x0=np.asarray(x0, dtype=float)[idx], sigma0=sigma0,
                                      seed=seed, **inner_options)
        cls = optimizer_class(inner)
        if cls is None:
            raise ConfigError(f"optimizer.options.inner: unknown optimizer {inner!r}")
        if cls.needs_budget:
            kwargs["budget"] = budget
        self.opt = make_optimizer(inner, **kwargs)
        self.generational = bool(getattr(self.opt, "generational", False))

    def embed(self, x: np.ndarray) -> np.ndarray:
        g = self.fixed.copy()
        g[self.dims] = x
        return g

    def ask(self, n: int) -> list[Candidate]:
        return [Candidate(c.id, self.embed(c.genome), dict(c.info)) for c in self.opt.ask(n)]

    def tell(self, results: list[Result]) -> None:
        self.opt.tell(results)

    def best(self) -> tuple[np.ndarray, float] | None:
        b = self.opt.best()
        return None if b is None else (self.embed(b[0]), b[1])

    def settings(self) -> dict[str, Any]:
        return {"inner": self.inner_name, "dims": list(self.dims), "fixed": self.fixed.copy()}

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)


class SubspaceDelegate(Optimizer):
    """An optimizer that is one :class:`Subspace` (``self.sub``) plus its own settings
    (``_settings()``): ask/tell/best and the exact state are the subspace's."""

    sub: Subspace

    @abstractmethod
    def _settings(self) -> dict[str, Any]:
        """What the state depends on (checked when a state is loaded)."""

    def ask(self, n: int) -> list[Candidate]:
        return self.sub.ask(n)

    def tell(self, results: list[Result]) -> None:
        self.sub.tell(list(results))

    def best(self) -> tuple[np.ndarray, float] | None:
        return self.sub.best()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": STATE_VERSION, "settings": self._settings(),
                "inner": self.sub.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_header(state, self.kind, STATE_VERSION, self._settings())
        self.sub.load_state_dict(state["inner"])


@register_optimizer("subspace")
class SubspaceOptimizer(SubspaceDelegate):
    """The registered form of :class:`Subspace` (options ``dims``, ``inner``, ``inner_options``,
    ``fixed``: full genome for the other coordinates, default x0)."""

    needs_budget = True
    kind = "subspace"
    space_extras = "dims"

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray | None = None,
                 sigma0: float = 0.2, seed: int = 0, budget: int | None = None, **options: Any):
        super().__init__(lower, upper, x0=x0, sigma0=sigma0, seed=seed, **options)
        opts = check_options(self.kind, options, {"dims": None, "inner": "cma",
                                                  "inner_options": {}, "fixed": None,
                                                  "popsize": None})
        self.dims_ = check_dims(opts["dims"], self.dim, "optimizer.options.dims")
        if not isinstance(opts["inner_options"], dict):
            raise ConfigError("optimizer.options.inner_options: a mapping of the inner "
                              "optimizer's options")
        if opts["inner"] == self.kind:
            raise ConfigError("optimizer.options.inner: a subspace cannot wrap another subspace")
        x0 = (self.lower + self.upper) / 2.0 if self.x0 is None else self.x0
        fixed = x0 if opts["fixed"] is None else np.asarray(opts["fixed"], dtype=float)
        if fixed.shape != (self.dim,) or not np.all((fixed >= self.lower) & (fixed <= self.upper)):
            raise ConfigError(f"optimizer.options.fixed: a genome of {self.dim} values inside the "
                              "search box")
        inner_options = dict(opts["inner_options"])
        if opts["popsize"] is not None:
            inner_options.setdefault("popsize", opts["popsize"])
        self.budget = budget
        self.sub = Subspace(str(opts["inner"]), self.dims_, self.lower, self.upper, x0,
                            self.sigma0, self.seed, fixed=fixed, budget=budget, **inner_options)
        self.generational = self.sub.generational

    def _settings(self) -> dict[str, Any]:
        return settings_of(self, budget=self.budget, **self.sub.settings())

