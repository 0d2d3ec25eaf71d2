"""vLLM backend: one resident ``vllm.LLM`` per worker, each candidate's weights swapped in place.

Starting a vLLM engine costs tens of seconds (minutes on a loaded CPU machine); scoring one
candidate of a small model costs well under a second. So the engine is built once from
``model_dir`` and every candidate's MergePlan is loaded into the live model through vLLM's
public extension points only:

- ``LLM(..., worker_extension_cls=...)`` mixes
  :class:`~evomerge.fitness.backends.vllm_worker.EvomergeWorkerExtension` into vLLM's
  workers, and ``LLM.collective_rpc("evomerge_load_plan", args=(plan_json, ...))`` runs it on
  every worker: the plan (a few kB of JSON) travels, the worker materializes it on its own
  device and reloads through the worker's ``reload_weights`` (the model's own
  ``load_weights``, which maps HF names onto fused ``qkv_proj`` / ``gate_up_proj``, inside
  vLLM's layerwise reload that redoes CPU weight repacking).
- ``LLM.reset_prefix_cache()`` after every swap, so no KV block computed with the previous
  candidate's weights is reused (prefix caching is on by default).

Before any RPC, the plan is checked here from metadata: it must produce every tensor of the
resident checkpoint with the checkpoint's shape (vLLM would otherwise keep stale values for
a missing layer, or process a partly sent fused layer with undefined shards, silently).

Scoring semantics match the HF backend (:mod:`evomerge.fitness.backends.hf`):

- prompts are tokenized here with the checkpoint's own tokenizer exactly as the HF backend
  does (``tokenizer(prompt)``, special tokens included, so the zoo's BOS template applies)
  and given to vLLM as token ids; prompts too long for the positions keep their end;
- generation is greedy (``temperature=0``), ``max_tokens`` per task, the task's stop
  strings, and stop at the EOS ids of both the tokenizer and the generation config; the
  text is decoded here from the token ids (cut at the first EOS, special tokens skipped)
  with the same tokenizer, then cut at the first stop string;
- log-likelihood (multiple choice, neg_perplexity) uses ``prompt_logprobs`` (lm-eval's vLLM
  approach): one request per (context, continuation) with ``max_tokens=1``, summing the
  prompt logprobs of the continuation's tokens (split from the context as the HF backend
  and lm-eval split them). vLLM skips its prefix cache for such requests by itself.

Known difference: vLLM refuses a prompt that fills all ``max_model_len`` positions, so a
log-likelihood sequence longer than ``max_model_len - 1`` tokens keeps one context token
fewer than the HF backend keeps (only at the position limit).

``vllm`` is imported when a backend is built, never when this module is imported, so the
``vllm`` name is registered (and gives a clear error) on machines without vLLM.

Engine processes: with vLLM's default multiprocessing the engine core runs in a child
process, so scripts that build this backend need an ``if __name__ == "__main__":`` guard
(as any vLLM script does; pytest and Ray workers already have one).
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BackendError, CheckpointError, PlanError
from ..scoring import Loglik, evaluate_tasks, truncate_at_stop
from .base import LocalBackend, register_backend
from .prompting import DTYPE_NAMES, collect_eos_ids, encode_pair, fit_prompts
from .vllm_setup import engine_env, import_vllm, read_config, text_config

WORKER_EXTENSION = "evomerge.fitness.backends.vllm_worker.EvomergeWorkerExtension"

_DTYPES = {"auto": "auto", **DTYPE_NAMES}

_TIED_HEAD = "lm_head.weight"


@register_backend("vllm")
class VLLMBackend(LocalBackend):
    """Scores tasks with a resident ``vllm.LLM``; :meth:`load_plan` swaps weights in place.

    Options (``backend.options`` in a run config):

    - ``max_model_len``: positions the engine serves (default and maximum: the model's
      ``max_position_embeddings``);
    - ``dtype`` (``backend.dtype``): ``float32``, ``bfloat16``, ``float16`` or ``auto``;
      unset, as the HF backend: float32 on CPU (so the two agree), the checkpoint's on GPU;
    - ``gpu_memory_utilization``: fraction of GPU memory vLLM may take (GPU only; vLLM's
      default otherwise);
    - ``kv_cache_space``: KV cache size in GiB. On CPU it sets ``VLLM_CPU_KVCACHE_SPACE``
      (an integer, default 1); on GPU it sizes the cache in bytes instead of by utilization;
    - ``block_size``: KV block size (on CPU a multiple of 32; vLLM's default otherwise);
    - ``enforce_eager``: skip compilation / CUDA graphs (default: True on CPU, where
      compiling costs minutes, False on GPU);
    - ``multiprocessing``: run vLLM's engine core in its own process (vLLM's default,
      True). False keeps it in this process: a much faster start, but vLLM's CPU worker then
      pins torch's thread count for the whole process;
    - ``cache_sources``: keep the source tensors (float32) on the worker's device between
      candidates. Default: the run's ``cache_sources`` on CPU, off on GPU (vLLM has given
      most of the GPU memory to its KV cache; sources then stream from the page cache);
    - ``enable_prefix_caching``, ``tensor_parallel_size``, ``seed``: passed to vLLM;
    - ``engine_args``: a mapping of any further ``vllm.LLM`` keyword arguments.

    ``batch_size`` caps the sequences vLLM runs at once (``max_num_seqs``).
    """

    default_batch_size = 128

    def open_model(self, path: Path, dtype: Any, opts: dict[str, Any]) -> None:
        device = self.device
        path = path.absolute()
        config = read_config(path)
        known = {
            "max_model_len", "gpu_memory_utilization", "kv_cache_space", "block_size",
            "enforce_eager", "multiprocessing", "enable_prefix_caching", "tensor_parallel_size",
            "seed", "engine_args", "trust_remote_code", "cache_sources",
        }
        unknown = sorted(set(opts) - known)
        if unknown:
            raise BackendError(
                f"backend.options: unknown option(s) {', '.join(map(repr, unknown))} for the "
                f"vllm backend; known: {', '.join(sorted(known))}"
            )
        if opts.get("trust_remote_code"):
            raise BackendError("backend.options.trust_remote_code: not supported by the vllm backend")

        vllm = import_vllm()
        from vllm.platforms import current_platform

        on_cpu = bool(current_platform.is_cpu())
        platform = "cpu" if on_cpu else str(getattr(current_platform, "device_type", "cuda"))
        if device is not None and str(device).split(":")[0] != platform:
            raise BackendError(
                f"backend.device: {device!r} was asked for, but this vLLM build runs on "
                f"{platform!r} (vLLM picks its device from how it was built)"
            )
        # The driver-side materializer only checks plans (metadata); tensors are made in the
        # engine's workers on their own device.
        self.device = None
        self.platform = platform

        limit = text_config(config).get("max_position_embeddings")
        limit = int(limit) if isinstance(limit, int) and limit > 0 else None
        max_model_len = opts.get("max_model_len")
        if max_model_len is not None:
            max_model_len = int(max_model_len)
            if max_model_len < 2:
                raise BackendError(f"backend.options.max_model_len: must be >= 2, got {max_model_len}")
            if limit is not None and max_model_len > limit:
                raise BackendError(
                    f"backend.options.max_model_len: {max_model_len} exceeds the model's "
                    f"max_position_embeddings {limit} ({path / 'config.json'})"
                )
        else:
            max_model_len = limit

        if dtype is None:  # as the HF backend: float32 on CPU, the checkpoint's dtype on GPU
            dtype = "float32" if on_cpu else "auto"
        dtype_name = str(dtype).removeprefix("torch.").lower()
        if dtype_name not in _DTYPES:
            raise BackendError(
                f"backend.dtype: unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}"
            )
        block_size = opts.get("block_size")
        if block_size is not None:
            block_size = int(block_size)
            if block_size < 1 or (on_cpu and block_size % 32):
                raise BackendError(
                    f"backend.options.block_size: {block_size} is not usable"
                    + (" (vLLM's CPU backend needs a positive multiple of 32)" if on_cpu else "")
                )
        enforce_eager = opts.get("enforce_eager")
        enforce_eager = on_cpu if enforce_eager is None else bool(enforce_eager)
        multiprocessing = bool(opts.get("multiprocessing", True))

        engine: dict[str, Any] = {
            "model": str(path),
            "tokenizer": str(path),
            "dtype": _DTYPES[dtype_name],
            "enforce_eager": enforce_eager,
            "max_num_seqs": self.batch_size,
            "trust_remote_code": False,
            "seed": int(opts.get("seed", 0)),
            "worker_extension_cls": WORKER_EXTENSION,
        }
        if max_model_len is not None:
            engine["max_model_len"] = max_model_len
        if block_size is not None:
            engine["block_size"] = block_size
        for key in ("enable_prefix_caching", "tensor_parallel_size"):
            if opts.get(key) is not None:
                engine[key] = opts[key]
        env: dict[str, str | None] = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocessing else "0",
        }
        kv_space = opts.get("kv_cache_space")
        if on_cpu:
            if kv_space is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                kv_space = 1
            if kv_space is not None:
                if float(kv_space) != int(float(kv_space)) or int(float(kv_space)) < 1:
                    raise BackendError(
                        f"backend.options.kv_cache_space: {kv_space!r} GiB; on CPU it must be a "
                        "whole number of GiB >= 1 (VLLM_CPU_KVCACHE_SPACE)"
                    )
                env["VLLM_CPU_KVCACHE_SPACE"] = str(int(float(kv_space)))
        else:
            if kv_space is not None:
                engine["kv_cache_memory_bytes"] = int(float(kv_space) * (1 << 30))
            if opts.get("gpu_memory_utilization") is not None:
                engine["gpu_memory_utilization"] = float(opts["gpu_memory_utilization"])
        extra = opts.get("engine_args") or {}
        if not isinstance(extra, Mapping):
            raise BackendError("backend.options.engine_args: must be a mapping of vllm.LLM arguments")
        clash = sorted(set(extra) & {"model", "worker_extension_cls", "trust_remote_code"})
        if clash:
            raise BackendError(f"backend.options.engine_args: {', '.join(clash)} cannot be overridden")
        engine.update(extra)
        self.engine_kwargs = dict(engine)
        cache = opts.get("cache_sources")
        self.cache_sources = None if cache is None else bool(cache)

        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{path}: cannot load the tokenizer: {first}") from None

        t0 = time.perf_counter()
        try:
            with engine_env(env):
                self.llm = vllm.LLM(**engine)
        except Exception as err:  # noqa: BLE001 - vLLM raises many kinds; one line for the user
            text = " ".join(str(err).split())
            raise BackendError(
                f"backend vllm: the engine for {path} did not start: {type(err).__name__}: "
                f"{text[:400]}"
            ) from err
        self.start_seconds = time.perf_counter() - t0
        if max_model_len is None:  # no max_position_embeddings: vLLM derived a length
            max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.max_length = int(max_model_len)

        gen_cfg = path / "generation_config.json"
        gen_eos = None
        if gen_cfg.is_file():
            try:
                gen_eos = json.loads(gen_cfg.read_text(encoding="utf-8")).get("eos_token_id")
            except (OSError, ValueError):
                gen_eos = None
        self.eos_ids = collect_eos_ids(gen_eos, text_config(config).get("eos_token_id"),
                                       self.tokenizer.eos_token_id)
        self.tied = bool(text_config(config).get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._weights_ok = True  # False after a failed swap: the weights are then undefined
        self.last_swap: dict[str, Any] = {}

    # -- the resident weights -------------------------------------------------------------

    def target_tensors(self) -> Mapping[str, Any]:
        """Empty: vLLM's weights live in its workers; :meth:`load_plan` swaps them by RPC."""
        return {}

    def _checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:
            from ...checkpoint.opener import open_checkpoint

            reader = open_checkpoint(self.model_dir)
            self._shapes = {n: tuple(reader.shape(n)) for n in reader.names}
        return self._shapes

    def check_plan(self, plan: Any, materializer: Any) -> None:
        """PlanError unless the plan produces exactly the resident checkpoint's tensors, each
        with the checkpoint's shape (metadata only; milliseconds)."""
        readers = materializer.check(plan)
        shapes = self._checkpoint_shapes()
        produced = {}
        for step in plan.steps:
            produced[step.output] = tuple(materializer.output_shape(plan, step, readers))
        for name, shape in produced.items():
            if name not in shapes:
                if name == _TIED_HEAD and self.tied:
                    continue  # the engine's head *is* the embedding; vLLM ignores this tensor
                raise PlanError(
                    f"plan produces tensor {name!r} which the resident model {self.model_dir} lacks"
                )
            if shape != shapes[name]:
                raise PlanError(
                    f"tensor {name!r}: the plan produces shape {list(shape)} but the resident "
                    f"model {self.model_dir} has {list(shapes[name])}"
                )
        missing = [n for n in shapes if n not in produced]
        if missing:
            from ...checkpoint.compat import list_names

            raise PlanError(
                f"the plan does not produce tensor(s) {list_names(missing)} "
                f"of the resident model {self.model_dir}: a vLLM swap must send every tensor "
                f"(missing ones would keep stale or undefined values)"
            )

    def load_plan(self, plan: Any, materializer: Any) -> None:
        """Swap the plan's weights into the live engine: check, RPC, reset the prefix cache."""
        t0 = time.perf_counter()
        self.check_plan(plan, materializer)
        t1 = time.perf_counter()
        cache = self.cache_sources
        if cache is None:  # the run's setting on CPU; on a GPU the KV cache needs the memory
            cache = bool(getattr(materializer, "cache_sources", True)) and self.platform == "cpu"
        self._weights_ok = False
        results = self.llm.collective_rpc("evomerge_load_plan", args=(plan.to_json(), cache))
        t2 = time.perf_counter()
        for r in results:
            if r.get("error"):
                cls = PlanError if r.get("error_type") == "PlanError" else BackendError
                raise cls(f"vLLM worker could not load the plan: {r['error']}")
        if not self.llm.reset_prefix_cache():
            raise BackendError("vLLM refused to reset its prefix cache after a weight swap")
        self._weights_ok = True
        self.last_swap = {
            "check_s": t1 - t0,
            "rpc_s": t2 - t1,
            "worker_s": max(float(r.get("seconds", 0.0)) for r in results),
            "seconds": time.perf_counter() - t0,
            "tensors": int(results[0].get("tensors", 0)),
            "bytes": int(results[0].get("bytes", 0)),
        }

    def _require_weights(self) -> None:
        if not self._weights_ok:
            raise BackendError(
                "the vLLM engine's weights are undefined after a failed swap; load a plan first"
            )

    # -- generation -----------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()
    ) -> list[str]:
        """Greedy completions of ``prompts``, cut at EOS and at the first stop string."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._require_weights()
        if not prompts:
            return []
        encoded = fit_prompts(self._encode(prompts), int(max_new_tokens), self.max_length,
                              f"the engine's {self.max_length} positions "
                              f"(max_model_len for {self.model_dir})")
        if any(not ids for ids in encoded):
            raise BackendError("cannot generate from an empty prompt (the tokenizer adds no BOS)")
        stop = [s for s in stop if s]
        params = SamplingParams(
            n=1,
            temperature=0.0,
            max_tokens=int(max_new_tokens),
            stop=stop or None,
            stop_token_ids=list(self.eos_ids) or None,
            skip_special_tokens=True,
            detokenize=bool(stop),  # vLLM needs text only to find stop strings
        )
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in encoded], params, use_tqdm=False
        )
        texts = []
        eos = set(self.eos_ids)
        for out in outs:
            toks = list(out.outputs[0].token_ids)
            cut = next((k for k, t in enumerate(toks) if t in eos), len(toks))
            texts.append(truncate_at_stop(self._decode(toks[:cut]), stop))
        return texts

    # -- log-likelihood -------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The HF backend's (and lm-eval's) split (:func:`.prompting.encode_pair`); no BOS:
        EOS, else the pad id, else 0."""
        pad = self.tokenizer.pad_token_id
        anchor = self.eos_ids[0] if self.eos_ids else (pad if pad is not None else 0)
        return encode_pair(self._encode, self.tokenizer, context, continuation, anchor)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[Loglik]:
        """Summed log p(continuation | context) and its token count, from prompt logprobs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._require_weights()
        if not requests:
            return []
        room = self.max_length - 1  # vLLM needs one free position after the prompt
        seqs: list[tuple[list[int], int]] = []
        for context, continuation in requests:
            ctx, cont = self._encode_pair(context, continuation)
            full = ctx + cont
            if len(full) > room:
                full = full[-room:]
            seqs.append((full, min(len(cont), len(full) - 1)))
        params = SamplingParams(
            n=1, temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False
        )
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=full) for full, _ in seqs], params, use_tqdm=False
        )
        results = []
        for (full, n_cont), out in zip(seqs, outs):
            plp = out.prompt_logprobs
            if plp is None or len(plp) != len(full):
                raise BackendError("vLLM returned no prompt logprobs for a log-likelihood request")
            total = 0.0
            for pos in range(len(full) - n_cont, len(full)):
                entry = plp[pos]
                if entry is None or full[pos] not in entry:
                    raise BackendError(
                        f"vLLM's prompt logprobs lack token {full[pos]} at position {pos}"
                    )
                total += float(entry[full[pos]].logprob)
            results.append(Loglik(total, n_cont))
        return results

    # -- the Backend contract -------------------------------------------------------------

    def evaluate(self, tasks, split: str = "search") -> dict[str, np.ndarray]:
        self._require_weights()
        return evaluate_tasks(tasks, split, self.generate, self.loglikelihood)

    def close(self) -> None:
        """Stop the engine (its processes too) and free its memory."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception:  # noqa: BLE001 - best effort while tearing down
                pass
        del llm, core, shutdown
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:  # noqa: BLE001 - absent in some releases; nothing else to release
            pass
        self._encode_cache.clear()
