"""Executors: where candidates are evaluated. The loop only talks to this interface.

Contract:
- ``connect()`` (optional) reaches the workers' machines; the runner calls it before it
  creates the run directory, so a cluster that cannot be joined leaves nothing behind.
- ``start(spec)`` builds the workers (each holds one :class:`Evaluator`).
- ``submit(cid, plan_dict)`` queues one candidate; at most ``capacity`` are in flight.
- ``poll(timeout)`` returns finished ``(cid, Outcome)`` pairs (possibly none). Each
  submitted candidate comes back exactly once: executors retry lost work internally and
  report a failed Outcome after ``max_failures`` retries.
- ``stats()`` reports per-worker busy time for `evomerge status`.

The local executor evaluates in-process, one candidate per poll; the Ray executor
(:mod:`evomerge.engine.ray_executor`) runs actors and returns results as they finish.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from typing import Any

from ..errors import RunError
from ..plan import MergePlan
from .evaluator import EvalSpec, Evaluator, Outcome


class WorkersLostError(RunError):
    """The machines evaluating candidates are gone (e.g. the Ray node under the driver died);
    the run stops where its checkpoint is, and ``evomerge resume`` continues it."""


class Executor(ABC):
    def connect(self) -> None:  # noqa: B027 - optional hook
        """Reach the machines (a cluster) before the run directory exists; fail in one line."""

    @abstractmethod
    def start(self, spec: EvalSpec) -> None: ...

    @property
    @abstractmethod
    def capacity(self) -> int: ...

    @abstractmethod
    def submit(self, cid: int, plan: MergePlan | dict[str, Any],
               context: dict[str, Any] | None = None) -> None:
        """Queue one candidate; ``context`` travels with it (e.g. the best fitness for racing).

        Args:
            cid: the candidate's id, returned with its outcome by :meth:`poll`.
            plan: the typed plan; an executor that crosses a process boundary turns it into
                a dict there (the local executor hands the object over as it is).
            context: plain data for the worker (``{"best": fitness or None}``).
        """

    @abstractmethod
    def poll(self, timeout: float | None = None) -> list[tuple[int, Outcome]]: ...

    @property
    @abstractmethod
    def in_flight(self) -> int: ...

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop workers."""


class LocalExecutor(Executor):
    """Evaluates in this process, one candidate per ``poll``: the debugging path."""

    def __init__(self, max_inflight: int | None = None):
        self._queue: deque[tuple[int, dict[str, Any], dict[str, Any] | None]] = deque()
        self._cap = max_inflight or 1
        self.evaluator: Evaluator | None = None
        self._busy = 0.0
        self._t0 = time.perf_counter()
        self._count = 0

    def start(self, spec: EvalSpec) -> None:
        self.evaluator = Evaluator(spec, worker="local-0")
        self._t0 = time.perf_counter()

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def in_flight(self) -> int:
        return len(self._queue)

    def submit(self, cid: int, plan: MergePlan | dict[str, Any],
               context: dict[str, Any] | None = None) -> None:
        self._queue.append((cid, plan, context))

    def poll(self, timeout: float | None = None) -> list[tuple[int, Outcome]]:
        if not self._queue:
            return []
        assert self.evaluator is not None, "executor not started"
        cid, plan, context = self._queue.popleft()
        out = self.evaluator.evaluate(plan, context=context)
        self._busy += out.seconds
        self._count += 1
        return [(cid, out)]

    def stats(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._t0
        return {
            "workers": {"local-0": {"busy_s": self._busy, "evaluations": self._count,
                                    "utilisation": self._busy / wall if wall > 0 else 0.0}},
            "wall_s": wall,
        }

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()
            self.evaluator = None

