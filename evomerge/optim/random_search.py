"""``random``: uniform random search in the box, the baseline every other optimizer must beat.

Steady state: ``ask(n)`` always returns ``n`` candidates and tells only update the best.
Genomes given as ``initial`` (e.g. the source models) are asked first, then uniform draws.

State is explicit and small: the numpy ``Generator`` state, the candidate book (next id,
pending candidates, best) and how many ``initial`` genomes were already asked. Draws are made
one candidate at a time, so ``ask(1)`` five times gives the same genomes as ``ask(5)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Candidate, Result, as_population, check_box, register_optimizer
from .state import (
    BookedOptimizer,
    CandidateBook,
    check_header,
    rng_state,
    set_rng_state,
    settings_of,
)

STATE_VERSION = 1


@register_optimizer("random")
class RandomSearch(BookedOptimizer):
    generational = False

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray | None = None,
                 sigma0: float = 0.2, seed: int = 0, initial: Any = None, **options: Any):
        super().__init__(lower, upper, x0=x0, sigma0=sigma0, seed=seed, **options)
        check_box(self.lower, self.upper, self.x0)
        if options:
            from ..errors import ConfigError

            key = sorted(options)[0]
            where = "optimizer.popsize" if key == "popsize" else f"optimizer.options.{key}"
            raise ConfigError(f"{where}: not an option of optimizer 'random' (it has none)")
        self.initial = as_population(initial, self.lower, self.upper)
        self._reset()

    def _reset(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._book = CandidateBook()
        self._initial_used = 0

    # -- ask/tell ------------------------------------------------------------------------
    def ask(self, n: int) -> list[Candidate]:
        out = []
        for _ in range(max(0, int(n))):
            if self._initial_used < len(self.initial):
                genome = self.initial[self._initial_used]
                info: dict[str, Any] = {"initial": self._initial_used}
                self._initial_used += 1
            else:
                genome = self._rng.uniform(self.lower, self.upper)
                info = {}
            out.append(self._book.issue(self.clip(genome), info))
        return out

    def tell(self, results: list[Result]) -> None:
        self._book.settle(list(results))

    # -- state ---------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return settings_of(self, initial=[g.copy() for g in self.initial])

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "random",
            "version": STATE_VERSION,
            "settings": self._settings(),
            "rng": rng_state(self._rng),
            "book": self._book.state_dict(),
            "initial_used": self._initial_used,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_header(state, "random", STATE_VERSION, self._settings())
        self._reset()
        set_rng_state(self._rng, state["rng"])
        self._book.load_state_dict(state["book"], self.dim)
        self._initial_used = int(state["initial_used"])
