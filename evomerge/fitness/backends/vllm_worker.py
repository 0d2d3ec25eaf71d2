"""The evomerge side of a vLLM worker: swaps a MergePlan's weights into the live model.

vLLM mixes this class into each of its workers when an ``LLM`` is built with
``worker_extension_cls="evomerge.fitness.backends.vllm_worker.EvomergeWorkerExtension"``,
and the driver calls its methods on every worker with ``LLM.collective_rpc``. That is
vLLM's public extension point (the one RL frameworks use for weight updates), so nothing
here reaches into private engine attributes that move between releases.

Why the plan travels, not the tensors: the plan is a few kB of JSON that crosses the
driver/engine process boundary as a plain string (tensors passed as RPC arguments arrive
as lists with the default multiprocessing engine), and the worker materializes it on its
own device (the GPU on GPU machines) from the memory-mapped source checkpoints, which the
engine's workers can read because they run on the same host.

Why ``reload_weights``: on CPU, vLLM repacks linear weights into oneDNN handles after
loading (the parameters become empty ``[0]`` tensors), so writing into parameters does
nothing and ``model.load_weights`` alone fails. The worker's ``reload_weights`` wraps the
model's own ``load_weights`` (which maps HF names such as ``q_proj``/``k_proj``/``v_proj``
and ``gate_proj``/``up_proj`` onto vLLM's fused ``qkv_proj``/``gate_up_proj``) in vLLM's
layerwise reload, which re-runs each layer's post-load processing (repacking) and copies
the result into the original storage. A layer only partly sent is processed with its
other shards undefined, silently: the driver checks that every plan covers every tensor
of the checkpoint before it calls here.

This module imports nothing from vLLM at import time and is importable without it.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from typing import Any

_MATERIALIZER_ATTR = "_evomerge_materializer"


def refresh_tied_modules(model: Any) -> list[str]:
    """Re-run post-load processing of modules whose parameters are shared with another
    module (a tied ``lm_head`` and ``embed_tokens``); returns their names.

    Why: on CPU, vLLM's post-load processing caches a packed copy of each linear weight
    (oneDNN / sgl kernels), the tied ``lm_head`` included. ``reload_weights`` re-processes
    only the layers that received tensors, and a tied ``lm_head`` receives none (the loader
    skips it: its weight *is* the embedding), so it kept computing logits from the first
    model's embedding: after a swap, every output differed from the HF backend's although
    swapping back restored the first model exactly. On GPU the embedding method packs
    nothing and this is a cheap no-op. Modules whose weight was already replaced by an
    empty placeholder (repacked linears) are skipped: they are re-processed by the reload.
    """
    owners: dict[int, list[tuple[str, Any]]] = {}
    for mod_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append((mod_name, module))
    refreshed: list[str] = []
    seen: set[int] = set()
    for mods in owners.values():
        if len(mods) < 2:
            continue
        for mod_name, module in mods:
            if id(module) in seen:
                continue
            seen.add(id(module))
            method = getattr(module, "quant_method", None)
            process = getattr(method, "process_weights_after_loading", None)
            params = list(module.parameters(recurse=False))
            if process is None or any(p.numel() == 0 or p.is_meta for p in params):
                continue
            process(module)
            refreshed.append(mod_name)
    return refreshed


class EvomergeWorkerExtension:
    """Methods added to every vLLM worker (names prefixed so they never clash with the
    worker's own). Runs inside vLLM's engine process; ``self`` is the vLLM worker."""

    def evomerge_load_plan(self, plan_json: str, cache_sources: bool = True) -> dict[str, Any]:
        """Materialize the plan on this worker's device and reload the model from it.

        Returns plain data (it crosses a process boundary): ``tensors``, ``bytes``,
        ``seconds``, ``device`` and, when anything failed, ``error`` (one line) and
        ``traceback``. Never raises, so the engine stays up after a bad candidate: a failure
        while streaming ends the stream early, vLLM's reload still finalizes every layer
        (the model stays structurally valid), and the next full plan overwrites it all.
        """
        import torch

        from ...materialize import Materializer
        from ...plan import MergePlan

        t0 = time.perf_counter()
        stats: dict[str, Any] = {"tensors": 0, "bytes": 0, "device": str(self.device)}
        try:
            plan = MergePlan.from_json(plan_json)
            mat = getattr(self, _MATERIALIZER_ATTR, None)
            if mat is None or mat.cache_sources != bool(cache_sources):
                mat = Materializer(device=self.device, cache_sources=bool(cache_sources))
                setattr(self, _MATERIALIZER_ATTR, mat)
            failure: list[BaseException] = []

            def stream() -> Iterator[tuple[str, torch.Tensor]]:
                try:
                    for name, tensor in mat.iter_tensors(plan):
                        stats["tensors"] += 1
                        stats["bytes"] += tensor.numel() * tensor.element_size()
                        yield name, tensor
                except Exception as err:  # noqa: BLE001 - reported to the driver below
                    failure.append(err)

            with torch.no_grad():
                self.reload_weights(weights_iterator=stream(), is_checkpoint_format=True)
                stats["refreshed"] = refresh_tied_modules(self.model_runner.get_model())
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if failure:
                err = failure[0]
                stats["error"] = f"{type(err).__name__}: {err}"
                stats["error_type"] = type(err).__name__
                stats["traceback"] = "".join(traceback.format_exception(err, limit=4))
        except Exception as err:  # noqa: BLE001 - reported to the driver, engine stays up
            stats["error"] = f"{type(err).__name__}: {err}"
            stats["error_type"] = type(err).__name__
            stats["traceback"] = traceback.format_exc(limit=4)
        stats["seconds"] = time.perf_counter() - t0
        return stats

    def evomerge_weights_digest(self) -> dict[str, float]:
        """Sum of |w| per parameter of the model as vLLM holds it (fused names, repacked
        weights included where readable): a cheap fingerprint for tests and debugging."""
        import torch

        model = self.model_runner.get_model()
        out: dict[str, float] = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                out[name] = float(p.detach().float().abs().sum()) if p.numel() else 0.0
        return out
