"""The objectives of a run: per-task mean scores grouped into named, maximized objectives.

A run config may declare ``objectives:`` (each a name and the tasks it averages, weighted by
the tasks' weights); without it every task is its own objective. The weighted sum over all
tasks stays the run's scalar ``fitness``. Everything here works from a record's ``scores``
(task name -> mean score), so the objectives of any logged run, old ones included, can be
recomputed from its evaluation log alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError


@dataclass
class Objectives:
    names: list[str]
    groups: list[list[str]]  # tasks averaged by each objective
    weights: dict[str, float]  # task -> weight

    @classmethod
    def build(cls, declared: Sequence[Any], task_names: Sequence[str],
              weights: Mapping[str, float] | None = None) -> Objectives:
        """From a config's ``objectives`` (ObjectiveConfig or dicts) and the task names."""
        w = {t: float((weights or {}).get(t, 1.0)) for t in task_names}
        if not declared:
            return cls(list(task_names), [[t] for t in task_names], w)
        names, groups = [], []
        for i, o in enumerate(declared):
            name = o["name"] if isinstance(o, Mapping) else o.name
            tasks = list(o["tasks"] if isinstance(o, Mapping) else o.tasks)
            if name in names:
                raise ConfigError(f"objectives[{i}].name: {name!r} appears twice")
            for t in tasks:
                if t not in w:
                    raise ConfigError(f"objectives[{i}].tasks: {t!r} is not a task of the run "
                                      f"(tasks: {', '.join(task_names)})")
            if sum(w[t] for t in tasks) <= 0:
                raise ConfigError(f"objectives[{i}]: its tasks' weights sum to zero")
            names.append(name)
            groups.append(tasks)
        return cls(names, groups, w)

    @classmethod
    def of_run(cls, cfg: Any, records: Sequence[Mapping[str, Any]]) -> Objectives:
        """A logged run's objectives; task names come from the records' ``scores`` (in task
        order), weights from the config's task list."""
        names: list[str] = []
        for r in records:
            if r.get("scores"):
                names = list(r["scores"])
                break
        weights = {t: float(ref.weight) for t, ref in zip(names, cfg.tasks)}
        return cls.build(getattr(cfg, "objectives", None) or [], names, weights)

    @property
    def m(self) -> int:
        return len(self.names)

    def values(self, scores: Mapping[str, float]) -> np.ndarray:
        """Objective vector of one record's per-task mean scores."""
        out = np.empty(self.m)
        for k, tasks in enumerate(self.groups):
            tw = np.array([self.weights[t] for t in tasks])
            out[k] = float(np.dot(tw, [float(scores[t]) for t in tasks]) / tw.sum())
        return out
