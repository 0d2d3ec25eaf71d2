"""Where things live in a checkpoint: transformer layers, embeddings, norms, head.

Known families:
- Llama / Mistral / Qwen2 / Gemma style: ``model.layers.N.``; embeddings
  ``model.embed_tokens``; final norm ``model.norm``; head ``lm_head``.
- GPT-2 style: ``transformer.h.N.``; embeddings ``transformer.wte`` / ``wpe``; final norm
  ``transformer.ln_f``; head ``lm_head``.
Anything else falls back to inspecting names: the first ``<prefix>.<int>.`` pattern shared by
most tensors is taken as the layer stack.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

KNOWN_LAYER_PREFIXES = ("model.layers.", "transformer.h.", "model.decoder.layers.", "gpt_neox.layers.")

ATTN_HINTS = ("self_attn", "attn", "attention")
MLP_HINTS = ("mlp", "feed_forward", "ffn")
NORM_HINTS = ("norm", "ln_")
EMBED_HINTS = ("embed_tokens", "wte", "wpe", "embed_in", "embeddings")
HEAD_HINTS = ("lm_head", "embed_out")

KINDS = ("attn", "mlp", "norm", "embed", "head", "other")


@dataclass(frozen=True)
class ModelLayout:
    """Layer structure of one checkpoint, derived from its tensor names (and config)."""

    layer_prefix: str | None  # e.g. "model.layers." ; None when no layer stack was found
    num_layers: int
    tied_embeddings: bool = False

    _pattern_cache = {}

    @property
    def _pattern(self) -> re.Pattern[str] | None:
        if self.layer_prefix is None:
            return None
        pat = ModelLayout._pattern_cache.get(self.layer_prefix)
        if pat is None:
            pat = re.compile("^" + re.escape(self.layer_prefix) + r"(\d+)\.(.*)$")
            ModelLayout._pattern_cache[self.layer_prefix] = pat
        return pat

    def layer_of(self, name: str) -> int | None:
        """Layer index of a tensor name, or None for embeddings/head/final norm."""
        pat = self._pattern
        if pat is None:
            return None
        m = pat.match(name)
        return int(m.group(1)) if m else None

    def suffix_of(self, name: str) -> str:
        """The part of a layer tensor's name after ``<prefix>N.`` (the name itself otherwise)."""
        pat = self._pattern
        m = pat.match(name) if pat is not None else None
        return m.group(2) if m else name

    def rename_layer(self, name: str, new_index: int) -> str:
        """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.<new_index>.mlp.up_proj.weight``."""
        if self.layer_of(name) is None:
            raise ValueError(f"{name!r} is not a layer tensor")
        return f"{self.layer_prefix}{int(new_index)}.{self.suffix_of(name)}"

    def layer_tensor(self, index: int, suffix: str) -> str:
        return f"{self.layer_prefix}{int(index)}.{suffix}"

    @staticmethod
    def kind_of(name: str) -> str:
        """One of KINDS: attn, mlp, norm, embed, head, other (used by per-kind filters)."""
        low = name.lower()
        if any(h in low for h in HEAD_HINTS):
            return "head"
        if any(h in low for h in EMBED_HINTS):
            return "embed"
        if any(h in low for h in NORM_HINTS):
            return "norm"
        if any(h in low for h in ATTN_HINTS):
            return "attn"
        if any(h in low for h in MLP_HINTS):
            return "mlp"
        return "other"


def detect_layout(names: Iterable[str], config: dict | None = None) -> ModelLayout:
    """Find the layer stack from tensor names; ``config`` refines the layer count and ties."""
    names = list(names)
    config = config or {}
    prefix = None
    for p in KNOWN_LAYER_PREFIXES:
        if any(n.startswith(p) for n in names):
            prefix = p
            break
    if prefix is None:  # fall back: most common "<something>.<int>." prefix
        counts: Counter[str] = Counter()
        for n in names:
            m = re.match(r"^(.*?\.)(\d+)\.", n)
            if m:
                counts[m.group(1)] += 1
        if counts:
            prefix = counts.most_common(1)[0][0]
    num_layers = 0
    if prefix is not None:
        pat = re.compile("^" + re.escape(prefix) + r"(\d+)\.")
        idx = [int(m.group(1)) for n in names if (m := pat.match(n))]
        num_layers = max(idx) + 1 if idx else 0
    n_cfg = config.get("num_hidden_layers", config.get("n_layer"))
    if isinstance(n_cfg, int) and n_cfg > num_layers:
        num_layers = n_cfg
    tied = bool(config.get("tie_word_embeddings", False)) or (
        not any(n.startswith("lm_head") for n in names) and any("embed" in n or "wte" in n for n in names)
    )
    return ModelLayout(layer_prefix=prefix, num_layers=num_layers, tied_embeddings=tied)


# -- residual-stream scale invariance (data-flow merging) -----------------------------------
# Families whose decoder layers are pre-norm residual blocks, ``x + f(norm(x))`` twice, with
# scale-invariant norms (RMSNorm / LayerNorm, up to epsilon) and nothing else reading the
# residual stream before the final norm. In these, scaling a layer's residual input by ``s``
# equals dividing the layer's output projections (listed per family, weights and biases) by
# ``s``: a data-flow path with scaled transitions folds into plain weights.
RESIDUAL_OUTPUT_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "llama": ("self_attn.o_proj.", "mlp.down_proj."),
    "mistral": ("self_attn.o_proj.", "mlp.down_proj."),
    "qwen2": ("self_attn.o_proj.", "mlp.down_proj."),
    "qwen3": ("self_attn.o_proj.", "mlp.down_proj."),
    "gemma": ("self_attn.o_proj.", "mlp.down_proj."),
    "phi3": ("self_attn.o_proj.", "mlp.down_proj."),
}
# Why the others are refused (model_type -> reason), for the error message.
NOT_SCALE_INVARIANT = {
    "gemma2": "post-norms on the attention and MLP outputs (rescaling o_proj/down_proj is undone)",
    "gemma3": "post-norms on the attention and MLP outputs (rescaling o_proj/down_proj is undone)",
    "gemma3_text": "post-norms on the attention and MLP outputs (rescaling o_proj/down_proj is undone)",
    "olmo2": "post-norm layers (the update is normalized after the sublayer)",
    "gpt2": "Conv1D output projections (c_proj) not covered by the folding rule",
    "mixtral": "mixture-of-experts MLPs (a router reads the residual stream)",
}


def residual_output_projections(config: dict) -> tuple[str, ...]:
    """Layer-tensor suffix prefixes to rescale for residual-stream scaling, or ValueError.

    The ValueError message is one line naming the model type and why it is refused."""
    mt = str(config.get("model_type") or "")
    if mt in RESIDUAL_OUTPUT_PROJECTIONS:
        return RESIDUAL_OUTPUT_PROJECTIONS[mt]
    why = NOT_SCALE_INVARIANT.get(mt, "not a known pre-norm residual family")
    known = ", ".join(sorted(RESIDUAL_OUTPUT_PROJECTIONS))
    raise ValueError(f"model_type {mt or '?'!r}: {why}; data-flow merging supports {known}")
