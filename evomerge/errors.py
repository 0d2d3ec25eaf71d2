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


def format_validation_error(err, source) -> str:
    """One line for a pydantic ``ValidationError``: ``<source>: <field.path>: <problem>``.

    The first error is named (an unknown field, a missing required field, or pydantic's own
    message); further errors are counted as ``(and N more)``. Shared by configs, task files and
    lm-eval task files so every file a user writes is reported in the same words.

    Args:
        err: a ``pydantic.ValidationError`` (anything with an ``errors()`` list of dicts).
        source: the file or name the data came from (a path or a string).
    """
    errors = err.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "required field is missing"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"
