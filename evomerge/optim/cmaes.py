"""``cma`` and ``sep-cma``: CMA-ES through the ``cma`` library, generation by generation.

Generational contract: a generation of ``popsize`` genomes (default ``4 + floor(3 ln n)``,
cma's own default, used whenever ``popsize`` is not given: fitness here is a noisy mean over
examples, and a population that grows with the dimension averages more of that noise into
each update than a fixed small one; :meth:`CMAES.estimate`, the distribution mean, is the
run's less noisy estimate of the optimum, scored at selection time) is sampled at once on the first ask after the previous generation
completed; ``ask(n)`` hands out at most what is left of it and ``[]`` while waiting. Tells
arrive in any order and are buffered; once the whole generation is told, cma is told in ask
order. So the sequence of genomes does not depend on the order results arrive in, nor on how
many workers evaluate them (``ask(1)`` ten times gives the same ten genomes as ``ask(10)``).

Randomness: cma's default sampler draws from numpy's *global* RNG. Here the option ``randn``
is bound to this optimizer's own ``numpy.random.Generator`` (seeded with ``seed``) and
``seed=nan`` stops cma from reseeding the global RNG, so two optimizers (or a test that
touches ``np.random``) never disturb each other. Nothing else in cma's ask/tell path draws
random numbers (checked in cma 4.5's source). Restarts (IPOP) draw their new ``x0`` from the
same Generator.

Bounds: cma's ``BoundTransform`` (its default boundary handler) maps the unbounded internal
search point smoothly into ``[lower, upper]`` (the identity away from the bounds), so every
asked genome is inside the box and cma is told exactly the points it produced, with no repair
step that would bias the update. The genome handed out is additionally clipped to the box,
a no-op except for rounding at the very edge. ``x0`` defaults to the box center; ``sigma0``
is in genome units (cma's ``maxstd_boundrange`` caps the std at 1/3 of each range).

Diagonal / separable CMA-ES: option ``diagonal: true`` (cma's ``CMA_diagonal=True``, a
diagonal covariance with the faster learning rates of sep-CMA-ES), or the name ``sep-cma``.

Step size: CSA (cumulative step-size adaptation) always, option ``step_size_rule: csa``
(default), ``tpa`` or ``auto`` (cma's own choice). pycma >= 4.5 switches to TPA from 300
dimensions on ("auto"), and TPA collapses sigma on plateau-rich accuracy landscapes: on the
M2N2 digits problem (benchmarks/m2n2_digits.py) it stalled at 59.4% where CSA reached 87.8%.
Below 300 dimensions "csa" and "auto" are the same strategy.

Options: ``popsize``, ``diagonal``, ``step_size_rule``, ``restarts`` (IPOP restarts after
one of cma's termination criteria fires, default 0: keep going with the same strategy), ``incpopsize``
(population factor per restart, default 2), ``cma_options`` (any other ``cma.CMAOptions``
entry, e.g. ``{CMA_stds: [...], tolflatfitness: 10}``; the ones this class owns are refused).
``initial`` genomes (e.g. the sources) are injected through cma's ``inject`` (a population's
worth per generation), so they are the first genomes asked and cma learns from them as from
its own samples.

Why replay instead of explicit fields: a ``CMAEvolutionStrategy`` holds much more than
mean, sigma, C, B, D, pc and ps (the sampler's eigendecomposition schedule, the step-size
adapter's state, recombination weights, fitness histories for its termination criteria,
injected-solution bookkeeping, the boundary handler...), and which of those matter changes
between cma versions; copying a subset risks a resumed run that differs in a late digit,
and pickling it is not allowed. Instead the state is the constructor settings plus the
ordered log of asks and tells (:class:`ReplayLog`). ``load_state_dict`` rebuilds the
strategy from the seed and replays the log through the same code path, checking after every
ask that the regenerated genomes are the logged ones (a digest per ask), and raises
:class:`RunError` if not (another cma version, or nondeterminism). Cost: replaying 2,000
evaluations in 20 dimensions took 0.3-0.5 s of CPU (0.6-1.4 s wall on a loaded 2-core
machine; tests/optim/test_optim.py checks it); the state of such a run is ~80 kB of JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import (
    Candidate,
    as_population,
    check_box,
    check_options,
    int_option,
    register_optimizer,
)
from .replay import ReplayOptimizer
from .state import Told, settings_of

STATE_VERSION = 1

_STEP_SIZE_RULES = ("csa", "tpa", "auto")
#: cma options this class sets itself; a user's ``cma_options`` may not override them
_OWNED = frozenset({
    "AdaptSigma", "popsize", "popsize_factor", "bounds", "BoundaryHandler", "randn", "seed", "CMA_diagonal",
    "verbose", "verb_log", "verb_disp", "verb_plot", "verb_filenameprefix", "verb_append",
    "signals_filename", "maxiter", "maxfevals", "timeout", "termination_callback",
    "verb_time",
})

#: stop reasons that only reflect budgets we do not hand to cma (never restart on them)
_NOT_CONVERGENCE = frozenset({"maxiter", "maxfevals", "timeout", "callback", "ftarget"})


def default_popsize(dim: int) -> int:
    """cma's default population size, ``4 + floor(3 ln n)``."""
    return 4 + int(math.floor(3 * math.log(dim)))


