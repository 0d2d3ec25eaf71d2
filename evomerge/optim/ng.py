"""``nevergrad``: any nevergrad optimizer that supports batched ask/tell, by name.

Use it as ``name: ng:NGOpt`` (or ``ng:TwoPointsDE``, ``ng:PSO``, ``ng:OnePlusOne``,
``ng:DiagonalCMA``, ``ng:CMA``, ``ng:DE``, ...), or ``name: nevergrad`` with
``options: {method: NGOpt}``.

Steady state: ``ask(n)`` returns ``n`` candidates and each tell reaches nevergrad at once,
in the order given. nevergrad's population-based optimizers accept many outstanding asks;
``num_workers`` (default 4; set it to the engine's in-flight cap) is passed to nevergrad,
whose choices depend on it (``NGOpt`` picks Cobyla, a sequential method, for
``num_workers: 1``; MetaModel or CMA otherwise).

Refused with :class:`ConfigError`: optimizers that cannot have two asks outstanding. The
scipy/recast-backed ones (Cobyla, NelderMead, Powell, SQP, BOBYQA, LBFGSB... nevergrad flags
them ``recast``/``no_parallelization``) run the wrapped solver in a thread, and a second ask
before a tell can block forever; Bayesian optimization (BO and relatives) suggests points one
at a time. The check walks the optimizer *as built*, including what NGOpt selects and the
members of portfolios, chains and meta-models, so a wrapper hiding a sequential method is
refused too.

Parametrization: ``ng.p.Array(init=x0, lower, upper)`` (nevergrad keeps values inside with
its bound layer; genomes are also clipped, a no-op), with ``set_mutation(sigma=sigma0)`` so
the step size is in genome units like for the other optimizers. Failed evaluations are told
as the loss ``-FAILED_FITNESS``. ``initial`` genomes are passed to nevergrad's ``suggest`` so
the first asks return them and nevergrad learns from them. ``budget`` (needed by NGOpt and
the one-shot samplers) is the number of evaluations the run will make.

Seeding: ``parametrization.random_state`` is a ``RandomState`` seeded from this optimizer's
own ``Generator``. Some nevergrad code still calls numpy's *global* RNG (MetaModel, parts
of OnePlusOne and DE); every call into nevergrad therefore runs with the global RNG swapped
for a private stream (also seeded from the Generator) and swapped back afterwards, so those
draws are reproducible and the caller's global RNG is untouched. (Not thread safe: do not
drive two nevergrad optimizers from two threads at once.)

Why replay: a nevergrad optimizer's state is an arbitrary object graph (archives, sub-
optimizers, a cma strategy, sklearn models); its own ``dump`` is pickle, which checkpoints
must not use. The state is therefore the constructor settings plus the ordered asks and
tells (:class:`ReplayLog`); ``load_state_dict`` rebuilds the optimizer from the seed and
replays them through the same calls, checking the regenerated genomes against a digest per
ask and raising :class:`RunError` on any difference. Replay costs what nevergrad's own
overhead cost the first time, which grows with the history: for 2,000 evaluations in 20
dimensions, measured in CPU seconds, OnePlusOne 1.3, TwoPointsDE 1.9, PSO 2.6, DiagonalCMA
3.9, NGOpt (which picks CMA there) 4.5; the state is ~80 kB of JSON. That is paid once per
resume and is small next to evaluations that take seconds each; ``cma`` (this package's
direct wrapper, 0.5 s) is the cheaper way to run CMA-ES.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import (
    FAILED_FITNESS,
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

#: model-based optimizers that propose one point at a time (a second ask repeats the first)
_ONE_AT_A_TIME = frozenset({"_BO", "_BayesOptim", "_HyperOpt"})

SUGGESTED = "NGOpt, TwoPointsDE, PSO, OnePlusOne, DiagonalCMA, CMA, DE"


def _nevergrad() -> Any:
    """Import nevergrad on first use (it takes seconds; cma/random users never pay it)."""
    import nevergrad

    return nevergrad


def _sequential_parts(opt: Any) -> list[str]:
    """Names of the parts of a built nevergrad optimizer that cannot run batched."""
    base = _nevergrad().optimizers.base.Optimizer
    found: list[str] = []
    seen: set[int] = set()

    def walk(o: Any) -> None:
        if id(o) in seen:
            return
        seen.add(id(o))
        if hasattr(type(o), "optim"):  # NGOpt family: builds its choice on first access
            o.optim  # noqa: B018
        if o.recast or o.no_parallelization or type(o).__name__ in _ONE_AT_A_TIME:
            found.append(o.name)
        for v in vars(o).values():
            items = v if isinstance(v, (list, tuple)) else [v]
            for x in items:
                if isinstance(x, base) and x is not o:
                    walk(x)

    walk(opt)
    return found


def _sequential_error(method: str, parts: list[str]) -> ConfigError:
    chosen = "" if parts == [method] else f" (it uses {', '.join(parts)})"
    return ConfigError(
        f"optimizer.name: nevergrad {method!r} is sequential{chosen}: it cannot have several "
        f"candidates in flight and could block; use one of {SUGGESTED}, or raise "
        "optimizer.options.num_workers")


@register_optimizer("nevergrad")
class NevergradOptimizer(ReplayOptimizer):
    """A nevergrad optimizer behind the ask/tell contract, resumed by replay.

    Args:
        lower, upper, x0, sigma0, seed, initial: as for :class:`~evomerge.optim.cmaes.CMAES`.
        **options: ``method`` (a nevergrad registry name), ``budget``, ``num_workers``.

    Raises:
        ConfigError: an unknown or sequential method, or a bad option.
    """

    needs_budget = True
    generational = False
    kind = "nevergrad"
    takes_num_workers = True
    state_version = STATE_VERSION

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray | None = None,
                 sigma0: float = 0.2, seed: int = 0, initial: Any = None, **options: Any):
        super().__init__(lower, upper, x0=x0, sigma0=sigma0, seed=seed, **options)
        check_box(self.lower, self.upper, self.x0)
        if not (math.isfinite(self.sigma0) and self.sigma0 > 0):
            raise ConfigError(f"optimizer.sigma0: must be a positive number, got {sigma0!r}")
        if "popsize" in options:
            raise ConfigError("optimizer.popsize: not used by nevergrad optimizers (their "
                              "population sizes are part of the method name)")
        opts = check_options(self.kind, options, {"method": "NGOpt", "budget": None,
                                                  "num_workers": 4})
        self.method = str(opts["method"])
        self.budget = (None if opts["budget"] is None
                       else int_option(opts["budget"], "optimizer.options.budget", 1))
        self.num_workers = int_option(opts["num_workers"], "optimizer.options.num_workers", 1)
        self.initial = as_population(initial, self.lower, self.upper)
        self.init = (self.lower + self.upper) / 2.0 if self.x0 is None else self.x0.copy()
        self._reset()

    # -- construction --------------------------------------------------------------------
    @contextlib.contextmanager
    def _private_global_rng(self) -> Iterator[None]:
        saved = np.random.get_state()
        np.random.set_state(self._global_state)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # nevergrad's budget/efficiency hints
                yield
        finally:
            self._global_state = np.random.get_state()
            np.random.set_state(saved)

    def _reset(self) -> None:
        ng = _nevergrad()
        self._rng = np.random.default_rng(self.seed)
        param_seed, global_seed = (int(s) for s in self._rng.integers(0, 2**32, size=2))
        self._global_state = np.random.RandomState(global_seed).get_state()
        self._reset_log()
        self._ng_pending: dict[int, Any] = {}
        registry = ng.optimizers.registry
        if self.method not in registry:
            close = difflib.get_close_matches(self.method, list(registry), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; e.g. {SUGGESTED}"
            raise ConfigError(f"optimizer.name: unknown nevergrad optimizer {self.method!r}{hint}")
        entry = registry[self.method]
        if getattr(entry, "recast", False) or getattr(entry, "no_parallelization", False):
            raise _sequential_error(self.method, [self.method])
        with self._private_global_rng():
            param = ng.p.Array(init=self.init, lower=self.lower, upper=self.upper)
            param.set_mutation(sigma=self.sigma0)
            param.random_state = np.random.RandomState(param_seed)
            try:
                opt = entry(param, budget=self.budget, num_workers=self.num_workers)
                parts = _sequential_parts(opt)
            except (ValueError, TypeError, AssertionError) as err:
                msg = " ".join(str(err).split()) or type(err).__name__
                if self.budget is None:
                    raise ConfigError(f"optimizer.options.budget: nevergrad {self.method!r} needs "
                                      f"the number of evaluations as its budget ({msg})") from None
                raise ConfigError(f"optimizer.name: nevergrad {self.method!r} cannot be built "
                                  f"for this space: {msg}") from None
            if parts:
                raise _sequential_error(self.method, parts)
            for g in reversed(self.initial):  # nevergrad pops suggestions last-in first-out
                opt.suggest(g.copy())
        self._opt = opt

    @property
    def selected(self) -> str:
        """What nevergrad runs: the method, or what NGOpt chose for this space and budget."""
        o = self._opt
        while hasattr(type(o), "optim"):
            o = o.optim
        return str(o.name)

    # -- ask/tell ------------------------------------------------------------------------
    def _ask(self, n: int) -> list[Candidate]:
        out = []
        with self._private_global_rng():
            for _ in range(max(0, n)):
                try:
                    p = self._opt.ask()
                except AssertionError as err:  # one-shot samplers refuse asks over budget
                    if "budget" not in str(err):
                        raise
                    raise ConfigError(f"optimizer.options.budget: nevergrad {self.method!r} was "
                                      f"asked for more than its budget of {self.budget} "
                                      "candidates") from None
                c = self._book.issue(self.clip(np.asarray(p.value, dtype=float)), {})
                self._ng_pending[c.id] = p
                out.append(c)
        return out

    def _tell(self, told: list[Told]) -> None:
        with self._private_global_rng():
            for t in told:
                self._book.settle_one(t.id, t.fitness, t.failed)
                loss = -FAILED_FITNESS if t.failed else -t.fitness  # nevergrad minimizes
                self._opt.tell(self._ng_pending.pop(t.id), float(loss))

    # -- state ---------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return settings_of(self, method=self.method, budget=self.budget,
                           num_workers=self.num_workers,
                           initial=[g.copy() for g in self.initial])

    def _library(self) -> str:
        return f"nevergrad {_nevergrad().__version__}"

    def _label(self) -> str:
        return f"ng:{self.method}"

    def _divergence_hint(self) -> str:
        return "; this nevergrad method is not reproducible from its seed"
