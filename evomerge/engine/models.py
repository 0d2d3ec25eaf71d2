"""Resolve the model references of a run config into local checkpoint directories.

``zoo:<member>`` names a member of the locally built full zoo (``zoo:base``,
``zoo:expert_a``, ``zoo:lora_b`` ...; `evomerge zoo build` lists them);
``zoo:<variant>/<member>`` picks the variant (``full`` or ``test``). ``org/name`` or
``org/name@revision`` is a Hugging Face Hub id, resolved through the local HF cache (see
:mod:`evomerge.checkpoint.resolve`); an existing local directory of the same spelling wins.

``pool:<adapter>`` (an adapter of an ``evomerge serve-pool`` provider) and
``api:<base_url>`` (an OpenAI-compatible endpoint) are remote: the black-box spaces use them
as they are, and there are no local weights to resolve.

A run records what each reference resolved to in ``models.json`` (Hub models with their
commit hash); resuming or exporting the run resolves Hub ids written without a revision at
that recorded commit, so the run keeps merging the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checkpoint.resolve import ResolvedModel, resolve_ref
from ..config import is_remote_ref
from ..zoo.refs import register_zoo_refs

MODELS_FILE = "models.json"


def resolve_model(ref: str, pinned: str | None = None) -> str:
    if is_remote_ref(ref):
        return ref
    register_zoo_refs()
    return resolve_ref(ref, pinned=pinned).path


def resolve_models_full(models: dict[str, str],
                        pins: dict[str, Any] | None = None) -> dict[str, ResolvedModel]:
    """key -> ResolvedModel (remote refs kept as they are); ``pins``: a run's models.json."""
    register_zoo_refs()
    out = {}
    for key, ref in models.items():
        if is_remote_ref(ref):
            out[key] = ResolvedModel(ref, ref)
            continue
        pin = (pins or {}).get(key) or {}
        pinned = pin.get("revision") if pin.get("ref") == ref else None
        out[key] = resolve_ref(ref, pinned=pinned)
    return out


def resolve_models(models: dict[str, str], pins: dict[str, Any] | None = None) -> dict[str, str]:
    return {k: r.path for k, r in resolve_models_full(models, pins).items()}


def read_pins(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's recorded resolutions (``models.json``), or None for a run without one."""
    p = Path(run_dir) / MODELS_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def pins_of(resolved: dict[str, ResolvedModel]) -> dict[str, Any]:
    return {k: r.to_dict() for k, r in resolved.items()}
