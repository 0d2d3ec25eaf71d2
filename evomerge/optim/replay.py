"""The replay wrapper shared by optimizers whose library state cannot be stored as data.

cma's ``CMAEvolutionStrategy`` and any nevergrad optimizer are object graphs that only pickle
could store, and checkpoints never use pickle. Such an optimizer's state is therefore its
constructor settings plus the ordered log of asks and tells (:class:`ReplayLog`):
``load_state_dict`` rebuilds it from the seed and replays the log through the same code path,
checking every regenerated ask against a digest and raising :class:`RunError` on a difference.

:class:`ReplayOptimizer` is a template: the public :meth:`ask`/:meth:`tell` keep the candidate
book and the log; a subclass implements :meth:`_reset` (a fresh strategy), :meth:`_ask`,
:meth:`_tell` (told results already settled into plain :class:`Told` records), and
:meth:`_settings` (what it was built with), and names its library in :meth:`_library`.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from ..errors import RunError
from .base import Candidate, Result, effective_fitness, is_failed
from .state import (
    BookedOptimizer,
    CandidateBook,
    ReplayDivergence,
    ReplayLog,
    Told,
    check_header,
    check_replayed_book,
)


class ReplayOptimizer(BookedOptimizer):
    """Base of optimizers whose state is a replay log (cma, nevergrad, evo_merging).

    Subclasses set ``kind`` and ``state_version`` and implement the hooks named in the module
    docstring; :meth:`_reset` must call :meth:`_reset_log` (a new book and log).
    """

    kind: str = ""
    state_version: int = 1

    # -- hooks ---------------------------------------------------------------------------
    @abstractmethod
    def _reset(self) -> None:
        """Rebuild the strategy from the seed, as at construction (calls ``_reset_log``)."""

    @abstractmethod
    def _ask(self, n: int) -> list[Candidate]:
        """Up to ``n`` new candidates, issued through ``self._book``."""

    @abstractmethod
    def _tell(self, told: list[Told]) -> None:
        """Learn from checked results; settle each one with ``self._book.settle_one``."""

    @abstractmethod
    def _settings(self) -> dict[str, Any]:
        """The constructor settings, saved in the state and checked on load."""

    @abstractmethod
    def _library(self) -> str:
        """The wrapped library and its version, e.g. ``"cma 4.5.0"``."""

    def _label(self) -> str:
        """How resume errors name this optimizer."""
        return self.kind

    def _divergence_hint(self) -> str:
        """Appended to the error when a replay diverges."""
        return ""

    def _extra_state(self) -> dict[str, Any]:
        """Derived fields stored for humans (never read back)."""
        return {}

    def _reset_log(self) -> None:
        self._book = CandidateBook()
        self._log = ReplayLog()

    # -- public ask/tell -----------------------------------------------------------------
    def ask(self, n: int) -> list[Candidate]:
        """Up to ``n`` new candidates (see :class:`Optimizer`); the ask is logged."""
        cands = self._ask(int(n))
        self._log.record_ask(cands)
        return cands

    def tell(self, results: list[Result]) -> None:
        """Learn from results of pending candidates, in any order; the tell is logged.

        Raises:
            ValueError: an id is unknown, already told or repeated (nothing changes then).
        """
        results = list(results)
        self._book.check(results)
        told = [Told(int(r.id), effective_fitness(r), is_failed(r)) for r in results]
        self._tell(told)
        self._log.record_tell(told)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Settings, library, the replay log and (derived, checked on load) the book."""
        return {
            "kind": self.kind,
            "version": self.state_version,
            "settings": self._settings(),
            "library": self._library(),
            "log": self._log.state_dict(),
            "book": self._book.state_dict(),
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild from the seed and replay the saved log.

        Raises:
            RunError: the state is for another optimizer, version or settings, or the replay
                regenerated different candidates.
        """
        check_header(state, self.kind, self.state_version, self._settings())
        self._reset()
        try:
            self._log.replay(state["log"], self._ask, self._tell)
        except ReplayDivergence as err:
            raise RunError(f"optimizer {self._label()!r}: resuming failed, {err} (state written "
                           f"by {state.get('library')}, running {self._library()})"
                           f"{self._divergence_hint()}") from None
        check_replayed_book(self._label(), self._book, state["book"], self.dim)
