""""Can these sources be merged?" — checked from metadata before any tensor is read.

A merge of models that differ in architecture, tensor names, shapes or vocabulary either
crashes halfway through or, worse, silently produces garbage (token ids that mean different
things in each model). :func:`check_compatible` compares every source with the first one and
raises :class:`~evomerge.errors.IncompatibleModelsError` naming the model and the tensor or
config field that differs. A vocabulary size mismatch gets its own message because it is the
most common way merges fail in other tools.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IncompatibleModelsError
from .layout import ModelLayout

VOCAB_KEYS = ("vocab_size", "n_vocab", "padded_vocab_size")
# Files whose content fixes the token -> id mapping, in order of preference.
_VOCAB_FILES = ("vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")


@dataclass
class CompatReport:
    """What the checked sources share (returned by :func:`check_compatible`)."""

    reference: str  # key of the model the others were compared with
    common_names: list[str]
    layout: ModelLayout
    vocab_size: int | None
    tokenizer_hash: str | None
    models: list[str] = field(default_factory=list)


def _vocab_size(config: Mapping[str, Any]) -> int | None:
    for key in VOCAB_KEYS:
        if isinstance(config.get(key), int):
            return int(config[key])
    text = config.get("text_config")
    if isinstance(text, Mapping):
        return _vocab_size(text)
    return None


def list_names(names: list[str], limit: int = 3) -> str:
    """``'a', 'b', 'c' and 4 more``: the first ``limit`` names, for a one-line message."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def tokenizer_vocab(files: list[Path]) -> dict[str, int] | None:
    """token -> id from ``tokenizer.json`` (model vocab plus added tokens), when present."""
    by_name = {p.name: p for p in files}
    tj = by_name.get("tokenizer.json")
    if tj is None:
        return None
    try:
        data = json.loads(tj.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IncompatibleModelsError(f"cannot read tokenizer {tj}: {e}") from None
    vocab: dict[str, int] = {}
    model = data.get("model") or {}
    raw = model.get("vocab")
    if isinstance(raw, dict):
        vocab.update({str(k): int(v) for k, v in raw.items()})
    elif isinstance(raw, list):  # Unigram: [[piece, score], ...]
        vocab.update({str(p[0]): i for i, p in enumerate(raw)})
    for tok in data.get("added_tokens") or []:
        if isinstance(tok, dict) and "content" in tok and "id" in tok:
            vocab[str(tok["content"])] = int(tok["id"])
    return vocab


def tokenizer_fingerprint(files: list[Path]) -> str | None:
    """A hash of what fixes token ids: the tokenizer.json vocab, else the vocab file bytes."""
    vocab = tokenizer_vocab(files)
    h = hashlib.sha256()
    if vocab is not None:
        h.update(json.dumps(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))).encode())
        return h.hexdigest()[:16]
    by_name = {p.name: p for p in files}
    for name in _VOCAB_FILES:
        if name in by_name:
            h.update(name.encode())
            h.update(by_name[name].read_bytes())
            return h.hexdigest()[:16]
    return None


def _compare_tokenizers(ref_key: str, ref, key: str, reader) -> None:
    ref_files, files = ref.tokenizer_files, reader.tokenizer_files
    ref_vocab, vocab = tokenizer_vocab(ref_files), tokenizer_vocab(files)
    if ref_vocab is not None and vocab is not None:
        if ref_vocab == vocab:
            return
        if len(ref_vocab) != len(vocab):
            raise IncompatibleModelsError(
                f"different tokenizers: model {key!r} has {len(vocab)} tokens, model "
                f"{ref_key!r} has {len(ref_vocab)} (tokenizer.json)"
            )
        for tok, i in sorted(ref_vocab.items(), key=lambda kv: kv[1]):
            if vocab.get(tok) != i:
                other = vocab.get(tok)
                raise IncompatibleModelsError(
                    f"different tokenizers: token {tok!r} has id {i} in model {ref_key!r} but "
                    f"{'is missing' if other is None else f'id {other}'} in model {key!r}"
                )
        return
    fa, fb = tokenizer_fingerprint(ref_files), tokenizer_fingerprint(files)
    if fa is None or fb is None:
        which = ref_key if fa is None else key
        raise IncompatibleModelsError(
            f"cannot compare tokenizers: model {which!r} has no tokenizer.json or vocabulary file"
        )
    if fa != fb:
        raise IncompatibleModelsError(
            f"different tokenizers: the vocabulary of model {key!r} differs from model {ref_key!r}"
        )


