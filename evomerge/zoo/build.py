"""Build, cache and load the model zoo: a base model, full fine-tuned experts, LoRA experts.

``build_zoo(variant)`` trains everything deterministically on CPU and writes ordinary
checkpoints::

    <root>/<variant>-<hash12>/
        zoo.json               manifest (written last): names, paths, tasks, metrics, config
        base/                  HF Llama checkpoint + tokenizer
        experts/<name>/        full fine-tunes of base, HF checkpoints + tokenizer
        lora/<name>/           PEFT LoRA adapters of base (adapter_config.json + safetensors)
        tasks/                 the zoo's fitness tasks (same bytes as fitness/zoo in the repo)

``hash12`` is the hash of the variant's whole spec (model, training recipes, seeds, threads,
task definitions and format version), so a changed recipe never reuses an old build, and an
unchanged one is never trained twice. The folder is assembled under a temporary name and
renamed into place at the end: an interrupted build leaves only a ``.partial`` folder,
which is never taken for a zoo and is cleared by the next build.

Determinism: every model is trained with a fixed torch thread count (``threads`` in the
spec) from seeded generators, so two builds give byte-identical safetensors. Experts are
independent of each other, so the ``full`` variant trains them in ``workers`` processes at
once (one thread each): the bytes do not depend on how many run in parallel.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import tasks as zoo_tasks
from .cache import Progress, ZooError, default_root, reuse, root_of, staged_build
from .spec import MANIFEST, VARIANTS, ZOO_FORMAT, ExpertSpec, ZooSpec, zoo_spec
from .train_members import StepCounter, quiet_transformers, train_base, train_experts

__all__ = [
    "MANIFEST", "VARIANTS", "ZOO_FORMAT", "ExpertSpec", "Progress", "ZooError", "ZooManifest", "ZooMember",
    "ZooSpec", "build_zoo", "build_zoo_spec", "default_root", "load_zoo", "load_zoo_dir", "zoo_spec",
]

# --- manifest --------------------------------------------------------------------------


@dataclass
class ZooMember:
    name: str
    kind: str  # "base", "full" or "lora"
    path: Path  # absolute
    skill: str | None = None
    task: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


@dataclass
class ZooManifest:
    """A built zoo: where its models and tasks are, and how they were made."""

    root: Path
    variant: str
    config_hash: str
    base: ZooMember
    experts: list[ZooMember]
    lora: list[ZooMember]
    tasks_dir: Path
    task_names: list[str]
    build_seconds: float
    built_at: str
    config: dict[str, Any]
    cache_hit: bool = False

    @property
    def expert_paths(self) -> dict[str, Path]:
        return {m.name: m.path for m in self.experts}

    @property
    def lora_paths(self) -> dict[str, Path]:
        return {m.name: m.path for m in self.lora}

    def member(self, name: str) -> ZooMember:
        for m in [self.base, *self.experts, *self.lora]:
            if m.name == name:
                return m
        raise ZooError(f"zoo {self.root}: no member named {name!r}")

    def task_yaml(self, name: str) -> Path:
        return self.tasks_dir / f"{name}.yaml"

    def to_dict(self) -> dict[str, Any]:
        def mem(m: ZooMember) -> dict[str, Any]:
            return {
                "name": m.name,
                "kind": m.kind,
                "path": m.path.relative_to(self.root).as_posix(),
                "skill": m.skill,
                "task": m.task,
                "metrics": m.metrics,
                "train": m.train,
            }

        return {
            "format": ZOO_FORMAT,
            "variant": self.variant,
            "config_hash": self.config_hash,
            "base": mem(self.base),
            "experts": [mem(m) for m in self.experts],
            "lora": [mem(m) for m in self.lora],
            "tasks_dir": self.tasks_dir.relative_to(self.root).as_posix(),
            "tasks": self.task_names,
            "build_seconds": round(self.build_seconds, 2),
            "built_at": self.built_at,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, root: Path, d: dict[str, Any]) -> ZooManifest:
        def mem(x: dict[str, Any]) -> ZooMember:
            return ZooMember(
                name=x["name"],
                kind=x["kind"],
                path=root / x["path"],
                skill=x.get("skill"),
                task=x.get("task"),
                metrics=x.get("metrics", {}),
                train=x.get("train", {}),
            )

        return cls(
            root=root,
            variant=d["variant"],
            config_hash=d["config_hash"],
            base=mem(d["base"]),
            experts=[mem(x) for x in d["experts"]],
            lora=[mem(x) for x in d["lora"]],
            tasks_dir=root / d["tasks_dir"],
            task_names=list(d["tasks"]),
            build_seconds=float(d["build_seconds"]),
            built_at=d["built_at"],
            config=d["config"],
        )


def load_zoo(variant: str = "full", root: str | Path | None = None) -> ZooManifest:
    """The complete zoo of ``variant`` under ``root``; ZooError if it was never built."""
    spec = zoo_spec(variant)
    folder = root_of(root)
    manifest = _read_manifest(folder / spec.folder_name, spec)
    if manifest is None:
        raise ZooError(
            f"no complete {variant!r} zoo in {folder / spec.folder_name}; build it with `evomerge zoo build --variant {variant}`"
        )
    return manifest


def load_zoo_dir(path: str | Path) -> ZooManifest:
    """A zoo from its own folder (the one holding ``zoo.json``)."""
    root = Path(path).expanduser()
    mf = root / MANIFEST
    if not mf.is_file():
        raise ZooError(f"{root} is not a complete zoo: {MANIFEST} is missing")
    try:
        return ZooManifest.from_dict(root.absolute(), json.loads(mf.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as err:
        raise ZooError(f"{mf}: unreadable zoo manifest ({err})") from err


def _read_manifest(folder: Path, spec: ZooSpec) -> ZooManifest | None:
    """The manifest when ``folder`` is a complete zoo of exactly ``spec``, else None."""
    mf = folder / MANIFEST
    if not mf.is_file():
        return None
    try:
        d = json.loads(mf.read_text(encoding="utf-8"))
        if d.get("format") != ZOO_FORMAT or d.get("config_hash") != spec.config_hash():
            return None
        manifest = ZooManifest.from_dict(folder.absolute(), d)
    except (ValueError, KeyError, TypeError):
        return None
    for m in [manifest.base, *manifest.experts, *manifest.lora]:
        if not m.path.is_dir():
            return None
    return manifest


# --- building --------------------------------------------------------------------------


def build_zoo(
    variant: str = "full",
    root: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ZooManifest:
    """Build the zoo ``variant`` (or return the cached build of the same spec).

    ``root`` defaults to :func:`default_root`. ``force`` rebuilds even when a complete
    build exists (it is replaced only once the new one is complete). ``progress`` is called
    as ``progress(stage, steps_done, steps_total)`` while training.
    """
    return build_zoo_spec(zoo_spec(variant), root=root, force=force, progress=progress)


def build_zoo_spec(
    spec: ZooSpec,
    root: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ZooManifest:
    """:func:`build_zoo` for an explicit :class:`ZooSpec` (e.g. a variant with more workers)."""
    base_root = root_of(root)
    final = (base_root / spec.folder_name).absolute()
    cached = None if force else reuse(final, lambda f: _read_manifest(f, spec))
    if cached is not None:
        return cached
    try:
        base_root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ZooError(f"cannot create zoo root {base_root}: {err}") from err
    with staged_build(final, keep_existing=None if force else lambda: _read_manifest(final, spec) is not None) as tmp:
        _build_into(spec, tmp, final, progress)  # a concurrent build that finished first is kept: same bytes
    return load_zoo_dir(final)


def _build_into(spec: ZooSpec, out: Path, final: Path, progress: Progress | None) -> ZooManifest:
    import torch

    from .tokenizer import make_tokenizer

    t0 = time.perf_counter()
    counter = StepCounter(spec, progress)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    bars_were_on = quiet_transformers()
    try:
        tokenizer = make_tokenizer(zoo_tasks.SYMBOLS, model_max_length=spec.model.max_position_embeddings)
        zoo_tasks.write_task_files(out / "tasks")

        if progress is not None:
            progress("base", 0, counter.total)
        base_dir = out / "base"
        base_metrics, base_train = train_base(spec, tokenizer, base_dir, counter)
        base = ZooMember("base", "base", final / "base", metrics=base_metrics, train=base_train)

        results = train_experts(spec, base_dir, out, counter)
    finally:
        torch.set_num_threads(prev_threads)
        if bars_were_on:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()

    experts, loras = [], []
    for e in spec.experts:
        metrics, train_info = results[e.name]
        sub = "experts" if e.kind == "full" else "lora"
        member = ZooMember(e.name, e.kind, final / sub / e.name, e.skill, e.skill, metrics, train_info)
        (experts if e.kind == "full" else loras).append(member)
    manifest = ZooManifest(
        root=final,
        variant=spec.variant,
        config_hash=spec.config_hash(),
        base=base,
        experts=experts,
        lora=loras,
        tasks_dir=final / "tasks",
        task_names=[t.name for t in zoo_tasks.TASKS],
        build_seconds=time.perf_counter() - t0,
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        config={**spec.to_dict(), "workers": spec.workers, "torch": torch.__version__, "python": platform.python_version()},
    )
    # the manifest goes last: a folder without it is never a complete zoo
    (out / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    return manifest


