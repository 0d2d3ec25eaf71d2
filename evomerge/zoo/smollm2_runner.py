"""SmolLM2 with one resident LoRA slot: trains the pool's adapters and scores merges
(greedy exact match, answer loss) for :mod:`evomerge.zoo.smollm2_pool`."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .smollm2_recipe import EOS_TEXT, TARGET_MODULES, PoolRecipe, Skill

# --- model helpers (training, greedy decoding, answer loss) -------------------------------


class Runner:
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
