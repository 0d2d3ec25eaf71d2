"""The model lm-eval talks to when it scores an evomerge task (see :mod:`.lmeval`).

``hflm``: lm-eval's ``HFLM`` around the HF backend's resident module and tokenizer
(:func:`resident_hflm`); ``backend``: an lm-eval ``LM`` answered by any backend's
``generate``/``loglikelihood`` primitives (:func:`make_backend_lm`). :func:`pick_lm` chooses.
lm-eval itself is imported only when a model is built.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Any

from ..errors import TaskError
from .scoring import Generate, Loglikelihood


def make_backend_lm(generate: Generate, loglikelihood: Loglikelihood) -> Any:
    """An lm-eval ``LM`` over an evomerge backend's two primitives (see :class:`BackendLM`)."""
    return _backend_lm_class()(generate, loglikelihood)


@functools.lru_cache(maxsize=1)
def _backend_lm_class() -> type:
    from lm_eval.api.model import LM

    class BackendLM(LM):
        """lm-eval requests answered by an evomerge backend's ``generate`` and
        ``loglikelihood`` (hf, vllm or api: whatever holds the candidate's weights).

        Greedy generation only (the backend's), grouped by (max_gen_toks, until). The
        backends return no "is the continuation greedy" flag, so a plain ``loglikelihood``
        task's ``acc`` and rolling log-likelihood (perplexity) tasks are refused here: they
        need ``model: hflm``.
        """

        def __init__(self, generate: Generate, loglikelihood: Loglikelihood):
            super().__init__()
            self._generate = generate
            self._loglikelihood = loglikelihood

        def loglikelihood(self, requests, disable_tqdm: bool = True):
            pairs = [(str(r.args[0]), str(r.args[1])) for r in requests]
            return [(float(ll.logprob), False) for ll in self._loglikelihood(pairs)]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
            raise TaskError(
                "lm-eval loglikelihood_rolling tasks need model: hflm (the hf backend): "
                "rolling windows are counted in the model's tokens"
            )

        def generate_until(self, requests, disable_tqdm: bool = True):
            groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
            for i, r in enumerate(requests):
                kwargs = dict(r.args[1] or {})
                until = kwargs.get("until") or []
                until = (until,) if isinstance(until, str) else tuple(until)
                max_toks = int(kwargs.get("max_gen_toks", 256))
                groups.setdefault((max_toks, until), []).append(i)
            out = [""] * len(requests)
            for (max_toks, until), idx in groups.items():
                texts = self._generate([str(requests[i].args[0]) for i in idx], max_toks, list(until))
                for i, text in zip(idx, texts):
                    out[i] = text
            return out

    return BackendLM


_TOKEN_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], tuple[int, ...]]] = (
    weakref.WeakKeyDictionary()
)


@functools.lru_cache(maxsize=1)
def _hflm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class ResidentHFLM(HFLM):
        """lm-eval's HFLM without progress bars (one set per candidate otherwise) and with
        token ids memoized per tokenizer: every candidate is asked the same requests, and
        re-tokenizing them was ~30% of a multiple-choice evaluation of the zoo here."""

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            if kwargs:
                return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
            cache = _TOKEN_CACHE.setdefault(self.tokenizer, {})
            key = (string, add_special_tokens, left_truncate_len)
            ids = cache.get(key)
            if ids is None:
                ids = cache[key] = tuple(super().tok_encode(string, add_special_tokens, left_truncate_len))
            return list(ids)

        def loglikelihood(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = True):
            return super().generate_until(requests, disable_tqdm=True)

    return ResidentHFLM


def _resident_hf(generate: Any) -> Any | None:
    """The backend object owning ``generate`` when it holds a transformers model and its
    tokenizer (the hf backend), else None."""
    owner = getattr(generate, "__self__", None)
    model = getattr(owner, "model", None)
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a base dependency
        return None
    if isinstance(model, PreTrainedModel) and getattr(owner, "tokenizer", None) is not None:
        return owner
    return None


def resident_hflm(model: Any, tokenizer: Any, batch_size: int = 64) -> Any:
    """lm-eval's HFLM around an already-built (resident) model: no copy, no disk."""
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)  # "pretrained is not a str" warnings: intended here
    try:
        return _hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size))
    finally:
        log.setLevel(level)


def pick_lm(mode: str, generate: Generate, loglikelihood: Loglikelihood, where: str) -> tuple[Any, bool]:
    """(the lm-eval model to use, whether it is lm-eval's HFLM on the resident model)."""
    owner = _resident_hf(generate)
    if mode == "hflm" and owner is None:
        raise TaskError(
            f"{where}: model: hflm needs the hf backend (a resident transformers model); "
            "use model: backend (or auto) with this backend"
        )
    if mode != "backend" and owner is not None:
        return resident_hflm(owner.model, owner.tokenizer, getattr(owner, "batch_size", 64)), True
    return make_backend_lm(generate, loglikelihood), False
