"""``nsga2``: NSGA-II (Deb et al. 2002) on the run's objective vectors, with a Pareto archive.

Why an own numpy implementation rather than pymoo or nevergrad's multi-objective mode:

- *Exact, explicit state.* NSGA-II's whole state is small plain data: the parent population
  (genomes, objective vectors), the generation being evaluated, the archive and one numpy
  ``Generator``. Kept as arrays, a checkpoint restores it exactly with no replay and no
  pickle. pymoo's ask/tell algorithms hold their state in object graphs (``Population``,
  ``Individual``, termination and display objects) that are only serializable by pickle;
  nevergrad's multi-objective mode wraps a single-objective optimizer on a hypervolume
  scalarization, can only be resumed by replaying (as ``ng:`` does) and is partly broken
  with numpy >= 2.4 on this machine (NOTES.md).
- *Dependency weight.* pymoo pulls compiled extensions, matplotlib-heavy extras and autograd;
  the algorithm itself is ~150 lines of numpy here.
- *Contract fit.* The genome box, the failed-candidate penalty and the generational
  ask/tell contract of :mod:`evomerge.optim.base` map directly onto it.

Algorithm: a generation of ``popsize`` genomes (the first is ``x0``, the rest of generation
0 uniform in the box; later generations: binary tournaments on (front rank, crowding
distance), simulated binary crossover (``crossover_eta``, probability ``crossover_prob``)
and polynomial mutation (``mutation_eta``, per-gene probability ``mutation_prob``, default
1/dim), both bounded to the box). When a generation is complete, parents and offspring are
merged and the next parents are chosen by non-dominated sorting and crowding distance, in ask
order (tells may arrive in any order; the result does not depend on it).

Objectives arrive as ``Result.objectives`` (maximized). A failed candidate, and one cut by
racing (whose scores are partial, so it is never on a front), get the penalty vector
(``FAILED_FITNESS`` in every objective). A single-objective run (``objectives`` None) uses
``[fitness]``. ``best()`` is the best weighted-sum fitness told; :meth:`NSGA2.archive` is the
non-dominated set of every candidate told (ids, genomes, objective vectors), part of the
checkpointed state.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..pareto import crowding_distance, nondominated, nondominated_sort
from .base import (
    FAILED_FITNESS,
    Candidate,
    Result,
    check_box,
    check_options,
    int_option,
    is_failed,
    register_optimizer,
)
from .state import (
    BookedOptimizer,
    CandidateBook,
    as_array,
    check_header,
    rng_state,
    set_rng_state,
    settings_of,
)

STATE_VERSION = 1


def objective_vector(result: Result, m: int) -> np.ndarray:
    """What a multi-objective optimizer learns from one result (penalty when failed/cut)."""
    if is_failed(result):
        return np.full(m, FAILED_FITNESS)
    if result.objectives is None:
        return np.full(m, float(result.fitness)) if m == 1 else np.full(m, FAILED_FITNESS)
    v = np.asarray(result.objectives, dtype=float).reshape(-1)
    if v.size != m:
        raise ValueError(f"result {result.id} has {v.size} objectives, optimizer expects {m}")
    return np.where(np.isfinite(v), v, FAILED_FITNESS)


def _float_option(opts: dict[str, Any], key: str, low: float, high: float) -> float:
    v = opts[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (low <= v <= high):
        raise ConfigError(f"optimizer.options.{key}: must be a number in [{low}, {high}], got {v!r}")
    return float(v)


def rank_and_crowd(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NSGA-II's front rank and crowding distance (within each front) of every point."""
    rank = nondominated_sort(points)
    crowd = np.zeros(len(points))
    for r in np.unique(rank):
        idx = np.flatnonzero(rank == r)
        crowd[idx] = crowding_distance(points[idx])
    return rank, crowd


