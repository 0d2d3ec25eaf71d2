"""The zoo's LoRA pool: many PEFT adapters over the zoo base, for black-box merging.

Issue 7's provider holds a base model and a pool of LoRA adapters; users search a control
vector (per adapter: sparsity alpha of LoRA-A, signed scale beta) for their target tasks
without ever seeing weights. ``build_zoo_pool(variant)`` trains such a pool over the zoo
base of the same variant (see :mod:`evomerge.zoo.pool_tasks` for the skills: relevant
half-slice ciphers, harmful wrong-table ciphers, irrelevant other skills)::

    <zoo root>/pool-<variant>-<hash12>/
        pool.json              manifest (written last): adapters, descriptions, metrics
        base/                  a byte copy of the zoo base (the pool folder stands alone)
        adapters/<name>/       PEFT LoRA adapters over base/ (same rank and modules)
        tasks/                 target tasks (the zoo's) + every adapter's own task

``hash12`` hashes the pool spec together with the zoo's own config hash, so a changed
base or recipe never reuses an old pool. Like the zoo, the folder is assembled under a
``.partial`` name and renamed into place, and training is deterministic (seeded, fixed
thread count): two builds give byte-identical adapters whatever the number of workers.

Every adapter starts from the *same* LoRA-A initialisation (one seed for the pool). The
black-box merge rule sums A's and B's separately (merged A = sum beta_i A_i, merged B =
sum beta_i B_i), so the merged delta holds cross terms B_i A_j; they only make sense
are smaller when the A's start from a shared subspace (real pools get that for free:
LoRA trainers seed every run alike). Measured on this pool (150 held-out items): with
independent A initialisations no factor-space merge of the relevant adapters beat 7%;
with the shared one, the six relevant adapters at beta 0.3 reach ~9% on ``combined``
while every single adapter stays at <= 3% and the uniform merge at 0%. Half as much
replay of the base mix (0.5 instead of the zoo's 0.3) kept dense merges best (39% vs 33%).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import pool_tasks as pt
from . import tasks as zt
from .build import build_zoo
from .cache import Progress, ZooError, reuse, root_of, staged_build
from .pool_reference import (  # noqa: F401 (merge_deltas, read_factors: re-exported)
    TARGET_TASKS,
    merge_deltas,
    read_factors,
    reference_merges,
    target_examples,
    vocab_kw,
)
from .train import LoraSpec, TrainSpec
from .train_members import quiet_transformers

POOL_FORMAT = 1
POOL_MANIFEST = "pool.json"
POOL_VARIANTS = ("full", "test")
"""The zoo tasks the pool is searched for (their ``search`` split) and reported on (held-out)."""

POOL_ORDER = (
    "cipher_a1",
    "reverse_digits",
    "cipher_b2",
    "wrongcipher_a2",
    "cipher_c1",
    "cipher_a2",
    "sort_upper",
    "wrongcipher_b1",
    "cipher_b1",
    "cipher_c2",
    "wrongcipher_c2",
)
"""Pool order: roles interleaved, so no prefix of the pool is the answer."""


# --- spec ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterSpec:
    """One pool adapter: trained on pool skill ``skill`` with ``replay`` of the base mix."""

    name: str
    skill: str
    train: TrainSpec
    replay: float = 0.3

    @property
    def role(self) -> str:
        return pt.POOL_SKILLS[self.skill].role

    @property
    def description(self) -> str:
        return pt.POOL_SKILLS[self.skill].description

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "skill": self.skill, "replay": self.replay, "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterSpec:
        return cls(d["name"], d["skill"], TrainSpec.from_dict(d["train"]), float(d["replay"]))


@dataclass(frozen=True)
class PoolSpec:
    variant: str
    zoo_hash: str  # config hash of the zoo whose base the pool adapts
    adapters: tuple[AdapterSpec, ...]
    lora: LoraSpec = field(default_factory=LoraSpec)
    lora_seed: int = 0  # shared LoRA-A initialisation of every adapter
    threads: int = 1
    workers: int = 1  # training processes; changes no byte (not hashed)
    eval_items: int = 200  # held-out items per task for the manifest's metrics
    task_items: int = 200  # items per split of each adapter's own task file

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": POOL_FORMAT,
            "variant": self.variant,
            "zoo_hash": self.zoo_hash,
            "adapters": [a.to_dict() for a in self.adapters],
            "lora": self.lora.to_dict(),
            "lora_seed": self.lora_seed,
            "threads": self.threads,
            "eval_items": self.eval_items,
            "task_items": self.task_items,
            "targets": list(TARGET_TASKS),
            "skills": pt.skill_signature(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoolSpec:
        if d.get("format") != POOL_FORMAT:
            raise ZooError(f"pool spec format {d.get('format')!r} is not {POOL_FORMAT}")
        return cls(
            variant=d["variant"],
            zoo_hash=d["zoo_hash"],
            adapters=tuple(AdapterSpec.from_dict(a) for a in d["adapters"]),
            lora=LoraSpec.from_dict(d["lora"]),
            lora_seed=int(d["lora_seed"]),
            threads=int(d["threads"]),
            workers=int(d.get("workers", 1)),
            eval_items=int(d["eval_items"]),
            task_items=int(d["task_items"]),
        )

    def config_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def folder_name(self) -> str:
        return f"pool-{self.variant}-{self.config_hash()[:12]}"

    def total_steps(self) -> int:
        return sum(a.train.steps for a in self.adapters)


def pool_spec(variant: str) -> PoolSpec:
    """The built-in pools: ``full`` over the demo zoo's base, ``test`` (tiny, seconds)."""
    from .spec import zoo_spec

    if variant not in POOL_VARIANTS:
        from ..errors import ConfigError

        raise ConfigError(f"pool variant: unknown variant {variant!r}; choose one of {', '.join(POOL_VARIANTS)}")
    zspec = zoo_spec(variant)
    if variant == "full":
        recipes = {
            # skill -> (lr, steps): the ':' skills need a new attention pattern, so more
            # steps; the ciphers reach 100% on their own task in well under 100
            **{s: (3e-3, 100) for s in pt.POOL_SKILLS if s.startswith(("cipher_", "wrongcipher_"))},
            "reverse_digits": (3e-3, 160),
            "sort_upper": (3e-3, 120),
        }
        batch, lora, eval_items, task_items, workers = 128, LoraSpec(rank=8, alpha=16.0), 200, 200, 2
    else:
        recipes = {s: (3e-3, 2) for s in pt.POOL_SKILLS}
        batch, lora, eval_items, task_items, workers = 16, LoraSpec(rank=4, alpha=8.0), 8, 8, 1
    adapters = tuple(
        AdapterSpec(
            name=name,
            skill=name,
            train=TrainSpec(
                steps=recipes[name][1],
                lr=recipes[name][0],
                batch_size=batch,
                warmup=min(20, recipes[name][1] // 4),
                seed=501 + i,
            ),
            replay=0.5,
        )
        for i, name in enumerate(POOL_ORDER)
    )
    return PoolSpec(
        variant=variant,
        zoo_hash=zspec.config_hash(),
        adapters=adapters,
        lora=lora,
        lora_seed=0,
        threads=1,
        workers=workers,
        eval_items=eval_items,
        task_items=task_items,
    )


# --- manifest --------------------------------------------------------------------------


@dataclass
class PoolManifest:
    """A built LoRA pool: its base, adapters (pool order), descriptions and target tasks.

    Paths are absolute in memory and stored relative to ``root`` in ``pool.json`` (when
    they lie inside it), so a pool folder can be moved as a whole.
    """

    root: Path
    name: str
    base: Path
    adapters: dict[str, Path]
    descriptions: dict[str, str]
    target_tasks: dict[str, Path]
    config_hash: str
    build_seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    built_at: str = ""
    cache_hit: bool = False

    def to_dict(self) -> dict[str, Any]:
        def rel(p: Path) -> str:
            p = Path(p)
            try:
                return p.relative_to(self.root).as_posix()
            except ValueError:
                return str(p)

        return {
            "format": POOL_FORMAT,
            "name": self.name,
            "config_hash": self.config_hash,
            "base": rel(self.base),
            "adapters": [{"name": n, "path": rel(p), "description": self.descriptions.get(n, "")} for n, p in self.adapters.items()],
            "target_tasks": {n: rel(p) for n, p in self.target_tasks.items()},
            "build_seconds": round(self.build_seconds, 2),
            "built_at": self.built_at,
            "metrics": self.metrics,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: str | Path) -> PoolManifest:
        """The inverse of :meth:`to_dict`; relative paths are resolved against ``root``."""
        root = Path(root).absolute()

        def path(x: str) -> Path:
            p = Path(x)
            return p if p.is_absolute() else root / p

        if d.get("format") != POOL_FORMAT:
            raise ZooError(f"{root / POOL_MANIFEST}: pool manifest format {d.get('format')!r} is not {POOL_FORMAT}")
        return cls(
            root=root,
            name=d["name"],
            base=path(d["base"]),
            adapters={a["name"]: path(a["path"]) for a in d["adapters"]},
            descriptions={a["name"]: a.get("description", "") for a in d["adapters"]},
            target_tasks={n: path(p) for n, p in d["target_tasks"].items()},
            config_hash=d["config_hash"],
            build_seconds=float(d["build_seconds"]),
            metrics=d.get("metrics", {}),
            config=d.get("config", {}),
            built_at=d.get("built_at", ""),
        )

    def write(self, folder: str | Path | None = None) -> Path:
        """Write ``pool.json`` into ``folder`` (default ``root``); paths relative to ``root``."""
        out = Path(folder) if folder is not None else self.root
        path = out / POOL_MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def load_pool_dir(path: str | Path) -> PoolManifest:
    """A pool from its own folder (the one holding ``pool.json``); ZooError if incomplete."""
    root = Path(path).expanduser().absolute()
    mf = root / POOL_MANIFEST
    if not mf.is_file():
        raise ZooError(f"{root} is not a complete LoRA pool: {POOL_MANIFEST} is missing")
    try:
        manifest = PoolManifest.from_dict(json.loads(mf.read_text(encoding="utf-8")), root)
    except (ValueError, KeyError, TypeError) as err:
        raise ZooError(f"{mf}: unreadable pool manifest ({err})") from err
    for name, p in [("base", manifest.base), *manifest.adapters.items()]:
        if not p.is_dir():
            raise ZooError(f"{mf}: {name} folder {p} is missing")
    return manifest


load_pool_manifest = load_pool_dir
"""Alias under the name ``evomerge serve-pool --pool-dir`` looks for."""


def _read_cached(folder: Path, spec: PoolSpec) -> PoolManifest | None:
    try:
        manifest = load_pool_dir(folder)
    except ZooError:
        return None
    return manifest if manifest.config_hash == spec.config_hash() else None


def load_zoo_pool(variant: str = "full", root: str | Path | None = None) -> PoolManifest:
    """The built pool of ``variant`` under the zoo root; ZooError if it was never built."""
    spec = pool_spec(variant)
    folder = (root_of(root)) / spec.folder_name
    manifest = _read_cached(folder, spec)
    if manifest is None:
        raise ZooError(
            f"no complete {variant!r} LoRA pool in {folder}; build it with `evomerge zoo build --variant {variant} --pool zoo`"
        )
    return manifest


# --- building --------------------------------------------------------------------------


def build_zoo_pool(
    variant: str = "full",
    root: str | Path | None = None,
    progress: Progress | None = None,
    force: bool = False,
    workers: int | None = None,
) -> PoolManifest:
    """Build (or return the cached) LoRA pool ``variant`` over the zoo base of that variant.

    Builds the zoo first when needed (``progress`` then reports its stages too). ``force``
    retrains the pool (not the zoo). ``workers`` overrides the spec's process count (the
    bytes do not depend on it).
    """
    spec = pool_spec(variant)
    if workers is not None:
        spec = dataclasses.replace(spec, workers=max(1, int(workers)))
    base_root = root_of(root)
    final = (base_root / spec.folder_name).absolute()
    cached = None if force else reuse(final, lambda f: _read_cached(f, spec))
    if cached is not None:
        return cached
    zoo = build_zoo(variant, root=base_root, progress=(lambda s, d, t: progress(f"zoo {s}", d, t)) if progress else None)
    if zoo.config_hash != spec.zoo_hash:
        raise ZooError(f"zoo {zoo.root} has config hash {zoo.config_hash[:12]}, the pool expects {spec.zoo_hash[:12]}")
    bars_were_on = quiet_transformers()
    try:
        with staged_build(final, keep_existing=None if force else lambda: _read_cached(final, spec) is not None) as tmp:
            _build_into(spec, zoo.base.path, tmp, final, progress)  # a concurrent build finished first: same bytes
    finally:
        if bars_were_on:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()
    return load_pool_dir(final)


def _build_into(spec: PoolSpec, zoo_base: Path, out: Path, final: Path, progress: Progress | None) -> PoolManifest:
    import torch

    t0 = time.perf_counter()
    shutil.copytree(zoo_base, out / "base")
    tasks_dir = out / "tasks"
    zt.write_task_files(tasks_dir)
    for a in spec.adapters:
        pt.write_skill_task(a.skill, tasks_dir, spec.task_items, spec.task_items)
    dirs = {a.name: str(out / "adapters" / a.name) for a in spec.adapters}
    total = spec.total_steps()
    done = [0]

    def advance(name: str, n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(f"pool {name}", done[0], total)

    if progress is not None:
        progress("pool", 0, total)
    workers = min(spec.workers, os.cpu_count() or 1, len(spec.adapters))
    prev_threads = torch.get_num_threads()
    try:
        if workers <= 1:
            torch.set_num_threads(spec.threads)
            results = {
                a.name: train_adapter(spec, a.name, str(out / "base"), dirs[a.name], report=advance)
                for a in spec.adapters
            }
        else:
            from .worker import run_workers

            scratch = out / ".workers"
            try:
                results = run_workers("evomerge.zoo.pool", spec, {a.name: a.train.steps for a in spec.adapters},
                                      str(out / "base"), dirs, scratch, workers, advance,
                                      what="pool worker for adapter")
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        if progress is not None:
            progress("pool reference merges", total, total)
        torch.set_num_threads(spec.threads)
        reference = reference_merges(spec, out / "base", {a.name: Path(dirs[a.name]) for a in spec.adapters}, tasks_dir)
    finally:
        torch.set_num_threads(prev_threads)
    metrics: dict[str, Any] = {
        "adapters": {name: {**results[name][0], "role": a.role} for name, a in ((a.name, a) for a in spec.adapters)},
        "reference": reference,
        "eval_items": spec.eval_items,
    }
    manifest = PoolManifest(
        root=final,
        name=f"zoo-{spec.variant}",
        base=final / "base",
        adapters={a.name: final / "adapters" / a.name for a in spec.adapters},
        descriptions={a.name: a.description for a in spec.adapters},
        target_tasks={t: final / "tasks" / f"{t}.yaml" for t in TARGET_TASKS},
        config_hash=spec.config_hash(),
        build_seconds=time.perf_counter() - t0,
        metrics=metrics,
        config={
            **spec.to_dict(),
            "workers": spec.workers,
            "roles": {a.name: a.role for a in spec.adapters},
            "train": {a.name: results[a.name][1] for a in spec.adapters},
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    manifest.write(out)  # last: a folder without it is never a complete pool
    return manifest


def train_adapter(spec: PoolSpec, name: str, base_dir: str, out_dir: str, report=None) -> tuple[dict, dict]:
    """Train one pool adapter from the saved base and write it as a PEFT folder.

    Returns (metrics, training record). Runs in a worker process too.
    """
    import torch

    from .quick_eval import accuracy
    from .train import attach_lora, detach_lora, lora_params, lora_state_dict, train
    from .train_members import load_base, save_lora

    torch.set_num_threads(spec.threads)
    adapter = next(a for a in spec.adapters if a.name == name)
    vocab, kw = vocab_kw()
    model = load_base(base_dir)
    wrapped = attach_lora(model, spec.lora, seed=spec.lora_seed)
    mix = pt.adapter_mix(adapter.skill, adapter.replay)
    on_step = (lambda s: report(name, 1)) if report is not None else None
    result = train(model, lora_params(wrapped), adapter.train, mix, vocab, on_step=on_step, sample=pt.sample_batch)
    metrics = {"own": round(accuracy(model, pt.eval_items(adapter.skill, spec.eval_items), vocab, **kw), 2)}
    tasks_dir = Path(base_dir).parent / "tasks"
    for t, exs in target_examples(tasks_dir, spec.eval_items).items():
        metrics[t] = round(accuracy(model, exs, vocab, **kw), 2)
    factors = lora_state_dict(wrapped)
    detach_lora(model, wrapped)
    save_lora(factors, spec.lora, Path(out_dir))
    return metrics, {**result.to_dict(), "mix": mix.to_dict()}


# --- worker processes -------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """Worker entry (``python -m evomerge.zoo.pool``, started by
    :func:`evomerge.zoo.worker.run_workers`): train one adapter."""
    from .worker import worker_main

    return worker_main(argv, PoolSpec.from_dict, train_adapter)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
