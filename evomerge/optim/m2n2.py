"""M2N2 (Model Merging of Natural Niches) as a steady-state ask/tell optimizer.

The archive of at most ``archive_size`` members and their per-example score rows is the
whole population. ``ask(n)`` breeds ``n`` children from the *current* archive (parents by
fitness and attraction, split-point SLERP crossover, optional Gaussian mutation); ``tell``
inserts each child as its result arrives, through the resource-competition replacement rule.
Nothing waits for a generation, so workers never idle at a barrier.

Lifecycle:

1. The first asks return the ``initial`` genomes (the source models, e.g. the experts) so
   their score rows become known; each is inserted through the normal update rule. Without
   ``initial`` the run starts *from scratch*: ``init_size`` random members (Gaussian around
   ``x0`` with ``sigma0`` when ``x0`` is given, else uniform in the box), like the reference's
   two N(0, 0.01) networks.
2. While the archive is still empty (asks running ahead of the first tells), children are
   bred blind from those starting genomes drawn uniformly, so ``ask(n)`` always returns ``n``.
3. Failed results are counted and dropped: they never enter the archive.

The formulas live in :mod:`evomerge.optim.m2n2_core`; the genome representation lives in the
:class:`~evomerge.optim.m2n2_core.Crossover`: flat weight vectors by default, a coefficient
table over source models for LLMs.

Differences from the reference code (github.com/SakanaAI/natural_niches) are listed in the
core module; in this loop: the archive is filled in order (the reference fills zero-score
placeholder slots, which is the same except when a real member has shared fitness exactly 0),
and children are clipped into the search box. Like every evomerge optimizer, ``tell`` refuses
unknown or already-told ids (ValueError): de-duplicating at-least-once deliveries is the
engine's job.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import (
    Candidate,
    Result,
    as_population,
    check_box,
    check_options,
    effective_fitness,
    is_failed,
    register_optimizer,
)
from .m2n2_core import (
    SLERP_EPS,
    Crossover,
    VectorSlerpCrossover,
    replacement_slot,
    resource_fitness,
    sample_parents,
    slerp,
)
from .state import (
    BookedOptimizer,
    CandidateBook,
    check_header,
    rng_state,
    set_rng_state,
    settings_of,
)

__all__ = ["M2N2", "Crossover", "VectorSlerpCrossover", "slerp"]

STATE_VERSION = 1
#: the reference's mutation for runs from scratch
SCRATCH_MUTATION_SIGMA = 0.01
_SCORE_TOL = 1e-9


def _make_crossover(spec: Crossover | str | None, slerp_eps: float) -> Crossover:
    if spec is None or spec == "slerp":
        return VectorSlerpCrossover(eps=slerp_eps, angle="global")
    if spec == "slerp_segment":
        return VectorSlerpCrossover(eps=slerp_eps, angle="segment")
    if isinstance(spec, str):
        raise ConfigError(f"optimizer.options.crossover: unknown crossover {spec!r}; known: "
                          "slerp, slerp_segment")
    if not callable(spec):
        raise ConfigError(f"optimizer.options.crossover: {type(spec).__name__} is not callable")
    return spec


def _crossover_name(cx: Crossover) -> str:
    if isinstance(cx, VectorSlerpCrossover):
        return f"slerp/{cx.angle}/{cx.eps!r}"
    return type(cx).__module__ + "." + type(cx).__qualname__


@register_optimizer("m2n2")
class M2N2(BookedOptimizer):
    """Model Merging of Natural Niches (steady-state).

    Options: ``initial`` (list of genomes, the source models), ``archive_size`` (20),
    ``alpha`` (1.0; 0 = plain GA), ``use_attraction`` (True), ``use_split_point`` (True),
    ``use_crossover`` (True; False copies parent A, the reference's ablation),
    ``mutation_sigma`` (None: 0.01 from scratch, 0 with initial members), ``c`` (per-example
    weights, default 1), ``eps`` (0.0, added to the shared denominator), ``init_size`` (2
    random members from scratch), ``crossover`` (a :class:`Crossover`, or "slerp" /
    "slerp_segment"), ``slerp_eps`` (1e-6).
    """

    needs_per_example = True
    takes_initial_population = True
    space_extras = "crossover"

    generational = False

    _DEFAULTS: dict[str, Any] = {
        "archive_size": 20, "alpha": 1.0, "use_attraction": True, "use_split_point": True,
        "use_crossover": True, "mutation_sigma": None, "c": None, "eps": 0.0, "init_size": 2,
        "crossover": None, "slerp_eps": SLERP_EPS,
    }

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray | None = None,
                 sigma0: float = 0.2, seed: int = 0, initial: Any = None, **options: Any):
        super().__init__(lower, upper, x0=x0, sigma0=sigma0, seed=seed, **options)
        check_box(self.lower, self.upper, self.x0)
        opts = check_options("m2n2", options, self._DEFAULTS)
        self.archive_size = int(opts["archive_size"])
        if self.archive_size < 1:
            raise ConfigError(f"optimizer.options.archive_size: must be >= 1, got "
                              f"{opts['archive_size']}")
        for key in ("alpha", "eps", "slerp_eps") + (
                ("mutation_sigma",) if opts["mutation_sigma"] is not None else ()):
            if not float(opts[key]) >= 0.0:
                raise ConfigError(f"optimizer.options.{key}: must be >= 0, got {opts[key]}")
        self.alpha = float(opts["alpha"])
        self.eps = float(opts["eps"])
        self.use_attraction = bool(opts["use_attraction"])
        self.use_split_point = bool(opts["use_split_point"])
        self.use_crossover = bool(opts["use_crossover"])
        self.crossover = _make_crossover(opts["crossover"], float(opts["slerp_eps"]))
        self.c = None if opts["c"] is None else np.asarray(opts["c"], dtype=float).ravel()
        if self.c is not None and not np.all(np.isfinite(self.c) & (self.c >= 0)):
            raise ConfigError("optimizer.options.c: per-example weights must be finite and >= 0")
        self.initial = as_population(initial, self.lower, self.upper)
        self.from_scratch = not self.initial
        self.init_size = int(opts["init_size"])
        if self.from_scratch and self.init_size < 1:
            raise ConfigError(f"optimizer.options.init_size: must be >= 1, got {self.init_size}")
        self.mutation_sigma = (
            (SCRATCH_MUTATION_SIGMA if self.from_scratch else 0.0)
            if opts["mutation_sigma"] is None else float(opts["mutation_sigma"]))
        self._reset()

    def _reset(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._book = CandidateBook()
        if self.initial:
            starts = np.asarray(self.initial, dtype=float).reshape(-1, self.dim)
        else:
            starts = np.asarray([self._random_member() for _ in range(self.init_size)])
        self._starts = starts  # the genomes bred from while the archive is still empty
        self._started = 0  # how many of them were asked already
        self._archive = np.zeros((self.archive_size, self.dim))
        self._scores = np.zeros((self.archive_size, 0))
        self._member_ids = np.full(self.archive_size, -1, dtype=np.int64)
        self._member_fitness = np.zeros(self.archive_size)
        self._filled = 0
        self._n_examples = -1
        self._counts = {"inserted": 0, "discarded": 0}

    # ------------------------------------------------------------------ breeding

    def _random_member(self) -> np.ndarray:
        if self.x0 is not None:
            return self.clip(self.x0 + self.sigma0 * self._rng.standard_normal(self.dim))
        return self._rng.uniform(self.lower, self.upper)

    def _breed(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        info: dict[str, Any] = {}
        if self.use_crossover:
            w_m = float(self._rng.uniform())
            w_s = float(self._rng.uniform()) if self.use_split_point else None
            child = np.array(self.crossover(a, b, w_m, w_s, self._rng), dtype=float)
            info.update(w_m=w_m, w_s=w_s)
        else:
            child = np.array(a, dtype=float)
        if self.mutation_sigma > 0.0:
            noise = self._rng.standard_normal(self.dim)
            noise *= self.mutation_sigma
            child += noise
        np.maximum(child, self.lower, out=child)  # clip in place: children are large vectors
        np.minimum(child, self.upper, out=child)
        return child, info

    def _next_genome(self) -> tuple[np.ndarray, dict[str, Any]]:
        if self._started < len(self._starts):
            self._started += 1
            return self._starts[self._started - 1].copy(), {"initial": self._started - 1}
        if self._filled == 0:  # asks ran ahead of the first tells: breed from the starts
            i, j = (int(k) for k in self._rng.integers(0, len(self._starts), size=2))
            child, info = self._breed(self._starts[i], self._starts[j])
            info.update(parents=[], starts=[i, j])
            return child, info
        a, b = sample_parents(self._scores[: self._filled], self._rng, self.alpha, self.c,
                              self.eps, self.use_attraction)
        child, info = self._breed(self._archive[a], self._archive[b])
        info.update(parents=[int(self._member_ids[a]), int(self._member_ids[b])])
        return child, info

    def ask(self, n: int) -> list[Candidate]:
        out = []
        for _ in range(max(int(n), 0)):
            genome, info = self._next_genome()
            out.append(self._book.issue(genome, info))
        return out

    # ------------------------------------------------------------------ updating

    def _checked_row(self, r: Result, n_examples: int) -> np.ndarray:
        if r.per_example is None:
            raise ConfigError(
                f"optimizer.name: m2n2 needs per-example scores, but the result of candidate "
                f"{r.id} has none (use a fitness whose tasks score each example)")
        row = np.asarray(r.per_example, dtype=float).ravel()
        if row.size == 0:
            raise ConfigError(f"optimizer.name: m2n2 got an empty per-example score row for "
                              f"candidate {r.id}")
        if n_examples >= 0 and row.size != n_examples:
            raise ConfigError(f"optimizer.name: candidate {r.id} has {row.size} per-example "
                              f"scores, earlier candidates had {n_examples}")
        if self.c is not None and self.c.size != row.size:
            raise ConfigError(f"optimizer.options.c: has {self.c.size} weights but the fitness "
                              f"scores {row.size} examples")
        if not np.all(np.isfinite(row)) or row.min() < -_SCORE_TOL or row.max() > 1 + _SCORE_TOL:
            raise ConfigError(f"optimizer.name: candidate {r.id} has per-example scores outside "
                              "[0, 1] (m2n2 shares each example's score among members)")
        return np.clip(row, 0.0, 1.0)

    def tell(self, results: list[Result]) -> None:
        """Insert results in the order given. Everything is checked before anything changes:
        unknown or repeated ids raise ValueError (as every evomerge optimizer), bad score
        rows raise ConfigError."""
        results = list(results)
        self._book.check(results)
        rows: dict[int, np.ndarray] = {}
        n_examples = self._n_examples
        for r in results:
            if not is_failed(r):
                rows[int(r.id)] = self._checked_row(r, n_examples)
                n_examples = rows[int(r.id)].size
        if self._n_examples < 0 and rows:
            self._n_examples = n_examples
            self._scores = np.zeros((self.archive_size, n_examples))
        for r in results:
            genome = self._book.pending[int(r.id)].genome
            told = self._book.settle_one(int(r.id), effective_fitness(r), is_failed(r))
            if told.failed:  # counted by the book, never enters the archive
                continue
            self._insert(genome, rows[told.id], told.id, told.fitness)

    def _insert(self, genome: np.ndarray, row: np.ndarray, cid: int, fitness: float) -> None:
        if self._filled < self.archive_size:
            slot: int | None = self._filled
            self._filled += 1
        else:
            slot = replacement_slot(self._scores, row, self.alpha, self.c, self.eps)
        if slot is None:
            self._counts["discarded"] += 1
            return
        self._archive[slot] = genome
        self._scores[slot] = row
        self._member_ids[slot] = cid
        self._member_fitness[slot] = fitness
        self._counts["inserted"] += 1

    # ------------------------------------------------------------------ views

    @property
    def stats(self) -> dict[str, int]:
        """How many results were told, failed, entered the archive, or were discarded."""
        return {"told": self._book.n_told, "failed": self._book.n_failed, **self._counts,
                "archive": self._filled}

    def archive(self) -> dict[str, np.ndarray]:
        """Copies of the archive: genomes, score rows, ids, told fitness, shared fitness."""
        k = self._filled
        scores = self._scores[:k].copy()
        shared = (resource_fitness(scores, self.alpha, self.c, self.eps) if k
                  else np.zeros(0))
        return {"genomes": self._archive[:k].copy(), "scores": scores,
                "ids": self._member_ids[:k].copy(), "fitness": self._member_fitness[:k].copy(),
                "shared_fitness": shared}

    def archive_best(self) -> tuple[np.ndarray, float] | None:
        """The archive member with the highest told fitness (the reference's choice)."""
        if self._filled == 0:
            return None
        i = int(np.argmax(self._member_fitness[: self._filled]))
        return self._archive[i].copy(), float(self._member_fitness[i])

    # ------------------------------------------------------------------ state

    def _settings(self) -> dict[str, Any]:
        return settings_of(
            self, initial=[g.copy() for g in self.initial], archive_size=self.archive_size,
            alpha=self.alpha, eps=self.eps, use_attraction=self.use_attraction,
            use_split_point=self.use_split_point, use_crossover=self.use_crossover,
            mutation_sigma=self.mutation_sigma, init_size=self.init_size,
            c=None if self.c is None else self.c.copy(),
            crossover=_crossover_name(self.crossover))

    def state_dict(self) -> dict[str, Any]:
        k = self._filled
        return {
            "kind": "m2n2",
            "version": STATE_VERSION,
            "settings": self._settings(),
            "rng": rng_state(self._rng),
            "book": self._book.state_dict(),
            "starts": self._starts.copy(),
            "started": self._started,
            "n_examples": self._n_examples,
            "archive": self._archive[:k].copy(),
            "scores": self._scores[:k].copy(),
            "member_ids": self._member_ids[:k].copy(),
            "member_fitness": self._member_fitness[:k].copy(),
            "counts": dict(self._counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_header(state, "m2n2", STATE_VERSION, self._settings())
        self._reset()
        set_rng_state(self._rng, state["rng"])
        self._book.load_state_dict(state["book"], self.dim)
        self._starts = np.asarray(state["starts"], dtype=float).reshape(-1, self.dim)
        self._started = int(state["started"])
        n = int(state["n_examples"])
        k = len(np.asarray(state["member_ids"]).ravel())
        self._n_examples = n
        self._filled = k
        self._scores = np.zeros((self.archive_size, max(n, 0)))
        if k:
            self._archive[:k] = np.asarray(state["archive"], dtype=float).reshape(k, self.dim)
            self._scores[:k] = np.asarray(state["scores"], dtype=float).reshape(k, n)
        self._member_ids[:k] = np.asarray(state["member_ids"], dtype=np.int64).ravel()
        self._member_fitness[:k] = np.asarray(state["member_fitness"], dtype=float).ravel()
        self._counts = {key: int(v) for key, v in dict(state["counts"]).items()}