def check_compatible(
    readers: Mapping[str, Any],
    require_same_tokenizer: bool = True,
    same_layer_count: bool = True,
) -> CompatReport:
    """Check that ``readers`` (key -> reader) can be merged; returns a :class:`CompatReport`.

    Compared with the first model: architecture (``architectures``, ``model_type``),
    vocabulary size, tensor names (missing or extra), shapes and, if
    ``require_same_tokenizer``, the tokenizers (token -> id mapping). With
    ``same_layer_count=False`` models may differ in depth (frankenmerges): then the
    per-layer tensor suffixes and every non-layer tensor must agree instead.
    """
    if not readers:
        raise IncompatibleModelsError("no source models to check")
    keys = list(readers)
    ref_key = keys[0]
    ref = readers[ref_key]
    ref_cfg = ref.config
    ref_vocab = _vocab_size(ref_cfg)
    ref_layout = ref.layout
    ref_names = set(ref.names)

    for key in keys[1:]:
        r = readers[key]
        cfg = r.config
        for field_name in ("model_type", "architectures"):
            a, b = ref_cfg.get(field_name), cfg.get(field_name)
            if a is not None and b is not None and a != b:
                raise IncompatibleModelsError(
                    f"different architectures: model {key!r} has {field_name}={b!r}, model "
                    f"{ref_key!r} has {a!r}"
                )
        vocab = _vocab_size(cfg)
        if ref_vocab is not None and vocab is not None and vocab != ref_vocab:
            raise IncompatibleModelsError(
                f"vocab size mismatch: model {key!r} has vocab_size {vocab}, model {ref_key!r} "
                f"has {ref_vocab}; merging needs one vocabulary (same tokenizer and embedding size)"
            )
        names = set(r.names)
        if same_layer_count:
            missing = sorted(ref_names - names)
            extra = sorted(names - ref_names)
        else:
            missing, extra = _depth_free_diff(ref_layout, ref_names, r.layout, names)
        if missing:
            raise IncompatibleModelsError(
                f"model {key!r} lacks tensor(s) {list_names(missing)} that model {ref_key!r} has"
            )
        if extra:
            raise IncompatibleModelsError(
                f"model {key!r} has tensor(s) {list_names(extra)} that model {ref_key!r} lacks"
            )
        for name in ref.names:
            other = _counterpart(name, ref_layout, r, same_layer_count)
            if other is None:
                continue
            sa, sb = tuple(ref.shape(name)), tuple(r.shape(other))
            if sa != sb:
                kind = ModelLayout.kind_of(name)
                hint = " (different vocab sizes)" if kind in ("embed", "head") and sa[1:] == sb[1:] else ""
                raise IncompatibleModelsError(
                    f"shape mismatch for tensor {other!r}: model {key!r} has {list(sb)}, model "
                    f"{ref_key!r} has {list(sa)}{hint}"
                )
    if require_same_tokenizer:
        _check_tokenizers(readers)
    common = [n for n in ref.names if all(readers[k].has(n) for k in keys)]
    return CompatReport(
        reference=ref_key,
        common_names=common,
        layout=ref_layout,
        vocab_size=ref_vocab,
        tokenizer_hash=tokenizer_fingerprint(ref.tokenizer_files) if ref.tokenizer_files else None,
        models=keys,
    )


def _check_tokenizers(readers: Mapping[str, Any]) -> None:
    """Same token -> id mapping for every source that has tokenizer files.

    A source without tokenizer files is accepted with a warning, as mergekit does: its
    vocabulary size and embedding shapes already match the others (checked above), so its
    ids are taken to mean the same tokens, and the merged model gets the tokenizer of
    ``tokenizer_source`` or of another source. With no tokenizer anywhere: refused.
    """
    with_tok = [k for k, r in readers.items() if r.tokenizer_files]
    without = [k for k in readers if k not in with_tok]
    if not with_tok:
        names = ", ".join(f"{k!r} ({readers[k].path})" for k in readers)
        raise IncompatibleModelsError(
            f"no source model has tokenizer files ({names}); the merged model would have no "
            f"tokenizer: add tokenizer files to one source"
        )
    ref_key = with_tok[0]
    for key in with_tok[1:]:
        _compare_tokenizers(ref_key, readers[ref_key], key, readers[key])
    if without:
        warnings.warn(
            f"model(s) {', '.join(map(repr, without))} have no tokenizer files: merged assuming "
            f"their token ids match {ref_key!r}'s (same vocabulary size); the output takes its "
            f"tokenizer from tokenizer_source or a source that has one",
            stacklevel=3,
        )


def _depth_free_diff(la: ModelLayout, names_a: set[str], lb: ModelLayout, names_b: set[str]):
    """Missing/extra names when layer counts may differ: compare suffixes and the rest."""

    def split(layout: ModelLayout, names: set[str]):
        suffixes, rest = set(), set()
        for n in names:
            if layout.layer_of(n) is None:
                rest.add(n)
            else:
                suffixes.add(f"<layer>.{layout.suffix_of(n)}")
        return suffixes | rest

    a, b = split(la, names_a), split(lb, names_b)
    return sorted(a - b), sorted(b - a)


def _counterpart(name: str, layout: ModelLayout, reader, same_layer_count: bool) -> str | None:
    """The tensor of ``reader`` to compare with ``name`` (layer 0's when depths may differ)."""
    if same_layer_count or layout.layer_of(name) is None:
        return name if reader.has(name) else None
    other = reader.layout.layer_tensor(0, layout.suffix_of(name))
    return other if reader.has(other) else None
