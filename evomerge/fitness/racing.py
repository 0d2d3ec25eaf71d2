"""Racing: stop scoring a candidate as soon as it provably cannot beat the best so far.

Most candidates of a search are worse than the best one already found, and a first slice of
the examples usually shows it. :func:`evaluate_racing` scores a candidate on a first slice
of every task (``first_fraction`` of its examples), bounds the fitness the *full* evaluation
could still reach, and finishes the evaluation only when that bound is at least
``best_so_far``. A candidate that is cut comes back flagged, with its partial mean; it must
never be taken for a full score (see "Engine contract" below).

The bound. The fitness is the weighted mean of task means, ``F = sum_t a_t mu_t`` with
``a_t = w_t / sum w`` and ``mu_t`` the mean of the ``n_t`` per-example scores in [0, 1] of
task ``t``. Each task's examples are visited in a fixed pseudo-random order (seeded per
task name, the same for every candidate), so the first ``m_t`` examples are a sample
without replacement from the ``n_t``. Serfling's inequality bounds each sample mean's
moment generating function with the finite-population factor ``1 - (m_t - 1)/n_t``;
the tasks' orders are independent, so for the weighted sum of sample means ``F^``::

    P(F >= F^ + eps) <= exp(-2 eps^2 / sum_t a_t^2 (1 - (m_t - 1)/n_t) / m_t)

Setting the right side to ``delta = 1 - confidence`` gives ``eps`` (Hoeffding-Serfling).
The upper bound used is ``min(F^ + eps, F_max)`` where ``F_max`` scores every unseen
example 1 (a certain bound). With several checkpoints (``stages``) the union bound splits
``delta`` evenly. ``bound="bernstein"`` uses instead an empirical Bernstein-Serfling bound
per task (Bardenet & Maillard 2015), whose width follows the sample's standard deviation
plus a ``1/m`` term: tighter for low-variance scores (``neg_perplexity``) on slices of
~1000+ examples, looser than Hoeffding on small ones. A candidate whose true full fitness is >= ``best_so_far`` is therefore
cut with probability at most ``delta`` (over the choice of orders); a clearly worse one is
cut after the first slice.

Engine contract (what a search loop must do with a :class:`RaceResult`):

- pass ``best_so_far`` = the best *complete* fitness so far (None: no racing yet, the
  candidate is evaluated in full);
- a complete result is an ordinary full score: log it, cache it by plan hash, tell it;
- a cut result (``complete`` False) is logged with ``racing_cut: true``, its partial mean
  and ``upper_bound``, and told to the optimizer with fitness ``result.fitness`` (the
  partial mean; it is below ``best_so_far`` with the stated confidence, so ranking
  optimizers see it as worse than the best). It is NOT put in the fitness cache as a
  full score and can never become the best; a later request for the same plan is
  re-raced (or finished) against the best at that time;
- per-example algorithms (M2N2) need every example's score: racing is for scalar-fitness
  optimizers only (a cut result's unseen examples are NaN);
- keep a :class:`RaceLedger` in the run state to report example evaluations saved;
- scores must lie in [0, 1]: ``loglik`` tasks race in their ``prob`` form (``exp`` of the
  mean or summed log-probability); raw ``logprob`` tasks are refused
  (:func:`check_racing_tasks`, also called when a run starts).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError
from .tasks import Task

RACE_FORMAT = 1


@dataclass
class RaceResult:
    """One candidate's racing outcome.

    ``scores``: per task, per-example scores in the task's original example order; when
    the candidate was cut, examples never evaluated are NaN. ``fitness``: the full combined
    fitness when ``complete``, else the partial estimate (weighted mean of the evaluated
    examples' task means). ``upper_bound``: the bound that decided (the fitness itself when
    complete).
    """

    scores: dict[str, np.ndarray]
    complete: bool
    fitness: float
    upper_bound: float
    evaluated: int
    total: int
    stages_run: int
    best_so_far: float | None = None

    @property
    def cut(self) -> bool:
        return not self.complete

    @property
    def saved(self) -> int:
        """Example evaluations not spent on this candidate."""
        return self.total - self.evaluated

    def to_dict(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "racing_cut": self.cut,
            "fitness": self.fitness,
            "upper_bound": self.upper_bound,
            "evaluated": self.evaluated,
            "total": self.total,
            "saved": self.saved,
            "stages_run": self.stages_run,
            "best_so_far": self.best_so_far,
        }


@dataclass
class RaceLedger:
    """Running totals over a search: how many example evaluations racing saved."""

    candidates: int = 0
    cut: int = 0
    evaluated: int = 0
    full_cost: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    keep_history: bool = False

    def record(self, result: RaceResult) -> None:
        self.candidates += 1
        self.cut += int(result.cut)
        self.evaluated += result.evaluated
        self.full_cost += result.total
        if self.keep_history:
            self.history.append(result.to_dict())

    @property
    def saved(self) -> int:
        return self.full_cost - self.evaluated

    @property
    def fraction_saved(self) -> float:
        return self.saved / self.full_cost if self.full_cost else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates,
            "cut": self.cut,
            "evaluated": self.evaluated,
            "full_cost": self.full_cost,
            "saved": self.saved,
            "fraction_saved": self.fraction_saved,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"format": RACE_FORMAT, **self.summary(), "history": list(self.history),
                "keep_history": self.keep_history}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != RACE_FORMAT:
            raise ConfigError(f"racing ledger: unsupported state format {state.get('format')!r}")
        self.candidates = int(state["candidates"])
        self.cut = int(state["cut"])
        self.evaluated = int(state["evaluated"])
        self.full_cost = int(state["full_cost"])
        self.history = list(state.get("history", []))
        self.keep_history = bool(state.get("keep_history", False))


# -- the bound ----------------------------------------------------------------------------


def hoeffding_serfling_eps(weights: Sequence[float], seen: Sequence[int], sizes: Sequence[int], delta: float) -> float:
    """``eps`` with ``P(F >= F^ + eps) <= delta`` for normalized ``weights`` (see module doc).

    Tasks with nothing seen make the statistical bound useless (infinite ``eps``)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    var = 0.0
    for a, m, n in zip(weights, seen, sizes):
        if a == 0.0:
            continue
        if m <= 0:
            return math.inf
        var += a * a * max(0.0, 1.0 - (m - 1) / n) / m
    return math.sqrt(math.log(1.0 / delta) * var / 2.0)