@dataclass
class _Generation:
    index: int
    restart: int
    X: list[np.ndarray]  # exactly what cma's ask returned (told back unchanged)
    genomes: list[np.ndarray]  # clipped copies handed out
    ids: list[int] = field(default_factory=list)  # id of member j, in ask order
    fitness: dict[int, float] = field(default_factory=dict)  # member position -> fitness

    @property
    def size(self) -> int:
        return len(self.X)


@register_optimizer("cma")
class CMAES(ReplayOptimizer):
    """CMA-ES through the ``cma`` library, one generation at a time, resumed by replay.

    Args:
        lower, upper: the search box.
        x0: the start mean (default: the box center).
        sigma0: the initial step size in genome units.
        seed: seeds this optimizer's own Generator (cma's sampler and restarts).
        initial: genomes injected first (e.g. the sources).
        **options: ``popsize``, ``diagonal``, ``step_size_rule``, ``restarts``,
            ``incpopsize``, ``cma_options`` (see the module docstring).

    Raises:
        ConfigError: a bad box, step size or option.
    """

    generational = True
    kind = "cma"
    state_version = STATE_VERSION
    _diagonal_default = False

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray | None = None,
                 sigma0: float = 0.2, seed: int = 0, initial: Any = None, **options: Any):
        super().__init__(lower, upper, x0=x0, sigma0=sigma0, seed=seed, **options)
        check_box(self.lower, self.upper, self.x0)
        if not (math.isfinite(self.sigma0) and self.sigma0 > 0):
            raise ConfigError(f"optimizer.sigma0: must be a positive number, got {sigma0!r}")
        known: dict[str, Any] = {"popsize": None, "restarts": 0, "incpopsize": 2.0,
                                 "cma_options": {}, "step_size_rule": "csa"}
        if self.kind == "cma":
            known["diagonal"] = False
        opts = check_options(self.kind, options, known)
        self.popsize = (default_popsize(self.dim) if opts["popsize"] is None
                        else int_option(opts["popsize"], "optimizer.popsize", 2))
        self.diagonal = opts.get("diagonal", self._diagonal_default)
        if not isinstance(self.diagonal, bool):
            raise ConfigError(f"optimizer.options.diagonal: must be true or false, got "
                              f"{self.diagonal!r}")
        self.step_size_rule = opts["step_size_rule"]
        if self.step_size_rule not in _STEP_SIZE_RULES:
            raise ConfigError(f"optimizer.options.step_size_rule: {self.step_size_rule!r} is not one of "
                              f"{', '.join(_STEP_SIZE_RULES)}")
        self.restarts = int_option(opts["restarts"], "optimizer.options.restarts", 0)
        inc = opts["incpopsize"]
        if isinstance(inc, bool) or not isinstance(inc, (int, float)) or not inc >= 1.0:
            raise ConfigError(f"optimizer.options.incpopsize: must be a number >= 1, got {inc!r}")
        self.incpopsize = float(inc)
        if not isinstance(opts["cma_options"], dict):
            raise ConfigError("optimizer.options.cma_options: must be a mapping of cma options")
        self.cma_options = dict(opts["cma_options"] or {})
        clash = sorted(set(self.cma_options) & _OWNED)
        if clash:
            raise ConfigError(f"optimizer.options.cma_options.{clash[0]}: set by evomerge itself; "
                              "use the optimizer's own options instead")
        self.initial = as_population(initial, self.lower, self.upper)
        self.mean0 = (self.lower + self.upper) / 2.0 if self.x0 is None else self.x0.copy()
        self._reset()

    # -- construction --------------------------------------------------------------------
    def _randn(self, *shape: int) -> np.ndarray:
        return self._rng.standard_normal(shape)

    def _new_strategy(self, x0: np.ndarray, popsize: int) -> Any:
        import cma
        from cma.sigma_adaptation import CMAAdaptSigmaCSA, CMAAdaptSigmaTPA

        rule = {"csa": CMAAdaptSigmaCSA, "tpa": CMAAdaptSigmaTPA, "auto": True}[self.step_size_rule]
        inopts = {
            "popsize": popsize,
            "bounds": [self.lower.tolist(), self.upper.tolist()],
            "BoundaryHandler": cma.BoundTransform,
            "randn": self._randn,
            "seed": np.nan,  # never touch numpy's global RNG
            "CMA_diagonal": True if self.diagonal else 0,
            "AdaptSigma": rule,
            "verbose": -9, "verb_log": 0, "verb_disp": 0, "verb_time": False,
            "signals_filename": "",  # never read option changes from a file in the cwd
            "maxiter": np.inf, "maxfevals": np.inf,  # the engine owns the budget
            **self.cma_options,
        }
        try:
            return cma.CMAEvolutionStrategy(x0.tolist(), self.sigma0, inopts)
        except ValueError as err:
            first = str(err).splitlines()[0]
            raise ConfigError(f"optimizer.options.cma_options: cma refused the options: {first}") from None

    def _reset(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._reset_log()
        self._restart = 0
        self._generation = 0
        self._gen: _Generation | None = None
        self._es = self._new_strategy(self.mean0, self.popsize)
        self._to_inject = [g.copy() for g in self.initial]

    # -- ask -----------------------------------------------------------------------------
    def _ask(self, n: int) -> list[Candidate]:
        if n <= 0:
            return []
        if self._gen is None:
            if self._to_inject:  # at most one generation's worth per generation
                k = self._es.popsize
                bh = self._es.boundary_handler
                self._es.inject([np.asarray(bh.inverse(g), dtype=float)
                                 for g in self._to_inject[:k]], force=True)
                self._to_inject = self._to_inject[k:]
            X = self._es.ask()
            self._gen = _Generation(self._generation, self._restart, X,
                                    [self.clip(x) for x in X])
        g = self._gen
        start = len(g.ids)
        out = []
        for j in range(start, min(g.size, start + n)):
            c = self._book.issue(g.genomes[j], {"generation": g.index, "restart": g.restart,
                                                "member": j})
            g.ids.append(c.id)
            out.append(c)
        return out

    # -- tell ----------------------------------------------------------------------------
    def _tell(self, told: list[Told]) -> None:
        for t in told:
            self._book.settle_one(t.id, t.fitness, t.failed)
            g = self._gen
            assert g is not None and t.id in g.ids, "pending ids belong to the current generation"
            g.fitness[g.ids.index(t.id)] = t.fitness
            if len(g.fitness) == g.size:
                self._complete(g)

    def _complete(self, g: _Generation) -> None:
        # cma minimizes: fitness is negated, in ask order regardless of arrival order
        self._es.tell(g.X, [-g.fitness[j] for j in range(g.size)])
        self._gen = None
        self._generation += 1
        if self._restart < self.restarts:
            stop = sorted(k for k in self._es.stop() if k not in _NOT_CONVERGENCE)
            if stop:
                self._restart += 1
                popsize = int(round(self.popsize * self.incpopsize ** self._restart))
                self._es = self._new_strategy(self._rng.uniform(self.lower, self.upper), popsize)

    # -- inspection ----------------------------------------------------------------------
    @property
    def generation(self) -> int:
        """Number of completed generations (over all restarts)."""
        return self._generation

    @property
    def sigma(self) -> float:
        """The current overall step size of the strategy (genome units)."""
        return float(self._es.sigma)

    def estimate(self) -> np.ndarray:
        """The distribution mean: CMA-ES's estimate of the optimum (less noisy than the best
        sample, which won a noisy comparison)."""
        return self.mean

    @property
    def mean(self) -> np.ndarray:
        """The current mean of the search distribution, mapped into the box."""
        return self.clip(self._es.boundary_handler.transform(np.asarray(self._es.mean)))

    # -- state ---------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return settings_of(self, popsize=self.popsize, diagonal=self.diagonal,
                           step_size_rule=self.step_size_rule,
                           restarts=self.restarts, incpopsize=self.incpopsize,
                           cma_options=dict(self.cma_options),
                           initial=[g.copy() for g in self.initial])

    def _library(self) -> str:
        import cma

        return f"cma {cma.__version__}"

    def _extra_state(self) -> dict[str, Any]:
        # derived from the log; kept for checking the replay and for humans
        return {"generation": self._generation, "restart": self._restart}


@register_optimizer("sep-cma")
class SepCMAES(CMAES):
    """Separable CMA-ES: a diagonal covariance (``CMA_diagonal=True``), linear cost in n."""

    kind = "sep-cma"
    _diagonal_default = True
