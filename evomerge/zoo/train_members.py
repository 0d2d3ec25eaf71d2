"""The torch steps of a zoo build: train the base and each expert (full or LoRA), measure
them on the zoo's held-out tasks, and save them as HF checkpoints / PEFT adapters.

Everything runs on CPU at the spec's thread count so two builds give the same bytes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from . import tasks as zoo_tasks
from .cache import Progress
from .spec import ZooSpec
from .train import LoraSpec


class StepCounter:
    """Training steps done out of the build's total, reported to ``progress``."""

    def __init__(self, spec: ZooSpec, progress: Progress | None):
        self.total = spec.total_steps()
        self.done = 0
        self.progress = progress

    def advance(self, stage: str, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(stage, self.done, self.total)



def quiet_transformers() -> bool:
    """Turn off transformers' per-file progress bars (the build has its own); returns
    whether they were on."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    return was_on


def train_device():
    """The zoo always trains on CPU, even where CUDA is present: the models are tiny (a GPU
    gains nothing) and CPU kernels at a fixed thread count make the build bit-reproducible,
    which the config-hash cache relies on."""
    import torch

    return torch.device("cpu")


def train_base(spec: ZooSpec, tokenizer, base_dir: Path, counter: StepCounter):
    from .model import new_model
    from .tokenizer import build_vocab
    from .train import train

    vocab = build_vocab(zoo_tasks.SYMBOLS)
    model = new_model(spec.model, tokenizer, spec.init_seed).to(train_device())
    result = train(
        model,
        list(model.parameters()),
        spec.base_train,
        zoo_tasks.BASE_MIX,
        vocab,
        on_step=lambda s: counter.advance("base", 1),
    )
    metrics = heldout_metrics(model, vocab, base_dir.parent / "tasks", spec.eval_items, extra=True)
    save_model(model, tokenizer, base_dir)
    return metrics, {**result.to_dict(), "mix": zoo_tasks.BASE_MIX.to_dict()}


def save_model(model, tokenizer, directory: Path) -> None:
    model = model.to("cpu")
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


def heldout_metrics(model, vocab: dict[str, int], tasks_dir: Path, eval_items: int | None, extra: bool = False) -> dict[str, float]:
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


def train_one_expert(spec: ZooSpec, expert_name: str, base_dir: str, out_dir: str, report=None):
    """Train one expert from the saved base and write it. Runs in a worker process too."""
    import torch

    from .tokenizer import build_vocab, make_tokenizer
    from .train import attach_lora, detach_lora, lora_params, lora_state_dict, train

    torch.set_num_threads(spec.threads)
    expert = next(e for e in spec.experts if e.name == expert_name)
    vocab = build_vocab(zoo_tasks.SYMBOLS)
    tokenizer = make_tokenizer(zoo_tasks.SYMBOLS, model_max_length=spec.model.max_position_embeddings)
    model = load_base(base_dir)
    mix = zoo_tasks.expert_mix(expert.slice, expert.replay)
    on_step = (lambda s: report(expert.name, 1)) if report is not None else None  # one step done
    out = Path(out_dir)
    if expert.kind == "full":
        result = train(model, list(model.parameters()), expert.train, mix, vocab, on_step=on_step)
        metrics = heldout_metrics(model, vocab, Path(base_dir).parent / "tasks", spec.eval_items)
        save_model(model, tokenizer, out)
    else:
        wrapped = attach_lora(model, spec.lora, seed=expert.train.seed)
        result = train(model, lora_params(wrapped), expert.train, mix, vocab, on_step=on_step)
        metrics = heldout_metrics(model, vocab, Path(base_dir).parent / "tasks", spec.eval_items)
        factors = lora_state_dict(wrapped)
        detach_lora(model, wrapped)
        save_lora(factors, spec.lora, out)
    return metrics, {**result.to_dict(), "mix": mix.to_dict()}


def load_base(base_dir: str):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype="float32")
    return model.to(train_device())


def save_lora(factors: dict[str, Any], lora: LoraSpec, out: Path) -> None:
    """A PEFT adapter directory; ``base_model_name_or_path`` is relative to it."""
    from ..checkpoint.lora import save_lora_adapter

    pairs = {}
    for key, a in factors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len("base_model.model.") : -len(".lora_A.weight")]
            pairs[module] = (a, factors[key.replace(".lora_A.", ".lora_B.")])
    save_lora_adapter(out, pairs, r=lora.rank, alpha=lora.alpha, target_modules=list(lora.targets), base_model_path="../../base")


def train_experts(spec: ZooSpec, base_dir: Path, out: Path, counter: StepCounter):
    dirs = {e.name: str(out / ("experts" if e.kind == "full" else "lora") / e.name) for e in spec.experts}
    workers = min(spec.workers, os.cpu_count() or 1, len(spec.experts))
    if workers <= 1:
        results: dict[str, Any] = {}
        for e in spec.experts:
            results[e.name] = train_one_expert(
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
