"""The contract every fitness backend implements (hf, vllm, api).

A backend owns a *resident* model and scores tasks on it per example. The engine writes
each candidate's weights into the resident model in place (through
:meth:`Backend.target_tensors` and the materializer) and then calls :meth:`evaluate`.
Backends never know about genomes, optimizers or runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import ConfigError
from ...registry import Registry

if TYPE_CHECKING:
    import torch

    from ..tasks import Task


class Backend(ABC):
    """``model_dir``: an HF checkpoint directory giving config + tokenizer (and initial weights)."""

    def __init__(self, model_dir: str, device: str | None = None, **options: Any):
        self.model_dir = model_dir
        self.device = device
        self.options = options

    @abstractmethod
    def target_tensors(self) -> Mapping[str, torch.Tensor]:
        """The resident model's tensors by HF name, for in-place writes by the materializer.

        Tied weights appear once under each name and share storage. Backends whose weights
        live elsewhere (vLLM, APIs) return ``{}`` and implement :meth:`load_plan` instead.
        """

    def load_plan(self, plan: Any, materializer: Any) -> None:
        """Put a MergePlan's weights into the resident model. Default: in place via torch."""
        materializer.materialize_into(plan, self.target_tensors())

    @abstractmethod
    def evaluate(self, tasks: list[Task], split: str = "search") -> dict[str, np.ndarray]:
        """Score every task's examples; returns task name -> float array of per-example scores."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release the resident model / engine / connections."""


_BACKENDS: Registry[type[Backend]] = Registry(
    "fitness backend", "backend.name: ", ConfigError, "evomerge.fitness.backends.builtin")


def register_backend(name: str):
    """Class decorator registering a fitness backend under the ``backend.name`` users write."""
    return _BACKENDS.register(name)


def make_backend(name: str, **kwargs: Any) -> Backend:
    return _BACKENDS.get(name)(**kwargs)
