"""Per-checkpoint metadata the recipe compiler needs, cached per reader object.

Search spaces compile one recipe per candidate, so the tensor names grouped by layer
(:func:`model_info`) and the compatibility check of a set of checkpoints
(:func:`compatible_cached`) are computed once per reader and reused;
:func:`clear_compile_cache` drops both caches.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ..checkpoint.compat import check_compatible
from ..checkpoint.layout import ModelLayout
from ..errors import IncompatibleModelsError
from .params import TensorCtx, gradient_t


@dataclass
class ModelInfo:
    """One checkpoint's reader and layout, with its tensor names grouped by layer."""

    reader: Any
    layout: ModelLayout
    layers: dict[int, list[str]]  # layer index -> tensor suffixes, in the reader's order
    non_layer: list[str]
    contexts: list[TensorCtx] | None = None  # every tensor at its own layer (models mode)

    def whole_model_contexts(self) -> list[TensorCtx]:
        if self.contexts is None:
            n = self.layout.num_layers
            out = []
            for name in self.reader.names:
                layer = self.layout.layer_of(name)
                out.append(TensorCtx.make(name, gradient_t(layer, n) if layer is not None else 0.0, layer))
            self.contexts = out
        return self.contexts


_INFO: dict[int, tuple[Any, ModelInfo]] = {}
_COMPAT: dict[tuple, tuple] = {}
_LOCK = threading.Lock()
_MAX_CACHED = 512  # readers are memoized per path; a rebuilt checkpoint gets a new reader


def model_info(reader: Any) -> ModelInfo:
    """Names of ``reader`` grouped by layer (cached per reader object)."""
    hit = _INFO.get(id(reader))
    if hit is not None and hit[0] is reader:
        return hit[1]
    layout = reader.layout
    layers: dict[int, list[str]] = {}
    non_layer: list[str] = []
    for name in reader.names:
        i = layout.layer_of(name)
        if i is None:
            non_layer.append(name)
        else:
            layers.setdefault(i, []).append(layout.suffix_of(name))
    info = ModelInfo(reader, layout, layers, non_layer)
    with _LOCK:
        if len(_INFO) > _MAX_CACHED:
            _INFO.clear()
        _INFO[id(reader)] = (reader, info)  # holding the reader keeps its id unique
    return info


def compatible_cached(readers: dict[str, Any], same_layer_count: bool, where: str) -> None:
    """check_compatible, once per set of reader objects (tokenizer files are read each time)."""
    key = (tuple((k, id(r)) for k, r in readers.items()), same_layer_count)
    hit = _COMPAT.get(key)
    if hit is not None and all(a is b for a, b in zip(hit, readers.values())):
        return
    try:
        check_compatible(readers, same_layer_count=same_layer_count)
    except IncompatibleModelsError as e:
        raise IncompatibleModelsError(f"{where}: {e}") from None
    with _LOCK:
        if len(_COMPAT) > _MAX_CACHED:
            _COMPAT.clear()
        _COMPAT[key] = tuple(readers.values())


def clear_compile_cache() -> None:
    """Forget every cached :class:`ModelInfo` and compatibility check."""
    with _LOCK:
        _INFO.clear()
        _COMPAT.clear()
