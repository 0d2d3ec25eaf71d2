"""A provider's LoRA pool: one resident base model, many PEFT adapters, merged on demand.

This is the provider side of black-box merging (Evo-Merging, "Black-box Model Merging for
Language-Model-as-a-Service with Massive Model Repositories"): users never see weights, they
send a *control vector* -- per adapter ``i`` a sparsity ``alpha_i`` in [0, 1] and a signed
scale ``beta_i`` -- and get losses and scores back. For every LoRA module ``m``::

    A_m = sum_i beta_i * TopK_{alpha_i}(A_{i,m})     (keep ceil(alpha*numel) largest |A|)
    B_m = sum_i beta_i * B_{i,m}                       (each adapter's lora_alpha/r folded in)
    W_m = W_base_m + B_m @ A_m                         (the merged adapter has scale 1)

The spine is the same as for white-box merges: :meth:`LoraPool.plan` compiles a control
vector into an ordinary :class:`~evomerge.plan.MergePlan` over the adapters' *factor*
tensors (``topk_sum`` for A, ``linear`` without normalization for B), which the standard
:class:`~evomerge.materialize.Materializer` runs (sources are presented by
:class:`FactorReader`, one per adapter, with the reader API the materializer expects).
The dense delta ``B @ A`` is then written into the resident model in place, each time from
a resident copy of the base weights, so candidates never accumulate.

Losses are the mean token cross-entropy of the answer plus EOS given the prompt (teacher
forcing), computed with the HF backend's own tokenization and forward; scores are the
hosted task's scorer (:func:`evomerge.fitness.scoring.evaluate_task`), or exact match of
the stripped greedy answer for uploaded examples.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint.lora import LoraReader, resolve_base_path, save_lora_adapter
from ..checkpoint.reader import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CheckpointReader,
    read_safetensors_header,
)
from ..errors import CheckpointError, EvomergeError
from ..fitness.tasks import Example, Task, TaskSpec
from ..materialize import GENERATION_CONFIG, default_device
from ..plan import MergePlan, TensorRef, TensorStep
from .factors import FactorMaterializer, FactorReader

ALPHA_RANGE = (0.0, 1.0)
BETA_RANGE = (-1.5, 1.5)
METRICS = ("loss", "score")
# Config keys that differ between saves of the same model and say nothing about its weights.
_VOLATILE_CONFIG = {"_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}
_FACTOR_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")


class PoolError(EvomergeError):
    """A LoRA pool cannot be built or a control vector is invalid (one line)."""


# --------------------------------------------------------------------------------------
# What a session evaluates
# --------------------------------------------------------------------------------------
@dataclass
class ExampleSet:
    """Examples to evaluate with the scorer of ``spec`` (a hosted task, or uploaded pairs)."""

    name: str
    spec: TaskSpec
    examples: list[Example]

    @classmethod
    def from_task(cls, task: Task, split: str = "search") -> ExampleSet:
        if task.spec.scoring == "lm_eval":
            raise PoolError(f"task {task.name} ({task.path}) uses lm_eval scoring, which a pool cannot host")
        return cls(task.name, task.spec, list(task.examples(split)))

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, str]], max_new_tokens: int,
                   name: str = "uploaded") -> ExampleSet:
        """Uploaded ``(prompt, answer)`` pairs, scored by exact match of the greedy answer."""
        spec = TaskSpec(name=name, data="(uploaded)", scoring="exact_match",
                        max_new_tokens=int(max_new_tokens))
        return cls(name, spec, [Example(str(p), str(a)) for p, a in pairs])

    def subset(self, indices: Sequence[int] | None) -> ExampleSet:
        if indices is None:
            return self
        return ExampleSet(self.name, self.spec, [self.examples[i] for i in indices])

    def as_task(self) -> Task:
        return Task(spec=self.spec, path=Path(self.name), splits={"search": self.examples})


def answer_losses(backend: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> np.ndarray:
    """Per pair, the mean token cross-entropy of ``answer`` + EOS given ``prompt``.

    Teacher forcing over one forward per batch, with the HF backend's own pieces: the
    prompt/answer token split of :meth:`HFBackend._encode_pair` (lm-eval's rule) and the
    batched log-likelihood of :meth:`HFBackend._loglik_batch`. The EOS token is appended to
    the answer so a model that does not stop after the answer pays for it.
    """
    tok = backend.tokenizer
    eos = tok.eos_token_id if tok.eos_token_id is not None else (backend.eos_ids[0] if backend.eos_ids else None)
    limit = backend.max_length
    seqs: list[tuple[list[int], int]] = []
    for prompt, answer in pairs:
        ctx, cont = backend._encode_pair(prompt, answer) if answer else (backend._encode([prompt])[0], [])
        if not ctx:
            ctx = [tok.bos_token_id if tok.bos_token_id is not None else (eos if eos is not None else backend.pad_id)]
        cont = list(cont) + ([int(eos)] if eos is not None else [])
        if not cont:
            raise PoolError("an example has an empty answer and the tokenizer has no EOS token to score")
        full = ctx + cont
        if limit and len(full) > limit:
            full = full[-int(limit):]
        seqs.append((full, min(len(cont), len(full) - 1)))
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i][0]), i))
    out = np.zeros(len(seqs), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for i, ll in zip(idx, backend._loglik_batch([seqs[i] for i in idx])):
                out[i] = -ll.logprob / max(ll.num_tokens, 1)
    return out


# --------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------
def _config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    for key in sorted(set(a) | set(b)):
        if key in _VOLATILE_CONFIG:
            continue
        if a.get(key) != b.get(key):
            return key
    return None


class LoraPool:
    """Base model + PEFT LoRA adapters sharing its module set and rank, merged on demand.

    Build with :meth:`from_dirs`. All model work (:meth:`evaluate`, exports) runs under one
    lock: the base model is resident once and swapped candidate by candidate.
    """

    def __init__(self, base: str | os.PathLike, adapters: Mapping[str, str | os.PathLike],
                 device: str | None = None, descriptions: Mapping[str, str] | None = None,
                 beta_range: tuple[float, float] = BETA_RANGE, batch_size: int = 64):
        if not adapters:
            raise PoolError("a LoRA pool needs at least one adapter")
        self.device = torch.device(device) if device is not None else default_device()
        self.base_path = Path(base).expanduser().resolve()
        try:
            self.base_reader = CheckpointReader(self.base_path)
        except CheckpointError as err:
            raise PoolError(f"pool base: {err}") from None
        self.names: list[str] = list(adapters)
        self.descriptions = {n: str((descriptions or {}).get(n, "")) for n in self.names}
        self.beta_range = (float(beta_range[0]), float(beta_range[1]))
        self.batch_size = int(batch_size)
        self.adapter_paths: dict[str, Path] = {}
        self.loras: dict[str, LoraReader] = {}
        self._load_adapters(adapters)
        first = self.loras[self.names[0]]
        self.modules: list[str] = first.lora_modules  # dense weight names, natural order
        self.rank = int(first.lora_factors(self.modules[0]).A.shape[0])
        self.transposed = {m: first.lora_transposed(m) for m in self.modules}
        self.fan_in_fan_out = bool(first.adapter_config.get("fan_in_fan_out", False))
        self.readers = {n: FactorReader(self.loras[n]) for n in self.names}
        self._materializer = FactorMaterializer(self.readers, self.device)
        self._factor_buffers = {
            name: torch.empty(self.readers[self.names[0]].shape(name), dtype=torch.float32, device=self.device)
            for name in self.readers[self.names[0]].names
        }
        self.lock = threading.RLock()
        self._backend = None
        self._base_weights: dict[str, torch.Tensor] = {}
        self._loaded: tuple | None = None  # the control vector now in the resident model

    @classmethod
    def from_dirs(cls, base: str | os.PathLike, adapters: Mapping[str, str | os.PathLike],
                  device: str | None = None, descriptions: Mapping[str, str] | None = None,
                  **kwargs: Any) -> LoraPool:
        return cls(base, adapters, device=device, descriptions=descriptions, **kwargs)

    # -- start-up checks -------------------------------------------------------------------
    def _load_adapters(self, adapters: Mapping[str, str | os.PathLike]) -> None:
        ref_modules: list[str] | None = None
        ref_rank: int | None = None
        ref_name = ""
        for name, path in adapters.items():
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
                raise PoolError(f"adapter name {name!r}: use letters, digits, '_', '-' and '.' only")
            p = Path(path).expanduser().resolve()
            where = f"adapter {name!r} ({p})"
            if not (p / ADAPTER_CONFIG).is_file():
                raise PoolError(f"{where} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
            try:
                cfg = json.loads((p / ADAPTER_CONFIG).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise PoolError(f"{where}: cannot read {ADAPTER_CONFIG}: {err}") from None
            declared = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
            if declared:
                try:
                    own_base = resolve_base_path(p, declared)
                except CheckpointError:
                    own_base = None  # not a local folder: the shape checks below still apply
                if own_base is not None and own_base != self.base_path:
                    try:
                        own_cfg = json.loads((own_base / "config.json").read_text(encoding="utf-8"))
                    except (OSError, json.JSONDecodeError):
                        own_cfg = None
                    if isinstance(own_cfg, dict):
                        key = _config_diff(own_cfg, self.base_reader.config)
                        if key is not None:
                            raise PoolError(
                                f"{where} was trained on base {own_base}, whose config differs from the "
                                f"pool base {self.base_path} (field {key!r})"
                            )
            if (p / ADAPTER_WEIGHTS).is_file():
                try:
                    keys = read_safetensors_header(p / ADAPTER_WEIGHTS)
                except CheckpointError as err:
                    raise PoolError(f"{where}: {err}") from None
                odd = sorted(k for k in keys if not _FACTOR_KEY.match(k))
                if odd:
                    raise PoolError(
                        f"{where} has tensor {odd[0]!r}, which is not a LoRA A/B factor (embedding "
                        f"LoRA, LoRA bias and modules_to_save are not part of the pool merge rule)"
                    )
            try:
                lora = LoraReader(p, base=self.base_reader)
            except CheckpointError as err:
                raise PoolError(f"{where}: {err}") from None
            modules = lora.lora_modules
            ranks = {int(lora.lora_factors(m).A.shape[0]) for m in modules}
            if len(ranks) != 1:
                raise PoolError(f"{where} mixes LoRA ranks {sorted(ranks)}; a pool needs one rank")
            rank = ranks.pop()
            if ref_modules is None:
                ref_modules, ref_rank, ref_name = modules, rank, name
            else:
                if modules != ref_modules:
                    extra = sorted(set(modules) - set(ref_modules))
                    missing = sorted(set(ref_modules) - set(modules))
                    what = f"adapts {extra[0]!r}" if extra else f"does not adapt {missing[0]!r}"
                    raise PoolError(
                        f"{where} {what} unlike adapter {ref_name!r}; every pool adapter needs the same module set"
                    )
                if rank != ref_rank:
                    raise PoolError(f"{where} has rank {rank} but adapter {ref_name!r} has rank {ref_rank}")
            self.adapter_paths[name] = p
            self.loras[name] = lora

    # -- the control vector ----------------------------------------------------------------
    def check_control(self, alpha: Any, beta: Any) -> tuple[np.ndarray, np.ndarray]:
        """alpha/beta as float arrays in pool order, or a PoolError naming the bad value."""
        n = len(self.names)
        out = []
        for label, values, (lo, hi) in (("alpha", alpha, ALPHA_RANGE), ("beta", beta, self.beta_range)):
            if isinstance(values, np.ndarray):
                values = values.tolist()
            if not isinstance(values, (list, tuple)):
                raise PoolError(f"{label} must be a list of {n} numbers (one per adapter, pool order)")
            if len(values) != n:
                raise PoolError(f"{label} has {len(values)} values but the pool has {n} adapters")
            arr = np.empty(n, dtype=np.float64)
            for i, v in enumerate(values):
                if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                    raise PoolError(f"{label}[{i}] must be a number, got {v!r}")
                v = float(v)
                if not np.isfinite(v):
                    raise PoolError(f"{label}[{i}] is {v}; every value must be a finite number")
                if not lo <= v <= hi:
                    raise PoolError(f"{label}[{i}] = {v} is out of range [{lo}, {hi}]")
                arr[i] = v
            out.append(arr)
        return out[0], out[1]

    def plan(self, alpha: Any, beta: Any) -> MergePlan:
        """The control vector as a per-tensor MergePlan over the adapters' factor tensors."""
        a, b = self.check_control(alpha, beta)
        steps = []
        for weight in self.modules:
            module = weight[: -len(".weight")]
            for part in ("A", "B"):
                name = f"{module}.lora_{part}.weight"
                inputs = [TensorRef(n, name) for n in self.names]
                if part == "A":
                    steps.append(TensorStep(name, "topk_sum", inputs,
                                            params={"density": a.tolist(), "weight": b.tolist()}))
                else:
                    steps.append(TensorStep(name, "linear", inputs,
                                            params={"weight": b.tolist(), "normalize": False}))
        return MergePlan(
            sources={n: str(self.adapter_paths[n]) for n in self.names},
            steps=steps,
            dtype="float32",
            meta={"method": "evo_lora_pool", "alpha": a.tolist(), "beta": b.tolist(),
                  "factor_plan": True},
        )

    def _materialize_factors(self, alpha: Any, beta: Any) -> dict[str, torch.Tensor]:
        """Run the plan into the pool's factor buffers (valid until the next call)."""
        self._materializer.materialize_into(self.plan(alpha, beta), self._factor_buffers)
        return self._factor_buffers

    def merged_factors(self, alpha: Any, beta: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (A, B)}`` of the merged adapter (module = dense name without .weight;
        copies on CPU, float32, scale 1)."""
        with self.lock:
            bufs = self._materialize_factors(alpha, beta)
            out = {}
            for weight in self.modules:
                module = weight[: -len(".weight")]
                out[module] = (bufs[f"{module}.lora_A.weight"].detach().cpu().clone(),
                               bufs[f"{module}.lora_B.weight"].detach().cpu().clone())
            return out

    # -- the resident model ----------------------------------------------------------------
    @property
    def backend(self):
        """The resident HF model (built on first use; base weights of adapted modules kept)."""
        with self.lock:
            if self._backend is None:
                from ..fitness.backends.hf import HFBackend

                backend = HFBackend(str(self.base_path), device=str(self.device), batch_size=self.batch_size)
                targets = backend.target_tensors()
                for weight in self.modules:
                    if weight not in targets:
                        raise PoolError(f"the pool base model has no parameter {weight!r} that the adapters adapt")
                    self._base_weights[weight] = targets[weight].detach().clone()
                self._targets = targets
                self._backend = backend
                self._loaded = None
            return self._backend

    def load_control(self, alpha: Any, beta: Any) -> dict[str, float]:
        """Put ``W_base + B @ A`` of the merged adapter into the resident model, in place."""
        a, b = self.check_control(alpha, beta)
        key = (tuple(a.tolist()), tuple(b.tolist()))
        with self.lock:
            if self.backend is None:  # builds the resident model (and base copies) on first use
                raise PoolError("the pool's resident model is closed")
            if self._loaded == key:
                return {"seconds": 0.0, "cached": 1.0}
            t0 = time.perf_counter()
            self._loaded = None
            bufs = self._materialize_factors(a, b)
            with torch.no_grad():
                for weight in self.modules:
                    module = weight[: -len(".weight")]
                    A = bufs[f"{module}.lora_A.weight"]
                    B = bufs[f"{module}.lora_B.weight"]
                    dst, w0 = self._targets[weight], self._base_weights[weight]
                    delta = B @ A
                    if self.transposed[weight]:
                        delta = delta.T
                    if dst.dtype == torch.float32:
                        torch.add(w0, delta, out=dst)
                    else:
                        dst.copy_(w0.float() + delta)
            self._loaded = key
            return {"seconds": time.perf_counter() - t0, "cached": 0.0}

    def evaluate(self, examples: ExampleSet | Sequence[tuple[str, str]], alpha: Any, beta: Any,
                 metrics: Sequence[str] = METRICS, indices: Sequence[int] | None = None,
                 max_new_tokens: int = 16) -> dict[str, Any]:
        """Per-example loss and/or score of the merged model on ``examples``.

        Returns ``{"loss", "losses", "score", "scores", "seconds"}``; a metric not asked
        for is None. ``indices`` evaluates a subset (in the given order).
        """
        if not isinstance(examples, ExampleSet):
            examples = ExampleSet.from_pairs(list(examples), max_new_tokens)
        bad = [m for m in metrics if m not in METRICS]
        if bad or not metrics:
            raise PoolError(f"metrics must be a non-empty subset of {list(METRICS)}, got {list(metrics)}")
        if indices is not None:
            n = len(examples.examples)
            for i in indices:
                if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < n:
                    raise PoolError(f"indices: {i!r} is not an example index 0..{n - 1}")
            if not indices:
                raise PoolError("indices: empty list (give null for every example)")
            examples = examples.subset([int(i) for i in indices])
        t0 = time.perf_counter()
        out: dict[str, Any] = {"loss": None, "losses": None, "score": None, "scores": None}
        with self.lock:
            self.load_control(alpha, beta)
            backend = self.backend
            if "loss" in metrics:
                losses = answer_losses(backend, [(ex.prompt, ex.target) for ex in examples.examples],
                                       self.batch_size)
                out["losses"] = [float(x) for x in losses]
                out["loss"] = float(losses.mean())
            if "score" in metrics:
                from ..fitness.scoring import evaluate_task

                scores = evaluate_task(examples.as_task(), "search", backend.generate, backend.loglikelihood)
                out["scores"] = [float(x) for x in scores]
                out["score"] = float(np.mean(scores))
        out["seconds"] = time.perf_counter() - t0
        return out

    # -- exports ---------------------------------------------------------------------------
    def save_merged_adapter(self, alpha: Any, beta: Any, out_dir: str | os.PathLike,
                            base_model_path: str | None = None, overwrite: bool = False) -> Path:
        """The merged adapter as a PEFT folder (lora_alpha = r: scale 1), loadable over the base
        with ``peft.PeftModel.from_pretrained``. ``base_model_path`` defaults to the base
        folder's name (the provider's own path is not written)."""
        factors = self.merged_factors(alpha, beta)
        a, b = self.check_control(alpha, beta)
        path = save_lora_adapter(out_dir, factors, r=self.rank, alpha=float(self.rank), target_modules=None,
                                 base_model_path=base_model_path or self.base_path.name,
                                 fan_in_fan_out=self.fan_in_fan_out, overwrite=overwrite)
        (Path(path) / "evomerge_control.json").write_text(
            json.dumps({"adapters": self.names, "alpha": a.tolist(), "beta": b.tolist()}, indent=2) + "\n",
            encoding="utf-8")
        return Path(path)

    def iter_merged_tensors(self, alpha: Any, beta: Any):
        """``(name, tensor)`` of the full merged checkpoint, in the base's names and dtypes."""
        factors = self.merged_factors(alpha, beta)
        for name in self.base_reader.names:
            w = self.base_reader.get(name)
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module is not None and module in factors:
                A, B = factors[module]
                delta = B @ A
                if self.transposed[name]:
                    delta = delta.T
                w = (w.to(torch.float32) + delta).to(w.dtype)
            yield name, w

    def save_merged_model(self, alpha: Any, beta: Any, out_dir: str | os.PathLike,
                          overwrite: bool = False) -> Path:
        """A full merged HF checkpoint (safetensors, config, tokenizer) through the standard
        checkpoint writer."""
        from ..checkpoint.writer import write_checkpoint

        a, b = self.check_control(alpha, beta)
        extra = [self.base_path / GENERATION_CONFIG] if (self.base_path / GENERATION_CONFIG).is_file() else []
        recipe = {"method": "evo_lora_pool", "adapters": self.names, "alpha": a.tolist(), "beta": b.tolist()}
        card = {"name": Path(out_dir).name, "method": "evo_lora_pool",
                "description": "A merge of a provider's LoRA pool (black-box Evo-Merging control vector).",
                "sources": {n: n for n in self.names}}
        return write_checkpoint(out_dir, self.iter_merged_tensors(a, b), self.base_reader.config,
                                tokenizer_dir=self.base_reader.tokenizer_dir, recipe=recipe, card=card,
                                overwrite=overwrite, extra_files=extra)

    # -- info ------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "base": {"model_type": str(self.base_reader.config.get("model_type", "")),
                     "num_parameters": int(self.base_reader.num_parameters)},
            "adapters": [{"name": n, "description": self.descriptions[n], "rank": self.rank} for n in self.names],
            "control": {"alpha": list(ALPHA_RANGE), "beta": list(self.beta_range)},
        }

    def close(self) -> None:
        with self.lock:
            if self._backend is not None:
                self._backend.close()
            self._backend = None
            self._base_weights.clear()
            self._loaded = None

    def __repr__(self) -> str:
        return f"LoraPool(base={str(self.base_path)!r}, adapters={self.names}, rank={self.rank})"


def temp_export_dir(prefix: str) -> Path:
    """A fresh private temporary folder for one export."""
    return Path(tempfile.mkdtemp(prefix=prefix))
