"""HF transformers backend: one resident model, scored in place candidate after candidate.

The model is built once from ``model_dir`` (safetensors only, ``trust_remote_code`` off
unless the options turn it on) and never rebuilt: the materializer writes each candidate's
weights into :meth:`HFBackend.target_tensors` in place (``copy_``), so there is no disk
round trip and no reallocation per candidate.

Generation is greedy and deterministic, batched with *left* padding, an explicit attention
mask and explicit position ids (each row's positions count from its first real token, so a
padded row computes exactly what it would alone). The default is a small greedy loop over
the model's forward with a KV cache: for tiny models it is several times faster than
``generate()`` (whose per-step bookkeeping dominates when the model itself costs ~1 ms);
``generation="generate"`` uses ``model.generate`` instead, and both give the same outputs.
A row stops at EOS, at ``max_new_tokens``, or when one of the task's stop strings appears;
a batch stops when all its rows have. Prompts are sorted by length before batching (less
padding), and results are returned in the original order.

Log-likelihood tasks (multiple choice, negative perplexity) take one forward pass per batch
of (context, continuation) pairs, right-padded, reading only the continuation positions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...devices import check_device
from ...errors import BackendError, CheckpointError
from ..scoring import Loglik, evaluate_tasks, truncate_at_stop
from .base import LocalBackend, register_backend
from .prompting import DTYPE_NAMES, collect_eos_ids, encode_pair, fit_prompts


def _resolve_dtype(dtype: Any, device: torch.device) -> Any:
    """None: float32 on CPU (bf16 matmuls are slow there), the checkpoint's dtype on CUDA."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else "auto"
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return getattr(torch, DTYPE_NAMES[str(dtype).lower()])
    except KeyError:
        raise BackendError(
            f"backend.dtype: unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPE_NAMES)}"
        ) from None


