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
    def load(cls, refs: Sequence[Any], split: str = "search",
             validation_fraction: float | None = None) -> TaskInfo:
        from ..fitness import load_task

        names: list[str] = []
        weights: dict[str, float] = {}
        sizes: dict[str, int] = {}
        unbounded: list[str] = []
        for i, ref in enumerate(refs):
            task = load_task(ref.path, validation_fraction=validation_fraction)
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


def task_entries(cfg: Any, report: bool = False) -> list[dict[str, Any]]:
    """The run's search tasks (or, ``report=True``, its report tasks) as the plain dicts
    workers load (:func:`evomerge.fitness.load_tasks`): path, weight and the validation
    carve-out fraction (search tasks only; report tasks are scored on held-out data)."""
    if report:
        return [t.model_dump() for t in cfg.report_tasks]
    frac = cfg.selection.validation_fraction or None
    return [dict(t.model_dump(), validation_fraction=frac) for t in cfg.tasks]


def split_record(cfg: Any) -> dict[str, Any]:
    """What ``splits.json`` records: per search task, the size of each split and where its
    validation split comes from (a file, or the carve-out and the digests it chose)."""
    from ..fitness import load_tasks
    from ..fitness.tasks import example_key

    out: dict[str, Any] = {"validation_fraction": cfg.selection.validation_fraction, "tasks": {}}
    for task in load_tasks(task_entries(cfg)):
        entry: dict[str, Any] = {"sizes": {k: len(v) for k, v in task.splits.items()},
                                 "validation_source": task.validation_source}
        if task.validation_source and task.validation_source.startswith("carve-out"):
            entry["validation_keys"] = sorted(example_key(e)[:16] for e in task.splits["validation"])
        out["tasks"][task.name] = entry
    return out