def survivors(points: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` survivors: by front rank, then crowding (desc), then index."""
    rank, crowd = rank_and_crowd(points)
    order = sorted(range(len(points)), key=lambda i: (rank[i], -crowd[i], i))
    return np.array(order[:n], dtype=int)


@register_optimizer("nsga2")
class NSGA2(BookedOptimizer):
    generational = True
    multi_objective = True
    kind = "nsga2"

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray | None = None,
                 sigma0: float = 0.2, seed: int = 0, n_objectives: int = 1, **options: Any):
        super().__init__(lower, upper, x0=x0, sigma0=sigma0, seed=seed, **options)
        check_box(self.lower, self.upper, self.x0)
        self.m = int_option(n_objectives, "objectives", 1)
        opts = check_options(self.kind, options, {
            "popsize": None, "crossover_eta": 15.0, "mutation_eta": 20.0,
            "crossover_prob": 0.9, "mutation_prob": None})
        default = max(8, 4 + int(math.floor(3 * math.log(self.dim))))
        self.popsize = default if opts["popsize"] is None else int_option(
            opts["popsize"], "optimizer.popsize", 4)
        self.crossover_eta = _float_option(opts, "crossover_eta", 0.0, 1000.0)
        self.mutation_eta = _float_option(opts, "mutation_eta", 0.0, 1000.0)
        self.crossover_prob = _float_option(opts, "crossover_prob", 0.0, 1.0)
        if opts["mutation_prob"] is None:
            opts["mutation_prob"] = 1.0 / self.dim
        self.mutation_prob = _float_option(opts, "mutation_prob", 0.0, 1.0)
        self._reset()

    def _reset(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._book = CandidateBook()
        self._generation = 0
        self._parents = np.zeros((0, self.dim))
        self._parent_obj = np.zeros((0, self.m))
        self._gen: np.ndarray | None = None  # genomes of the generation being evaluated
        self._gen_ids: list[int] = []
        self._gen_obj: dict[int, np.ndarray] = {}  # member position -> objective vector
        self._arch_ids: list[int] = []
        self._arch_x = np.zeros((0, self.dim))
        self._arch_obj = np.zeros((0, self.m))

    # -- variation -----------------------------------------------------------------------
    def _tournament(self, rank: np.ndarray, crowd: np.ndarray) -> int:
        a, b = self._rng.integers(0, len(rank), size=2)
        if (rank[a], -crowd[a]) <= (rank[b], -crowd[b]):
            return int(a)
        return int(b)

    def _sbx(self, p1: np.ndarray, p2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c1, c2 = p1.copy(), p2.copy()
        if self._rng.random() > self.crossover_prob:
            return c1, c2
        eta, lo, hi = self.crossover_eta, self.lower, self.upper
        u = self._rng.random(self.dim)
        swap = self._rng.random(self.dim) < 0.5
        for i in range(self.dim):
            if u[i] > 0.5 or abs(p1[i] - p2[i]) < 1e-14:
                continue
            y1, y2 = min(p1[i], p2[i]), max(p1[i], p2[i])
            r = self._rng.random()
            out = []
            for beta in (1.0 + 2.0 * (y1 - lo[i]) / (y2 - y1), 1.0 + 2.0 * (hi[i] - y2) / (y2 - y1)):
                alpha = 2.0 - beta ** -(eta + 1.0)
                q = ((r * alpha) ** (1.0 / (eta + 1.0)) if r <= 1.0 / alpha
                     else (1.0 / (2.0 - r * alpha)) ** (1.0 / (eta + 1.0)))
                out.append(q)
            a = 0.5 * ((y1 + y2) - out[0] * (y2 - y1))
            b = 0.5 * ((y1 + y2) + out[1] * (y2 - y1))
            a, b = min(max(a, lo[i]), hi[i]), min(max(b, lo[i]), hi[i])
            c1[i], c2[i] = (b, a) if swap[i] else (a, b)
        return c1, c2

    def _mutate(self, x: np.ndarray) -> np.ndarray:
        eta, lo, hi = self.mutation_eta, self.lower, self.upper
        y = x.copy()
        hit = self._rng.random(self.dim) < self.mutation_prob
        r = self._rng.random(self.dim)
        for i in np.flatnonzero(hit):
            span = hi[i] - lo[i]
            d1, d2 = (y[i] - lo[i]) / span, (hi[i] - y[i]) / span
            p = 1.0 / (eta + 1.0)
            if r[i] < 0.5:
                v = 2.0 * r[i] + (1.0 - 2.0 * r[i]) * (1.0 - d1) ** (eta + 1.0)
                dq = v ** p - 1.0
            else:
                v = 2.0 * (1.0 - r[i]) + 2.0 * (r[i] - 0.5) * (1.0 - d2) ** (eta + 1.0)
                dq = 1.0 - v ** p
            y[i] = y[i] + dq * span
        return self.clip(y)

    def _offspring(self) -> np.ndarray:
        n = self.popsize
        if len(self._parents) == 0:
            X = self._rng.uniform(self.lower, self.upper, size=(n, self.dim))
            if self.x0 is not None:
                X[0] = self.x0
            return X
        rank, crowd = rank_and_crowd(self._parent_obj)
        out: list[np.ndarray] = []
        while len(out) < n:
            p1 = self._parents[self._tournament(rank, crowd)]
            p2 = self._parents[self._tournament(rank, crowd)]
            for c in self._sbx(p1, p2):
                if len(out) < n:
                    out.append(self._mutate(c))
        return np.array(out)

    # -- ask/tell ------------------------------------------------------------------------
    def ask(self, n: int) -> list[Candidate]:
        if n <= 0:
            return []
        if self._gen is None:
            self._gen, self._gen_ids, self._gen_obj = self._offspring(), [], {}
        out = []
        for j in range(len(self._gen_ids), min(self.popsize, len(self._gen_ids) + int(n))):
            c = self._book.issue(self.clip(self._gen[j]), {"generation": self._generation,
                                                           "member": j})
            self._gen_ids.append(c.id)
            out.append(c)
        return out

    def tell(self, results: list[Result]) -> None:
        results = list(results)
        self._book.check(results)
        vecs = [objective_vector(r, self.m) for r in results]
        self._book.settle(results)
        for r, v in zip(results, vecs):
            self._gen_obj[self._gen_ids.index(int(r.id))] = v
        if self._gen is not None and len(self._gen_obj) == self.popsize:
            self._complete()

    def _complete(self) -> None:
        assert self._gen is not None
        obj = np.array([self._gen_obj[j] for j in range(self.popsize)])
        X = np.vstack([self._parents, self._gen])
        F = np.vstack([self._parent_obj, obj])
        keep = survivors(F, self.popsize)
        self._parents, self._parent_obj = X[keep].copy(), F[keep].copy()
        # archive: non-dominated over everything told (penalized points never enter)
        ok = np.all(obj > FAILED_FITNESS, axis=1)
        ids = self._arch_ids + [self._gen_ids[j] for j in np.flatnonzero(ok)]
        AX = np.vstack([self._arch_x, self._gen[ok]])
        AF = np.vstack([self._arch_obj, obj[ok]])
        mask = nondominated(AF) if len(AF) else np.zeros(0, dtype=bool)
        self._arch_ids = [i for i, k in zip(ids, mask) if k]
        self._arch_x, self._arch_obj = AX[mask], AF[mask]
        self._gen, self._gen_ids, self._gen_obj = None, [], {}
        self._generation += 1

    # -- inspection ----------------------------------------------------------------------
    def archive(self) -> tuple[list[int], np.ndarray, np.ndarray]:
        """The Pareto archive: candidate ids, genomes and objective vectors."""
        return list(self._arch_ids), self._arch_x.copy(), self._arch_obj.copy()

    @property
    def generation(self) -> int:
        return self._generation

    # -- state ---------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return settings_of(self, n_objectives=self.m, popsize=self.popsize,
                           crossover_eta=self.crossover_eta, mutation_eta=self.mutation_eta,
                           crossover_prob=self.crossover_prob, mutation_prob=self.mutation_prob)

    def state_dict(self) -> dict[str, Any]:
        gen_pos = sorted(self._gen_obj)
        return {
            "kind": self.kind, "version": STATE_VERSION, "settings": self._settings(),
            "rng": rng_state(self._rng), "book": self._book.state_dict(),
            "generation": self._generation,
            "parents": self._parents.copy(), "parent_obj": self._parent_obj.copy(),
            "gen": None if self._gen is None else self._gen.copy(),
            "gen_ids": list(self._gen_ids), "gen_told": gen_pos,
            "gen_obj": np.array([self._gen_obj[j] for j in gen_pos]).reshape(-1, self.m),
            "archive_ids": list(self._arch_ids), "archive_x": self._arch_x.copy(),
            "archive_obj": self._arch_obj.copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_header(state, self.kind, STATE_VERSION, self._settings())
        self._reset()
        set_rng_state(self._rng, state["rng"])
        self._book.load_state_dict(state["book"], self.dim)
        self._generation = int(state["generation"])
        self._parents = as_array(state["parents"]).reshape(-1, self.dim)
        self._parent_obj = as_array(state["parent_obj"]).reshape(-1, self.m)
        self._gen = None if state["gen"] is None else as_array(state["gen"]).reshape(-1, self.dim)
        self._gen_ids = [int(i) for i in state["gen_ids"]]
        gen_obj = as_array(state["gen_obj"]).reshape(-1, self.m)
        self._gen_obj = {int(j): gen_obj[k].copy() for k, j in enumerate(state["gen_told"])}
        self._arch_ids = [int(i) for i in state["archive_ids"]]
        self._arch_x = as_array(state["archive_x"]).reshape(-1, self.dim)
        self._arch_obj = as_array(state["archive_obj"]).reshape(-1, self.m)