def bernstein_serfling_ucb(x: np.ndarray, n: int, delta: float) -> float:
    """Upper bound on the mean of ``n`` values in [0, 1] from a sample ``x`` drawn without
    replacement, holding with probability >= 1 - delta (empirical Bernstein-Serfling,
    Bardenet & Maillard 2015, Thm. 3). Tight when the scores vary little (likelihoods,
    near-constant tasks), where Hoeffding's range-only bound is loose."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    m = int(x.size)
    if m < 2:
        return 1.0
    f = m / n
    rho = 1.0 - (m - 1) / n if f <= 0.5 else (1.0 - f) * (1.0 + 1.0 / m)
    log_term = math.log(5.0 / delta)
    kappa = 7.0 / 3.0 + 3.0 / math.sqrt(2.0)
    return float(x.mean()) + float(x.std()) * math.sqrt(2.0 * rho * log_term / m) + kappa * log_term / m


BOUNDS = ("hoeffding", "bernstein")


def upper_confidence_bound(
    observed: Mapping[str, np.ndarray],
    sizes: Mapping[str, int],
    weights: Mapping[str, float],
    delta: float,
    bound: str = "hoeffding",
) -> tuple[float, float]:
    """``(estimate, upper bound)`` of the full combined fitness from the scores seen so far.

    ``observed[t]``: the scores of task ``t``'s examples evaluated so far (a sample without
    replacement of its ``sizes[t]`` examples); ``weights``: task weights (any scale).
    ``bound``: "hoeffding" (one Hoeffding-Serfling bound on the weighted sum) or
    "bernstein" (an empirical Bernstein-Serfling bound per task at ``delta / tasks``,
    combined by the union bound). Either is clipped by the certain bound.
    """
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; use one of {', '.join(BOUNDS)}")
    total_w = float(sum(weights.values()))
    if not total_w > 0:
        raise ValueError("task weights must sum to a positive number")
    names = list(weights)
    a = [float(weights[t]) / total_w for t in names]
    n_weighted = sum(1 for at in a if at > 0)
    est, certain, bern = 0.0, 0.0, 0.0
    seen, ns = [], []
    for t, at in zip(names, a):
        x = np.asarray(observed.get(t, np.empty(0)), dtype=np.float64)
        n, m = int(sizes[t]), int(x.size)
        if m > n:
            raise ValueError(f"task {t}: {m} scores observed for {n} examples")
        s = float(x.sum())
        est += at * (s / m if m else 0.0)
        certain_t = (s + (n - m)) / n  # every unseen example scores 1
        certain += at * certain_t
        if bound == "bernstein" and at > 0:
            bern += at * min(certain_t, bernstein_serfling_ucb(x, n, delta / n_weighted))
        seen.append(m)
        ns.append(n)
    if bound == "bernstein":
        return est, min(certain, bern)
    eps = hoeffding_serfling_eps(a, seen, ns, delta)
    return est, min(certain, est + eps)


# -- orders and slices --------------------------------------------------------------------


def example_order(task_name: str, n: int, seed: int = 0) -> np.ndarray:
    """The fixed pseudo-random visiting order of a task's ``n`` examples (same for every
    candidate, so slices are paired across candidates)."""
    digest = hashlib.sha256(f"{int(seed)}:{task_name}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.permutation(n)


def _sliced(task: Task, split: str, idx: np.ndarray) -> Task:
    examples = task.examples(split)
    return Task(spec=task.spec, path=task.path, splits={split: [examples[i] for i in idx]}, weight=task.weight)


def _cuts(n: int, fractions: Sequence[float], min_examples: int) -> list[int]:
    """Number of examples seen after each stage (strictly increasing, last = n)."""
    out: list[int] = []
    for f in fractions:
        m = min(n, max(min_examples, math.ceil(f * n)))
        if m < n and (not out or m > out[-1]):
            out.append(m)
    out.append(n)
    return out


def evaluate_racing(
    backend: Any,
    tasks: Sequence[Task],
    best_so_far: float | None,
    confidence: float = 0.95,
    first_fraction: float = 0.25,
    *,
    split: str = "search",
    stages: Sequence[float] | None = None,
    seed: int = 0,
    min_examples: int = 1,
    bound: str = "hoeffding",
    front: Sequence[Sequence[float]] | None = None,
    groups: Sequence[Sequence[str]] | None = None,
) -> RaceResult:
    """Score ``tasks`` with ``backend`` (weights already loaded), racing against ``best_so_far``.

    Multi-objective runs pass ``front`` (the complete evaluations' non-dominated objective
    vectors) and ``groups`` (each objective's tasks): the candidate is then cut only when a
    front point beats its per-objective upper bound on every objective (Pareto-aware: a
    candidate that could still be non-dominated is never cut); :func:`pareto_cut`.

    ``stages``: fractions of each task's examples after which to check (default
    ``[first_fraction]``); the candidate is cut at the first check whose upper confidence
    bound (at ``confidence``, split over the checks) is below ``best_so_far``. With
    ``best_so_far`` None every example is scored in one call. ``bound``: "hoeffding"
    (default) or "bernstein" (variance-adaptive: tighter once a slice holds ~1000 or more
    low-variance scores such as neg_perplexity; on small slices its constant term makes it
    looser than Hoeffding).
    """
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"racing.confidence: must be in (0, 1), got {confidence}")
    fractions = list(stages) if stages is not None else [first_fraction]
    if not fractions or any(not 0.0 < f < 1.0 for f in fractions) or fractions != sorted(fractions):
        raise ConfigError(f"racing.stages / first_fraction: increasing fractions in (0, 1) expected, got {fractions}")
    if min_examples < 1:
        raise ConfigError(f"racing.min_examples: must be >= 1, got {min_examples}")
    if bound not in BOUNDS:
        raise ConfigError(f"racing.bound: unknown bound {bound!r}; use one of {', '.join(BOUNDS)}")
    if not tasks:
        raise ConfigError("racing: no tasks")
    check_racing_tasks(tasks)
    weights = {t.name: float(t.weight) for t in tasks}
    sizes = {t.name: len(t.examples(split)) for t in tasks}
    total = sum(sizes.values())

    if best_so_far is None:
        raw = backend.evaluate(list(tasks), split=split)
        scores = {t.name: np.asarray(raw[t.name], dtype=np.float64) for t in tasks}
        fit = _combined(scores, weights)
        return RaceResult(scores, True, fit, fit, total, total, 1, None)

    orders = {t.name: example_order(t.name, sizes[t.name], seed) for t in tasks}
    cuts = {t.name: _cuts(sizes[t.name], fractions, min_examples) for t in tasks}
    n_checks = max(len(c) for c in cuts.values()) - 1
    delta = (1.0 - confidence) / max(1, n_checks)
    scores = {t.name: np.full(sizes[t.name], np.nan) for t in tasks}
    done = {t.name: 0 for t in tasks}
    stage = 0
    while True:
        batch = []
        for t in tasks:
            c = cuts[t.name]
            target = c[min(stage, len(c) - 1)]
            if target > done[t.name]:
                batch.append((t, orders[t.name][done[t.name]:target]))
        if batch:
            raw = backend.evaluate([_sliced(t, split, idx) for t, idx in batch], split=split)
            for t, idx in batch:
                got = np.asarray(raw[t.name], dtype=np.float64)
                assert got.shape == (len(idx),), (t.name, got.shape, len(idx))
                scores[t.name][idx] = got
                done[t.name] += len(idx)
        stage += 1
        evaluated = sum(done.values())
        if evaluated == total:
            fit = _combined(scores, weights)
            return RaceResult(scores, True, fit, fit, total, total, stage, best_so_far)
        observed = {name: scores[name][orders[name][: done[name]]] for name in scores}
        est, ucb = upper_confidence_bound(observed, sizes, weights, delta, bound)
        if front is not None and groups:
            cut = pareto_cut(observed, sizes, weights, groups, front, delta, bound)
        else:
            cut = ucb < best_so_far
        if cut:
            return RaceResult(scores, False, est, ucb, evaluated, total, stage, best_so_far)


def pareto_cut(observed: Mapping[str, np.ndarray], sizes: Mapping[str, int],
               weights: Mapping[str, float], groups: Sequence[Sequence[str]],
               front: Sequence[Sequence[float]], delta: float, bound: str = "hoeffding") -> bool:
    """Whether a partially scored candidate is dominated even at its optimistic bound.

    Each objective (the weighted mean of its ``groups`` tasks) gets an upper confidence
    bound at ``delta / len(groups)`` (union bound); the candidate is cut only when some
    ``front`` point is strictly above that bound on every objective.
    """
    if not len(front):
        return False
    d = delta / max(1, len(groups))
    ucbs = np.array([upper_confidence_bound({t: observed[t] for t in g}, sizes,
                                            {t: weights.get(t, 1.0) for t in g}, d, bound)[1]
                     for g in groups])
    pts = np.asarray(front, dtype=float).reshape(-1, len(groups))
    return bool(np.any(np.all(pts > ucbs, axis=1)))


def check_racing_tasks(tasks: Sequence[Task]) -> None:
    """Racing's bounds need every score in [0, 1]: refuse raw log-probability tasks."""
    refuse_unbounded([t.name for t in tasks if not t.spec.bounded])


def refuse_unbounded(raw: Sequence[str]) -> None:
    """One ConfigError line when tasks named ``raw`` (unbounded scores) are to be raced."""
    if raw:
        raise ConfigError(
            f"racing.enabled: task(s) {', '.join(raw)} score raw log-probabilities (unbounded); "
            "use loglik_transform: prob (scores in [0, 1]) or turn racing off"
        )


def _combined(scores: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> float:
    from .scoring import combined_fitness

    return combined_fitness(scores, weights)
