"""Prompt handling shared by the local-weights backends (HF and vLLM), torch-free.

One tokenizer rule for both engines, so their scores agree: memoized encoding with the
tokenizer's special tokens (:func:`encode_cached`), prompts cut to their last tokens when they
would run past the model's positions (:func:`fit_prompts`), lm-eval's context/continuation
split (:func:`encode_pair`), EOS ids from every place a checkpoint declares them
(:func:`collect_eos_ids`) and the dtype names a config may use (:data:`DTYPE_NAMES`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ...errors import BackendError

DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
"""``backend.dtype`` spellings -> canonical dtype name (``auto`` is handled by each backend)."""


def encode_cached(tokenizer: Any, cache: dict[str, list[int]], texts: Sequence[str]) -> list[list[int]]:
    """Token ids of ``texts`` with the tokenizer's special tokens (BOS), memoized in ``cache``
    (the same prompts are encoded for every candidate)."""
    missing = [t for t in dict.fromkeys(texts) if t not in cache]
    if missing:
        ids = tokenizer(list(missing), add_special_tokens=True)["input_ids"]
        cache.update(zip(missing, ids))
    return [cache[t] for t in texts]


def fit_prompts(encoded: list[list[int]], max_new_tokens: int, limit: int | None,
                positions: str) -> list[list[int]]:
    """Keep the last tokens of prompts that would run past ``limit`` positions (as lm-eval
    does), with a warning: models with learned positions fail beyond them.

    Args:
        encoded: token ids per prompt.
        max_new_tokens: tokens to leave free for generation.
        limit: the model's positions (None or 0: no limit, prompts are kept whole).
        positions: what the limit is, for the error (e.g. ``"the model's 2048 positions
            (max_position_embeddings of <dir>)"``).

    Raises:
        BackendError: ``max_new_tokens`` leaves no room for any prompt.
    """
    if not limit:
        return encoded
    room = limit - max_new_tokens
    if room < 1:
        raise BackendError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in {positions}")
    too_long = sum(len(ids) > room for ids in encoded)
    if not too_long:
        return encoded
    warnings.warn(
        f"{too_long} prompt(s) cut to their last {room} tokens to fit max_new_tokens "
        f"{max_new_tokens} in {limit} positions",
        stacklevel=3,  # the caller of the backend's generate()
    )
    return [ids[-room:] if len(ids) > room else ids for ids in encoded]


def encode_pair(encode: Callable[[Sequence[str]], list[list[int]]], tokenizer: Any, context: str,
                continuation: str, fallback_anchor: int) -> tuple[list[int], list[int]]:
    """lm-eval's split: encode context+continuation whole and take the continuation as the
    tokens after the context's encoding (trailing context spaces move over). An empty context
    is replaced by one anchor token to condition on: BOS, else ``fallback_anchor``."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    ctx, whole = encode([stripped, stripped + continuation])
    cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else []
    if not cont:
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not ctx:  # nothing to condition the first token on: use BOS/EOS as lm-eval does
        anchor = tokenizer.bos_token_id
        ctx = [anchor if anchor is not None else fallback_anchor]
    return ctx, cont


def collect_eos_ids(*values: Any) -> list[int]:
    """Sorted EOS ids from each of ``values`` (an int, a list of ints, or None)."""
    eos: set[int] = set()
    for value in values:
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, (list, tuple)):
            eos.update(int(v) for v in value)
    return sorted(eos)
