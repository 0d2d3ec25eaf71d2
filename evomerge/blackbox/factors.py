"""A LoRA pool's raw factor tensors as checkpoint readers (see :mod:`.pool`).

:class:`FactorReader` presents one adapter's A/B factors with the CheckpointReader API the
materializer expects; :class:`FactorMaterializer` is the standard materializer over them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.layout import ModelLayout
from ..checkpoint.lora import LoraReader
from ..checkpoint.reader import natural_key
from ..errors import CheckpointError
from ..materialize import Materializer
from ..plan import MergePlan


class FactorReader:
    """One adapter's raw LoRA factors presented with the CheckpointReader API.

    Tensor names are ``<module>.lora_A.weight`` (``[r, in]``) and ``<module>.lora_B.weight``
    (``[out, r]``) for every adapted module (``module`` = dense weight name without
    ``.weight``). ``B`` comes with the adapter's scale (``lora_alpha / r``, or the rsLoRA
    scale) folded in, so adapters trained with different alphas mix correctly and the
    merged adapter has scale 1. Tensors are float32 on CPU.
    """

    def __init__(self, lora: LoraReader):
        self.lora = lora
        self.path = lora.path
        self.config = lora.config
        self._factors: dict[str, tuple[str, str]] = {}  # factor name -> (dense weight, part)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for weight in lora.lora_modules:
            f = lora.lora_factors(weight)
            assert f is not None
            module = weight[: -len(".weight")]
            for part, t in (("A", f.A), ("B", f.B)):
                name = f"{module}.lora_{part}.weight"
                self._factors[name] = (weight, part)
                self._shapes[name] = tuple(t.shape)
        self.names = sorted(self._factors, key=natural_key)

    @property
    def layout(self) -> ModelLayout:
        from ..checkpoint.layout import detect_layout

        return detect_layout(self.names, self.config)

    @property
    def is_lora(self) -> bool:
        return False

    @property
    def tokenizer_dir(self) -> Path | None:
        return None

    def has(self, name: str) -> bool:
        return name in self._factors

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return self._shapes[name]
        except KeyError:
            raise CheckpointError(f"adapter {self.path} has no LoRA factor {name!r}") from None

    def dtype(self, name: str) -> torch.dtype:
        self.shape(name)
        return torch.float32

    def get(self, name: str, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        self.shape(name)
        weight, part = self._factors[name]
        f = self.lora.lora_factors(weight)
        assert f is not None
        t = f.A.to(torch.float32) if part == "A" else f.B.to(torch.float32) * float(f.scale)
        return t.to(device=device, dtype=dtype or torch.float32)


class FactorMaterializer(Materializer):
    """The standard materializer with the pool's factor readers as its sources."""

    def __init__(self, readers: Mapping[str, FactorReader], device: torch.device):
        super().__init__(device=device, cache_sources=True)  # factors are small: keep them
        self.readers = dict(readers)

    def check(self, plan: MergePlan, readers: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return super().check(plan, readers if readers is not None else self.readers)
