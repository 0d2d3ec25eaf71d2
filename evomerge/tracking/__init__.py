"""Experiment logging: run records streamed to TensorBoard, Weights & Biases or MLflow.

One small callback interface (:class:`RunLogger`), fed by :class:`RunLogFeed`, which tails a
run directory's append-only evaluation log: loggers see plain records, never live objects,
so an old run can be replayed into a tracker as well as a live one. No tracker is a hard
dependency: TensorBoard is used by default when ``tensorboard`` is installed; W&B and
MLflow only when asked for (and installed).
"""

from .base import LOGGERS, RunLogFeed, RunLogger, default_loggers, make_loggers

__all__ = ["LOGGERS", "RunLogFeed", "RunLogger", "default_loggers", "make_loggers"]
