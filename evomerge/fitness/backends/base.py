"""The contract every fitness backend implements (hf, vllm, api).

A backend owns a *resident* model and scores tasks on it per example. The engine writes
each candidate's weights into the resident model in place (through
:meth:`Backend.target_tensors` and the materializer) and then calls :meth:`evaluate`.
Backends never know about genomes, optimizers or runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import BackendError, ConfigError
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


class LocalBackend(Backend):
    """A backend whose resident model is read from a local HF checkpoint (hf, vllm).

    One constructor for all of them: it records the arguments, checks ``batch_size`` (None:
    the backend's :attr:`default_batch_size`) and hands the checkpoint directory to
    :meth:`open_model`, which each backend implements.

    Raises:
        BackendError: ``batch_size`` below 1, or what :meth:`open_model` refuses.
    """

    #: ``batch_size`` when none is given
    default_batch_size: int = 64

    def __init__(self, model_dir: str, device: str | None = None, dtype: Any = None,
                 batch_size: int | None = None, **opts: Any):
        super().__init__(str(model_dir), device, **opts)
        size = self.default_batch_size if batch_size is None else batch_size
        if int(size) < 1:
            raise BackendError(f"backend.batch_size: must be >= 1, got {size}")
        self.batch_size = int(size)
        self.tokenizer: Any = None
        self._encode_cache: dict[str, list[int]] = {}
        self.open_model(Path(model_dir).expanduser(), dtype, opts)

    @abstractmethod
    def open_model(self, path: Path, dtype: Any, opts: dict[str, Any]) -> None:
        """Load the model at ``path`` with the backend's ``opts`` (``self.device`` and
        ``self.batch_size`` are set; it sets ``self.tokenizer``); BackendError /
        CheckpointError on bad input."""

    # -- tokenization, the same for every local backend -----------------------------------

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with the tokenizer's special tokens (BOS). Memoized: the same prompts
        are encoded for every candidate."""
        from .prompting import encode_cached

        return encode_cached(self.tokenizer, self._encode_cache, texts)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


_BACKENDS: Registry[type[Backend]] = Registry(
    "fitness backend", "backend.name: ", ConfigError, "evomerge.fitness.backends.builtin")


def register_backend(name: str):
    """Class decorator registering a fitness backend under the ``backend.name`` users write."""
    return _BACKENDS.register(name)


def make_backend(name: str, **kwargs: Any) -> Backend:
    return _BACKENDS.get(name)(**kwargs)
