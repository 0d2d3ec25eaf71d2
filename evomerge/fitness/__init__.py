"""Fitness: task definitions, per-example scoring, and the backends that run models.

A run's tasks are YAML files (:func:`load_tasks`); a backend (:func:`make_backend`, "hf"
by default) scores each task per example in [0, 1]; :func:`combined_fitness` turns the
per-task means into the single number the optimizer maximizes, and :func:`flatten_scores`
gives the per-example row that per-example algorithms (M2N2) use.
"""

from __future__ import annotations

from .backends import Backend, make_backend, register_backend
from .scoring import (
    SCORERS,
    Loglik,
    combined_fitness,
    evaluate_task,
    evaluate_tasks,
    flatten_scores,
    register_scorer,
    task_weights,
    truncate_at_stop,
)
from .tasks import SPLITS, Example, Task, TaskSpec, load_task, load_tasks

__all__ = [
    "SCORERS",
    "SPLITS",
    "Backend",
    "Example",
    "Loglik",
    "Task",
    "TaskSpec",
    "combined_fitness",
    "evaluate_task",
    "evaluate_tasks",
    "flatten_scores",
    "load_task",
    "load_tasks",
    "make_backend",
    "register_backend",
    "register_scorer",
    "task_weights",
    "truncate_at_stop",
]