def _check_checkpoint(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory not found: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: no config.json (not a Hugging Face checkpoint)")
    if not any(name.endswith(".safetensors") for name in os.listdir(model_dir)):
        raise CheckpointError(
            f"{model_dir}: no .safetensors weights (pickled .bin weights are refused for safety)"
        )


@register_backend("hf")
class HFBackend(LocalBackend):
    """Scores tasks with a resident ``AutoModelForCausalLM``.

    Options: ``trust_remote_code`` (default False), ``attn_implementation`` (default: the
    model's), ``generation`` ("loop", the default custom greedy loop, or "generate"),
    ``loglik_batch_size`` (default ``batch_size``).
    """

    default_batch_size = 64

    def open_model(self, path: Path, dtype: Any, opts: dict[str, Any]) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        _check_checkpoint(path)
        self.torch_device = check_device(self.device, "backend.device") or torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.loglik_batch_size = int(opts.get("loglik_batch_size", self.batch_size))
        self.generation = opts.get("generation", "loop")
        if self.generation not in ("loop", "generate"):
            raise BackendError(
                f"backend.generation: unknown mode {self.generation!r}; use 'loop' or 'generate'"
            )
        trust = bool(opts.get("trust_remote_code", False))
        load_kwargs: dict[str, Any] = {
            "dtype": _resolve_dtype(dtype, self.torch_device),
            "use_safetensors": True,
            "trust_remote_code": trust,
        }
        if opts.get("attn_implementation"):
            load_kwargs["attn_implementation"] = opts["attn_implementation"]

        max_layers = opts.get("max_layers")
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            if max_layers is not None:
                load_kwargs["config"] = _deeper_config(path, int(max_layers), trust)
            verbosity = hf_logging.get_verbosity()
            if max_layers is not None:  # the extra slots are "newly initialized": expected
                hf_logging.set_verbosity_error()
            try:
                model = AutoModelForCausalLM.from_pretrained(str(path), **load_kwargs)
            finally:
                hf_logging.set_verbosity(verbosity)
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust)
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{path}: cannot load model/tokenizer: {first}") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()

        model.to(self.torch_device)
        model.eval()
        model.requires_grad_(False)  # in-place writes to parameters need no autograd
        self.model = model
        self.tokenizer = tokenizer

        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        self.eos_ids = collect_eos_ids(gen_eos, tokenizer.eos_token_id)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
            elif tokenizer.unk_token is not None:
                tokenizer.pad_token = tokenizer.unk_token
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._eos_tensor = torch.tensor(self.eos_ids or [-1], device=self.torch_device)
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_length = int(limit) if isinstance(limit, int) and limit > 0 else None
        self.layer_slots = LayerSlots(model)

    # -- the resident weights -------------------------------------------------------------

    def target_tensors(self) -> Mapping[str, torch.Tensor]:
        """Every state-dict tensor by HF name (tied names share one tensor), not copies.

        ``state_dict(keep_vars=True)`` lists parameters and persistent buffers under the names
        checkpoints use, once per name, so a tied ``lm_head.weight`` is the very tensor of
        ``model.embed_tokens.weight``. Non-persistent buffers (rotary tables) are derived
        from the config and are not weights.
        """
        return dict(self.model.state_dict(keep_vars=True))

    def load_plan(self, plan: Any, materializer: Any) -> None:
        """Write the plan's weights in place; a plan with fewer layers than the resident model
        holds (``max_layers``: data-flow paths) first shortens the active layer stack."""
        self.layer_slots.activate(self.layer_slots.layers_of(plan))
        materializer.materialize_into(plan, self.target_tensors())

    # -- generation -----------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()
    ) -> list[str]:
        """Greedy completions of ``prompts``, cut at EOS and at the first stop string."""
        if not prompts:
            return []
        encoded = fit_prompts(self._encode(prompts), int(max_new_tokens), self.max_length,
                              f"the model's {self.max_length} positions "
                              f"(max_position_embeddings of {self.model_dir})")
        order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
        outputs: list[str] = [""] * len(prompts)
        run = self._generate_loop if self.generation == "loop" else self._generate_hf
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                texts = run([encoded[i] for i in idx], int(max_new_tokens), list(stop))
                for i, text in zip(idx, texts):
                    outputs[i] = truncate_at_stop(text, stop)
        return outputs

    def _left_pad(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, ids in enumerate(batch):
            if ids:
                input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                mask[r, width - len(ids) :] = 1
        return input_ids.to(self.torch_device), mask.to(self.torch_device)

    def _finish(self, rows: list[list[int]]) -> list[str]:
        texts = []
        for toks in rows:
            cut = len(toks)
            for k, t in enumerate(toks):
                if t in self.eos_ids:
                    cut = k
                    break
            texts.append(self._decode(toks[:cut]))
        return texts

    def _generate_loop(
        self, batch: list[list[int]], max_new_tokens: int, stop: list[str]
    ) -> list[str]:
        from .kv_cache import cache_kwarg, last_logits_kwargs, new_cache

        if any(not ids for ids in batch):
            raise BackendError("cannot generate from an empty prompt (the tokenizer adds no BOS)")
        input_ids, mask = self._left_pad(batch)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        cache = {cache_kwarg(self.model): new_cache(self.model)}  # updated in place by forward
        n = len(batch)
        finished = torch.zeros(n, dtype=torch.bool, device=self.torch_device)
        generated: list[torch.Tensor] = []
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **last_logits_kwargs(self.model),
            **cache,
        )
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1, :].argmax(dim=-1)
            nxt = torch.where(finished, torch.full_like(nxt, self.pad_id), nxt)
            generated.append(nxt)
            finished |= torch.isin(nxt, self._eos_tensor)
            if stop and not bool(finished.all()):
                toks = torch.stack(generated, dim=1).tolist()
                for r in (~finished).nonzero().flatten().tolist():
                    text = self._decode(toks[r])
                    if any(s in text for s in stop):
                        finished[r] = True
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **cache,
            )
        return self._finish(torch.stack(generated, dim=1).tolist())

    def _generate_hf(
        self, batch: list[list[int]], max_new_tokens: int, stop: list[str]
    ) -> list[str]:
        input_ids, mask = self._left_pad(batch)
        kwargs: dict[str, Any] = {}
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pad_id,
            **kwargs,
        )
        return self._finish(out[:, input_ids.shape[1] :].tolist())

    # -- log-likelihood -------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split (:func:`.prompting.encode_pair`); no BOS: EOS, else the pad id."""
        anchor = self.eos_ids[0] if self.eos_ids else self.pad_id
        return encode_pair(self._encode, self.tokenizer, context, continuation, anchor)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[Loglik]:
        """Summed log p(continuation | context) and its token count, per request."""
        if not requests:
            return []
        limit = self.max_length
        seqs: list[tuple[list[int], int]] = []
        for context, continuation in requests:
            ctx, cont = self._encode_pair(context, continuation)
            full = ctx + cont
            if limit and len(full) > limit:  # keep the end: the continuation and nearest context
                full = full[-int(limit) :]
            seqs.append((full, min(len(cont), len(full) - 1)))
        order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i][0]), i))
        results: list[Loglik | None] = [None] * len(seqs)
        with torch.inference_mode():
            for start in range(0, len(order), self.loglik_batch_size):
                idx = order[start : start + self.loglik_batch_size]
                for i, ll in zip(idx, self._loglik_batch([seqs[i] for i in idx])):
                    results[i] = ll
        return results  # type: ignore[return-value]

    def _loglik_batch(self, batch: list[tuple[list[int], int]]) -> list[Loglik]:
        width = max(len(full) for full, _ in batch) - 1
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, (full, n_cont) in enumerate(batch):
            inp = full[:-1]
            input_ids[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            mask[r, : len(inp)] = 1
            first = len(full) - 1 - n_cont  # position whose logits predict the first cont token
            rows += [r] * n_cont
            cols += range(first, len(full) - 1)
            targets += full[len(full) - n_cont :]
        logits = self.model(
            input_ids=input_ids.to(self.torch_device),
            attention_mask=mask.to(self.torch_device),
            use_cache=False,
        ).logits
        dev = logits.device
        picked = logits[torch.tensor(rows, dtype=torch.long, device=dev),
                        torch.tensor(cols, dtype=torch.long, device=dev)]
        picked = picked.float().log_softmax(dim=-1)
        token_lp = picked.gather(1, torch.tensor(targets, dtype=torch.long, device=picked.device)[:, None])[:, 0]
        per_row = torch.zeros(len(batch), dtype=torch.float64)
        per_row.index_add_(0, torch.tensor(rows, dtype=torch.long), token_lp.double().cpu())
        return [Loglik(float(per_row[r]), n_cont) for r, (_, n_cont) in enumerate(batch)]

    # -- the Backend contract -------------------------------------------------------------

    def evaluate(self, tasks, split: str = "search") -> dict[str, np.ndarray]:
        return evaluate_tasks(tasks, split, self.generate, self.loglikelihood)

    def close(self) -> None:
        self.model = None
        self._encode_cache.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _deeper_config(path: Path, layers: int, trust: bool) -> Any:
    """The checkpoint's config with ``layers`` decoder layers (room for longer layer paths)."""
    from transformers import AutoConfig

    if layers < 1:
        raise BackendError(f"backend.options.max_layers: must be >= 1, got {layers}")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise BackendError(f"backend.options.max_layers: {path} has no num_hidden_layers")
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) != layers:
        if len(set(map(str, types))) > 1:
            raise BackendError(f"backend.options.max_layers: {path} mixes layer types "
                               f"{sorted(set(map(str, types)))}; cannot add uniform slots")
        config.layer_types = [types[0]] * layers
    config.num_hidden_layers = layers
    return config


