"""Imports every built-in operator module so their ``@register_op`` decorators run."""

from __future__ import annotations

from . import linear, model_stock, passthrough, spherical, task_vectors  # noqa: F401
