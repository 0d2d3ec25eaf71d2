"""The few typed errors users can cause. Each carries one clear line naming the problem.

The CLI catches :class:`EvomergeError`, prints ``error: <message>`` and exits non-zero.
``assert`` is kept for programming errors only.
"""

from __future__ import annotations


class EvomergeError(Exception):
    """Base of every error a user can cause. ``str(err)`` is one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(EvomergeError):
    """A YAML config or recipe is wrong: the message names the field path."""


class CheckpointError(EvomergeError):
    """A checkpoint is missing, unreadable, corrupt, or not safetensors."""


class IncompatibleModelsError(EvomergeError):
    """Source models cannot be merged: the message names the model and tensor."""


class PlanError(EvomergeError):
    """A MergePlan is invalid (unknown operator, bad parameters, bad tensor refs)."""


class TaskError(EvomergeError):
    """A fitness task is missing, empty or malformed."""


class BackendError(EvomergeError):
    """A fitness backend failed in a way the user can fix (bad response, bad endpoint)."""


class RunError(EvomergeError):
    """A run directory is missing, locked, or its config changed since it was created."""
