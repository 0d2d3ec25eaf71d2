"""Driver-side view of the run's tasks: names, weights, and the combined fitness.

Loading the tasks here (not only in the workers) makes a missing file or an empty dataset
fail at start-up with one clear line, before any worker is started.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass
class TaskInfo:
    names: list[str]
    weights: dict[str, float]
    sizes: dict[str, int]
    unbounded: list[str] = field(default_factory=list)  # tasks whose scores leave [0, 1]

    @classmethod
    def load(cls, refs: Sequence[Any], split: str = "search") -> TaskInfo:
        from ..fitness import load_task

        names: list[str] = []
        weights: dict[str, float] = {}
        sizes: dict[str, int] = {}
        unbounded: list[str] = []
        for i, ref in enumerate(refs):
            task = load_task(ref.path)
            if task.name in weights:
                raise ConfigError(f"tasks[{i}]: task name {task.name!r} appears twice")
            names.append(task.name)
            weights[task.name] = float(ref.weight)
            sizes[task.name] = len(task.examples(split))
            if not task.spec.bounded:
                unbounded.append(task.name)
        if sum(weights.values()) <= 0:
            raise ConfigError("tasks: the task weights sum to zero")
        return cls(names, weights, sizes, unbounded)

    def combine(self, means: dict[str, float]) -> float:
        """Weighted mean of per-task mean scores, in [0, 1]."""
        total = sum(self.weights.values())
        return float(sum(self.weights[t] * means[t] for t in self.names) / total)
