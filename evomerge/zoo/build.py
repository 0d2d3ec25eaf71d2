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

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import tasks as zoo_tasks
from .cache import Progress, ZooError, default_root, staged_build
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
    folder = Path(root).expanduser() if root is not None else default_root()
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
    base_root = Path(root).expanduser() if root is not None else default_root()
    final = (base_root / spec.folder_name).absolute()
    if not force:
        cached = _read_manifest(final, spec)
        if cached is not None:
            cached.cache_hit = True
            return cached
    try:
        base_root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ZooError(f"cannot create zoo root {base_root}: {err}") from err
    with staged_build(final, keep_existing=None if force else lambda: _read_manifest(final, spec) is not None) as tmp:
        _build_into(spec, tmp, final, progress)  # a concurrent build that finished first is kept: same bytes
    return load_zoo_dir(final)


class _StepCounter:
    def __init__(self, spec: ZooSpec, progress: Progress | None):
        self.total = spec.total_steps()
        self.done = 0
        self.progress = progress

    def advance(self, stage: str, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(stage, self.done, self.total)


def _build_into(spec: ZooSpec, out: Path, final: Path, progress: Progress | None) -> ZooManifest:
    import torch

    from .tokenizer import make_tokenizer

    t0 = time.perf_counter()
    counter = _StepCounter(spec, progress)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    bars_were_on = _quiet_transformers()
    try:
        tokenizer = make_tokenizer(zoo_tasks.SYMBOLS, model_max_length=spec.model.max_position_embeddings)
        zoo_tasks.write_task_files(out / "tasks")

        if progress is not None:
            progress("base", 0, counter.total)
        base_dir = out / "base"
        base_metrics, base_train = _train_base(spec, tokenizer, base_dir, counter)
        base = ZooMember("base", "base", final / "base", metrics=base_metrics, train=base_train)

        results = _train_experts(spec, base_dir, out, counter)
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


def _quiet_transformers() -> bool:
    """Turn off transformers' per-file progress bars (the build has its own); returns
    whether they were on."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    return was_on


def _device():
    """The zoo always trains on CPU, even where CUDA is present: the models are tiny (a GPU
    gains nothing) and CPU kernels at a fixed thread count make the build bit-reproducible,
    which the config-hash cache relies on."""
    import torch

    return torch.device("cpu")


def _train_base(spec: ZooSpec, tokenizer, base_dir: Path, counter: _StepCounter):
    from .model import new_model
    from .tokenizer import build_vocab
    from .train import train

    vocab = build_vocab(zoo_tasks.SYMBOLS)
    model = new_model(spec.model, tokenizer, spec.init_seed).to(_device())
    result = train(
        model,
        list(model.parameters()),
        spec.base_train,
        zoo_tasks.BASE_MIX,
        vocab,
        on_step=lambda s: counter.advance("base", 1),
    )
    metrics = _metrics(model, vocab, base_dir.parent / "tasks", spec.eval_items, extra=True)
    _save_model(model, tokenizer, base_dir)
    return metrics, {**result.to_dict(), "mix": zoo_tasks.BASE_MIX.to_dict()}


def _save_model(model, tokenizer, directory: Path) -> None:
    model = model.to("cpu")
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


def _metrics(model, vocab: dict[str, int], tasks_dir: Path, eval_items: int | None, extra: bool = False) -> dict[str, float]:
    """Held-out exact match (percent) on the zoo's tasks (+ the base's own skills)."""
    import random

    from .quick_eval import accuracy

    kw = {"bos_id": vocab["<s>"], "eos_id": vocab["</s>"]}
    out: dict[str, float] = {}
    for t in zoo_tasks.TASKS:
        if t.name == "combined":
            continue
        recs = zoo_tasks.load_records(tasks_dir / f"{t.name}.heldout.jsonl")
        exs = zoo_tasks.eval_examples(recs)[:eval_items]
        out[t.name] = round(accuracy(model, exs, vocab, **kw), 2)
    slices = [out[f"cipher_{s}"] for s in zoo_tasks.SLICES]
    out["combined"] = round(sum(slices) / len(slices), 2)
    if extra:
        n = eval_items or 200
        for skill in ("copy", "cipher_digits", "cipher_upper"):
            exs = zoo_tasks.sample_examples(skill, random.Random(f"metrics:{skill}"), n, "heldout", set())
            out[skill] = round(accuracy(model, exs, vocab, **kw), 2)
    return out


def _train_one_expert(spec: ZooSpec, expert_name: str, base_dir: str, out_dir: str, report=None):
    """Train one expert from the saved base and write it. Runs in a worker process too."""
    import torch

    from .tokenizer import build_vocab, make_tokenizer
    from .train import attach_lora, detach_lora, lora_params, lora_state_dict, train

    torch.set_num_threads(spec.threads)
    expert = next(e for e in spec.experts if e.name == expert_name)
    vocab = build_vocab(zoo_tasks.SYMBOLS)
    tokenizer = make_tokenizer(zoo_tasks.SYMBOLS, model_max_length=spec.model.max_position_embeddings)
    model = _load_base(base_dir)
    mix = zoo_tasks.expert_mix(expert.slice, expert.replay)
    on_step = (lambda s: report(expert.name, 1)) if report is not None else None  # one step done
    out = Path(out_dir)
    if expert.kind == "full":
        result = train(model, list(model.parameters()), expert.train, mix, vocab, on_step=on_step)
        metrics = _metrics(model, vocab, Path(base_dir).parent / "tasks", spec.eval_items)
        _save_model(model, tokenizer, out)
    else:
        wrapped = attach_lora(model, spec.lora, seed=expert.train.seed)
        result = train(model, lora_params(wrapped), expert.train, mix, vocab, on_step=on_step)
        metrics = _metrics(model, vocab, Path(base_dir).parent / "tasks", spec.eval_items)
        factors = lora_state_dict(wrapped)
        detach_lora(model, wrapped)
        _save_lora(factors, spec.lora, out)
    return metrics, {**result.to_dict(), "mix": mix.to_dict()}


def _load_base(base_dir: str):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype="float32")
    return model.to(_device())


def _save_lora(factors: dict[str, Any], lora: LoraSpec, out: Path) -> None:
    """A PEFT adapter directory; ``base_model_name_or_path`` is relative to it."""
    from ..checkpoint.lora import save_lora_adapter

    pairs = {}
    for key, a in factors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len("base_model.model.") : -len(".lora_A.weight")]
            pairs[module] = (a, factors[key.replace(".lora_A.", ".lora_B.")])
    save_lora_adapter(out, pairs, r=lora.rank, alpha=lora.alpha, target_modules=list(lora.targets), base_model_path="../../base")


def _train_experts(spec: ZooSpec, base_dir: Path, out: Path, counter: _StepCounter):
    dirs = {e.name: str(out / ("experts" if e.kind == "full" else "lora") / e.name) for e in spec.experts}
    workers = min(spec.workers, os.cpu_count() or 1, len(spec.experts))
    if workers <= 1:
        results: dict[str, Any] = {}
        for e in spec.experts:
            results[e.name] = _train_one_expert(
                spec, e.name, str(base_dir), dirs[e.name], report=counter.advance
            )
        return results
    from .worker import run_workers

    scratch = out / ".workers"
    try:
        return run_workers("evomerge.zoo.worker", spec, {e.name: e.train.steps for e in spec.experts},
                           str(base_dir), dirs, scratch, workers, counter.advance)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
