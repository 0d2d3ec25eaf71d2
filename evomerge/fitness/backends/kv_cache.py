"""The KV cache of a hand-written decoding loop, across transformers versions.

transformers 5.x renamed the model's cache argument and output from ``past_key_values`` to
``cache`` (the old name warns ``FutureWarning: past_key_values is deprecated`` and goes away
in 5.40); 4.x only knows ``past_key_values``. A loop keeps its own :class:`DynamicCache`
(updated in place by every forward, in both versions), passes it under the name this model's
``forward`` takes, and never reads it back from the output.
"""

from __future__ import annotations

import inspect
from typing import Any


def new_cache(model: Any) -> Any:
    """An empty dynamic cache for ``model``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x: no config argument
        return DynamicCache()


def cache_kwarg(model: Any) -> str:
    """``"cache"`` where the model's forward takes it (transformers >= 5.x), else
    ``"past_key_values"``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def last_logits_kwargs(model: Any) -> dict[str, int]:
    """Ask the model for the last position's logits only (``logits_to_keep``; 4.45 names it
    ``num_logits_to_keep``; nothing when the model takes neither)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}