class LayerSlots:
    """The resident decoder stack as slots: the first ``n`` are active for the current plan.

    Shortening swaps in a ``ModuleList`` of references to the first ``n`` layer modules (no
    copies; each keeps its ``layer_idx``, so KV-cache indexing stays right) and sets
    ``config.num_hidden_layers`` (and ``layer_types``), which the cache and the masks read.
    ``state_dict`` then lists exactly the active layers, so the materializer's completeness
    check covers every weight the forward uses.
    """

    PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")

    def __init__(self, model: Any):
        self.model = model
        self.parent, self.attr, self.all, self.path = None, None, None, ""
        for p in self.PATHS:
            parent_path, _, attr = p.rpartition(".")
            try:
                parent = model.get_submodule(parent_path)
            except AttributeError:
                continue
            if isinstance(getattr(parent, attr, None), torch.nn.ModuleList):
                self.parent, self.attr, self.path = parent, attr, p
                self.all = list(getattr(parent, attr))
                break
        self.types = getattr(model.config, "layer_types", None)
        self.count_key = "n_layer" if hasattr(model.config, "n_layer") else "num_hidden_layers"
        self.active = len(self.all) if self.all is not None else None

    @property
    def capacity(self) -> int | None:
        return len(self.all) if self.all is not None else None

    def layers_of(self, plan: Any) -> int | None:
        """Layers a plan produces: its layer-count override, else its highest layer + 1."""
        over = getattr(plan, "config_overrides", None) or {}
        n = over.get("num_hidden_layers", over.get("n_layer"))
        if isinstance(n, int):
            return int(n)
        prefix = f"{self.path}."
        idx = [int(head) for name in plan.output_names if name.startswith(prefix)
               and (head := name[len(prefix):].partition(".")[0]).isdigit()]
        return max(idx) + 1 if idx else self.capacity

    def activate(self, n: int | None) -> None:
        if n is None or self.all is None or n == self.active:
            return
        if not 1 <= n <= len(self.all):
            raise BackendError(
                f"the plan has {n} layers but the resident model holds {len(self.all)} "
                f"(raise backend.options.max_layers)")
        setattr(self.parent, self.attr, torch.nn.ModuleList(self.all[:n]))
        setattr(self.model.config, self.count_key, n)
        if isinstance(self.types, list):
            self.model.config.layer_types = list(self.types[:n])
        self.active = n
