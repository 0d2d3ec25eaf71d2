"""The LoRA pool's reference scores: what a black-box search has to beat (the base, the
uniform merge, the relevant adapters at weight 1 and at the weight best on the search
split), under the one merge rule :func:`evomerge.ops.factor.merge_lora_factors`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import pool_tasks as pt
from . import tasks as zt

if TYPE_CHECKING:
    from .pool import PoolSpec

TARGET_TASKS = ("combined", "cross")


def vocab_kw():
    """The zoo vocabulary and the bos/eos ids :func:`~evomerge.zoo.quick_eval.accuracy` takes."""
    from .tokenizer import build_vocab

    vocab = build_vocab(zt.SYMBOLS)
    return vocab, {"bos_id": vocab["<s>"], "eos_id": vocab["</s>"]}


def target_examples(tasks_dir: Path, n: int, split: str = "heldout") -> dict[str, list]:
    """The first ``n`` examples of each target task's ``split``."""
    return {t: zt.eval_examples(zt.load_records(tasks_dir / f"{t}.{split}.jsonl"))[:n] for t in TARGET_TASKS}


# --- reference merges (what the search has to beat) -------------------------------------


def read_factors(adapter_dir: Path) -> tuple[dict[str, tuple[Any, Any]], float]:
    """Module -> (A, B) of a PEFT adapter folder, and its scale lora_alpha / r."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len("base_model.model.") : -len(".lora_A.weight")]
            pairs[module] = (a, tensors[key.replace(".lora_A.", ".lora_B.")])
    return pairs, float(cfg["lora_alpha"]) / float(cfg["r"])


def merge_deltas(adapters: list[tuple[dict[str, tuple[Any, Any]], float]], alpha, beta) -> dict[str, Any]:
    """Dense weight deltas ``B @ A`` of the black-box merge rule (issue 7,
    :func:`evomerge.ops.factor.merge_lora_factors`): per module, A = sum beta_i
    TopK_{alpha_i}(A_i), B = sum beta_i scale_i B_i. Used here for the pool's reference
    scores only."""
    from ..ops.factor import merge_lora_factors

    merged = merge_lora_factors([p for p, _ in adapters], alpha, beta, scales=[s for _, s in adapters])
    return {f"{module}.weight": b @ a for module, (a, b) in merged.items()}


def reference_merges(spec: PoolSpec, base_dir: Path, adapter_dirs: dict[str, Path], tasks_dir: Path) -> dict[str, Any]:
    """Target scores (held-out) of the base and of control vectors a user could pick
    without search: uniform (beta = 1/N, the LoraHub start), the relevant adapters
    alone at weights 1 and at the weight in {0.2..1} best on the *search* split."""
    import torch

    from .quick_eval import accuracy
    from .train_members import load_base

    vocab, kw = vocab_kw()
    model = load_base(str(base_dir))
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    names = list(adapter_dirs)
    factors = [read_factors(adapter_dirs[n]) for n in names]
    heldout = target_examples(tasks_dir, spec.eval_items, "heldout")
    search = target_examples(tasks_dir, spec.eval_items, "search")

    def scores(beta: list[float], exs: dict[str, list]) -> dict[str, float]:
        deltas = merge_deltas(factors, [1.0] * len(names), beta)
        with torch.no_grad():
            model.load_state_dict({k: v + deltas[k] if k in deltas else v for k, v in state0.items()})
        out = {t: round(accuracy(model, e, vocab, **kw), 2) for t, e in exs.items()}
        out["mean"] = round(sum(out.values()) / len(out), 2)
        return out

    relevant = [pt.POOL_SKILLS[a.skill].role == "relevant" for a in spec.adapters]
    ref: dict[str, Any] = {"base": scores([0.0] * len(names), heldout)}
    ref["uniform"] = {"beta": 1.0 / len(names), **scores([1.0 / len(names)] * len(names), heldout)}
    ref["relevant_1"] = {"beta": 1.0, **scores([1.0 if r else 0.0 for r in relevant], heldout)}
    grid = (0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
    tuned = {b: scores([b if r else 0.0 for r in relevant], search)["mean"] for b in grid}
    best = max(grid, key=lambda b: (tuned[b], -abs(b - 1.0)))
    ref["relevant_tuned"] = {"beta": best, "search_mean": tuned[best], **scores([best if r else 0.0 for r in relevant], heldout)}
    model.load_state_dict(state0)
    return ref
