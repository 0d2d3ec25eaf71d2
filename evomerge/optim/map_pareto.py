"""``map``: Model merging with Amortized Pareto fronts (MAP), as an ask/tell optimizer.

MAP (Li et al., "MAP: Low-compute Model Merging with Amortized Pareto Fronts via Quadratic
Approximation") replaces evolution by a surrogate: evaluate a small, pre-selected set of
merge-coefficient vectors, fit one quadratic per objective over the coefficients, take the
surrogate's Pareto front and evaluate a few of its points to confirm.

Rounds here:

1. *Design*: ``initial_points`` genomes, ``x0`` first and the rest a Latin hypercube in the
   box (seeded).
2. *Fit*: once every design point is told, each objective gets a quadratic
   ``y = c + b.x + x'Ax`` (all ``(d+1)(d+2)/2`` monomials of the box-normalized genome),
   fitted by ridge-regularized least squares (numpy ``lstsq``, ``ridge`` = 1e-6 by default;
   with fewer points than monomials this is the minimum-norm fit). Failed and racing-cut
   candidates are not data.
3. *Front*: ``samples`` Latin-hypercube genomes are scored by the surrogates; of their
   non-dominated set, ``round_size`` spread points (objective extremes first, then farthest
   points) that were not evaluated before are asked, each carrying its surrogate prediction
   in ``info["predicted"]`` (so the run log holds predicted vs measured for every confirmed
   point, see :meth:`MAP.confirmations`).
4. Steps 2-3 repeat with all data so far until the run's budget ends (each round refines
   the surrogate where the front is).

Exact state is explicit plain data (no replay needed): the RNG, the candidate book, the
current batch, the data (ids, genomes, objective vectors) and the confirmations. The fit is
deterministic given the data, which is kept sorted by candidate id, so the order in which
tells arrive does not change any later ask.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from ..pareto import nondominated, spread_select
from .base import (
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


# --------------------------------------------------------------------------- surrogate


def quadratic_features(Z: np.ndarray) -> np.ndarray:
    """``[1, z_i, z_i z_j (i <= j)]`` for each row of ``Z``."""
    Z = np.atleast_2d(np.asarray(Z, dtype=float))
    n, d = Z.shape
    iu = np.triu_indices(d)
    quad = (Z[:, :, None] * Z[:, None, :])[:, iu[0], iu[1]]
    return np.hstack([np.ones((n, 1)), Z, quad])


def n_quadratic_features(d: int) -> int:
    return (d + 1) * (d + 2) // 2


def fit_quadratic(Z: np.ndarray, y: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """Least-squares coefficients (ridge-regularized, intercept unpenalized) of a quadratic
    in ``Z`` for each column of ``y``; shape ``(n_features, m)``."""
    F = quadratic_features(Z)
    Y = np.asarray(y, dtype=float).reshape(len(F), -1)
    if ridge > 0:
        pen = np.sqrt(ridge) * np.eye(F.shape[1])[1:]
        F = np.vstack([F, pen])
        Y = np.vstack([Y, np.zeros((pen.shape[0], Y.shape[1]))])
    coef, *_ = np.linalg.lstsq(F, Y, rcond=None)
    return coef


def predict_quadratic(coef: np.ndarray, Z: np.ndarray) -> np.ndarray:
    return quadratic_features(Z) @ coef


def latin_hypercube(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """``n`` points in [0, 1]^d, one per stratum in every dimension."""
    u = (rng.random((n, d)) + np.arange(n)[:, None]) / n
    for j in range(d):
        u[:, j] = u[rng.permutation(n), j]
    return u


# --------------------------------------------------------------------------- optimizer


@register_optimizer("map")
class MAP(BookedOptimizer):
    generational = True
    multi_objective = True
    needs_budget = True
    kind = "map"

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray | None = None,
                 sigma0: float = 0.2, seed: int = 0, n_objectives: int = 1,
                 budget: int | None = None, **options: Any):
        super().__init__(lower, upper, x0=x0, sigma0=sigma0, seed=seed, **options)
        check_box(self.lower, self.upper, self.x0)
        self.m = int_option(n_objectives, "objectives", 1)
        nfeat = n_quadratic_features(self.dim)
        budget = int(budget) if budget else 4 * nfeat
        opts = check_options(self.kind, options, {
            "initial_points": None, "round_size": None, "samples": 4096, "ridge": 1e-6,
            "popsize": None})
        if opts["popsize"] is not None:  # the generic `optimizer.popsize` means the round size
            opts["round_size"] = opts["round_size"] or opts["popsize"]
        self.initial_points = (max(2, min(2 * nfeat, budget // 2)) if opts["initial_points"] is None
                               else int_option(opts["initial_points"],
                                               "optimizer.options.initial_points", 2))
        self.round_size = (max(2, min(8, budget // 8)) if opts["round_size"] is None
                           else int_option(opts["round_size"], "optimizer.options.round_size", 1))
        self.samples = int_option(opts["samples"], "optimizer.options.samples", 16)
        ridge = opts["ridge"]
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or ridge < 0:
            raise ConfigError(f"optimizer.options.ridge: must be a number >= 0, got {ridge!r}")
        self.ridge = float(ridge)
        self._reset()

    def _reset(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._book = CandidateBook()
        self._round = 0  # 0: design; r >= 1: confirmation round r
        self._batch: np.ndarray | None = None
        self._batch_pred: np.ndarray | None = None
        self._batch_ids: list[int] = []
        self._batch_told = 0
        self._data_ids: list[int] = []
        self._data_x = np.zeros((0, self.dim))
        self._data_y = np.zeros((0, self.m))
        self._conf: list[tuple[int, np.ndarray, np.ndarray | None]] = []  # id, predicted, measured

    # -- surrogate ------------------------------------------------------------------------
    def _z(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=float) - self.lower) / (self.upper - self.lower)

    def surrogate(self) -> np.ndarray | None:
        """Current quadratic coefficients ``(n_features, m)`` over box-normalized genomes."""
        if len(self._data_ids) == 0:
            return None
        order = np.argsort(self._data_ids, kind="stable")
        return fit_quadratic(self._z(self._data_x[order]), self._data_y[order], self.ridge)

    def predict(self, X: np.ndarray) -> np.ndarray:
        coef = self.surrogate()
        if coef is None:
            raise ValueError("no data to fit the surrogate yet")
        return predict_quadratic(coef, self._z(X))

    def _design(self) -> tuple[np.ndarray, np.ndarray | None]:
        U = latin_hypercube(self._rng, self.initial_points, self.dim)
        X = self.lower + U * (self.upper - self.lower)
        if self.x0 is not None:
            X[0] = self.x0
        return X, None

    def _confirm_batch(self) -> tuple[np.ndarray, np.ndarray | None]:
        U = latin_hypercube(self._rng, self.samples, self.dim)
        X = self.lower + U * (self.upper - self.lower)
        if len(self._data_ids) == 0:  # everything failed so far: explore
            return X[: self.round_size], None
        P = self.predict(X)
        front = np.flatnonzero(nondominated(P))
        # never re-ask a genome already evaluated
        if len(self._data_x):
            dist = np.min(np.linalg.norm(X[front, None, :] - self._data_x[None], axis=2), axis=1)
            front = front[dist > 1e-9]
        pick = front[spread_select(P[front], self.round_size)] if front.size else front
        if pick.size < self.round_size:  # a front smaller than a round: fill with samples
            rest = np.setdiff1d(np.arange(len(X)), pick)[: self.round_size - pick.size]
            pick = np.concatenate([pick, rest])
        return X[pick], P[pick]

    # -- ask/tell ------------------------------------------------------------------------
    def ask(self, n: int) -> list[Candidate]:
        if n <= 0:
            return []
        if self._batch is None:
            self._batch, self._batch_pred = (self._design() if self._round == 0
                                             else self._confirm_batch())
            self._batch_ids, self._batch_told = [], 0
        out = []
        for j in range(len(self._batch_ids), min(len(self._batch), len(self._batch_ids) + n)):
            info: dict[str, Any] = {"generation": self._round, "member": j,
                                    "phase": "design" if self._round == 0 else "confirm"}
            if self._batch_pred is not None:
                info["predicted"] = [float(v) for v in self._batch_pred[j]]
            c = self._book.issue(self.clip(self._batch[j]), info)
            self._batch_ids.append(c.id)
            out.append(c)
        return out

    def tell(self, results: list[Result]) -> None:
        results = list(results)
        self._book.check(results)
        for r in results:
            cand = self._book.pending[int(r.id)]
            ok = not is_failed(r) and (r.objectives is not None or self.m == 1)
            y = None
            if ok:
                y = (np.asarray(r.objectives, dtype=float).reshape(-1) if r.objectives is not None
                     else np.array([float(r.fitness)]))
                if y.size != self.m or not np.all(np.isfinite(y)):
                    raise ValueError(f"result {r.id}: expected {self.m} finite objectives")
                self._data_ids.append(int(r.id))
                self._data_x = np.vstack([self._data_x, cand.genome[None]])
                self._data_y = np.vstack([self._data_y, y[None]])
            if "predicted" in cand.info:
                self._conf.append((int(r.id), np.asarray(cand.info["predicted"], float), y))
            self._batch_told += 1
        self._book.settle(results)
        if self._batch is not None and self._batch_told == len(self._batch):
            self._batch, self._batch_pred, self._batch_ids = None, None, []
            self._round += 1

    # -- inspection ----------------------------------------------------------------------
    def confirmations(self) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
        """(candidate id, surrogate-predicted objectives, measured objectives or None)."""
        return sorted(((i, p.copy(), None if y is None else y.copy()) for i, p, y in self._conf),
                      key=lambda t: t[0])

    # -- state ---------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return settings_of(self, n_objectives=self.m, initial_points=self.initial_points,
                           round_size=self.round_size, samples=self.samples, ridge=self.ridge)

    def state_dict(self) -> dict[str, Any]:
        conf = sorted(self._conf, key=lambda t: t[0])
        return {
            "kind": self.kind, "version": STATE_VERSION, "settings": self._settings(),
            "rng": rng_state(self._rng), "book": self._book.state_dict(), "round": self._round,
            "batch": None if self._batch is None else self._batch.copy(),
            "batch_pred": None if self._batch_pred is None else self._batch_pred.copy(),
            "batch_ids": list(self._batch_ids), "batch_told": self._batch_told,
            "data_ids": list(self._data_ids), "data_x": self._data_x.copy(),
            "data_y": self._data_y.copy(),
            "conf_ids": [c[0] for c in conf],
            "conf_pred": np.array([c[1] for c in conf]).reshape(-1, self.m),
            "conf_measured": [None if c[2] is None else c[2].copy() for c in conf],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_header(state, self.kind, STATE_VERSION, self._settings())
        self._reset()
        set_rng_state(self._rng, state["rng"])
        self._book.load_state_dict(state["book"], self.dim)
        self._round = int(state["round"])
        self._batch = None if state["batch"] is None else as_array(state["batch"]).reshape(-1, self.dim)
        self._batch_pred = (None if state["batch_pred"] is None
                            else as_array(state["batch_pred"]).reshape(-1, self.m))
        self._batch_ids = [int(i) for i in state["batch_ids"]]
        self._batch_told = int(state["batch_told"])
        self._data_ids = [int(i) for i in state["data_ids"]]
        self._data_x = as_array(state["data_x"]).reshape(-1, self.dim)
        self._data_y = as_array(state["data_y"]).reshape(-1, self.m)
        pred = as_array(state["conf_pred"]).reshape(-1, self.m)
        self._conf = [(int(i), pred[k].copy(), None if y is None else as_array(y))
                      for k, (i, y) in enumerate(zip(state["conf_ids"], state["conf_measured"]))]
