"""What a zoo variant is: the model, training recipes, seeds and threads of each variant,
and the config hash that keys its cached build (see :mod:`evomerge.zoo.build`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from . import tasks as zoo_tasks
from .cache import ZooError
from .model import ModelSpec
from .train import LoraSpec, TrainSpec

ZOO_FORMAT = 1
MANIFEST = "zoo.json"
VARIANTS = ("full", "test")

@dataclass(frozen=True)
class ExpertSpec:
    """One expert: fine-tuned on ``slice`` (a key of :data:`tasks.SLICES`) with replay."""

    name: str
    slice: str
    kind: str  # "full" or "lora"
    train: TrainSpec
    replay: float = 0.3

    @property
    def skill(self) -> str:
        return f"cipher_{self.slice}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "slice": self.slice,
            "kind": self.kind,
            "replay": self.replay,
            "train": self.train.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpertSpec:
        return cls(d["name"], d["slice"], d["kind"], TrainSpec.from_dict(d["train"]), float(d["replay"]))


@dataclass(frozen=True)
class ZooSpec:
    variant: str
    model: ModelSpec
    base_train: TrainSpec
    experts: tuple[ExpertSpec, ...]
    lora: LoraSpec = field(default_factory=LoraSpec)
    threads: int = 1
    workers: int = 1  # expert training processes; does not change any byte (not hashed)
    eval_items: int | None = None  # held-out items per task for the manifest's metrics
    init_seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ZOO_FORMAT,
            "variant": self.variant,
            "model": self.model.to_dict(),
            "base_train": self.base_train.to_dict(),
            "experts": [e.to_dict() for e in self.experts],
            "lora": self.lora.to_dict(),
            "threads": self.threads,
            "eval_items": self.eval_items,
            "init_seed": self.init_seed,
            "tasks": _tasks_signature(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZooSpec:
        """The inverse of :meth:`to_dict` (``workers`` is not part of it: 1 unless given)."""
        if d.get("format") != ZOO_FORMAT:
            raise ZooError(f"zoo spec format {d.get('format')!r} is not {ZOO_FORMAT}")
        return cls(
            variant=d["variant"],
            model=ModelSpec.from_dict(d["model"]),
            base_train=TrainSpec.from_dict(d["base_train"]),
            experts=tuple(ExpertSpec.from_dict(e) for e in d["experts"]),
            lora=LoraSpec.from_dict(d["lora"]),
            threads=int(d["threads"]),
            workers=int(d.get("workers", 1)),
            eval_items=d["eval_items"],
            init_seed=int(d["init_seed"]),
        )

    def config_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def folder_name(self) -> str:
        return f"{self.variant}-{self.config_hash()[:12]}"

    def total_steps(self) -> int:
        return self.base_train.steps + sum(e.train.steps for e in self.experts)


def _tasks_signature() -> dict[str, Any]:
    """What defines the zoo's skills: changing any of it changes the hash."""
    return {
        "symbols": zoo_tasks.SYMBOLS,
        "slices": zoo_tasks.SLICES,
        "table_seed": zoo_tasks.TABLE_SEED,
        "lengths": [zoo_tasks.MIN_LEN, zoo_tasks.MAX_LEN],
        "base_mix": zoo_tasks.BASE_MIX.to_dict(),
        "task_seed": zoo_tasks.TASK_SEED,
        "tasks": [[t.name, list(t.skills), t.n_search, t.n_heldout] for t in zoo_tasks.TASKS],
    }


def _experts(
    kind: str, recipes: dict[str, tuple[float, int]], batch: int, prefix: str, embed_lr_mult: float = 1.0
) -> tuple[ExpertSpec, ...]:
    return tuple(
        ExpertSpec(
            name=f"{prefix}_{s}",
            slice=s,
            kind=kind,
            train=TrainSpec(
                steps=steps,
                lr=lr,
                batch_size=batch,
                warmup=min(20, steps // 4),
                embed_lr_mult=embed_lr_mult,
                seed=101 + i,
            ),
        )
        for i, (s, (lr, steps)) in enumerate(recipes.items())
    )


def zoo_spec(variant: str) -> ZooSpec:
    """The built-in zoo variants.

    ``full``: the demo's zoo (hidden 128, 2 layers, ~0.5 M parameters). What makes its three
    experts mergeable, measured on this design (NOTES.md, "zoo"):

    - the base already runs the cipher mechanism on letters (the ``upper`` group), so an
      expert mostly adds table entries for its own slice;
    - expert fine-tunes move the embedding matrix 10x faster than the layers
      (``embed_lr_mult``): a slice's skill then sits largely in its own letters' rows,
      which do not collide between experts (without it, merges kept two slices of three);
    - experts use different learning rates (1e-3, 5e-4, 2.5e-4), so their task vectors
      differ in size and the best merge weights are far from uniform.

    ``test``: the same files and formats from a model small and short enough to build in
    seconds (quality irrelevant), for the test suite.
    """
    if variant == "full":
        return ZooSpec(
            variant="full",
            model=ModelSpec(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512),
            base_train=TrainSpec(steps=400, lr=3e-3, batch_size=128, warmup=20, weight_decay=0.1, seed=1),
            experts=_experts(
                "full", {"a": (1e-3, 100), "b": (5e-4, 100), "c": (2.5e-4, 100)}, 128, "expert", embed_lr_mult=10.0
            )
            + _experts("lora", {"a": (4e-3, 100), "b": (3e-3, 100), "c": (2e-3, 100)}, 128, "lora"),
            threads=1,
            workers=2,
            eval_items=None,
        )
    if variant == "test":
        return ZooSpec(
            variant="test",
            model=ModelSpec(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32),
            base_train=TrainSpec(steps=6, lr=3e-3, batch_size=16, warmup=2, weight_decay=0.1, seed=1),
            experts=_experts(
                "full", {"a": (1e-3, 3), "b": (5e-4, 3), "c": (2.5e-4, 3)}, 16, "expert", embed_lr_mult=10.0
            )
            + _experts("lora", {"a": (4e-3, 3), "b": (3e-3, 3), "c": (2e-3, 3)}, 16, "lora"),
            lora=LoraSpec(rank=4, alpha=8.0),
            threads=1,
            workers=1,
            eval_items=8,
        )
    raise ConfigError(f"zoo variant: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
